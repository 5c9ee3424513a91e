"""Pure-PyTorch contrastive losses (they build the N x M logits): the ground truth for kernels.

InfoNCE / CLIP, with logits[i, j] = s * <x_i, y_j>  (x = image features, y = text features):

    image direction:  l_img[i] = logsumexp_j logits[i, j] - logits[i, labels[i]]
    text direction:   l_txt[j] = logsumexp_i logits[i, j] - logits[inv[j], j]
                      (inv[j] = the image i whose label is j; identity by default)
    both (CLIP):      N == M, row i = (l_img[i] + l_txt[i]) / 2

Written as log-sum-exp minus the target logit (not F.cross_entropy) so that non-finite logits give
IEEE's answer (docs: NUMERICS): torch.logsumexp of a row holding +inf is +inf, so a +inf logit makes
its row's and its column's losses inf (or NaN where the target logit is that +inf), while
log_softmax would turn the whole row NaN.

SigLIP (https://arxiv.org/abs/2303.15343), z_ij = 1 for the positive pairs (j = labels[i]; by
default i = j) and -1 otherwise:

    loss = -(1/N) sum_i sum_j log sigmoid(z_ij * (s * <x_i, y_j> + b))

Blocks (the building blocks of losses over logits that no process holds whole, mmfast.nn's ring):
``block_forward`` gives one block's row and column log-sum-exp (InfoNCE) or row losses (SigLIP),
``block_backward`` that block's gradients given the final statistics and per-row / per-column
loss weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["block_backward", "block_forward", "info_nce", "siglip_loss"]


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


def _image_rows(logits: Tensor, tgt: Tensor) -> Tensor:
    """logsumexp_j logits[i, j] - logits[i, tgt[i]] per row i."""
    return logits.logsumexp(1) - logits.gather(1, tgt[:, None]).squeeze(1)


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
        float64 input). An empty batch gives an empty "none", a sum of 0 and a mean of NaN.
    """
    x, y = _upcast(image_features), _upcast(text_features)
    N, M = x.shape[0], y.shape[0]
    logits = _scale(logit_scale, x) * (x @ y.t())
    if direction == "image":
        tgt = labels if labels is not None else torch.arange(N, device=x.device)
        rows = _image_rows(logits, tgt.long())
    elif direction == "text":
        tgt = labels if labels is not None else torch.arange(M, device=x.device)
        rows = _image_rows(logits.t(), tgt.long())
    elif direction == "both":
        if N != M:
            raise ValueError(f"direction='both' needs as many images as texts, got {N} and {M}")
        tgt = labels.long() if labels is not None else torch.arange(N, device=x.device)
        inv = torch.empty_like(tgt)
        inv[tgt] = torch.arange(N, device=x.device)
        rows = 0.5 * (_image_rows(logits, tgt) + _image_rows(logits.t(), inv))
    else:
        raise ValueError(f"direction must be 'both', 'image' or 'text', got {direction!r}")
    return _reduce(rows, reduction)


def _siglip_signs(N: int, M: int, labels: Tensor | None, like: Tensor) -> Tensor:
    """z (N, M): +1 at (i, labels[i]) (labels -1: no positive), -1 elsewhere; default labels arange."""
    z = -torch.ones(N, M, device=like.device, dtype=like.dtype)
    if labels is None:
        labels = torch.arange(N, device=like.device)
    rows = torch.arange(N, device=like.device)[labels >= 0]
    z[rows, labels[labels >= 0].long()] = 1
    return z


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    labels: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """SigLIP pairwise sigmoid loss from the materialized logits.

    Args:
        image_features: (N, D); text_features: (M, D) (M == N with the default labels).
        logit_scale: s (a float or 0-dim tensor); logit_bias: b (likewise).
        labels: optional (N,) int64, the positive text of each image (-1: none); default arange.
        reduction: "mean" (sum over all pairs / N, as open_clip), "sum", or "none" ((N,) per image).
    """
    x, y = _upcast(image_features), _upcast(text_features)
    N, M = x.shape[0], y.shape[0]
    if labels is None and N != M:
        raise ValueError(f"siglip_loss needs as many images as texts, got {N} and {M}")
    b = logit_bias.to(x.dtype) if isinstance(logit_bias, Tensor) else float(logit_bias)
    logits = _scale(logit_scale, x) * (x @ y.t()) + b
    rows = -F.logsigmoid(_siglip_signs(N, M, labels, x) * logits).sum(dim=1)
    if reduction == "mean":
        return rows.sum() / N
    return _reduce(rows, reduction)


def _target_mask(n: int, m: int, labels: Tensor | None, like: Tensor) -> Tensor:
    """(n, m) 1.0 at (i, labels[i]) for labels[i] >= 0, else 0 (no labels: no targets)."""
    mask = torch.zeros(n, m, device=like.device, dtype=like.dtype)
    if labels is not None:
        rows = torch.arange(n, device=like.device)[labels >= 0]
        mask[rows, labels[labels >= 0].long()] = 1
    return mask


def block_forward(
    x: Tensor,
    y: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float = 0.0,
    *,
    labels: Tensor | None = None,
    loss: str = "info_nce",
) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics of one block S = s x yᵀ (+ b) of a larger logits matrix.

    Args:
        x: (n, D) rows of the block; y: (m, D) its columns.
        labels: optional (n,) int64, the target column of each row inside this block, -1 where the
            row's target lies in another block; None: no targets in this block.
        loss: "info_nce" or "siglip".

    Returns:
        InfoNCE: (row_lse (n,), col_lse (m,), target (n,)): log-sum-exp of each row and column of S,
        and S[i, labels[i]] (0 where there is none). SigLIP: (rows (n,), empty, empty) with rows[i] =
        sum_j softplus(-z_ij S_ij), z_ij = 1 at (i, labels[i]), else -1. Accumulation dtype (float32,
        float64 for float64 input).
    """
    xs, ys = _upcast(x), _upcast(y)
    n, m = xs.shape[0], ys.shape[0]
    S = _scale(logit_scale, xs) * (xs @ ys.t())
    empty = S.new_empty(0)
    if loss == "siglip":
        b = logit_bias.to(S.dtype) if isinstance(logit_bias, Tensor) else float(logit_bias)
        z = 2 * _target_mask(n, m, labels, S) - 1
        return F.softplus(-z * (S + b)).sum(1), empty, empty
    target = S.new_zeros(n)
    if labels is not None:
        picked = S.gather(1, labels.clamp(min=0).long()[:, None]).squeeze(1)
        target = torch.where(labels >= 0, picked, target)
    return S.logsumexp(1), S.logsumexp(0), target


def block_backward(
    x: Tensor,
    y: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    labels: Tensor | None,
    row_lse: Tensor | None,
    col_lse: Tensor | None,
    row_weight: Tensor,
    col_weight: Tensor | None,
    loss: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of one block given the final statistics (every argument as
    ``mmfast.ops.contrastive.block_backward`` passes it, see there), G = dLoss/dS on the block:

        InfoNCE  G_ij = a_i (e^(S_ij - row_lse_i) - T_ij) + c_j (e^(S_ij - col_lse_j) - T_ij)
        SigLIP   G_ij = -a_i z_ij sigmoid(-z_ij (S_ij + b))

    with T_ij = 1 at (i, labels[i]), a = row_weight (n,), c = col_weight (m,) (None: no column
    term; InfoNCE's labels must then give each column at most one target row).

    Returns:
        (dx = s G y (n, D), dy = s Gᵀ x (m, D), dscale (2,) = [sum of the row terms' G U, sum of the
        column terms' G U], dbias = sum G (SigLIP; 0 for InfoNCE)), in the accumulation dtype.
    """
    xs, ys = _upcast(x), _upcast(y)
    n, m = xs.shape[0], ys.shape[0]
    s = _scale(logit_scale, xs)
    U = xs @ ys.t()
    S = s * U
    T = _target_mask(n, m, labels, S)
    a = row_weight.to(S.dtype)[:, None]
    if loss == "siglip":
        b = logit_bias.to(S.dtype) if isinstance(logit_bias, Tensor) else float(logit_bias)
        z = 2 * T - 1
        g_row = -a * z * torch.sigmoid(-z * (S + b))
        g_col = torch.zeros_like(S)
    else:
        g_row = a * ((S - row_lse.to(S.dtype)[:, None]).exp() - T)
        g_col = torch.zeros_like(S)
        if col_weight is not None:
            c = col_weight.to(S.dtype)[None, :]
            g_col = c * ((S - col_lse.to(S.dtype)[None, :]).exp() - T)
    G = g_row + g_col
    dscale = torch.stack([(g_row * U).sum(), (g_col * U).sum()])
    dbias = G.sum() if loss == "siglip" else S.new_zeros(())
    return s * (G @ ys), s * (G.t() @ xs), dscale, dbias
