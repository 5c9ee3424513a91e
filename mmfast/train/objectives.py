"""Training objectives: what GradCache calls on the whole batch's embeddings.

An objective is built from the model (for its logit scale / bias) and the process layout, and is
called as ``objective(image_embeddings, text_embeddings) -> scalar`` (the ``loss_fn`` of
``GradCache``). ``begin_step(batch, step)`` runs before each step with the rank's ``Batch`` (its
captions and per-sample attributes), for objectives that need more than the embeddings (hard
negatives built from attributes), and ``inputs(batch, device)`` gives what the towers are called on
(``itm.py``'s objective asks them for tokens too). New objectives register in ``OBJECTIVES``.

Across ranks, the loss is mmfast's ``ClipLoss`` / ``SigLipLoss`` with ``local_loss=True`` and a
differentiable gather (or the ring, ``dist_impl="ring"``): each rank's loss covers its own rows
against every rank's columns, the mean of the ranks' losses is the one-process loss of the global
batch, and with DDP's gradient averaging every gradient equals the one-process gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mmfast.nn import ClipLoss, SigLipLoss
from mmfast.train.models import ClipModel

__all__ = ["OBJECTIVES", "TRAINING_OBJECTIVES", "ContrastiveObjective", "build_objective"]

DIST_IMPLS = ("gather", "ring")
TRAINING_OBJECTIVES = ("itc", "itc+itm")


def _dist_kwargs(dist_impl: str) -> dict[str, Any]:
    if dist_impl not in DIST_IMPLS:
        raise ValueError(f"--dist-impl must be one of {DIST_IMPLS}, got {dist_impl!r}")
    return {"dist_impl": dist_impl}


class ContrastiveObjective:
    """CLIP (InfoNCE, both directions) or SigLIP over the global batch.

    Args:
        kind: "clip" or "siglip" (``--loss``); SigLIP needs the model's ``logit_bias``.
        model: the ``ClipModel`` whose ``scale()`` / ``bias()`` the loss reads (their gradients
            are taken inside the loss).
        rank, world_size: the process layout.
        dist_impl: "gather" or "ring" (``--dist-impl``), passed to the loss.
    """

    def __init__(self, kind: str, model: ClipModel, *, rank: int = 0, world_size: int = 1, dist_impl: str = "gather"):
        if kind not in ("clip", "siglip"):
            raise ValueError(f"--loss must be 'clip' or 'siglip', got {kind!r}")
        if kind == "siglip" and model.logit_bias is None:
            raise ValueError("--loss siglip needs a model with a logit_bias (build it with add_logit_bias)")
        self.kind, self.model = kind, model
        kw = _dist_kwargs(dist_impl) if world_size > 1 else {}
        if kind == "clip":
            self.loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size, **kw)
        else:
            self.loss = SigLipLoss(rank=rank, world_size=world_size, **kw)

    def begin_step(self, batch: Any, step: int = 0) -> None:
        """Nothing to prepare: the contrastive loss needs only the embeddings."""

    def inputs(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        """What the towers are called on this step: (images, texts) on ``device``."""
        images = batch.images.to(device, non_blocking=True)
        texts = {k: v.to(device, non_blocking=True) for k, v in batch.texts.items()}
        return images, texts

    def __call__(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        if self.kind == "clip":
            return self.loss(image_emb, text_emb, self.model.scale())
        return self.loss(image_emb, text_emb, self.model.scale(), self.model.bias())


OBJECTIVES: dict[str, Callable[..., ContrastiveObjective]] = {
    "clip": lambda model, **kw: ContrastiveObjective("clip", model, **kw),
    "siglip": lambda model, **kw: ContrastiveObjective("siglip", model, **kw),
}


def build_objective(name: str, model: ClipModel, *, objective: str = "itc", itm: dict | None = None, **kw: Any) -> Any:
    """The objective ``--loss NAME`` names (see ``OBJECTIVES``); with ``objective="itc+itm"`` wrapped
    in ``itm.ItcItmObjective(contrastive, model, **itm)`` (the model needs its fusion encoder)."""
    if name not in OBJECTIVES:
        raise ValueError(f"--loss must be one of {sorted(OBJECTIVES)}, got {name!r}")
    if objective not in TRAINING_OBJECTIVES:
        raise ValueError(f"--objective must be one of {TRAINING_OBJECTIVES}, got {objective!r}")
    contrastive = OBJECTIVES[name](model, **kw)
    if objective == "itc":
        return contrastive
    from mmfast.train.itm import ItcItmObjective  # noqa: PLC0415

    return ItcItmObjective(contrastive, model, **(itm or {}))
