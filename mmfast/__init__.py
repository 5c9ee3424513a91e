"""mmfast: fused kernels for multimodal models (cross-attention, contrastive losses).

Public API::

    mmfast.cross_attention(query, key, value, *, key_padding_mask=None, attn_mask=None, ...)
    mmfast.info_nce(image_features, text_features, logit_scale, *, labels=None, ...)
    mmfast.siglip_loss(image_features, text_features, logit_scale, logit_bias, ...)
    mmfast.backends()      # per op, each backend: available or not, and why (pretty=True: a table;
                           # python -m mmfast prints it)
    mmfast.build_info()    # how the extension was built
    mmfast.cpu_options()   # the cpu backend's code paths (forced for tests), large-output allocator
    mmfast.nn              # CrossAttention, AttentionFusion, CoAttentionLayer, ClipLoss, SigLipLoss
    mmfast.swap_modules(model)  # replace compatible nn.MultiheadAttention layers in place
"""

from __future__ import annotations

import torch  # noqa: F401 - loads libtorch before the extension

from mmfast import nn as nn
from mmfast._version import __version__
from mmfast.cpu import cpu_options
from mmfast.ops import backends, cross_attention, info_nce, siglip_loss
from mmfast.swap import swap_modules as swap_modules


def build_info() -> dict:
    """How mmfast._C was built: version, whether CUDA kernels are in it and for which archs, compiler,
    torch. Without the extension: ``{"extension": None, "reason": ...}``, the reason saying why it
    does not load (not built, or built for another torch) and how to build it."""
    from mmfast._dispatch import extension  # noqa: PLC0415

    ext, why = extension()
    if ext is None:
        return {"extension": None, "reason": why}
    return {
        "version": ext.__version__,
        "with_cuda": bool(ext.with_cuda),
        "cuda_archs": ext.cuda_archs,
        "compiler": ext.compiler,
        "torch_version": ext.torch_version,
    }


__all__ = [
    "__version__",
    "backends",
    "build_info",
    "cpu_options",
    "cross_attention",
    "info_nce",
    "nn",
    "siglip_loss",
    "swap_modules",
]
