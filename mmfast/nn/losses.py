"""open_clip-compatible ``ClipLoss`` and ``SigLipLoss`` on mmfast's fused contrastive kernels.

Same constructors and ``forward`` as open_clip's classes; the N x N logits are never formed.
With world_size > 1 the features are gathered with torch.distributed:

ClipLoss (s = logit_scale, n = local batch, r = rank, X/Y = all ranks' image/text features):
    global (local_loss=False): loss = info_nce(X, Y, s)                             (every rank)
    local  (local_loss=True):  labels = r*n + arange(n)
        loss = (CE(s x Y^T, labels) + CE(s y X^T, labels)) / 2  with x, y the local features
    gather_with_grad=True: the gather is differentiable (each rank's loss sends gradients back to
    every rank's features); otherwise only the local slice carries a gradient, as in open_clip.

SigLipLoss (sum over pairs / n, z = +1 for matching pairs, -1 otherwise):
    loss = siglip(x, y) + sum_{r' != r} neg(x, Y_r'),   neg(x, y') = -(1/n) sum_ij log sig(-l_ij)
    neg() uses the identity -log sig(-l) = -log sig(l) + l: it is siglip_loss(x, y') plus
    (1/n) sum_i l_ii, a row-wise dot product, so the fused kernel covers it too.
    Other ranks' text features arrive through a differentiable all_gather (open_clip exchanges
    them between neighbours; the loss and the gradients are the same).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmfast.ops import info_nce, siglip_loss

__all__ = ["ClipLoss", "SigLipLoss", "gather_features"]


def _all_gather_with_grad(x: Tensor) -> list[Tensor]:
    import torch.distributed.nn as dist_nn  # noqa: PLC0415 - only needed with world_size > 1

    return list(dist_nn.all_gather(x))


def gather_features(
    image_features: Tensor,
    text_features: Tensor,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """All ranks' features, (world_size * n, D) each, in rank order.

    With ``gather_with_grad`` the gather is differentiable; otherwise the gathered copies carry no
    gradient and (unless ``local_loss``) the local slice is the caller's own tensor, so the local
    features still receive the gradient of the local loss.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"world_size={world_size} needs torch.distributed to be initialised")
    if gather_with_grad:
        return torch.cat(_all_gather_with_grad(image_features)), torch.cat(_all_gather_with_grad(text_features))
    imgs = [torch.empty_like(image_features) for _ in range(world_size)]
    txts = [torch.empty_like(text_features) for _ in range(world_size)]
    dist.all_gather(imgs, image_features.detach().contiguous())
    dist.all_gather(txts, text_features.detach().contiguous())
    if not local_loss:
        imgs[rank], txts[rank] = image_features, text_features
    return torch.cat(imgs), torch.cat(txts)


def _zero_grad_link(logit_bias: Tensor | float | None) -> Tensor | float:
    """0 * logit_bias: a softmax loss does not depend on a constant bias, but the bias (a parameter
    in SigLIP-style models) should still receive its (zero) gradient, as with open_clip."""
    return 0.0 if not isinstance(logit_bias, Tensor) else logit_bias.sum() * 0.0


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` (InfoNCE, both directions) on the fused kernel.

    Args:
        local_loss: each rank uses its own rows against all columns (needs world_size > 1).
        gather_with_grad: differentiable all_gather of the features.
        cache_labels: keep the labels tensor between calls (as open_clip).
        rank, world_size: this process's rank and the number of processes.
        use_horovod: not supported (must be False).
        backend: mmfast backend for ``info_nce``.
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
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if use_horovod:
            raise ValueError("mmfast.nn.ClipLoss does not support horovod; use torch.distributed")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, False
        self.backend = backend
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
        x, y, kw = image_features, text_features, {"backend": self.backend}
        if self.world_size == 1:
            loss = info_nce(x, y, logit_scale, **kw)
        else:
            X, Y = gather_features(
                x,
                y,
                local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad,
                rank=self.rank,
                world_size=self.world_size,
            )
            if self.local_loss:
                labels = self.get_ground_truth(x.device, x.shape[0])
                loss_i = info_nce(x, Y, logit_scale, labels=labels, direction="image", **kw)
                loss_t = info_nce(X, y, logit_scale, labels=labels, direction="text", **kw)
                loss = 0.5 * (loss_i + loss_t)
            else:
                loss = info_nce(X, Y, logit_scale, **kw)
        loss = loss + _zero_grad_link(logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss`` (pairwise sigmoid) on the fused kernel.

    Args:
        cache_labels: accepted for compatibility (no labels tensor is built).
        rank, world_size: this process's rank and the number of processes.
        dist_impl: open_clip's exchange pattern ("bidir", "shift", "reduce", "gather"); all give
            the same loss and gradients here, computed from one differentiable all_gather.
        backend: mmfast backend for ``siglip_loss``.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be 'bidir', 'shift', 'reduce' or 'gather', got {dist_impl!r}")
        self.cache_labels, self.rank, self.world_size, self.backend = cache_labels, rank, world_size, backend

    def _negatives(self, x: Tensor, y: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float) -> Tensor:
        """-(1/n) sum_ij log sigmoid(-l_ij) = siglip(x, y) + (1/n) sum_i l_ii (see the module docstring)."""
        diag = (x.float() * y.float()).sum(-1) * logit_scale + logit_bias
        return siglip_loss(x, y, logit_scale, logit_bias, backend=self.backend) + diag.mean()

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
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        if self.world_size > 1:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError(f"world_size={self.world_size} needs torch.distributed to be initialised")
            texts = _all_gather_with_grad(text_features)
            for r, y in enumerate(texts):
                if r != self.rank:
                    loss = loss + self._negatives(image_features, y, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss
