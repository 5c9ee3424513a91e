"""Triton cross-attention backend: launchers, custom ops (fake + autograd), dispatch registration.

The kernels and their math live in ``cross_attention_kernels.py``. This module

* launches them (autotuned on GPUs; one small config under ``TRITON_INTERPRET=1``), choosing
  split-KV when a short query cannot fill the GPU;
* wraps them as ``torch.ops.mmfast.cross_attention_{forward,forward_out,backward}_triton`` custom ops with
  fake (meta) implementations and an autograd formula, so ``torch.compile`` can trace them;
* exposes ``compile_specs()`` for the ahead-of-time compile check (sm_80 / sm_90).
"""

from typing import Any

import torch
import triton
from torch import Tensor

from mmfast.ops._attention_out import IntoCall, attention_into
from mmfast.ops.cross_attention import no_double_backward
from mmfast.reference.cross_attention import default_scale, options_of
from mmfast.reference.dropout import M32, draw_seed, threshold
from mmfast.triton import INTERPRET
from mmfast.triton import cross_attention_kernels as kern

MAX_HEAD_DIM = 256
_INTERPRET = INTERPRET
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NO_SEED = torch.zeros((), dtype=torch.int64)  # the seed argument when there is no dropout


# --------------------------------------------------------------------------------------------
# Autotuning: a handful of FlashAttention-2-like tile shapes for sm_80/sm_90, one under the
# interpreter (there, bigger tiles only cost time). Configs that do not fit in shared memory are
# pruned up front for large head dims and otherwise skipped by the autotuner.
# --------------------------------------------------------------------------------------------

_FWD_TILES = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2), (64, 32, 4, 2)]
_BWD_TILES = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 32, 4, 1)]
_KEY = ["Lq", "Lk", "BLOCK_D", "BLOCK_DV", "MASK_KIND", "HAS_KPM", "IS_CAUSAL", "HAS_DROPOUT"]


def _configs(tiles: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep tiles whose q/k/v blocks fit comfortably for this head dim (256 needs small tiles).

    The autotuner passes positional arguments in ``named_args`` and keyword ones (the
    constexprs, BLOCK_D among them) in ``kwargs``.
    """
    args = {**named_args, **kwargs}
    d = max(args["BLOCK_D"], args["BLOCK_DV"])
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * d <= 128 * 256]
    return kept or configs[-1:]


def _tuned(fn, tiles: list[tuple[int, int, int, int]], key: list[str]):
    return triton.autotune(_configs(tiles), key=key, prune_configs_by={"early_config_prune": _prune})(fn)


_fwd = _tuned(kern.attn_fwd, _FWD_TILES, [*_KEY, "NUM_SPLITS"])
_bwd_dkdv = _tuned(kern.attn_bwd_dkdv, _BWD_TILES, _KEY)
_bwd_dq = _tuned(kern.attn_bwd_dq, _BWD_TILES, [*_KEY, "MASK_GRAD"])
_SMALL_BLOCK_M = 16 if _INTERPRET else 64  # merge and preprocess: memory-bound, one config


# --------------------------------------------------------------------------------------------
# Launchers.
# --------------------------------------------------------------------------------------------


def _i32(x: int) -> int:
    """The signed int32 with the bit pattern of uint32 ``x`` (kernels bitcast it back)."""
    x &= M32
    return x - (1 << 32) if x >= (1 << 31) else x


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _dot_prec(dtype: torch.dtype) -> str:
    """fp32 inputs keep fp32 accuracy through 3xTF32 (tensor cores; "ieee" falls back to FMA dots,
    slow and spilling: 1348 B of spills vs 316 B for dkdv at D=64 on sm_90), unless the user opted
    into TF32 matmuls (torch.backends.cuda.matmul.allow_tf32). 16-bit inputs ignore it."""
    if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "tf32x3"


def _mask_args(q: Tensor, Lk: int, kpm: Tensor | None, mask: Tensor | None) -> tuple[list, dict]:
    """Pointer + strides for the padding mask and attn_mask (broadcast dims get stride 0)."""
    B, Hq, Lq, _ = q.shape
    if kpm is None:
        kpm_t, kpm_strides = q, (0, 0)
    else:
        kpm_t = kpm.view(torch.uint8)
        kpm_strides = kpm_t.stride()
    if mask is None:
        mask_t, kind = q, 0
        m_strides = (0, 0, 0, 0)
    else:
        kind = 1 if mask.dtype == torch.bool else 2
        mask_t = (mask.view(torch.uint8) if kind == 1 else mask).expand(B, Hq, Lq, Lk)
        m_strides = mask_t.stride()
    return [kpm_t, mask_t], dict(strides=[*kpm_strides, *m_strides], MASK_KIND=kind, HAS_KPM=kpm is not None)


def _dropout_args(dropout_p: float, seed: Tensor | int) -> list:
    seed = int(seed)  # the custom ops take the seed as a 0-dim int64 CPU tensor (see draw_seed)
    return [_i32(seed), _i32(seed >> 32), _i32(threshold(dropout_p)), 1.0 / (1.0 - dropout_p)]


def auto_splits(B: int, Hq: int, Lq: int, Lk: int, device: torch.device) -> int:
    """Split-KV factor: >1 only when B*Hq*ceil(Lq/64) programs cannot fill the GPU's SMs."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    ctas = B * Hq * triton.cdiv(Lq, 64)
    want = min(triton.cdiv(sms, max(ctas, 1)), Lk // 256, 16)
    return 1 if want < 2 else 1 << (want.bit_length() - 1)  # powers of two: few recompiles


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kpm: Tensor | None,
    mask: Tensor | None,
    is_causal: bool,
    scale: float,
    dropout_p: float,
    seed: Tensor,
    num_splits: int = 0,
    out: Tensor | None = None,
    lse: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """out (B, Hq, Lq, Dv) and LSE (B, Hq, Lq) fp32 (contiguous), written into ``out`` / ``lse`` when given."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if out is None:
        out = q.new_empty(B, Hq, Lq, Dv)
    if lse is None:
        lse = q.new_empty(B, Hq, Lq, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    splits = num_splits or auto_splits(B, Hq, Lq, Lk, q.device)
    masks, mk = _mask_args(q, Lk, kpm, mask)
    if splits == 1:
        o_t, l_t = out, lse
        o_strides, l_strides = (0, *out.stride()), (0, Hq * Lq, Lq)
    else:
        o_t = q.new_empty(splits, B, Hq, Lq, Dv, dtype=torch.float32)
        l_t = q.new_empty(splits, B, Hq, Lq, dtype=torch.float32)
        o_strides, l_strides = o_t.stride(), l_t.stride()[:3]
    _fwd[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq, splits)](
        q, k, v, o_t, l_t, *masks,
        *q.stride(), *k.stride(), *v.stride(), *o_strides, *l_strides, *mk["strides"],
        Hq, Hkv, Lq, Lk, D, Dv,
        scale * kern.LOG2E, *_dropout_args(dropout_p, seed),
        BLOCK_D=_block(D), BLOCK_DV=_block(Dv), MASK_KIND=mk["MASK_KIND"], HAS_KPM=mk["HAS_KPM"],
        IS_CAUSAL=is_causal, HAS_DROPOUT=dropout_p > 0, NUM_SPLITS=splits, DOT_PREC=_dot_prec(q.dtype),
    )  # fmt: skip
    if splits > 1:
        kern.attn_merge[(triton.cdiv(Lq, _SMALL_BLOCK_M), B * Hq)](
            o_t, l_t, out, lse, *o_t.stride(), *l_t.stride()[:3], *out.stride(), Hq, Lq, Dv,
            BLOCK_M=_SMALL_BLOCK_M, BLOCK_DV=_block(Dv), NUM_SPLITS=splits,
        )  # fmt: skip
    return out, lse


def backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    kpm: Tensor | None,
    mask: Tensor | None,
    is_causal: bool,
    scale: float,
    dropout_p: float,
    seed: Tensor,
    mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv (shapes and dtypes of q, k, v) and dS (B, Hq, Lq, Lk) fp32 (empty unless mask_grad)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dmask = q.new_zeros((B, Hq, Lq, Lk) if mask_grad else (0,), dtype=torch.float32)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask
    # 1. delta = rowsum(dO * out) - dlse.
    delta = q.new_empty(B, Hq, Lq, dtype=torch.float32)
    dlse_t = delta if dlse is None else dlse.float().contiguous()
    kern.attn_bwd_preprocess[(triton.cdiv(Lq, _SMALL_BLOCK_M), B * Hq)](
        out, dout, dlse_t, delta, *out.stride(), *dout.stride(), Hq, Lq, Dv,
        BLOCK_M=_SMALL_BLOCK_M, BLOCK_DV=_block(Dv), HAS_DLSE=dlse is not None,
    )  # fmt: skip
    masks, mk = _mask_args(q, Lk, kpm, mask)
    flags = dict(
        BLOCK_D=_block(D), BLOCK_DV=_block(Dv), MASK_KIND=mk["MASK_KIND"], HAS_KPM=mk["HAS_KPM"],
        IS_CAUSAL=is_causal, HAS_DROPOUT=dropout_p > 0, DOT_PREC=_dot_prec(q.dtype),
    )  # fmt: skip
    tail = [Hq, Hkv, Lq, Lk, D, Dv, scale * kern.LOG2E, scale, *_dropout_args(dropout_p, seed)]
    # 2. dk, dv: one program per (key tile, b, kv head).
    _bwd_dkdv[lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv, *masks,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), *mk["strides"],
        *tail, **flags,
    )  # fmt: skip
    # 3. dq (and dS for the float mask): one program per (query tile, b, query head).
    _bwd_dq[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)](
        q, k, v, dout, lse, delta, dq, dmask if mask_grad else delta, *masks,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *mk["strides"],
        *tail, MASK_GRAD=mask_grad, **flags,
    )  # fmt: skip
    return dq, dk, dv, dmask


# --------------------------------------------------------------------------------------------
# Custom ops: torch.ops.mmfast.cross_attention_{forward, forward_out, backward}_triton.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("mmfast::cross_attention_forward_triton", mutates_args=())
def _fwd_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float,
    dropout_p: float,
    seed: Tensor,
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Lq, Dv), lse (B, Hq, Lq) fp32)."""
    return forward(query, key, value, key_padding_mask, attn_mask, is_causal, scale, dropout_p, seed, num_splits)


@_fwd_op.register_fake
def _(query, key, value, key_padding_mask, attn_mask, is_causal, scale, dropout_p, seed, num_splits):
    B, Hq, Lq, _ = query.shape
    return query.new_empty(B, Hq, Lq, value.shape[3]), query.new_empty(B, Hq, Lq, dtype=torch.float32)


@torch.library.custom_op("mmfast::cross_attention_forward_out_triton", mutates_args=("out", "lse"))
def _fwd_out_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float,
    dropout_p: float,
    seed: Tensor,
    num_splits: int,
    out: Tensor,
    lse: Tensor,
) -> None:
    """Writes the output into ``out`` (B, Hq, Lq, Dv), any strides, and LSE into ``lse`` (B, Hq, Lq)
    fp32, contiguous."""
    args = (key_padding_mask, attn_mask, is_causal, scale, dropout_p, seed, num_splits)
    forward(query, key, value, *args, out=out, lse=lse)


@_fwd_out_op.register_fake
def _(query, key, value, key_padding_mask, attn_mask, is_causal, scale, dropout_p, seed, num_splits, out, lse):
    return None


@torch.library.custom_op("mmfast::cross_attention_backward_triton", mutates_args=())
def _bwd_op(
    dout: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float,
    dropout_p: float,
    seed: Tensor,
    mask_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dS): dS (B, Hq, Lq, Lk) fp32 when mask_grad, else an empty tensor."""
    return backward(
        dout,
        query,
        key,
        value,
        out,
        lse,
        dlse,
        key_padding_mask,
        attn_mask,
        is_causal,
        scale,
        dropout_p,
        seed,
        mask_grad,
    )


@_bwd_op.register_fake
def _(
    dout, query, key, value, out, lse, dlse, key_padding_mask, attn_mask, is_causal, scale, dropout_p, seed, mask_grad
):
    B, Hq, Lq, _ = query.shape
    shape = (B, Hq, Lq, key.shape[2]) if mask_grad else (0,)
    dmask = query.new_empty(shape, dtype=torch.float32)
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), dmask


def _reduce_mask_grad(dmask: Tensor, attn_mask: Tensor) -> Tensor:
    """Sum the full (B, Hq, Lq, Lk) gradient over the dims the mask was broadcast along."""
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    dims = [i for i in range(4) if shape[i] == 1 and dmask.shape[i] != 1]
    if dims:
        dmask = dmask.sum(dims, keepdim=True)
    return dmask.reshape(attn_mask.shape).to(attn_mask.dtype)


def _into_call(is_causal: bool, scale: float, dropout_p: float, seed: Tensor, num_splits: int) -> IntoCall:
    """The triton ops for the out= path (mmfast/ops/_attention_out.py), with this call's settings."""

    def forward_out(q, k, v, kpm, mask, out):
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        torch.ops.mmfast.cross_attention_forward_out_triton(
            q, k, v, kpm, mask, is_causal, scale, dropout_p, seed, num_splits, out, lse
        )
        return lse

    def backward(dout, dlse, q, k, v, out, lse, kpm, mask, mask_grad):
        if dout is None:  # only the LSE was used: out drops out of delta = rowsum(dO out) - dlse
            out = dout = q.new_zeros(*q.shape[:3], v.shape[3])
        dq, dk, dv, dmask = torch.ops.mmfast.cross_attention_backward_triton(
            dout, q, k, v, out, lse, dlse, kpm, mask, is_causal, scale, dropout_p, seed, mask_grad
        )
        return dq, dk, dv, _reduce_mask_grad(dmask, mask) if mask_grad else None

    return IntoCall(forward_out, backward)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kpm, mask, is_causal, scale, dropout_p, seed, num_splits = inputs
    ctx.save_for_backward(q, k, v, *output, kpm, mask, seed)
    ctx.settings = (is_causal, scale, dropout_p)
    ctx.set_materialize_grads(False)  # an unused LSE arrives as None: no dlse pass in the kernels


def _backward(ctx, dout: Tensor, dlse: Tensor | None):
    q, k, v, out, lse, kpm, mask, seed = ctx.saved_tensors
    mask_grad = mask is not None and mask.is_floating_point() and bool(ctx.needs_input_grad[4])
    dq, dk, dv, dmask = _into_call(*ctx.settings, seed, 0).backward(dout, dlse, q, k, v, out, lse, kpm, mask, mask_grad)
    return dq, dk, dv, None, dmask, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_bwd_op.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)


# --------------------------------------------------------------------------------------------
# Backend entry point and dispatch registration.
# --------------------------------------------------------------------------------------------


def triton_cross_attention(
    query: Tensor, key: Tensor, value: Tensor, *, num_splits: int = 0, **options: Any
) -> Tensor | tuple[Tensor, Tensor]:
    """Backend ``triton`` of ``mmfast.cross_attention`` (inputs already validated there).

    query (B, Hq, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv) -> out (B, Hq, Lq, Dv)
    [, lse (B, Hq, Lq) fp32]. ``options``: mmfast.cross_attention's keyword arguments (key_padding_mask,
    attn_mask, is_causal, scale, dropout_p, return_lse, out; the same defaults). ``num_splits`` forces
    the split-KV factor (0: automatic).

    With ``out=`` and gradients, ``out`` is saved for the backward (delta = rowsum(dO * out)), so
    autograd raises if that buffer (or any view of its base) is written again before backward:
    fill the other parts of a fusion buffer first.
    """
    o = options_of("triton_cross_attention", options)
    key_padding_mask, attn_mask, is_causal, scale = o["key_padding_mask"], o["attn_mask"], o["is_causal"], o["scale"]
    dropout_p, return_lse, out = o["dropout_p"], o["return_lse"], o["out"]
    scale = default_scale(query.shape[-1]) if scale is None else float(scale)
    seed = draw_seed() if dropout_p > 0 else _NO_SEED
    args = (is_causal, scale, float(dropout_p), seed, int(num_splits))
    if out is None or torch.compiler.is_compiling():
        # Compiled graphs are functionalized (an in-place write into a graph input becomes a copy
        # anyway), and the view-rebasing Function below trips an autograd assert under AOT
        # autograd, so traced code takes the functional op and copies.
        o, lse = torch.ops.mmfast.cross_attention_forward_triton(query, key, value, key_padding_mask, attn_mask, *args)
        if out is not None:
            o = out.copy_(o)
    else:
        o, lse = attention_into(out, query, key, value, key_padding_mask, attn_mask, _into_call(*args))
    return (o, lse) if return_lse else o


def reasons(*, dtype: torch.dtype, D: int, Dv: int, **_) -> list[str]:
    """Why the Triton kernels cannot take these inputs (empty: they can)."""
    why = []
    if dtype not in _DTYPES:
        why.append(f"triton kernels take float32, float16 or bfloat16, got {dtype}")
    elif dtype == torch.bfloat16 and _INTERPRET:
        why.append("the Triton interpreter has no bfloat16 arithmetic")
    if max(D, Dv) > MAX_HEAD_DIM:
        why.append(f"head dim D={D}, Dv={Dv} is above the triton kernels' limit of {MAX_HEAD_DIM}")
    if min(D, Dv) < 1:
        why.append(f"head dim D={D}, Dv={Dv} must be at least 1")
    return why


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (for the sm_80 / sm_90 compile-only check).
# --------------------------------------------------------------------------------------------

_FP32_ARGS = {"LSE", "LP", "OP", "DELTA", "DLSE", "DMASK"}
_FLOAT_SCALARS = {"qk_scale", "scale", "drop_scale"}
_DATA_ARGS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}


def _signature(fn, dtype: str, constexprs: dict, mask_dtype: str = "u8") -> dict[str, str]:
    """Triton signature of ``fn``: tensors by name, strides/sizes/seeds i32, scales fp32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _FP32_ARGS or (name == "O" and constexprs.get("NUM_SPLITS", 1) > 1):
            sig[name] = "*fp32"
        elif name == "KPM":
            sig[name] = "*u8"
        elif name == "MASK":
            sig[name] = f"*{mask_dtype}"
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        elif name in _DATA_ARGS:
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "i32"
    return sig


def _unit_strides(fn, constexprs: dict) -> dict:
    """Head-dim strides (and the padding mask's / a dense mask's key stride) set to 1, as the JIT
    specializes them for contiguous last dims: without it the compiler sees gathers."""
    unit = {a: 1 for a in fn.arg_names if a.startswith("stride_") and a.endswith("d")}
    if "stride_kpn" in fn.arg_names:
        unit["stride_kpn"] = 1
    if constexprs.get("MASK_KIND", 0) and "stride_mn" in fn.arg_names:
        unit["stride_mn"] = 1
    return {**constexprs, **unit}


_ALIGNED_STRIDES = (
    "stride_q",
    "stride_k",
    "stride_v",
    "stride_o",
    "stride_do",
    "stride_dq",
    "stride_dk",
    "stride_dv",
    "stride_p",
)


def compile_attrs(fn, signature: dict[str, str]) -> dict:
    """The alignment facts the JIT finds at run time for typical inputs (torch allocations are
    16-byte aligned; q/k/v/out row strides are multiples of 16 for D = 64/128), as ``ASTSource``
    ``attrs``. Without them the compiler sees unaligned scalar loads (sm_90 forward, D=64: 254
    registers instead of 132). Mask/LSE strides (multiples of Lk, Lq) get no hint."""
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        kind = signature[name]
        if kind.startswith("*") or (kind == "i32" and name.startswith(_ALIGNED_STRIDES) and name != "stride_kpb"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_specs() -> list[tuple[str, object, dict[str, str], dict]]:
    """``(name, jit_fn, signature, constexprs)`` for every kernel at realistic settings.

    Covers D = 64 and 128 in bf16 and fp32 (plus masks, causal, dropout, split-KV and the float
    mask gradient), for ``triton.compile(ASTSource(fn, signature, constexprs), target=...)`` with
    the default 4 warps (tiles chosen to suit 4 warps); contiguous last dims, as at run time.
    """
    specs = []
    for dt, d in (("bf16", 64), ("bf16", 128), ("fp32", 64), ("fp32", 128)):
        prec = "tf32x3" if dt == "fp32" else "tf32"
        base = dict(BLOCK_D=d, BLOCK_DV=d, MASK_KIND=0, HAS_KPM=True, IS_CAUSAL=False, HAS_DROPOUT=False, DOT_PREC=prec)
        bn = 64 if dt == "bf16" else 32
        variants = [
            ("attn_fwd", kern.attn_fwd, dict(base, BLOCK_M=64, BLOCK_N=bn, NUM_SPLITS=1), "u8"),
            ("attn_bwd_dkdv", kern.attn_bwd_dkdv, dict(base, BLOCK_M=32, BLOCK_N=bn), "u8"),
            ("attn_bwd_dq", kern.attn_bwd_dq, dict(base, BLOCK_M=64, BLOCK_N=32, MASK_GRAD=False), "u8"),
            ("attn_merge", kern.attn_merge, dict(BLOCK_M=64, BLOCK_DV=d, NUM_SPLITS=4), "u8"),
            ("attn_bwd_preprocess", kern.attn_bwd_preprocess, dict(BLOCK_M=64, BLOCK_DV=d, HAS_DLSE=True), "u8"),
        ]
        if dt == "bf16":  # every feature on: float mask (+ its gradient), causal, dropout, split-KV
            full = dict(base, MASK_KIND=2, IS_CAUSAL=True, HAS_DROPOUT=True)
            variants += [
                ("attn_fwd_all", kern.attn_fwd, dict(full, BLOCK_M=64, BLOCK_N=bn, NUM_SPLITS=4), dt),
                ("attn_bwd_dkdv_all", kern.attn_bwd_dkdv, dict(full, BLOCK_M=32, BLOCK_N=bn), dt),
                ("attn_bwd_dq_all", kern.attn_bwd_dq, dict(full, BLOCK_M=64, BLOCK_N=32, MASK_GRAD=True), dt),
            ]
        for name, fn, cx, mask_dt in variants:
            cx = _unit_strides(fn, cx)
            specs.append((f"{name}_{dt}_d{d}", fn, _signature(fn, dt, cx, mask_dt), cx))
    return specs
