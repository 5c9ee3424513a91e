"""open_clip-compatible ``ClipLoss`` and ``SigLipLoss`` on mmfast's fused contrastive kernels.

Same constructors and ``forward`` as open_clip's classes (3.3); the N x N logits are never formed.
With world_size > 1 the features of all ranks take part, by one of two exchanges (``dist_impl``):

* ``"gather"``: all_gather every rank's features (world_size x n x D on every rank).
* ``"ring"``: the blocks travel between neighbours (``batch_isend_irecv``) and no rank holds more
  than two ranks' features (mmfast/nn/contrastive_ring.py). The result equals ``"gather"`` with
  ``gather_with_grad=True``.

ClipLoss (s = logit_scale, n = local batch, r = rank, X/Y = all ranks' image/text features):
    global (local_loss=False): loss = info_nce(X, Y, s)                             (every rank)
    local  (local_loss=True):  labels = r*n + arange(n)
        loss = (CE(s x Y^T, labels) + CE(s y X^T, labels)) / 2  with x, y the local features
    gather_with_grad=True: the gather is differentiable (each rank's loss sends gradients back to
    every rank's features); otherwise only the local slice carries a gradient, as in open_clip.

SigLipLoss (sum over pairs / n, z = +1 for matching pairs, -1 otherwise):
    loss = siglip(x, y) + sum_{r' != r} neg(x, Y_r'),   neg(x, y') = -(1/n) sum_ij log sig(-l_ij)
    open_clip's dist_impl "bidir" and "shift" (neighbour exchange) run as mmfast's "ring", "reduce"
    and "gather" (collectives) as its "gather": the loss and the gradients are the same.

Mixed dtypes (bf16 image features with fp32 text features, as autocast produces): under autocast
both are cast to the autocast dtype (what open_clip's matmul does); otherwise to their common dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmfast.nn.contrastive_ring import check_peers, ring_clip_loss, ring_siglip_loss, siglip_negatives
from mmfast.ops import info_nce, siglip_loss

__all__ = ["ClipLoss", "SigLipLoss", "gather_features"]

DIST_IMPLS = ("gather", "ring")
# open_clip SigLipLoss's exchanges -> mmfast's (results are the same; memory is what differs)
SIGLIP_DIST_IMPLS = {"bidir": "ring", "shift": "ring", "reduce": "gather", "gather": "gather", "ring": "ring"}


class _AllGatherWithGrad(torch.autograd.Function):
    """(world, *x.shape): every rank's ``x`` (same shape on all ranks), differentiable.

    The gradient of a rank's ``x`` is the sum over ranks of their gradients for its slice (a
    reduce-scatter), as torch.distributed.nn's all_gather gives. Written here on the public
    collectives (all_gather_into_tensor / reduce_scatter_tensor, gloo and NCCL) because that one is
    deprecated (a FutureWarning on every call) and, imported after ``init_process_group``, keeps
    the default group alive through its default arguments."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty(world * x.numel())  # flat: gloo gathers along dim 0 only
        dist.all_gather_into_tensor(out, x.contiguous().view(-1), group=group)
        return out.view((world,) + tuple(x.shape))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        gx = grad.new_empty(grad[0].numel())
        dist.reduce_scatter_tensor(gx, grad.contiguous().view(-1), op=dist.ReduceOp.SUM, group=ctx.group)
        return gx.view(grad.shape[1:]), None


def _all_gather_with_grad(x: Tensor, group: Any = None) -> list[Tensor]:
    """Every rank's ``x``, in rank order, with gradients flowing back to each rank's ``x``."""
    return list(_AllGatherWithGrad.apply(x, group).unbind(0))


def _require_dist(world_size: int) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"world_size={world_size} needs torch.distributed to be initialised")


def gather_features(
    image_features: Tensor,
    text_features: Tensor,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
    process_group: Any = None,
) -> tuple[Tensor, Tensor]:
    """All ranks' features, (world_size * n, D) each, in rank order.

    With ``gather_with_grad`` the gather is differentiable; otherwise the gathered copies carry no
    gradient and (unless ``local_loss``) the local slice is the caller's own tensor, so the local
    features still receive the gradient of the local loss.
    """
    _require_dist(world_size)
    if gather_with_grad:
        return (
            torch.cat(_all_gather_with_grad(image_features, process_group)),
            torch.cat(_all_gather_with_grad(text_features, process_group)),
        )
    imgs = [torch.empty_like(image_features) for _ in range(world_size)]
    txts = [torch.empty_like(text_features) for _ in range(world_size)]
    dist.all_gather(imgs, image_features.detach().contiguous(), group=process_group)
    dist.all_gather(txts, text_features.detach().contiguous(), group=process_group)
    if not local_loss:
        imgs[rank], txts[rank] = image_features, text_features
    return torch.cat(imgs), torch.cat(txts)


def _zero_grad_link(logit_bias: Tensor | float | None) -> Tensor | float:
    """0 * logit_bias: a softmax loss does not depend on a constant bias, but the bias (a parameter
    in SigLIP-style models) should still receive its (zero) gradient, as with open_clip."""
    return 0.0 if not isinstance(logit_bias, Tensor) else logit_bias.sum() * 0.0


def _one_dtype(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Image and text features in one dtype: the autocast dtype under autocast (open_clip's matmul
    runs there), else their common dtype."""
    if x.dtype == y.dtype:
        return x, y
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(dtype)


def _check_group(rank: int, world_size: int, group: Any, what: str) -> None:
    """rank / world_size must describe this process in ``group`` (the default group if None)."""
    _require_dist(world_size)
    g_rank, g_world = dist.get_rank(group), dist.get_world_size(group)
    if (g_rank, g_world) != (rank, world_size):
        raise ValueError(
            f"{what}: rank={rank}, world_size={world_size} but this process is rank {g_rank} of {g_world} "
            "in the process group"
        )


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` (InfoNCE, both directions) on the fused kernel.

    Args:
        local_loss: each rank uses its own rows against all columns (needs world_size > 1).
        gather_with_grad: differentiable all_gather of the features.
        cache_labels: keep the labels tensor between calls (as open_clip).
        rank, world_size: this process's rank and the number of processes (in ``process_group``).
        use_horovod: not supported (must be False).
        dist_impl: "gather" (all_gather the features) or "ring" (neighbour exchange: no rank holds
            more than two ranks' features; equals "gather" with gather_with_grad=True, which it
            therefore requires).
        process_group: the torch.distributed group of the ranks that share the loss (default: the
            default group).
        backend: mmfast backend for the kernels.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        dist_impl: str = "gather",
        process_group: Any = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if use_horovod:
            raise ValueError("mmfast.nn.ClipLoss does not support horovod; use torch.distributed")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be 'gather' or 'ring', got {dist_impl!r}")
        if dist_impl == "ring" and world_size > 1 and not gather_with_grad:
            raise ValueError(
                "dist_impl='ring' computes the gather_with_grad=True gradients (every rank's loss reaches every "
                "rank's features); pass gather_with_grad=True"
            )
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, False
        self.dist_impl, self.process_group, self.backend = dist_impl, process_group, backend
        self.prev_num_logits = 0
        self.labels: dict[torch.device, Tensor] = {}

    def get_ground_truth(self, device: torch.device, num_logits: int) -> Tensor:
        """Targets of the local rows: arange(n), offset by rank * n with local_loss."""
        if self.prev_num_logits == num_logits and device in self.labels:
            return self.labels[device]
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank
        if self.cache_labels:
            self.labels[device], self.prev_num_logits = labels, num_logits
        return labels

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        """Contrastive loss of (n, D) image and text features; logit_scale is the multiplier
        (open_clip passes ``logit_scale.exp()``). Returns a float32 scalar (or {"contrastive_loss": ...})."""
        x, y = _one_dtype(image_features, text_features)
        kw = {"backend": self.backend}
        if self.world_size == 1:
            loss = info_nce(x, y, logit_scale, **kw)
        else:
            what = f"mmfast.nn.ClipLoss(dist_impl={self.dist_impl!r})"
            _check_group(self.rank, self.world_size, self.process_group, what)
            check_peers(x, y, self.process_group, what)
            if self.dist_impl == "ring" and x.shape[0] and x.shape[1]:
                loss = ring_clip_loss(
                    x, y, logit_scale, local_loss=self.local_loss, group=self.process_group, backend=self.backend
                )
            else:
                loss = self._gathered(x, y, logit_scale, kw)
        loss = loss + _zero_grad_link(logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _gathered(self, x: Tensor, y: Tensor, logit_scale: Tensor | float, kw: dict) -> Tensor:
        X, Y = gather_features(
            x,
            y,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
            process_group=self.process_group,
        )
        if not self.local_loss:
            return info_nce(X, Y, logit_scale, **kw)
        labels = self.get_ground_truth(x.device, x.shape[0])
        loss_i = info_nce(x, Y, logit_scale, labels=labels, direction="image", **kw)
        loss_t = info_nce(X, y, logit_scale, labels=labels, direction="text", **kw)
        return 0.5 * (loss_i + loss_t)


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss`` (pairwise sigmoid) on the fused kernel.

    Args:
        cache_labels: accepted for compatibility (no labels tensor is built).
        rank, world_size: this process's rank and the number of processes (in ``process_group``).
        dist_impl: mmfast's "ring" or "gather", or open_clip's names: "bidir" and "shift" (its
            neighbour exchanges, the default "bidir") run as "ring", "reduce" and "gather" as
            "gather". All give the same loss and gradients.
        chunk_size: accepted for compatibility with open_clip (a positive int or None); the fused
            kernel never builds the logits, so there is nothing to chunk.
        process_group: the torch.distributed group of the ranks that share the loss.
        backend: mmfast backend for the kernels.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        chunk_size: int | None = None,
        *,
        process_group: Any = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in SIGLIP_DIST_IMPLS:
            names = ", ".join(repr(k) for k in SIGLIP_DIST_IMPLS)
            raise ValueError(f"dist_impl must be one of {names}, got {dist_impl!r}")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.cache_labels, self.rank, self.world_size, self.backend = cache_labels, rank, world_size, backend
        self.chunk_size, self.process_group = chunk_size, process_group

    def _negatives(self, x: Tensor, y: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float) -> Tensor:
        """-(1/n) sum_ij log sigmoid(-l_ij): every pair of x and y a negative (a block without positives)."""
        return siglip_negatives(x, y, logit_scale, logit_bias, backend=self.backend)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        """Sigmoid loss of (n, D) image and text features: sum over all pairs / n (open_clip's
        normalisation), plus the negatives against every other rank's texts when world_size > 1."""
        x, y = _one_dtype(image_features, text_features)
        if self.world_size == 1:
            loss = siglip_loss(x, y, logit_scale, logit_bias, backend=self.backend)
            return {"contrastive_loss": loss} if output_dict else loss
        impl = SIGLIP_DIST_IMPLS[self.dist_impl]
        what = f"mmfast.nn.SigLipLoss(dist_impl={self.dist_impl!r})"
        _check_group(self.rank, self.world_size, self.process_group, what)
        check_peers(x, y, self.process_group, what)
        if impl == "ring" and x.shape[0] and x.shape[1]:
            loss = ring_siglip_loss(x, y, logit_scale, logit_bias, group=self.process_group, backend=self.backend)
        else:
            loss = siglip_loss(x, y, logit_scale, logit_bias, backend=self.backend)
            for r, yr in enumerate(_all_gather_with_grad(y, self.process_group)):
                if r != self.rank:
                    loss = loss + self._negatives(x, yr, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss
