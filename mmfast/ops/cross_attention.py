"""Public cross-attention op: ``cross_attention``, and the custom ops behind the cpu/cuda backends.

Validates inputs once, then dispatches to a backend (see ``mmfast._dispatch``). The C++ kernels are
``torch.ops.mmfast.cross_attention_{forward,forward_out,backward}`` (schemas in
csrc/cross_attention/cpu.cpp; one implementation per device). This module gives them fake
(meta) implementations and an autograd formula, so ``torch.compile(fullgraph=True)`` and
``torch.library.opcheck`` work; the ``out=`` path (the kernel writes into the caller's buffer) is
mmfast/ops/_attention_out.py's, shared with the triton backend.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from mmfast import _dispatch
from mmfast import reference as _ref
from mmfast.ops._attention_out import IntoCall, attention_into
from mmfast.ops._validate import check_same, check_tensor
from mmfast.reference.cross_attention import default_scale
from mmfast.reference.dropout import draw_seed

MAX_HEAD_DIM = 256  # the cpu kernels' limit on D and Dv
CUDA_MAX_HEAD_DIM = 128  # the cuda kernels' (two head-dim templates, 64 and 128, zero-padded)


def _mask_kind(attn_mask: Tensor | None) -> str:
    if attn_mask is None:
        return "none"
    return "bool" if attn_mask.dtype == torch.bool else "float"


def _is_real(x: object) -> bool:
    """A Python / NumPy real number or a traced symbolic one; not a bool (True is not a scale)."""
    return not isinstance(x, bool) and isinstance(x, (numbers.Real, torch.SymFloat, torch.SymInt))


def _shares_memory(x: Tensor, others: tuple[Tensor, ...]) -> bool:
    """Whether ``x`` lives in the same storage as one of ``others`` (fake tensors: never)."""
    if torch.compiler.is_compiling():  # dynamo cannot trace storage pointers; eager calls check
        return False
    if x.numel() == 0:  # nothing is written; empty storages all have pointer 0
        return False
    try:
        ptr = x.untyped_storage().data_ptr()
        return any(t.untyped_storage().data_ptr() == ptr for t in others)
    except (RuntimeError, NotImplementedError):  # no real storage (tracing)
        return False


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
    if (Hkv == 0 and Hq != 0) or (Hkv != 0 and Hq % Hkv):
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
    if not _is_real(dropout_p):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not _is_real(scale):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if out is not None:
        check_tensor("out", out)
        if tuple(out.shape) != (B, Hq, Lq, Dv):
            raise ValueError(f"out must have shape (B, Hq, Lq, Dv) = {(B, Hq, Lq, Dv)}, got {tuple(out.shape)}")
        if out.dtype != query.dtype or out.device != query.device:
            raise TypeError(f"out must be {query.dtype} on {query.device}, got {out.dtype} on {out.device}")
        if any(st == 0 and n > 1 for st, n in zip(out.stride(), out.shape)):
            raise ValueError(f"out must not overlap itself (an expanded view), got strides {out.stride()}")
        if _shares_memory(out, (query, key, value)):
            raise ValueError("out must not share memory with query, key or value")
        if out.requires_grad and out.is_leaf and torch.is_grad_enabled():
            raise RuntimeError(
                "out is a leaf tensor that requires grad: the result cannot be written into it in place "
                "(pass out=None, a buffer without requires_grad, or call under torch.no_grad())"
            )
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
    impl = _dispatch.select(OP, backend, query.device, args)
    return impl(
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


# --------------------------------------------------------------------------------------------
# Custom ops (cpu + cuda backends): fake implementations, autograd, the out= path.
# --------------------------------------------------------------------------------------------


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The LSE is float32, or float64 for float64 inputs (gradcheck needs the full precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, key_padding_mask, attn_mask, is_causal, scale, dropout_p, seed):
    B, Hq, Lq, _ = q.shape
    return q.new_empty((B, Hq, Lq, v.shape[-1])), q.new_empty((B, Hq, Lq), dtype=_lse_dtype(q.dtype))


def _fake_forward_out(q, k, v, key_padding_mask, attn_mask, is_causal, scale, dropout_p, seed, out):
    B, Hq, Lq, _ = q.shape
    return q.new_empty((B, Hq, Lq), dtype=_lse_dtype(q.dtype))


def _fake_backward(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    grad_lse,
    key_padding_mask,
    attn_mask,
    is_causal,
    scale,
    dropout_p,
    seed,
    attn_mask_grad,
):
    float_mask = attn_mask is not None and attn_mask.dtype != torch.bool
    dmask = attn_mask.new_empty(attn_mask.shape) if attn_mask_grad and float_mask else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def no_double_backward(ctx, *grads):
    raise NotImplementedError("mmfast.cross_attention: double backward (grad of the gradient) is not supported")


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, attn_mask, is_causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, attn_mask, seed)
    ctx.settings = (is_causal, scale, dropout_p)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no work for it


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, attn_mask, seed = ctx.saved_tensors
    mask_grad = bool(ctx.needs_input_grad[4]) and attn_mask is not None and attn_mask.dtype != torch.bool
    backward = _into_call(*ctx.settings, seed).backward
    dq, dk, dv, dmask = backward(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, attn_mask, mask_grad)
    return dq, dk, dv, None, dmask, None, None, None, None


def _into_call(is_causal: bool, scale: float, dropout_p: float, seed: Tensor) -> IntoCall:
    """The C++ ops for the out= path (mmfast/ops/_attention_out.py), with this call's settings."""
    settings = (is_causal, scale, dropout_p, seed)

    def forward_out(q, k, v, kpm, mask, out):
        return torch.ops.mmfast.cross_attention_forward_out(q, k, v, kpm, mask, *settings, out)

    def backward(grad_out, grad_lse, q, k, v, out, lse, kpm, mask, mask_grad):
        if grad_out is None:  # only the LSE was used: dO = 0, and out drops out of D_i = <dO_i, o_i>
            out = grad_out = q.new_zeros((*q.shape[:3], v.shape[3]))
        dq, dk, dv, dmask = torch.ops.mmfast.cross_attention_backward(
            grad_out, q, k, v, out, lse, grad_lse, kpm, mask, *settings, mask_grad
        )
        return dq, dk, dv, dmask if mask_grad else None

    return IntoCall(forward_out, backward)


_NO_SEED = torch.zeros((), dtype=torch.int64)  # the seed argument when there is no dropout


def _kernel(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    dropout_p: float,
    return_lse: bool,
    out: Tensor | None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The cpu and cuda backends: the same custom ops, dispatched by the tensors' device."""
    scale = default_scale(query.shape[-1]) if scale is None else scale
    seed = draw_seed() if dropout_p > 0 else _NO_SEED
    args = (query, key, value, key_padding_mask, attn_mask, is_causal, scale, dropout_p, seed)
    if out is None or torch.compiler.is_compiling():
        # Compiled graphs are functionalized (an in-place write into a graph input becomes a copy
        # anyway), and the view-rebasing Function below does not trace: traced code takes the
        # functional op and copies into ``out``.
        o, lse = torch.ops.mmfast.cross_attention_forward(*args)
        if out is not None:
            o = out.copy_(o)
    else:
        o, lse = attention_into(out, query, key, value, key_padding_mask, attn_mask, _into_call(*args[5:]))
    return (o, lse) if return_lse else o


def _head_dim_reasons(D: int, Dv: int, limit: int = MAX_HEAD_DIM) -> list[str]:
    if max(D, Dv) > limit:
        return [f"head dim D={D}, Dv={Dv} exceeds the kernel's limit of {limit} (use backend='reference')"]
    return []


def _cpu_reasons(*, D: int, Dv: int, **_) -> list[str]:
    return _head_dim_reasons(D, Dv)


def _cuda_reasons(*, dtype: torch.dtype, D: int, Dv: int, **_) -> list[str]:
    why = _head_dim_reasons(D, Dv, CUDA_MAX_HEAD_DIM)
    if min(D, Dv) < 1:
        why.append(f"head dims D={D}, Dv={Dv}: the cuda kernels need both >= 1 (cpu and reference take 0)")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        why.append(f"cuda kernels take float32, bfloat16 or float16, got {dtype}")
    return why


def _reference(query, key, value, **kw):
    return _ref.cross_attention(query, key, value, **kw)


_CPP_OPS = ("cross_attention_forward", "cross_attention_forward_out", "cross_attention_backward")
if _dispatch.has_ops(*_CPP_OPS):  # fake (meta) and autograd formulas of the C++ ops
    torch.library.register_fake("mmfast::cross_attention_forward")(_fake_forward)
    torch.library.register_fake("mmfast::cross_attention_forward_out")(_fake_forward_out)
    torch.library.register_fake("mmfast::cross_attention_backward")(_fake_backward)
    torch.library.register_autograd("mmfast::cross_attention_forward", _backward, setup_context=_setup_context)
    torch.library.register_autograd(
        "mmfast::cross_attention_backward", no_double_backward, setup_context=lambda ctx, inputs, output: None
    )

# The backends of cross_attention (mmfast/_dispatch.py picks one per call).
OP = _dispatch.Op(
    "cross_attention",
    {
        "cuda": _dispatch.Backend(
            "cuda", _kernel, _cuda_reasons, _CPP_OPS, note="CUDA kernels not yet verified on hardware"
        ),
        "triton": _dispatch.Backend(
            "triton",
            "mmfast.triton.cross_attention:triton_cross_attention",
            "mmfast.triton.cross_attention:reasons",
            note="verified through the Triton interpreter and sm_80/sm_90 compiles; not yet timed on hardware",
        ),
        "cpu": _dispatch.Backend("cpu", _kernel, _cpu_reasons, _CPP_OPS),
        "reference": _dispatch.Backend("reference", _reference),
    },
)
