"""Pure-PyTorch cross-attention: the ground truth every kernel is tested against.

For batch b, query head h (key/value head g = h // (Hq // Hkv)), query row i, key column j:

    s[b,h,i,j]  = scale * <q[b,h,i,:], k[b,g,j,:]> + bias[b,h,i,j]       (float attn_mask)
    allowed     = not key_padding_mask[b,j] and attn_mask[b,h,i,j] (bool) and (j <= i + Lk - Lq if causal)
    lse[b,h,i]  = log sum_{j allowed} exp(s[b,h,i,j])                     (-inf if nothing allowed)
    p[b,h,i,j]  = exp(s - lse) if allowed else 0
    out[b,h,i]  = sum_j p[b,h,i,j] * keep[b,h,i,j] / (1 - dropout_p) * v[b,g,j,:]

A row with no allowed key gives out = 0, lse = -inf and zero gradients (never NaN). Non-finite
values follow docs/numerics.md: a masked score is replaced (a -inf additive entry is a mask too), so
whatever q.k was there does not matter; an allowed NaN or +inf score makes its row's out and lse NaN.
Empty dims: Lk = 0 rows are fully masked; D = 0 scores are 0 (empty dot products); B, Hq, Lq or
Dv = 0 give empty results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast.reference.dropout import draw_seed, keep_mask

__all__ = ["OPTIONS", "attention_probs", "cross_attention", "default_scale"]


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def default_scale(head_dim: int) -> float:
    """1 / sqrt(D); 1.0 for D = 0 (every score is then an empty dot product, 0, whatever the scale)."""
    return head_dim**-0.5 if head_dim > 0 else 1.0


def attention_probs(
    query: Tensor,
    key: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax probabilities (B, Hq, Lq, Lk) and natural-log LSE (B, Hq, Lq), in fp32 or fp64."""
    B, Hq, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    if Hkv == 0 and Hq == 0:
        Hkv = 1  # no head at all: nothing to repeat
    elif Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key heads ({Hkv})")
    scale = default_scale(D) if scale is None else float(scale)
    q, k = _upcast(query), _upcast(key)
    k = k.repeat_interleave(Hq // Hkv, dim=1) if key.shape[1] != Hq else k
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = torch.ones(B, 1, 1, Lk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.to(torch.bool).view(B, 1, 1, Lk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            bias = attn_mask.to(s.dtype)
            allowed = allowed & (bias != float("-inf"))  # a -inf entry is a mask: replace, never add
            s = s + bias
    if is_causal:  # bottom-right aligned: query i sees keys j <= i + (Lk - Lq)
        i = torch.arange(Lq, device=q.device).view(Lq, 1)
        j = torch.arange(Lk, device=q.device).view(1, Lk)
        allowed = allowed & (j <= i + (Lk - Lq))
    allowed = allowed.expand_as(s)
    s = torch.where(allowed, s, torch.full_like(s, float("-inf")))
    if Lk == 0:  # every row fully masked (results kept connected to q and k: zero gradients, not None)
        return s * 0, s.sum(-1) * 0 + float("-inf")
    m_raw = s.amax(dim=-1, keepdim=True)  # NaN when a score is NaN
    m = torch.where(torch.isfinite(m_raw), m_raw, torch.zeros_like(m_raw)).detach()
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    empty = denom == 0  # no allowed key (a NaN denominator is not empty)
    safe = torch.where(empty, torch.ones_like(denom), denom)
    p = e / safe
    lse = torch.where(empty, torch.full_like(denom, float("-inf")), m + torch.log(safe))
    # An allowed +inf score: softmax is inf - inf, NaN for the whole row (multiplied in, so the
    # gradients of the row are NaN too, as the kernels' are).
    poison = torch.where(m_raw == float("inf"), torch.full_like(m_raw, float("nan")), torch.ones_like(m_raw))
    return p * poison, (lse * poison).squeeze(-1)


# mmfast.cross_attention's keyword arguments (all but ``backend``) and their defaults: the reference
# and the triton entry point take them as ``**options``.
OPTIONS = dict(
    key_padding_mask=None, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0, return_lse=False, out=None
)


def options_of(fn_name: str, options: dict) -> dict:
    """``options`` completed with the defaults; unknown names are a TypeError, as for a signature."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"{fn_name}() got unexpected keyword arguments {sorted(unknown)}")
    return {**OPTIONS, **options}


def cross_attention(
    query: Tensor, key: Tensor, value: Tensor, *, dropout_mask: Tensor | None = None, **options: object
) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-head (cross-)attention in plain PyTorch, differentiable and float64-capable.

    Args:
        query: (B, Hq, Lq, D).
        key: (B, Hkv, Lk, D), Hq % Hkv == 0 (GQA/MQA).
        value: (B, Hkv, Lk, Dv).
        dropout_mask: (B, Hq, Lq, Lk) bool keep-mask to use instead of drawing one; drawn, it is the
            kernels' (``mmfast.reference.dropout.keep_mask`` of a seed from torch's generator).
        **options: ``mmfast.cross_attention``'s keyword arguments, with the same defaults and
            meanings: key_padding_mask (B, Lk) bool (True = padding), attn_mask (bool: True = take
            part, or additive float; broadcastable to (B, Hq, Lq, Lk)), is_causal (bottom-right
            aligned), scale (default 1/sqrt(D)), dropout_p, return_lse (also the LSE (B, Hq, Lq) in
            float32, float64 for float64 input), out (a (B, Hq, Lq, Dv) tensor the result is
            copied into).

    Returns:
        out (B, Hq, Lq, Dv) in query's dtype [, lse].
    """
    o = options_of("cross_attention", options)
    key_padding_mask, attn_mask, is_causal, scale = o["key_padding_mask"], o["attn_mask"], o["is_causal"], o["scale"]
    dropout_p, return_lse, out = float(o["dropout_p"]), o["return_lse"], o["out"]
    B, Hq, Lq, _ = query.shape
    Hkv = max(key.shape[1], 1)
    p, lse = attention_probs(
        query, key, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal, scale=scale
    )
    if dropout_p > 0.0 or dropout_mask is not None:
        if dropout_mask is None:  # the kernels' counter-hash mask: the same torch seed, the same result
            dropout_mask = keep_mask(draw_seed(), B, Hq, Lq, key.shape[2], dropout_p, device=p.device)
        p = p * dropout_mask / (1.0 - dropout_p)
    v = _upcast(value)
    v = v.repeat_interleave(Hq // Hkv, dim=1) if Hkv != Hq else v
    o = torch.matmul(p.to(v.dtype), v).to(query.dtype)
    if out is not None:
        out.copy_(o)
        o = out
    if return_lse:
        return o, lse.to(torch.float64 if query.dtype == torch.float64 else torch.float32)
    return o
