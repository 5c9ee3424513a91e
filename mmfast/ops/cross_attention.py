"""Public cross-attention op: ``cross_attention``.

Validates inputs once, then dispatches to a backend (see ``mmfast._dispatch``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast import _dispatch
from mmfast import reference as _ref
from mmfast.ops._validate import check_same, check_tensor


def _mask_kind(attn_mask: Tensor | None) -> str:
    if attn_mask is None:
        return "none"
    return "bool" if attn_mask.dtype == torch.bool else "float"


def validate(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    dropout_p: float,
    scale: float | None,
    out: Tensor | None,
) -> dict:
    """Check every argument; return the feature dict backends' ``reasons`` functions receive."""
    check_tensor("query", query, ndim=4)
    check_tensor("key", key, ndim=4)
    check_tensor("value", value, ndim=4)
    check_same(("query", "key", "value"), (query, key, value))
    B, Hq, Lq, D = query.shape
    Bk, Hkv, Lk, Dk = key.shape
    Bv, Hv, Lv, Dv = value.shape
    if Bk != B or Bv != B:
        raise ValueError(f"batch sizes differ: query {B}, key {Bk}, value {Bv}")
    if Dk != D:
        raise ValueError(f"query has head dim D={D} but key has {Dk}")
    if (Hv, Lv) != (Hkv, Lk):
        raise ValueError(f"value must have key's heads and length ({Hkv}, {Lk}), got ({Hv}, {Lv})")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, floating=False)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = padding), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(
                f"key_padding_mask must have shape (B, Lk) = ({B}, {Lk}), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != query.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but query is on {query.device}")
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, floating=False)
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool (True = take part) or floating (additive), got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        try:
            shape = torch.broadcast_shapes(tuple(attn_mask.shape), (B, Hq, Lq, Lk))
        except RuntimeError:
            shape = None
        if attn_mask.dim() > 4 or shape != (B, Hq, Lq, Lk):
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, Hq, Lq, Lk) = {(B, Hq, Lq, Lk)}"
            )
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if out is not None:
        check_tensor("out", out)
        if tuple(out.shape) != (B, Hq, Lq, Dv):
            raise ValueError(f"out must have shape (B, Hq, Lq, Dv) = {(B, Hq, Lq, Dv)}, got {tuple(out.shape)}")
        if out.dtype != query.dtype or out.device != query.device:
            raise TypeError(f"out must be {query.dtype} on {query.device}, got {out.dtype} on {out.device}")
    return dict(
        dtype=query.dtype,
        B=B,
        Hq=Hq,
        Hkv=Hkv,
        Lq=Lq,
        Lk=Lk,
        D=D,
        Dv=Dv,
        has_key_padding_mask=key_padding_mask is not None,
        attn_mask_kind=_mask_kind(attn_mask),
        attn_mask_requires_grad=attn_mask is not None and attn_mask.requires_grad,
        dropout_p=float(dropout_p),
        has_out=out is not None,
    )


def cross_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    out: Tensor | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused multi-head (cross-)attention with padding masks, GQA and output into any buffer.

    Args:
        query: (B, Hq, Lq, D), any strides (a (B, L, H, D) tensor's ``.transpose(1, 2)`` is free).
        key: (B, Hkv, Lk, D), Hq % Hkv == 0 (GQA / MQA).
        value: (B, Hkv, Lk, Dv).
        key_padding_mask: (B, Lk) bool, True = padding to ignore (nn.MultiheadAttention's convention).
        attn_mask: bool (True = take part, SDPA's convention) or additive float mask, broadcastable
            to (B, Hq, Lq, Lk); a float mask that requires grad receives its gradient.
        is_causal: causal mask, bottom-right aligned when Lq != Lk.
        scale: softmax scale, default 1/sqrt(D).
        dropout_p: attention-probability dropout (training); seeded by torch's generator.
        return_lse: also return the natural-log LSE (B, Hq, Lq) in float32.
        out: optional preallocated (B, Hq, Lq, Dv) tensor, any strides, written in place.
        backend: "auto" | "cpu" | "cuda" | "triton" | "reference".

    Returns:
        out (B, Hq, Lq, Dv) [, lse (B, Hq, Lq)]. A query row with every key masked gives 0 output,
        LSE -inf and zero gradients.
    """
    args = validate(query, key, value, key_padding_mask, attn_mask, dropout_p, scale, out)
    args.update(is_causal=bool(is_causal), return_lse=bool(return_lse))
    impl = _dispatch.select("cross_attention", backend, query.device, args)
    return impl.fn(
        query,
        key,
        value,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        is_causal=bool(is_causal),
        scale=None if scale is None else float(scale),
        dropout_p=float(dropout_p),
        return_lse=bool(return_lse),
        out=out,
    )


def _reference(query, key, value, **kw):
    return _ref.cross_attention(query, key, value, **kw)


_dispatch.register("cross_attention", "reference", _reference, lambda **_: [])
