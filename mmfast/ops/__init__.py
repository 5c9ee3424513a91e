"""Public ops, and the table of every op's backends (each op's module lists its own)."""

from __future__ import annotations

from typing import Any

from mmfast import _dispatch
from mmfast.ops import contrastive as _contrastive
from mmfast.ops import cross_attention as _cross_attention
from mmfast.ops.contrastive import block_backward, block_forward, info_nce, merge_lse, siglip_loss
from mmfast.ops.cross_attention import cross_attention

OPS: tuple[_dispatch.Op, ...] = (
    _cross_attention.OP,
    _contrastive.INFO_NCE,
    _contrastive.SIGLIP_LOSS,
    _contrastive.BLOCK_FORWARD,
    _contrastive.BLOCK_BACKWARD,
)
_dispatch.preload(OPS)  # the triton entry points, only where they can run (a GPU, or TRITON_INTERPRET=1)


def backends(pretty: bool = False) -> dict[str, dict[str, dict[str, Any]]] | str:
    """Per op, each backend: ``{"available": bool, "reason": str | None, "note": str | None}``.

    ``pretty=True`` returns a readable table instead (op x backend, why not, the CPU code paths):
    ``print(mmfast.backends(pretty=True))``, or ``python -m mmfast``.
    """
    out = _dispatch.report(OPS)
    if pretty:
        from mmfast._backends_table import backends_table  # noqa: PLC0415 - only for the printout

        return backends_table(out, _dispatch.extension())
    return out


__all__ = ["backends", "block_backward", "block_forward", "cross_attention", "info_nce", "merge_lse", "siglip_loss"]
