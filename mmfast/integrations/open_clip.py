"""open_clip integration: swap a model's attention and convert its loss to mmfast's.

open_clip's towers are built from ``nn.MultiheadAttention`` (ResidualAttentionBlock,
AttentionalPooler), so ``swap_modules`` covers them; its losses have mmfast twins with the same
constructor (``mmfast.nn.ClipLoss`` / ``SigLipLoss``).
"""

from __future__ import annotations

import torch
from torch import nn

from mmfast.nn.contrastive import ClipLoss, SigLipLoss
from mmfast.swap import SwapReport, swap_modules

__all__ = ["apply_mmfast_to_open_clip", "loss_from_open_clip"]


def apply_mmfast_to_open_clip(model: nn.Module, *, backend: str = "auto") -> SwapReport:
    """Replace the attention layers of an open_clip model (CLIP, CoCa, ...) in place; returns the report.

    A TorchScript model (``create_model(..., jit=True)``) is refused: its attention is compiled
    code, which no module swap reaches, so it would silently keep PyTorch's attention.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "apply_mmfast_to_open_clip got a TorchScript model (open_clip's jit=True): its attention is compiled "
            "and cannot be swapped. Create the model with jit=False and apply mmfast before any torch.jit.script."
        )
    return swap_modules(model, backend=backend)


def loss_from_open_clip(loss: nn.Module, *, backend: str = "auto") -> ClipLoss | SigLipLoss:
    """The mmfast loss with ``loss``'s settings, for an open_clip ``ClipLoss`` or ``SigLipLoss``.

    Subclasses with extra terms (CoCaLoss, DistillClipLoss) are rejected: their forward adds
    losses mmfast does not compute.
    """
    name = type(loss).__name__
    if name == "ClipLoss":
        if getattr(loss, "use_horovod", False):
            raise ValueError("open_clip ClipLoss with use_horovod=True has no mmfast equivalent")
        return ClipLoss(
            local_loss=loss.local_loss,
            gather_with_grad=loss.gather_with_grad,
            cache_labels=loss.cache_labels,
            rank=loss.rank,
            world_size=loss.world_size,
            backend=backend,
        )
    if name == "SigLipLoss":
        return SigLipLoss(
            cache_labels=loss.cache_labels,
            rank=loss.rank,
            world_size=loss.world_size,
            dist_impl=loss.dist_impl,
            backend=backend,
        )
    raise TypeError(f"loss_from_open_clip takes open_clip's ClipLoss or SigLipLoss, got {name}")
