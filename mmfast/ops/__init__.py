"""Public ops. Importing this registers every op's backends with ``mmfast._dispatch``."""

from mmfast import _dispatch
from mmfast.ops.contrastive import info_nce, siglip_loss
from mmfast.ops.cross_attention import cross_attention

if _dispatch._triton_import_error() is None:
    import mmfast.triton  # noqa: F401 - registers the triton backends

__all__ = ["cross_attention", "info_nce", "siglip_loss"]
