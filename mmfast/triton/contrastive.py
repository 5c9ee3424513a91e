"""Triton backend of ``info_nce`` and ``siglip_loss``: launchers, custom ops, dispatch registration.

The kernels (and the math) are in ``mmfast/triton/contrastive_kernels.py``. Forward: one pass over
the (row block, column block) tiles of S = s·X Yᵀ gives the row and column log-sum-exp (fp32,
online max); the backward recomputes the tiles and writes dX (row-parallel) and dY
(column-parallel) without float atomics, so results are deterministic. Memory beyond the inputs
and gradients: O(N + M) statistics plus a (N / BLOCK_N) x M buffer of column partials.

Custom ops (fake + autograd registered, so ``torch.compile(fullgraph=True)`` traces through):

    mmfast::contrastive_forward_triton(x, y, scale, bias, labels, loss, direction, reduction)
        -> (loss, row_stat, col_stat)
    mmfast::contrastive_backward_triton(grad, x, y, scale, bias, labels, row_stat, col_stat,
        loss, direction, reduction) -> (dx, dy, dscale, dbias)

with the integer codes and the statistics layout of the C++ schema (csrc/contrastive/cpu.cpp):
loss 0 = InfoNCE, 1 = SigLIP; direction 0 = both, 1 = image, 2 = text; reduction 0 = mean,
1 = sum, 2 = none; row_stat (N,) / col_stat (M,) fp32 log-sum-exp, empty where the direction does
not read them. The op bodies check the labels' values (they run eagerly, also under torch.compile).

Block primitives (``block_forward`` / ``block_backward``, the ``triton`` backend of
mmfast.ops.contrastive's ``block_forward`` / ``block_backward``): the same kernels on one block of a
larger logits matrix, with labels -1 for rows whose target lies in another block, external
statistics and weights, fp32 gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
from torch import Tensor

from mmfast.ops.contrastive import CODES, no_double_backward, stat_shapes
from mmfast.triton import INTERPRET
from mmfast.triton import contrastive_kernels as K

# The ops' argument codes (one definition: mmfast.ops.contrastive.CODES).
INFO_NCE, SIGLIP = CODES["info_nce"], CODES["siglip"]
BOTH, TEXT = CODES["both"], CODES["text"]
MEAN, SUM, NONE = CODES["mean"], CODES["sum"], CODES["none"]
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# --------------------------------------------------------------------------------------------
# Tile configurations. The forward's BLOCK_N is chosen on the host (it sizes the column-partials
# buffer); everything else is autotuned on GPU among configs that ptxas compiles without (or with
# only a few bytes of) register spills for sm_80 and sm_90 (16-byte aligned inputs; figures from
# tools/triton_compile_report.py). fp32 "ieee" dots run on FMA units and hold their operands in
# registers, hence narrower K and D chunks. Under the interpreter: one small config, no tuning.
# --------------------------------------------------------------------------------------------


def _capability() -> tuple[int, int]:
    if INTERPRET or not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability()


def _configs(shapes: list[tuple], names: tuple[str, ...], family: str) -> list[triton.Config]:
    out = []
    for *blocks, warps, stages in shapes:
        cfg = triton.Config(dict(zip(names, blocks)), num_warps=warps, num_stages=stages)
        cfg.family = family  # read by _prune: "16" for fp16/bf16 inputs, "32" for fp32
        out.append(cfg)
    return out


def _fwd_configs() -> list[triton.Config]:
    names = ("BLOCK_M", "BLOCK_K")
    if INTERPRET:
        return _configs([(32, 64, 1, 1)], names, "any")
    if _capability() >= (9, 0):
        half = [(64, 64, 4, 4), (128, 64, 8, 4), (128, 32, 8, 4)]
    else:
        half = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 2)]
    single = [(64, 32, 4, 2), (128, 32, 8, 3), (64, 16, 4, 3)]
    return _configs(half, names, "16") + _configs(single, names, "32")


def _bwd_configs() -> list[triton.Config]:
    names = ("BLOCK_N", "BLOCK_M", "BLOCK_K", "BLOCK_DV")  # BLOCK_N: rows owned (dx) or swept (dy)
    if INTERPRET:
        return _configs([(32, 32, 64, 64, 1, 1)], names, "any")
    if _capability() >= (9, 0):
        half = [(64, 64, 64, 128, 4, 3), (128, 64, 64, 128, 8, 3), (64, 64, 64, 256, 8, 2)]
        single = [(64, 64, 16, 128, 8, 2), (32, 64, 32, 128, 4, 2)]
    else:
        half = [(64, 64, 64, 128, 4, 3), (128, 64, 64, 128, 8, 2), (64, 64, 64, 256, 8, 2)]
        single = [(32, 32, 32, 64, 4, 2), (64, 32, 32, 64, 8, 2), (32, 32, 32, 128, 4, 3)]
    return _configs(half, names, "16") + _configs(single, names, "32")


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list[triton.Config]:
    """Keep the configs of the input dtype's family; drop D chunks far wider than D."""
    family = "32" if named_args["x_ptr"].dtype == torch.float32 else "16"
    width = max(64, triton.next_power_of_2(int(named_args["D"])))
    kept = [c for c in configs if c.family in (family, "any") and c.kwargs.get("BLOCK_DV", 0) <= width]
    return kept or [c for c in configs if c.family in (family, "any")][:1]


# The forward and the backward recompute the same logits: their K chunks must match (BLOCK_K 64 for
# 16-bit inputs, 32 for fp32) so each S is summed in the same order (see contrastive_kernels.py).
FWD_BLOCK_K = {"16": 64, "32": 32, "any": 64}


def _same_k(configs: list[triton.Config]) -> list[triton.Config]:
    return [c for c in configs if c.kwargs["BLOCK_K"] == FWD_BLOCK_K[c.family]]


# Launch option of every contrastive kernel: no FMA fusion, so s·T is rounded before lse is
# subtracted, identically in the forward and the backward.
NO_FUSION = dict(enable_fp_fusion=False)


def _autotuned(kernel: Any, configs: list[triton.Config]) -> Any:
    prune = dict(early_config_prune=_prune)
    return triton.autotune(configs, key=["D", "LOSS", "COL_STATS"], prune_configs_by=prune)(kernel)


_fwd = _autotuned(K._fwd_kernel, _same_k(_fwd_configs()))
_bwd_dx = _autotuned(K._bwd_dx_kernel, _same_k(_bwd_configs()))
_bwd_dy = _autotuned(K._bwd_dy_kernel, _same_k(_bwd_configs()))
MERGE_BLOCK = 32 if INTERPRET else 256


def _fwd_block_n(dtype: torch.dtype) -> int:
    if INTERPRET:
        return 32
    return 64 if dtype == torch.float32 else 128


def _num_splits(row_blocks: int, M: int, align: int, device: torch.device) -> tuple[int, int]:
    """(splits, columns per split): about two programs per SM; every split non-empty."""
    if INTERPRET:
        want = 3  # exercise the row-partial merge in tests
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = max(1, -(-2 * sms // row_blocks))
    per = -(-M // want)
    per = -(-per // align) * align
    return -(-M // per), per


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products unless the user allowed TF32 for matmuls in torch."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _strides(x: Tensor, y: Tensor) -> tuple[int, int, int, int]:
    return x.stride(0), x.stride(1), y.stride(0), y.stride(1)


# --------------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------------


def _partials(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, labels: Tensor | None, loss: int, col_stats: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Launch the forward tile pass: (row partials, target partials) (SPLITS x N) and the column
    partials (ROW_BLOCKS x M, None without col_stats)."""
    (N, D), M = x.shape, y.shape[0]
    block_n = _fwd_block_n(x.dtype)
    row_blocks = triton.cdiv(N, block_n)
    splits, per = _num_splits(row_blocks, M, 32 if INTERPRET else 128, x.device)
    f32 = dict(device=x.device, dtype=torch.float32)
    row_part = torch.empty(splits, N, **f32)
    tgt_part = torch.empty(splits, N, **f32)
    col_part = torch.empty(row_blocks, M, **f32) if col_stats else row_part
    _fwd[(row_blocks, splits)](
        x, y, scale, bias, labels if labels is not None else x,
        row_part, tgt_part, col_part,
        N, M, D, per, *_strides(x, y),
        LOSS=loss, HAS_LABELS=labels is not None, COL_STATS=col_stats, BLOCK_N=block_n,
        PRECISION=_precision(x.dtype), **NO_FUSION,
    )  # fmt: skip
    return row_part, tgt_part, col_part if col_stats else None


def _lse_merge(part: Tensor) -> Tensor:
    """log Σ_p exp part[p, :] (a P x L fp32 buffer) -> (L,)."""
    P, L = part.shape
    out = torch.empty(L, device=part.device, dtype=torch.float32)
    K._lse_merge_kernel[(triton.cdiv(L, MERGE_BLOCK),)](part, out, P, L, BLOCK=MERGE_BLOCK, **NO_FUSION)
    return out


def _reduce(rows: Tensor, reduction: int, divisor: int) -> Tensor:
    if reduction == MEAN:
        return rows.sum() / divisor
    return rows.sum() if reduction == SUM else rows


def _inverse(labels: Tensor) -> Tensor:
    inv = torch.empty_like(labels)
    inv[labels] = torch.arange(labels.numel(), device=labels.device, dtype=labels.dtype)
    return inv


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32)


def _oriented(x: Tensor, y: Tensor, direction: int) -> tuple[Tensor, Tensor]:
    """direction "text" is direction "image" with the roles of the features swapped."""
    return (y, x) if direction == TEXT else (x, y)


def _checked_labels(labels: Tensor | None, n: int, lo: int, classes: int) -> Tensor | None:
    """Contiguous int64 labels, their values checked to lie in [lo, classes)."""
    if labels is None:
        return None
    labels = labels.to(torch.int64).contiguous()
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if n and (int(labels.min()) < lo or int(labels.max()) >= classes):
        raise ValueError(f"labels must lie in [{lo}, {classes})")
    return labels


def _indexable(t: Tensor) -> Tensor:
    """The kernels index in 32 bits: features whose last element lies 2^31 elements or more from the
    first (wide row strides) are copied compactly (reasons() rejects N * D >= 2^31 itself)."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.contiguous() if last >= 2**31 else t


@torch.library.custom_op("mmfast::contrastive_forward_triton", mutates_args=())
def contrastive_forward(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, labels: Tensor | None, loss: int, direction: int, reduction: int
) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, D), y (M, D), scale and bias 0-dim fp32, labels (N,) int64 (direction text: (M,))
    -> (loss: () or per-row fp32, row_stat, col_stat): InfoNCE row (N,) / column (M,) log-sum-exp
    where the direction reads them (else empty), empty for SigLIP."""
    a, c = _oriented(_indexable(x), _indexable(y), direction)
    lo = -1 if loss == SIGLIP else 0
    labels = _checked_labels(labels, a.shape[0], lo, c.shape[0])
    col_stats = loss == INFO_NCE and direction == BOTH
    row_part, tgt_part, col_part = _partials(a, c, scale, bias, labels, loss, col_stats)
    if loss == SIGLIP:
        return _reduce(row_part.sum(0), reduction, a.shape[0]), _empty(a), _empty(a)
    row_lse = _lse_merge(row_part)
    tgt = tgt_part.sum(0)  # exactly one split holds each row's target logit, the rest hold 0
    rows = row_lse - tgt
    col_lse = _empty(a)
    if col_stats:
        inv = None if labels is None else _inverse(labels)
        if inv is not None and not bool((torch.bincount(labels, minlength=a.shape[0]) == 1).all()):
            raise ValueError("labels must be a permutation of 0..N-1 for direction='both'")
        col_lse = _lse_merge(col_part)
        rows = 0.5 * (rows + (col_lse - (tgt if inv is None else tgt[inv])))
    out = _reduce(rows, reduction, a.shape[0])
    return (out, _empty(a), row_lse) if direction == TEXT else (out, row_lse, col_lse)


@contrastive_forward.register_fake
def _(x, y, scale, bias, labels, loss, direction, reduction):
    a, _c = _oriented(x, y, direction)
    out = x.new_empty(() if reduction != NONE else (a.shape[0],), dtype=torch.float32)
    r, c = stat_shapes(x.shape[0], y.shape[0], loss, direction)
    return out, x.new_empty(r, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------------------------


def _weights(grad: Tensor, n: int, loss: int, direction: int, reduction: int) -> Tensor:
    """∂L/∂(row loss i), fp32 contiguous (n,). For "both", output row i is (l_img_i + l_txt_i) / 2,
    so the image-row weight g_i and the text-column weight h_i are the same: half of it."""
    w = grad.float()
    if reduction == MEAN:
        w = w / n
    w = w.expand(n).contiguous() if w.dim() == 0 else w.contiguous()
    return 0.5 * w if loss == INFO_NCE and direction == BOTH else w


@torch.library.custom_op("mmfast::contrastive_backward_triton", mutates_args=())
def contrastive_backward(
    grad: Tensor,
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    bias: Tensor,
    labels: Tensor | None,
    row_stat: Tensor,
    col_stat: Tensor,
    loss: int,
    direction: int,
    reduction: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad: () or per-row -> (dx (N, D) like x, dy (M, D) like y, dscale (), dbias ()) fp32 scalars."""
    a, c = _oriented(_indexable(x), _indexable(y), direction)
    labels = _checked_labels(labels, a.shape[0], -1 if loss == SIGLIP else 0, c.shape[0])
    col_stats = loss == INFO_NCE and direction == BOTH
    g = _weights(grad, a.shape[0], loss, direction, reduction)
    rlse = (col_stat if direction == TEXT else row_stat) if loss == INFO_NCE else None
    da, dc, ds, db = _grads(
        a, c, scale, bias, labels, g, g if col_stats else None, rlse, col_stat, loss, a.dtype, False
    )
    dx, dy = _oriented(da, dc, direction)
    return dx, dy, ds.sum(), db


def _grads(
    a: Tensor,
    c: Tensor,
    scale: Tensor,
    bias: Tensor,
    labels: Tensor | None,
    g: Tensor,
    h: Tensor | None,
    rlse: Tensor | None,
    clse: Tensor | None,
    loss: int,
    out_dtype: torch.dtype,
    split: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both backward kernels: (da (N, D), dc (M, D) in out_dtype, dscale (2,) = [g terms, h terms]
    (with ``split``; else [all, 0]), dbias ()). g (N,) row weights, h (M,) column weights or None."""
    (N, D), M = a.shape, c.shape[0]
    col_stats = h is not None
    da = torch.empty(N, D, device=a.device, dtype=out_dtype)
    dc = torch.empty(M, D, device=a.device, dtype=out_dtype)
    ds = torch.empty(3, N, device=a.device, dtype=torch.float32)
    rlse = g if rlse is None else rlse.float().contiguous()
    clse = clse.float().contiguous() if col_stats else g
    h = h if col_stats else g
    lab = labels if labels is not None else a
    meta = dict(LOSS=loss, HAS_LABELS=labels is not None, COL_STATS=col_stats, PRECISION=_precision(a.dtype))
    common = (a, c, scale, bias, lab, g, h, rlse, clse)
    _bwd_dx[lambda m: (triton.cdiv(N, m["BLOCK_N"]), triton.cdiv(D, m["BLOCK_DV"]))](
        *common, da, ds[0], ds[1], ds[2], N, M, D, *_strides(a, c), **meta, SPLIT_DS=split and col_stats, **NO_FUSION
    )
    _bwd_dy[lambda m: (triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(D, m["BLOCK_DV"]))](
        *common, dc, N, M, D, *_strides(a, c), **meta, **NO_FUSION
    )
    db = ds[2].sum() if loss == SIGLIP else torch.zeros((), device=a.device)  # InfoNCE: no bias
    return da, dc, ds[:2].sum(1), db


@contrastive_backward.register_fake
def _(grad, x, y, scale, bias, labels, row_stat, col_stat, loss, direction, reduction):
    f32 = dict(device=x.device, dtype=torch.float32)
    dx, dy = x.new_empty(x.shape), y.new_empty(y.shape)  # contiguous, as the kernels write them
    return dx, dy, torch.empty((), **f32), torch.empty((), **f32)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, y, scale, bias, labels, loss, direction, reduction = inputs
    _loss, row_stat, col_stat = output
    ctx.save_for_backward(x, y, scale, bias, labels, row_stat, col_stat)
    ctx.codes = (loss, direction, reduction)


def _backward(ctx: Any, grad: Tensor, _grad_row: Tensor, _grad_col: Tensor) -> tuple:
    x, y, scale, bias, labels, row_stat, col_stat = ctx.saved_tensors
    dx, dy, ds, db = contrastive_backward(grad, x, y, scale, bias, labels, row_stat, col_stat, *ctx.codes)
    return dx, dy, ds, db, None, None, None, None


contrastive_forward.register_autograd(_backward, setup_context=_setup_context)
contrastive_backward.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)


# --------------------------------------------------------------------------------------------
# Backend functions (called by mmfast.info_nce / mmfast.siglip_loss after validation).
# --------------------------------------------------------------------------------------------


def _scalar(v: Tensor | float, device: torch.device) -> Tensor:
    if isinstance(v, Tensor):
        return v.to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(v), device=device, dtype=torch.float32)


def info_nce(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    labels: Tensor | None,
    direction: str,
    reduction: str,
) -> Tensor:
    """InfoNCE / CLIP on (N, D) and (M, D) features; see ``mmfast.info_nce``."""
    dev = image_features.device
    scale, bias = _scalar(logit_scale, dev), torch.zeros((), device=dev, dtype=torch.float32)
    labels = labels.long().contiguous() if labels is not None else None
    out, _, _ = contrastive_forward(
        image_features, text_features, scale, bias, labels, INFO_NCE, CODES[direction], CODES[reduction]
    )
    return out


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    reduction: str,
) -> Tensor:
    """SigLIP on (N, D) and (N, D) features; see ``mmfast.siglip_loss``."""
    dev = image_features.device
    scale, bias = _scalar(logit_scale, dev), _scalar(logit_bias, dev)
    out, _, _ = contrastive_forward(image_features, text_features, scale, bias, None, SIGLIP, BOTH, CODES[reduction])
    return out


def _block_labels(labels: Tensor | None, n: int, m: int, device: torch.device) -> Tensor:
    """A block's labels in [-1, m); None: no target / positive in this block (all -1: the kernels
    read absent labels as the diagonal)."""
    if labels is None:
        return torch.full((n,), -1, device=device, dtype=torch.int64)
    return _checked_labels(labels, n, -1, m)


def block_forward(
    x: Tensor, y: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float, *, labels: Tensor | None, loss: str
) -> tuple[Tensor, Tensor, Tensor]:
    """One block's statistics; see ``mmfast.ops.contrastive.block_forward``. labels -1: no target."""
    dev = x.device
    scale, bias = _scalar(logit_scale, dev).detach(), _scalar(logit_bias, dev).detach()
    x, y = _indexable(x), _indexable(y)
    n, m = x.shape[0], y.shape[0]
    labels = _block_labels(labels, n, m, dev)
    code = INFO_NCE if loss == "info_nce" else SIGLIP
    row_part, tgt_part, col_part = _partials(x, y, scale, bias, labels, code, code == INFO_NCE)
    if code == SIGLIP:
        return row_part.sum(0), _empty(x), _empty(x)
    return _lse_merge(row_part), _lse_merge(col_part), tgt_part.sum(0)


def block_backward(
    x: Tensor, y: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float, *, loss: str, **stats: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One block's fp32 gradients; see ``mmfast.ops.contrastive.block_backward`` (``stats``: its
    labels, row_lse, col_lse, row_weight, col_weight)."""
    labels, row_lse, col_lse = stats["labels"], stats["row_lse"], stats["col_lse"]
    row_weight, col_weight = stats["row_weight"], stats["col_weight"]
    dev = x.device
    scale, bias = _scalar(logit_scale, dev).detach(), _scalar(logit_bias, dev).detach()
    x, y = _indexable(x), _indexable(y)
    labels = _block_labels(labels, x.shape[0], y.shape[0], dev)
    g = row_weight.float().contiguous()
    h = None if col_weight is None else col_weight.float().contiguous()
    code = INFO_NCE if loss == "info_nce" else SIGLIP
    return _grads(x, y, scale, bias, labels, g, h, row_lse, col_lse, code, torch.float32, True)


def reasons(*, dtype: torch.dtype, N: int, M: int, D: int, direction: str, reduction: str) -> list[str]:
    """Why the Triton kernels cannot take these inputs (empty: they can)."""
    why = []
    if dtype not in SUPPORTED_DTYPES:
        why.append(f"triton contrastive kernels take float32, float16, bfloat16 (got {dtype})")
    if INTERPRET and dtype == torch.bfloat16:
        why.append("the Triton interpreter (TRITON_INTERPRET=1) has no bf16 arithmetic")
    if max(N, M) * max(D, 1) >= 2**31:
        why.append(f"N*D and M*D must be < 2^31 for 32-bit indexing (got N={N}, M={M}, D={D})")
    return why


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (the compile-only test builds each for sm_80 and sm_90).
# --------------------------------------------------------------------------------------------

_TORCH_TO_TRITON = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_specs() -> list[tuple[str, Any, dict[str, str], dict[str, Any]]]:
    """(name, jit_fn, signature, constexprs) for every kernel, with realistic constexprs (fp32 and
    bf16, InfoNCE both directions / one direction and SigLIP), contiguous features (unit inner
    strides, as the JIT specializes them), for
    ``triton.compile(ASTSource(jit_fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))``.
    """
    specs = []
    variants = [  # (tag, dtype, LOSS, COL_STATS, HAS_LABELS)
        ("clip_fp32", torch.float32, INFO_NCE, True, False),
        ("clip_bf16", torch.bfloat16, INFO_NCE, True, True),
        ("image_fp16", torch.float16, INFO_NCE, False, True),
        ("siglip_bf16", torch.bfloat16, SIGLIP, False, False),
    ]
    for tag, dtype, loss, col_stats, has_labels in variants:
        t = _TORCH_TO_TRITON[dtype]
        flags = dict(LOSS=loss, HAS_LABELS=has_labels, COL_STATS=col_stats, sxd=1, syd=1)
        fwd_sig = {
            **dict.fromkeys(["x_ptr", "y_ptr"], f"*{t}"),
            **dict.fromkeys(["scale_ptr", "bias_ptr", "row_part_ptr", "tgt_part_ptr", "col_part_ptr"], "*fp32"),
            "labels_ptr": "*i64",
            **dict.fromkeys(["N", "M", "D", "cols_per_split", "sxn", "syn"], "i32"),
        }
        single = dtype == torch.float32  # blocks of a spill-free autotune config of the dtype's family
        fwd_blocks = dict(BLOCK_M=64, BLOCK_K=32 if single else 64)
        fwd_const = dict(flags, BLOCK_N=_fwd_block_n(dtype), **fwd_blocks, PRECISION="ieee")
        specs.append(_spec(f"fwd_{tag}", K._fwd_kernel, fwd_sig, fwd_const))
        bwd_sig = {
            **dict.fromkeys(["x_ptr", "y_ptr"], f"*{t}"),
            **dict.fromkeys(["scale_ptr", "bias_ptr", "g_ptr", "h_ptr", "rlse_ptr", "clse_ptr"], "*fp32"),
            "labels_ptr": "*i64",
            **dict.fromkeys(["N", "M", "D", "sxn", "syn"], "i32"),
        }
        bwd_blocks = (
            dict(BLOCK_N=32, BLOCK_M=32, BLOCK_K=32, BLOCK_DV=64)
            if single
            else dict(BLOCK_N=64, BLOCK_M=64, BLOCK_K=64, BLOCK_DV=128)
        )
        bwd_const = dict(flags, **bwd_blocks, PRECISION="ieee")
        dx_sig = dict(bwd_sig, dx_ptr=f"*{t}", ds_ptr="*fp32", dsc_ptr="*fp32", db_ptr="*fp32")
        specs.append(_spec(f"bwd_dx_{tag}", K._bwd_dx_kernel, dx_sig, dict(bwd_const, SPLIT_DS=False)))
        dy_sig = dict(bwd_sig, dy_ptr=f"*{t}")
        specs.append(_spec(f"bwd_dy_{tag}", K._bwd_dy_kernel, dy_sig, bwd_const))
    merge_sig = {"part_ptr": "*fp32", "out_ptr": "*fp32", "P": "i32", "L": "i32"}
    specs.append(_spec("lse_merge", K._lse_merge_kernel, merge_sig, {"BLOCK": 256}))
    return specs


def compile_attrs(jit_fn: Any, signature: dict[str, str]) -> dict[tuple[int, ...], list]:
    """The ``attrs`` the JIT gives at run time to 16-byte aligned pointers and to the row strides
    and D when they are multiples of 16 (the usual case), for ``ASTSource(..., attrs=...)``.

    Without them loads cannot be vectorized and ptxas reports spills that real launches on
    aligned inputs do not have.
    """
    hinted = [a for a, t in signature.items() if t.startswith("*") or a in ("sxn", "syn", "D")]
    return {(jit_fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in hinted}


def _spec(name: str, fn: Any, sig: dict[str, str], constexprs: dict[str, Any]) -> tuple:
    """(name, fn, full signature in argument order with constexprs typed "constexpr", constexprs)."""
    merged = {**sig, **dict.fromkeys(constexprs, "constexpr")}
    return name, fn, {arg: merged[arg] for arg in fn.arg_names}, constexprs
