"""The attention-dropout mask every backend draws: a counter-based hash, so kernels need no state.

Element (b, h, i, j) of a (B, H, Lq, Lk) attention matrix is kept iff

    hash(seed, row = (b * H + h) * Lq + i, col = j) >= floor(dropout_p * 2**32)

with, in uint32 arithmetic (all products mod 2**32):

    x = (seed_lo ^ (row * 0x9E3779B1)) ^ (col * 0x85EBCA77)
    x = fmix(x) ^ seed_hi
    x = fmix(x)
    fmix(x): x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13; x *= 0xC2B2AE35; x ^= x >> 16

where seed_lo / seed_hi are the low / high 32 bits of the 64-bit seed (drawn from torch's default
generator by the op, so torch.manual_seed reproduces it). The C++, CUDA and Triton kernels use the
same function, so the reference can rebuild the exact mask a kernel used.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def _fmix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def threshold(dropout_p: float) -> int:
    return min(int(dropout_p * 2**32), M32)


def hash32(seed: int | torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """uint32 hash (held in int64) of (seed, row, col); row and col are int64 tensors."""
    lo, hi = seed & M32, (seed >> 32) & M32
    x = lo ^ (((row & M32) * 0x9E3779B1) & M32) ^ (((col & M32) * 0x85EBCA77) & M32)
    return _fmix(_fmix(x) ^ hi)


def keep_mask(
    seed: int | torch.Tensor, B: int, H: int, Lq: int, Lk: int, dropout_p: float, device=None
) -> torch.Tensor:
    """(B, H, Lq, Lk) bool: True where the attention weight survives dropout."""
    row = torch.arange(B * H * Lq, device=device, dtype=torch.int64).view(B, H, Lq, 1)
    col = torch.arange(Lk, device=device, dtype=torch.int64).view(1, 1, 1, Lk)
    return hash32(seed, row, col) >= threshold(dropout_p)


def draw_seed() -> torch.Tensor:
    """A 63-bit seed from torch's default CPU generator (torch.manual_seed reproduces it), as a 0-dim
    int64 CPU tensor: a tensor, not a Python int, so torch.compile traces the draw into the graph
    (``.item()`` would break it). ``keep_mask`` and ``hash32`` take it as it is."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
