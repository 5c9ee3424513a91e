"""Hard negatives for ITM, mined from the contrastive similarities in tiles (never the N x M matrix).

ALBEF (https://arxiv.org/abs/2107.07651, section 3.3): for each image i a negative caption j is
drawn with probability proportional to exp(s_ij), and for each caption j a negative image i with
probability proportional to exp(s_ij), where s_ij = scale * <x_i, y_j> are the contrastive logits
and pairs that match are excluded. Here both draws come from one sweep over (block x block) tiles
of s, by the Gumbel-max trick: with g_ij i.i.d. Gumbel(0, 1),

    argmax_j (s_ij + g_ij)  ~  Categorical(softmax_j s_ij)        (one independent g per draw)

so each row keeps a running (max, argmax) of s + g over the column tiles, each column a running
(max, argmax) of s + g' over the row tiles, and a tile is dropped once both are merged: memory is
O(block^2 + N + M). Excluded pairs get -inf; a row (or column) whose pairs are all excluded gets
index -1. Without a generator the draw is the hardest negative, argmax_j s_ij.

Cost: the products of the similarity (2 N M D FLOPs) plus two Gumbel draws per pair; with the
default local batch (512) this is a few milliseconds, and it grows as N M.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["excluded", "mine_negatives"]


def excluded(row_keys: Tensor, col_keys: Tensor) -> Tensor:
    """(R, C) bool: True where row r and column c share a key in any column of the (R, G) / (C, G)
    key tables (same image, same caption text, ...): such a pair matches, it is no negative."""
    return (row_keys[:, None, :] == col_keys[None, :, :]).any(-1)


def _gumbel(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    u = torch.rand(shape, generator=generator).clamp_(min=torch.finfo(torch.float32).tiny)
    return u.log_().neg_().log_().neg_()  # -log(-log u)


def _merge(best_v: Tensor, best_i: Tensor, v: Tensor, i: Tensor) -> None:
    """In place: keep (v, i) where v beats the running best (ties keep the earlier index)."""
    better = v > best_v
    best_v[better] = v[better]
    best_i[better] = i[better]


@torch.no_grad()
@torch.autocast("cpu", enabled=False)  # products in fp32 under --precision bf16 too
def mine_negatives(
    x: Tensor,
    y: Tensor,
    scale: float | Tensor,
    *,
    x_keys: Tensor,
    y_keys: Tensor,
    generator: torch.Generator | None = None,
    block: int = 1024,
) -> tuple[Tensor, Tensor]:
    """A negative column per row and a negative row per column of s = scale * x y^T, in tiles.

    Args:
        x: (N, D) image embeddings; y: (M, D) text embeddings (any float dtype; products in fp32).
        scale: the logit multiplier (the contrastive loss's exp(logit_scale)).
        x_keys: (N, G) int64, y_keys: (M, G) int64: pairs sharing a key in any of the G columns
            are matches and never drawn (e.g. column 0 = image id, column 1 = caption-text id).
        generator: the draws' random stream; None = the hardest negative (argmax, no noise).
        block: tile side.

    Returns:
        (neg_text (N,) int64 in [-1, M), neg_image (M,) int64 in [-1, N)); -1 = no negative exists.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x (N, D) and y (M, D) must agree on D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x_keys.shape[0] != x.shape[0] or y_keys.shape[0] != y.shape[0] or x_keys.shape[1:] != y_keys.shape[1:]:
        raise ValueError(f"x_keys (N, G) and y_keys (M, G) must match x, y and each other, got "
                         f"{tuple(x_keys.shape)} and {tuple(y_keys.shape)}")  # fmt: skip
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    n, m = x.shape[0], y.shape[0]
    x, y, scale = x.detach().float().cpu(), y.detach().float().cpu(), float(scale)
    x_keys, y_keys = x_keys.cpu(), y_keys.cpu()
    row_v, row_i = torch.full((n,), float("-inf")), torch.full((n,), -1, dtype=torch.long)
    col_v, col_i = torch.full((m,), float("-inf")), torch.full((m,), -1, dtype=torch.long)
    for r in range(0, n, block):
        xr, kr = x[r : r + block], x_keys[r : r + block]
        for c in range(0, m, block):
            s = (xr @ y[c : c + block].T).mul_(scale)
            s.masked_fill_(excluded(kr, y_keys[c : c + block]), float("-inf"))
            rows = s if generator is None else s + _gumbel(s.shape, generator)
            v, j = rows.max(1)
            _merge(row_v[r : r + block], row_i[r : r + block], v, j + c)
            cols = s if generator is None else s.add_(_gumbel(s.shape, generator))
            v, i = cols.max(0)
            _merge(col_v[c : c + block], col_i[c : c + block], v, i + r)
    return row_i, col_i
