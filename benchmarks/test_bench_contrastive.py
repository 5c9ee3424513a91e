"""Regression benchmarks: info_nce and siglip_loss, every provider, fwd and fwd+bwd."""

import pytest
import torch
from regression import ON_GPU, params, run_benchmark

from mmfast.bench.cases import contrastive_case

SIZES = [4096, 16384] if ON_GPU else [2048]
DTYPES = [torch.float32, torch.bfloat16]


def cases(op):
    return [contrastive_case(op, N, 512, dt, mode) for N in SIZES for dt in DTYPES for mode in ("fwd", "fwd+bwd")]


@pytest.mark.parametrize(("case", "provider"), params("info_nce", cases("info_nce")))
def test_info_nce(benchmark, case, provider):
    run_benchmark(benchmark, case, provider)


@pytest.mark.parametrize(("case", "provider"), params("siglip_loss", cases("siglip_loss")))
def test_siglip_loss(benchmark, case, provider):
    run_benchmark(benchmark, case, provider)
