"""Measured backend choice on CUDA tensors.

``auto`` on a CUDA tensor picks between the hand-written ``cuda`` kernels and the ``triton`` ones
from this table of results measured on real GPUs (benchmarks/device_check.sh writes the figures;
benchmarks/PERFORMANCE.md keeps them). An op/GPU pair with no measurement prefers triton, and
``mmfast.backends()`` marks the cuda kernels as not yet verified on hardware.

Entries: (op, GPU name prefix as torch.cuda.get_device_name reports it) -> backends, best first.
"""

from __future__ import annotations

import torch

MEASURED: dict[tuple[str, str], tuple[str, ...]] = {
    # No GPU run has measured the cuda kernels yet.
}

UNMEASURED_ORDER = ("triton", "cuda", "reference")


def cuda_order(op: str, device: torch.device) -> tuple[str, ...]:
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else ""
    for (m_op, prefix), order in MEASURED.items():
        if m_op == op and name.startswith(prefix):
            return order
    return UNMEASURED_ORDER


def cuda_verified(op: str) -> bool:
    return any(m_op == op for m_op, _ in MEASURED)
