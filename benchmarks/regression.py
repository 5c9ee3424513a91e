"""Helpers of the pytest-benchmark suites in benchmarks/ (regression tracking, not the test command).

    python -m pytest benchmarks/ --benchmark-only --benchmark-json out.json

Each benchmark checks its provider against the reference first (a disagreement fails the test)
and then times it; the FLOP count of the case goes into ``extra_info``. Shapes are the issue's on a
GPU and smaller on the CPU, so a CPU run stays within minutes.
"""

from __future__ import annotations

import pytest
import torch

from mmfast.bench import measure
from mmfast.bench.cases import DTYPE_NAMES, Case, compute_reference, flops, make_data
from mmfast.bench.providers import Provider, select_providers
from mmfast.bench.runner import Runner, Settings, is_unsupported

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def providers_for(op: str) -> list[Provider]:
    """Default providers that run ``op`` here (mmfast backends discovered, peers when installed)."""
    return [p for p in select_providers(DEVICE, None, False) if op in p.ops and p.why_not(DEVICE) is None]


def params(op: str, cases: list[Case]) -> list:
    """pytest params over (case, provider) with readable ids."""
    return [
        pytest.param(c, p, id=f"{c.shape_label}-{DTYPE_NAMES[c.dtype]}-{c.mode}-{p.name}".replace(" ", "_"))
        for c in cases
        for p in providers_for(op)
    ]


def run_benchmark(benchmark, case: Case, provider: Provider) -> None:
    data = make_data(case, DEVICE)
    compute_reference(case, data)
    runner = Runner(DEVICE, Settings(), {})
    try:
        call = runner.make_call(case, provider, data)
        err = runner.agreement(case, data, call())
    except Exception as e:
        if not is_unsupported(e):
            raise
        pytest.skip(f"{provider.name} cannot take this case: {e}")
    assert err <= measure.AGREE_TOL[case.dtype], f"{provider.name} disagrees with the reference: {err:.2e}"

    def timed():
        out = call()
        measure.sync(DEVICE)
        return out

    benchmark.extra_info.update(flops=flops(case, data.valid_keys), max_err=err, provider=provider.name)
    benchmark.pedantic(timed, rounds=10 if ON_GPU else 3, warmup_rounds=1, iterations=1)
