"""Public contrastive-loss ops: ``info_nce`` (InfoNCE / CLIP) and ``siglip_loss``, and the block
primitives that losses over logits no process holds whole are built from (``block_forward``,
``merge_lse``, ``block_backward``: mmfast.nn's ring).

Each validates its inputs once, then dispatches to a backend (see ``mmfast._dispatch``). The
kernels' custom-op registrations (fake + autograd) live beside their backends.

Statistics, one layout on every backend: the log-sum-exp of each row (N,) and each column (M,) of
the logits S = s x yᵀ, float32 (float64 for float64 input). A max is folded into it, so merging the
statistics of two blocks is ``logaddexp`` (``merge_lse``).

Empty inputs (NUMERICS.md): N = 0 or M = 0 give an empty "none", a sum of 0 and a mean of NaN; D = 0
makes every logit 0. Such inputs have nothing to tile and are evaluated by the reference formulas
whichever backend is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mmfast import _dispatch
from mmfast import reference as _ref
from mmfast.ops._validate import check_choice, check_same, check_scalar, check_tensor
from mmfast.reference import contrastive as _ref_blocks

# The choices of the public arguments, defined once. The custom ops' schemas take an argument's
# position in its tuple (``int loss, int direction, int reduction``: CODES); the C++ kernels name the
# same codes in csrc/contrastive/codes.h (tests/test_structure.py checks that the two agree).
LOSSES = ("info_nce", "siglip")
DIRECTIONS = ("both", "image", "text")
REDUCTIONS = ("mean", "sum", "none")
CODES = {name: i for choices in (LOSSES, DIRECTIONS, REDUCTIONS) for i, name in enumerate(choices)}


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_label_tensor(labels: object, n: int, device: torch.device) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of int64, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 (or int32) tensor, got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the features are on {device}")
    return labels


def _check_labels(labels: Tensor | None, n: int, classes: int, device: torch.device, permutation: bool) -> None:
    """Type, shape and device always; the values (range, permutation) only outside torch.compile,
    where reading them would break the graph: compiled, the kernels check them when they run."""
    if labels is None:
        return
    _check_label_tensor(labels, n, device)
    if _compiling() or not n:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        raise ValueError(f"labels must lie in [0, {classes}), got values in [{lo}, {hi}]")
    if permutation and not bool((torch.bincount(labels.long(), minlength=classes) == 1).all()):
        raise ValueError("labels must be a permutation of 0..N-1 for direction='both'")


def _check_features(image_features: Tensor, text_features: Tensor) -> tuple[int, int, int]:
    check_tensor("image_features", image_features, ndim=2)
    check_tensor("text_features", text_features, ndim=2)
    check_same(("image_features", "text_features"), (image_features, text_features))
    (N, D), (M, Dt) = image_features.shape, text_features.shape
    if D != Dt:
        raise ValueError(f"image_features has D={D} but text_features has D={Dt}")
    return N, M, D


def info_nce(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    labels: Tensor | None = None,
    direction: str = "both",
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """InfoNCE / CLIP contrastive loss without materializing the N x M logits.

    logits[i, j] = logit_scale * <image_features[i], text_features[j]>.

    Args:
        image_features: (N, D) float32, bfloat16, float16 (or float64).
        text_features: (M, D), same dtype and device.
        logit_scale: the multiplier s (open_clip passes ``logit_scale.exp()``); a float, or a 0-dim
            tensor, which then receives a gradient.
        labels: optional (N,) int64 (or int32) targets of the image direction ((M,) for "text");
            default ``arange``. For "both", a permutation: text j's target is the image i with
            labels[i] == j.
        direction: "both" (CLIP, N == M, mean of both directions), "image" (each image over the M
            texts, M >= N allowed) or "text" (each text over the N images).
        reduction: "mean" | "sum" | "none" (per-row losses; for "both" row i is the mean of image
            i's and text i's losses).
        backend: "auto" | "cpu" | "cuda" | "triton" | "reference".

    Returns:
        the loss in float32 (float64 for float64 input): a scalar, or per-row for "none".
        Second-order gradients are not supported (a clear error; use backend="reference").
    """
    N, M, D = _check_features(image_features, text_features)
    check_choice("direction", direction, DIRECTIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    device = image_features.device
    logit_scale = check_scalar("logit_scale", logit_scale, device)
    if direction == "both" and N != M:
        raise ValueError(f"direction='both' needs as many images as texts, got N={N} and M={M}")
    if direction == "image":
        if labels is None and M < N:
            raise ValueError(f"direction='image' with default labels needs M >= N, got N={N}, M={M}")
        _check_labels(labels, N, M, device, permutation=False)
    elif direction == "text":
        if labels is None and N < M:
            raise ValueError(f"direction='text' with default labels needs N >= M, got N={N}, M={M}")
        _check_labels(labels, M, N, device, permutation=False)
    else:
        _check_labels(labels, N, N, device, permutation=True)
    if labels is not None:
        labels = labels.to(torch.int64)  # int32 accepted; every backend gets int64
    kw = dict(labels=labels, direction=direction, reduction=reduction)
    if N == 0 or M == 0 or D == 0:
        return _ref.info_nce(image_features, text_features, logit_scale, **kw)
    args = dict(dtype=image_features.dtype, N=N, M=M, D=D, direction=direction, reduction=reduction)
    impl = _dispatch.select(INFO_NCE, backend, device, args)
    return impl(image_features, text_features, logit_scale, **kw)


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """SigLIP pairwise sigmoid loss without materializing the N x N logits.

    loss = -(1/N) sum_i sum_j log sigmoid(z_ij * (s * <x_i, y_j> + b)), z_ii = 1, z_ij = -1 (i != j).

    Args:
        image_features: (N, D); text_features: (N, D), same dtype and device.
        logit_scale: s, a float or 0-dim tensor (receives a gradient).
        logit_bias: b, a float or 0-dim tensor (receives a gradient).
        reduction: "mean" (open_clip's: total / N), "sum", or "none" ((N,) per image).
        backend: "auto" | "cpu" | "cuda" | "triton" | "reference".
    """
    N, M, D = _check_features(image_features, text_features)
    if N != M:
        raise ValueError(f"siglip_loss needs as many images as texts, got N={N} and M={M}")
    check_choice("reduction", reduction, REDUCTIONS)
    device = image_features.device
    logit_scale = check_scalar("logit_scale", logit_scale, device)
    logit_bias = check_scalar("logit_bias", logit_bias, device)
    if N == 0 or D == 0:
        return _ref.siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction=reduction)
    args = dict(dtype=image_features.dtype, N=N, M=M, D=D, direction="both", reduction=reduction)
    impl = _dispatch.select(SIGLIP_LOSS, backend, device, args)
    return impl(image_features, text_features, logit_scale, logit_bias, reduction=reduction)


# --------------------------------------------------------------------------------------------
# Block primitives.
# --------------------------------------------------------------------------------------------


def merge_lse(*stats: Tensor) -> Tensor:
    """Merge log-sum-exp statistics of the same rows (or columns) over disjoint blocks of columns:
    log(Σ_k exp(stats[k])), elementwise (logaddexp: -inf is the neutral element, +inf wins, NaN stays)."""
    out = stats[0]
    for s in stats[1:]:
        out = torch.logaddexp(out, s)
    return out


def _check_block(
    x: Tensor, y: Tensor, labels: Tensor | None, loss: str, injective: bool
) -> tuple[int, int, int, Tensor | None]:
    check_tensor("x", x, ndim=2)
    check_tensor("y", y, ndim=2)
    check_same(("x", "y"), (x, y))
    check_choice("loss", loss, LOSSES)
    (n, D), (m, Dy) = x.shape, y.shape
    if D != Dy:
        raise ValueError(f"x has D={D} but y has D={Dy}")
    if labels is None:
        return n, m, D, None
    labels = _check_label_tensor(labels, n, x.device)
    if n and not _compiling():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < -1 or hi >= m:
            raise ValueError(f"labels must lie in [-1, {m}) (-1: the target is in another block), got [{lo}, {hi}]")
        hit = labels[labels >= 0].long()
        if injective and hit.numel() and int(torch.bincount(hit, minlength=m).max()) > 1:
            raise ValueError("labels must give each column at most one row (column weights or SigLIP)")
    return n, m, D, labels.to(torch.int64)


def _stat_arg(name: str, t: Tensor | None, n: int, device: torch.device) -> Tensor:
    if t is None:
        raise ValueError(f"{name} is required here")
    check_tensor(name, t, ndim=1)
    if t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    return t


def block_forward(
    x: Tensor,
    y: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float = 0.0,
    *,
    labels: Tensor | None = None,
    loss: str = "info_nce",
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics of one block S = s x yᵀ (+ b) of a larger logits matrix, never built.

    Args:
        x: (n, D) the block's rows (image features); y: (m, D) its columns (text features).
        labels: optional (n,) int64, each row's target column inside this block, -1 where it lies in
            another block; None: no targets in this block. SigLIP: the positive pairs.
        loss: "info_nce" or "siglip".

    Returns:
        InfoNCE: (row_lse (n,), col_lse (m,), target (n,) = S[i, labels[i]], 0 where none).
        SigLIP: (rows (n,) = Σ_j softplus(-z_ij (S_ij + b)), empty, empty).
        float32 (float64 for float64 input). Not differentiable: see ``block_backward``.
    """
    n, m, D, labels = _check_block(x, y, labels, loss, injective=loss == "siglip")
    logit_scale = check_scalar("logit_scale", logit_scale, x.device)
    logit_bias = check_scalar("logit_bias", logit_bias, x.device)
    kw = dict(labels=labels, loss=loss)
    if n == 0 or m == 0 or D == 0:
        return _ref_blocks.block_forward(x, y, logit_scale, logit_bias, **kw)
    args = dict(dtype=x.dtype, N=n, M=m, D=D, direction="both", reduction="none")
    return _dispatch.select(BLOCK_FORWARD, backend, x.device, args)(x, y, logit_scale, logit_bias, **kw)


def block_backward(
    x: Tensor,
    y: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float = 0.0,
    *,
    labels: Tensor | None = None,
    row_lse: Tensor | None = None,
    col_lse: Tensor | None = None,
    row_weight: Tensor,
    col_weight: Tensor | None = None,
    loss: str = "info_nce",
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of one block given the final (merged) statistics and the loss weights:

        InfoNCE  G_ij = a_i (e^(S_ij - row_lse_i) - T_ij) + c_j (e^(S_ij - col_lse_j) - T_ij)
        SigLIP   G_ij = -a_i z_ij sigmoid(-z_ij (S_ij + b))

    T_ij = 1 at (i, labels[i]); a = row_weight (n,) = dLoss/d(row i's loss), c = col_weight (m,) =
    dLoss/d(column j's loss) (None: no column term). InfoNCE needs row_lse (n,), and col_lse (m,)
    with col_weight.

    Returns:
        (dx = s G y (n, D), dy = s Gᵀ x (m, D), dscale (2,) = [the row terms' Σ G·xyᵀ, the column
        terms'], dbias () = Σ G (SigLIP; 0 for InfoNCE)), float32 (float64 for float64 input):
        accumulate blocks in it and round once.
    """
    cols = col_weight is not None
    n, m, D, labels = _check_block(x, y, labels, loss, injective=cols or loss == "siglip")
    if loss == "siglip" and cols:
        raise ValueError("SigLIP blocks take row weights only (col_weight must be None)")
    dev = x.device
    row_weight = _stat_arg("row_weight", row_weight, n, dev)
    col_weight = _stat_arg("col_weight", col_weight, m, dev) if cols else None
    if loss == "info_nce":
        row_lse = _stat_arg("row_lse", row_lse, n, dev)
        col_lse = _stat_arg("col_lse", col_lse, m, dev) if cols else None
    logit_scale = check_scalar("logit_scale", logit_scale, dev)
    logit_bias = check_scalar("logit_bias", logit_bias, dev)
    kw = dict(labels=labels, row_lse=row_lse, col_lse=col_lse, row_weight=row_weight, col_weight=col_weight)
    if n == 0 or m == 0 or D == 0:
        return _ref_blocks.block_backward(x, y, logit_scale, logit_bias, loss=loss, **kw)
    args = dict(dtype=x.dtype, N=n, M=m, D=D, direction="both", reduction="none")
    impl = _dispatch.select(BLOCK_BACKWARD, backend, dev, args)
    return impl(x, y, logit_scale, logit_bias, loss=loss, **kw)


# --------------------------------------------------------------------------------------------
# The C++ custom ops (torch.ops.mmfast.contrastive_*): fake + autograd, and the "cpu" and "cuda"
# backends built on them (the same ops; the dispatcher picks the device's kernel).
# --------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def stat_shapes(N: int, M: int, loss: int, direction: int) -> tuple[int, int]:
    """Lengths of (row_stat, col_stat): the rows' (columns') log-sum-exp where the direction reads
    them, else 0. The same on every backend."""
    if loss != CODES["info_nce"]:
        return 0, 0
    return (0 if direction == CODES["text"] else N), (0 if direction == CODES["image"] else M)


def _forward_fake(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, labels: Tensor | None, loss: int, direction: int, reduction: int
) -> tuple[Tensor, Tensor, Tensor]:
    acc = _acc_dtype(x.dtype)
    text = loss == CODES["info_nce"] and direction == CODES["text"]
    rows = y.shape[0] if text else x.shape[0]
    out = x.new_empty((rows,) if reduction == CODES["none"] else (), dtype=acc)
    r, c = stat_shapes(x.shape[0], y.shape[0], loss, direction)
    return out, x.new_empty((r,), dtype=acc), x.new_empty((c,), dtype=acc)


def _backward_fake(grad_loss, x, y, scale, bias, labels, row_stat, col_stat, loss, direction, reduction) -> tuple:  # noqa: ANN001
    return x.new_empty(x.shape), y.new_empty(y.shape), scale.new_empty(()), bias.new_empty(())


def _block_forward_fake(x, y, scale, bias, labels, loss):  # noqa: ANN001, ANN202 - the op's schema
    acc = _acc_dtype(x.dtype)
    nce = loss == CODES["info_nce"]
    n, m = x.shape[0], y.shape[0]
    return (
        x.new_empty((n,), dtype=acc),
        x.new_empty((m if nce else 0,), dtype=acc),
        x.new_empty((n if nce else 0,), dtype=acc),
    )


def _block_backward_fake(x, y, scale, bias, labels, row_lse, col_lse, row_weight, col_weight, loss):  # noqa: ANN001, ANN202
    acc = _acc_dtype(x.dtype)
    return (
        x.new_empty(x.shape, dtype=acc),
        y.new_empty(y.shape, dtype=acc),
        x.new_empty((2,), dtype=acc),
        x.new_empty((), dtype=acc),
    )


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, y, scale, bias, labels, loss, direction, reduction = inputs
    _, row_stat, col_stat = output
    ctx.save_for_backward(x, y, scale, bias, labels, row_stat, col_stat)
    ctx.params = (loss, direction, reduction)


def _backward(ctx, grad_loss: Tensor, _grad_row: Tensor | None, _grad_col: Tensor | None) -> tuple:
    x, y, scale, bias, labels, row_stat, col_stat = ctx.saved_tensors
    dx, dy, dscale, dbias = torch.ops.mmfast.contrastive_backward(
        grad_loss, x, y, scale, bias, labels, row_stat, col_stat, *ctx.params
    )
    return dx, dy, dscale, dbias, None, None, None, None


def no_double_backward(ctx, *grads: Tensor) -> tuple:
    """Autograd of the backward ops: second-order gradients are not implemented, and say so."""
    raise NotImplementedError(
        "mmfast.info_nce / siglip_loss: double backward (the gradient of a gradient) is not supported; "
        "use backend='reference' for higher-order gradients"
    )


def _no_block_grad(ctx, *grads: Tensor) -> tuple:
    raise NotImplementedError("mmfast block primitives are not differentiable: use block_backward")


_CPP_OPS = ("contrastive_forward", "contrastive_backward", "contrastive_block_forward", "contrastive_block_backward")


def _register_custom_ops() -> bool:
    """Add fake and autograd registrations to the C++ ops; False when the extension is missing."""
    if not _dispatch.has_ops(*_CPP_OPS):
        return False
    torch.library.register_fake("mmfast::contrastive_forward")(_forward_fake)
    torch.library.register_fake("mmfast::contrastive_backward")(_backward_fake)
    torch.library.register_fake("mmfast::contrastive_block_forward")(_block_forward_fake)
    torch.library.register_fake("mmfast::contrastive_block_backward")(_block_backward_fake)
    torch.library.register_autograd("mmfast::contrastive_forward", _backward, setup_context=_setup_context)
    for name, fn in (("contrastive_backward", no_double_backward), ("contrastive_block_forward", _no_block_grad),
                     ("contrastive_block_backward", _no_block_grad)):  # fmt: skip
        torch.library.register_autograd(f"mmfast::{name}", fn, setup_context=lambda ctx, inputs, output: None)
    return True


def _scalar_tensor(value: Tensor | float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-dim tensor of ``dtype`` (a float becomes a constant; a tensor keeps its autograd graph)."""
    if isinstance(value, Tensor):
        return value.to(dtype)
    return torch.tensor(value, dtype=dtype, device=device)


def _kernel_info_nce(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    labels: Tensor | None,
    direction: str,
    reduction: str,
) -> Tensor:
    acc, device = _acc_dtype(image_features.dtype), image_features.device
    scale = _scalar_tensor(logit_scale, acc, device)
    bias = torch.zeros((), dtype=acc, device=device)
    labels = None if labels is None else labels.contiguous()
    loss, _, _ = torch.ops.mmfast.contrastive_forward(
        image_features,
        text_features,
        scale,
        bias,
        labels,
        CODES["info_nce"],
        CODES[direction],
        CODES[reduction],
    )
    return loss


def _kernel_siglip(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    reduction: str,
) -> Tensor:
    acc, device = _acc_dtype(image_features.dtype), image_features.device
    scale = _scalar_tensor(logit_scale, acc, device)
    bias = _scalar_tensor(logit_bias, acc, device)
    loss, _, _ = torch.ops.mmfast.contrastive_forward(
        image_features, text_features, scale, bias, None, CODES["siglip"], CODES["both"], CODES[reduction]
    )
    return loss


def _kernel_block_forward(x: Tensor, y: Tensor, logit_scale, logit_bias, *, labels, loss) -> tuple:  # noqa: ANN001
    acc = _acc_dtype(x.dtype)
    scale, bias = (_scalar_tensor(v, acc, x.device).detach() for v in (logit_scale, logit_bias))
    lab = None if labels is None else labels.contiguous()
    return torch.ops.mmfast.contrastive_block_forward(x, y, scale, bias, lab, CODES[loss])


def _kernel_block_backward(x: Tensor, y: Tensor, logit_scale, logit_bias, *, labels, loss, **stats) -> tuple:  # noqa: ANN001
    acc = _acc_dtype(x.dtype)
    scale, bias = (_scalar_tensor(v, acc, x.device).detach() for v in (logit_scale, logit_bias))
    lab = None if labels is None else labels.contiguous()
    empty = x.new_empty(0, dtype=acc)
    row_lse, col_lse, col_w = (empty if stats[k] is None else stats[k] for k in ("row_lse", "col_lse", "col_weight"))
    return torch.ops.mmfast.contrastive_block_backward(
        x, y, scale, bias, lab, row_lse, col_lse, stats["row_weight"], col_w, CODES[loss]
    )


def _cuda_reasons(dtype: torch.dtype, **_: object) -> list[str]:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return [f"cuda kernels take float32, bfloat16 or float16, got {dtype}"]
    return []


_register_custom_ops()


def _table(name: str, cpp: Callable[..., Any], triton: str, reference: Callable[..., Any]) -> _dispatch.Op:
    """The four backends of one contrastive op: the C++ ops on cpu and cuda, the triton entry point
    (imported on first use) and the reference."""
    return _dispatch.Op(
        name,
        {
            "cuda": _dispatch.Backend(
                "cuda", cpp, _cuda_reasons, _CPP_OPS, note="CUDA kernels not yet verified on hardware"
            ),
            "triton": _dispatch.Backend(
                "triton", f"mmfast.triton.contrastive:{triton}", "mmfast.triton.contrastive:reasons"
            ),
            "cpu": _dispatch.Backend("cpu", cpp, needs_ops=_CPP_OPS),
            "reference": _dispatch.Backend("reference", reference),
        },
    )


# The backends of each op (mmfast/_dispatch.py picks one per call).
INFO_NCE = _table("info_nce", _kernel_info_nce, "info_nce", _ref.info_nce)
SIGLIP_LOSS = _table("siglip_loss", _kernel_siglip, "siglip_loss", _ref.siglip_loss)
BLOCK_FORWARD = _table("contrastive_block_forward", _kernel_block_forward, "block_forward", _ref_blocks.block_forward)
BLOCK_BACKWARD = _table(
    "contrastive_block_backward", _kernel_block_backward, "block_backward", _ref_blocks.block_backward
)
