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
        raise TypeError(f"labels must be an int64 tensor, got {labels.dtype}")
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
        labels: optional (N,) int64 targets of the image direction ((M,) for direction="text");
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


_dispatch.register("info_nce", "reference", _ref.info_nce, _no_reasons)
_dispatch.register("siglip_loss", "reference", _ref.siglip_loss, _no_reasons)
