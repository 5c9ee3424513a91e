"""GradCache under DDP and FSDP2 on 2 gloo processes equals one process with the global batch.

Each rank takes its half of a global batch of 24 (chunks of 5: uneven), the loss is mmfast's
ClipLoss (local_loss, gather_with_grad) plus SigLipLoss across ranks, and the head's gradients are
averaged over ranks as the trainer does. In float64 every parameter's gradient must match the
one-process full-batch gradient to 1e-10 with ClipLoss; with SigLipLoss added, to 1e-6 (its
cross-rank negatives term computes in float32 even for float64 features). With DDP, a comm hook counts the all-reduces: one per
bucket per step (no_sync on all but the last chunk), not one per chunk. Bounded: 60 s for the
process group, 180 s for the whole test.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import torch
import torch.distributed as dist

from tests.dist_utils import free_port, spawn_bounded
from tests.test_gradcache import TextTower, assert_grads_close, make_inputs

WORLD, N, CHUNK = 2, 24, 5
DEADLINE_S = 180


class Head(torch.nn.Module):
    def __init__(self, rank: int, world: int, siglip: bool) -> None:
        super().__init__()
        self.use_siglip = siglip
        from mmfast.nn import ClipLoss, SigLipLoss  # noqa: PLC0415

        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))
        kw = dict(rank=rank, world_size=world, backend="reference")
        self.clip = ClipLoss(local_loss=True, gather_with_grad=True, **kw)
        self.siglip = SigLipLoss(**kw)

    def forward(self, x, y):
        s = self.logit_scale.exp()
        if self.use_siglip:
            return self.clip(x, y, s) + 0.5 * self.siglip(x, y, s, self.logit_bias)
        return self.clip(x, y, s) + 0.0 * self.logit_bias


class ImageTower(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(12, 16), torch.nn.Linear(16, 8)])

    def forward(self, x):
        return torch.nn.functional.normalize(self.blocks[1](torch.tanh(self.blocks[0](x))), dim=-1)


def _reference(img, txt, images, texts, siglip):
    """One process, the whole global batch, no chunks."""
    head = Head(0, 1, siglip)
    head(img(images), txt(**texts)).backward()
    return head


def _check(rank, got, want, tag, siglip):
    try:
        assert_grads_close(got, want, 1e-6 if siglip else 1e-10)
    except AssertionError as e:
        raise AssertionError(f"{tag} rank {rank}: {e}") from e


def _ddp_case(rank, img0, txt0, images, texts, want, siglip):
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

    from mmfast.train import GradCache  # noqa: PLC0415
    from mmfast.train.distributed import average_gradients  # noqa: PLC0415

    calls = {"image": 0, "text": 0}

    def counting(name):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: PLC0415

        def hook(state, bucket):
            calls[name] += 1
            return allreduce_hook(state, bucket)

        return hook

    img, txt, head = DDP(copy.deepcopy(img0)), DDP(copy.deepcopy(txt0)), Head(rank, WORLD, siglip)
    img.register_comm_hook(None, counting("image"))
    txt.register_comm_hook(None, counting("text"))
    GradCache(img, txt, head, CHUNK).step(images, texts)
    average_gradients(list(head.parameters()), WORLD)
    _check(rank, (img.module, txt.module, head), want, f"DDP siglip={siglip}", siglip)
    assert calls == {"image": 1, "text": 1}, f"rank {rank}: all-reduce calls per tower {calls}, expected 1 each"


def _fsdp_case(rank, img0, txt0, images, texts, want, siglip):
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    from mmfast.train import GradCache  # noqa: PLC0415
    from mmfast.train.distributed import average_gradients  # noqa: PLC0415

    img, txt, head = copy.deepcopy(img0), copy.deepcopy(txt0), Head(rank, WORLD, siglip)
    for block in img.blocks:
        fully_shard(block)
    fully_shard(img)
    fully_shard(txt)
    GradCache(img, txt, head, CHUNK).step(images, texts)
    average_gradients(list(head.parameters()), WORLD)
    for mod in (img, txt):
        for p in mod.parameters():
            p.grad = p.grad.full_tensor()
    _check(rank, (img, txt, head), want, f"FSDP2 siglip={siglip}", siglip)


def _worker(rank: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        torch.manual_seed(0)  # the same weights and global batch on every rank
        img0, txt0 = ImageTower().double(), TextTower(p=0.0).double()
        images, texts = make_inputs(N, torch.float64)
        rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        local_images, local_texts = images[rows], {k: v[rows] for k, v in texts.items()}
        for siglip in (False, True):
            ref_img, ref_txt = copy.deepcopy(img0), copy.deepcopy(txt0)
            want = (ref_img, ref_txt, _reference(ref_img, ref_txt, images, texts, siglip))
            _ddp_case(rank, img0, txt0, local_images, local_texts, want, siglip)
            _fsdp_case(rank, img0, txt0, local_images, local_texts, want, siglip)
    finally:
        dist.destroy_process_group()


def test_gradcache_ddp_and_fsdp2_equal_one_process():
    spawn_bounded(_worker, WORLD, (free_port(),), DEADLINE_S, "distributed GradCache test")
