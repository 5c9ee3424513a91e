"""Drop-in modules built on mmfast's fused ops.

* ``CrossAttention``: ``nn.MultiheadAttention``-compatible (plus GQA), ``.from_multihead_attention(mha)``.
* ``AttentionFusion``: ``Concat(T, Attn(T -> V))`` written into one buffer.
* ``CoAttentionLayer``: LXMERT's cross-modality layer, both cross directions in one op call.
* ``ClipLoss``, ``SigLipLoss``: open_clip-compatible contrastive losses on the fused kernels.
"""

from mmfast.nn.co_attention import CoAttentionLayer
from mmfast.nn.contrastive import ClipLoss, SigLipLoss
from mmfast.nn.cross_attention import CrossAttention
from mmfast.nn.fusion import AttentionFusion

__all__ = ["AttentionFusion", "ClipLoss", "CoAttentionLayer", "CrossAttention", "SigLipLoss"]
