"""Triton cross-attention kernels (filled in by the cross-attention Triton work)."""
