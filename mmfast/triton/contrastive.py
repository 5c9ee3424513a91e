"""Triton InfoNCE / SigLIP kernels (filled in by the contrastive Triton work)."""
