"""Triton kernels: one module per op (launchers, custom ops, the backend entry point) and its
``*_kernels.py`` (the @triton.jit kernels and their math).

Nothing here registers itself: each op's table in ``mmfast/ops`` names its triton entry point, which
is imported the first time the triton backend is selected. Set ``TRITON_INTERPRET=1`` before the
first import to run the kernels on CPU tensors (the tests do this when no GPU is visible).
"""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
