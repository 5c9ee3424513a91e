"""Regression benchmarks: cross_attention, every provider, text->image (with/without padding) and square."""

import pytest
import torch
from regression import ON_GPU, params, run_benchmark

from mmfast.bench.cases import attention_case

# (kind, B, H, Lq, Lk, D, pad): the shapes on a GPU, a quarter of the batch on the CPU.
SHAPES = [
    ("text->image", 32, 12, 32, 577, 64, False),
    ("text->image", 32, 12, 32, 577, 64, True),
    ("square", 4, 8, 1024, 1024, 64, False),
]
if not ON_GPU:
    SHAPES = [(k, max(1, B // 4), *rest) for k, B, *rest in SHAPES]
DTYPES = [torch.float32, torch.bfloat16]
CASES = [attention_case(*s, dtype=dt, mode=m) for s in SHAPES for dt in DTYPES for m in ("fwd", "fwd+bwd")]


@pytest.mark.parametrize(("case", "provider"), params("cross_attention", CASES))
def test_cross_attention(benchmark, case, provider):
    run_benchmark(benchmark, case, provider)
