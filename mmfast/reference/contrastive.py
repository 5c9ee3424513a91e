"""Pure-PyTorch contrastive losses (they build the N x M logits): the ground truth for kernels.

InfoNCE / CLIP, with logits[i, j] = s * <x_i, y_j>  (x = image features, y = text features):

    image direction:  l_img[i] = logsumexp_j logits[i, j] - logits[i, labels[i]]
    text direction:   l_txt[j] = logsumexp_i logits[i, j] - logits[inv[j], j]
                      (inv[j] = the image i whose label is j; identity by default)
    both (CLIP):      N == M, row i = (l_img[i] + l_txt[i]) / 2

SigLIP (https://arxiv.org/abs/2303.15343), z_ii = 1 and z_ij = -1 for i != j:

    loss = -(1/N) sum_i sum_j log sigmoid(z_ij * (s * <x_i, y_j> + b))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["info_nce", "siglip_loss"]


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _reduce(rows: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    if reduction == "none":
        return rows
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _scale(logit_scale: Tensor | float, like: Tensor) -> Tensor | float:
    return logit_scale.to(like.dtype) if isinstance(logit_scale, Tensor) else float(logit_scale)


def info_nce(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    labels: Tensor | None = None,
    direction: str = "both",
    reduction: str = "mean",
) -> Tensor:
    """InfoNCE / CLIP loss from the materialized logits.

    Args:
        image_features: (N, D).
        text_features: (M, D).
        logit_scale: the multiplier s (open_clip passes ``logit_scale.exp()``), float or 0-dim tensor.
        labels: (N,) int64 targets for the image direction ((M,) for "text"); default arange.
            For "both" a permutation of 0..N-1.
        direction: "both" (N == M), "image" or "text".
        reduction: "mean" | "sum" | "none" (per-row losses).

    Returns:
        scalar, or (N,) for reduction="none" ((M,) for direction="text"), in float32 (float64 for
        float64 input).
    """
    x, y = _upcast(image_features), _upcast(text_features)
    N, M = x.shape[0], y.shape[0]
    logits = _scale(logit_scale, x) * (x @ y.t())
    if direction == "image":
        tgt = labels if labels is not None else torch.arange(N, device=x.device)
        rows = F.cross_entropy(logits, tgt, reduction="none")
    elif direction == "text":
        tgt = labels if labels is not None else torch.arange(M, device=x.device)
        rows = F.cross_entropy(logits.t(), tgt, reduction="none")
    elif direction == "both":
        if N != M:
            raise ValueError(f"direction='both' needs as many images as texts, got {N} and {M}")
        tgt = labels if labels is not None else torch.arange(N, device=x.device)
        inv = torch.empty_like(tgt)
        inv[tgt] = torch.arange(N, device=x.device)
        rows = 0.5 * (
            F.cross_entropy(logits, tgt, reduction="none") + F.cross_entropy(logits.t(), inv, reduction="none")
        )
    else:
        raise ValueError(f"direction must be 'both', 'image' or 'text', got {direction!r}")
    return _reduce(rows, reduction)


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    reduction: str = "mean",
) -> Tensor:
    """SigLIP pairwise sigmoid loss from the materialized logits.

    Args:
        image_features: (N, D); text_features: (N, D).
        logit_scale: s (a float or 0-dim tensor); logit_bias: b (likewise).
        reduction: "mean" (sum over all pairs / N, as open_clip), "sum", or "none" ((N,) per image).
    """
    x, y = _upcast(image_features), _upcast(text_features)
    N, M = x.shape[0], y.shape[0]
    if N != M:
        raise ValueError(f"siglip_loss needs as many images as texts, got {N} and {M}")
    b = logit_bias.to(x.dtype) if isinstance(logit_bias, Tensor) else float(logit_bias)
    logits = _scale(logit_scale, x) * (x @ y.t()) + b
    z = 2 * torch.eye(N, device=x.device, dtype=x.dtype) - 1
    rows = -F.logsigmoid(z * logits).sum(dim=1)
    if reduction == "mean":
        return rows.sum() / N
    return _reduce(rows, reduction)
