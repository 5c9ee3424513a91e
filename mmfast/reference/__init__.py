"""Pure-PyTorch reference implementations (differentiable, float64-capable)."""

from mmfast.reference.contrastive import info_nce, siglip_loss
from mmfast.reference.cross_attention import attention_probs, cross_attention

__all__ = ["attention_probs", "cross_attention", "info_nce", "siglip_loss"]
