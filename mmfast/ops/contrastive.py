"""Public contrastive-loss ops: ``info_nce`` (InfoNCE / CLIP) and ``siglip_loss``.

Each validates its inputs once, then dispatches to a backend (see ``mmfast._dispatch``). The
kernels' custom-op registrations (fake + autograd) live beside their backends.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfast import _dispatch
from mmfast import reference as _ref
from mmfast.ops._validate import check_choice, check_same, check_scalar, check_tensor

DIRECTIONS = ("both", "image", "text")
REDUCTIONS = ("mean", "sum", "none")


def _check_labels(labels: Tensor | None, n: int, classes: int, device: torch.device, permutation: bool) -> None:
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of int64, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 (or int32) tensor, got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the features are on {device}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got values in [{int(labels.min())}, {int(labels.max())}]")
    if permutation and n and not bool((torch.bincount(labels.long(), minlength=classes) == 1).all()):
        raise ValueError("labels must be a permutation of 0..N-1 for direction='both'")


def _check_features(image_features: Tensor, text_features: Tensor) -> tuple[int, int, int]:
    check_tensor("image_features", image_features, ndim=2)
    check_tensor("text_features", text_features, ndim=2)
    check_same(("image_features", "text_features"), (image_features, text_features))
    (N, D), (M, Dt) = image_features.shape, text_features.shape
    if D != Dt:
        raise ValueError(f"image_features has D={D} but text_features has D={Dt}")
    if N == 0 or M == 0:
        raise ValueError(f"empty batch: image_features has {N} rows and text_features {M}")
    if D == 0:
        raise ValueError("features must have D >= 1")
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
    args = dict(dtype=image_features.dtype, N=N, M=M, D=D, direction=direction, reduction=reduction)
    impl = _dispatch.select("info_nce", backend, device, args)
    return impl.fn(image_features, text_features, logit_scale, labels=labels, direction=direction, reduction=reduction)


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
    args = dict(dtype=image_features.dtype, N=N, M=M, D=D, direction="both", reduction=reduction)
    impl = _dispatch.select("siglip_loss", backend, device, args)
    return impl.fn(image_features, text_features, logit_scale, logit_bias, reduction=reduction)


def _no_reasons(**_: object) -> list[str]:
    return []


# --------------------------------------------------------------------------------------------
# The C++ custom ops (torch.ops.mmfast.contrastive_forward / _backward): fake + autograd, and the
# "cpu" and "cuda" backends built on them (the same ops; the dispatcher picks the device's kernel).
# --------------------------------------------------------------------------------------------

_LOSS = {"info_nce": 0, "siglip": 1}
_DIRECTION = {"both": 0, "image": 1, "text": 2}
_REDUCTION = {"mean": 0, "sum": 1, "none": 2}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_fake(
    x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, labels: Tensor | None, loss: int, direction: int, reduction: int
) -> tuple[Tensor, Tensor, Tensor]:
    acc = _acc_dtype(x.dtype)
    text = loss == _LOSS["info_nce"] and direction == _DIRECTION["text"]
    rows = y.shape[0] if text else x.shape[0]
    out = x.new_empty((rows,) if reduction == _REDUCTION["none"] else (), dtype=acc)
    if loss == _LOSS["siglip"]:
        return out, x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
    if x.device.type == "cuda":  # the CUDA kernels keep one fp32 LSE per row and column (csrc/contrastive/glue.h)
        return out, x.new_empty((x.shape[0],), dtype=acc), x.new_empty((y.shape[0],), dtype=acc)
    # InfoNCE stats: each log-sum-exp as [max; log sum exp(S - max)] (see csrc/contrastive/cpu.cpp).
    cols = y.shape[0] if direction == _DIRECTION["both"] else 0
    return out, x.new_empty((2, rows), dtype=acc), x.new_empty((2, cols), dtype=acc)


def _backward_fake(
    grad_loss: Tensor,
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
    return x.new_empty(x.shape), y.new_empty(y.shape), scale.new_empty(()), bias.new_empty(())


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


def _register_custom_ops() -> bool:
    """Add fake and autograd registrations to the C++ ops; False when the extension is missing."""
    if not _dispatch.has_ops("contrastive_forward", "contrastive_backward"):
        return False
    torch.library.register_fake("mmfast::contrastive_forward")(_forward_fake)
    torch.library.register_fake("mmfast::contrastive_backward")(_backward_fake)
    torch.library.register_autograd("mmfast::contrastive_forward", _backward, setup_context=_setup_context)
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
        _LOSS["info_nce"],
        _DIRECTION[direction],
        _REDUCTION[reduction],
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
        image_features, text_features, scale, bias, None, _LOSS["siglip"], _DIRECTION["both"], _REDUCTION[reduction]
    )
    return loss


def _cuda_reasons(dtype: torch.dtype, **_: object) -> list[str]:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return [f"cuda kernels take float32, bfloat16 or float16, got {dtype}"]
    return []


_dispatch.register("info_nce", "reference", _ref.info_nce, _no_reasons)
_dispatch.register("siglip_loss", "reference", _ref.siglip_loss, _no_reasons)
if _register_custom_ops():
    _CUDA_NOTE = "CUDA kernels not yet verified on hardware"
    _dispatch.register("info_nce", "cpu", _kernel_info_nce, _no_reasons)
    _dispatch.register("siglip_loss", "cpu", _kernel_siglip, _no_reasons)
    _dispatch.register("info_nce", "cuda", _kernel_info_nce, _cuda_reasons, note=_CUDA_NOTE)
    _dispatch.register("siglip_loss", "cuda", _kernel_siglip, _cuda_reasons, note=_CUDA_NOTE)
