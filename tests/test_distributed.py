"""ClipLoss / SigLipLoss with world_size = 2 on gloo (loopback), against open_clip's classes.

Two processes are spawned with torch.multiprocessing; every case runs in the same pair of
processes (start-up dominates). Each rank compares, on its own features, the loss and the
gradients of its features, logit_scale and logit_bias; a failing assertion in a rank fails the
test with that rank's traceback. Bounded: 60 s for the process group, 240 s for the whole run.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import free_port, spawn_bounded
from tests.nn_utils import load_open_clip_loss

pytestmark = pytest.mark.skipif(load_open_clip_loss() is None, reason="open_clip not installed")

WORLD = 2
DEADLINE_S = 240


def _case(make_ref, make_new, rank: int, with_bias: bool, tag: str) -> None:
    torch.manual_seed(1234 + rank)  # different features on each rank
    n, d = 6, 16
    x0 = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    y0 = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    results = []
    for make in (make_ref, make_new):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        s = torch.tensor(2.0, requires_grad=True)
        b = torch.tensor(-3.0, requires_grad=True)
        loss_fn = make(rank)
        loss = loss_fn(x, y, s.exp(), b) if with_bias else loss_fn(x, y, s.exp())
        loss.backward()
        results.append((loss.detach(), x.grad, y.grad, s.grad, b.grad if with_bias else None))
    names = ("loss", "grad image", "grad text", "grad logit_scale", "grad logit_bias")
    for name, got, want in zip(names, results[1], results[0]):
        if want is not None:
            torch.testing.assert_close(
                got, want, atol=1e-5, rtol=1e-5, msg=lambda m, nm=name: f"{tag} rank {rank} {nm}: {m}"
            )


def _worker(rank: int, port: int) -> None:
    from mmfast.nn import ClipLoss, SigLipLoss  # noqa: PLC0415

    oc = load_open_clip_loss()

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        for local in (False, True):
            for with_grad in (False, True):
                kw = dict(local_loss=local, gather_with_grad=with_grad, world_size=WORLD)
                _case(
                    lambda r, kw=kw: oc.ClipLoss(rank=r, **kw),
                    lambda r, kw=kw: ClipLoss(rank=r, **kw),
                    rank,
                    with_bias=False,
                    tag=f"ClipLoss(local_loss={local}, gather_with_grad={with_grad})",
                )
        for impl in ("bidir", "shift", "reduce", "gather"):
            _case(
                lambda r, impl=impl: oc.SigLipLoss(rank=r, world_size=WORLD, dist_impl=impl),
                lambda r, impl=impl: SigLipLoss(rank=r, world_size=WORLD, dist_impl=impl),
                rank,
                with_bias=True,
                tag=f"SigLipLoss(dist_impl={impl})",
            )
    finally:
        dist.destroy_process_group()


def test_losses_match_open_clip_on_two_processes():
    spawn_bounded(_worker, WORLD, (free_port(),), DEADLINE_S, "distributed loss test")


def test_gather_features_needs_init():
    from mmfast.nn.contrastive import gather_features  # noqa: PLC0415

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="torch.distributed"):
        gather_features(torch.randn(2, 3), torch.randn(2, 3), world_size=2)
