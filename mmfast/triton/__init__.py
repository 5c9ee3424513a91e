"""Triton kernels. Importing this registers the ``triton`` backend of each op.

Set ``TRITON_INTERPRET=1`` before importing to run the kernels on CPU tensors (tests do this when
no GPU is visible).
"""

from mmfast.triton import contrastive, cross_attention  # noqa: F401
