"""Microbenchmarks: ``python -m mmfast.bench`` (console script ``mmfast-bench``).

Runs every available mmfast backend and the installed peers on the same inputs, checks each
against the reference before timing it, and reports median time with 20/80% quantiles, speed-up
over the PyTorch baseline, GFLOP/s as a fraction of the machine's matmul rate (measured in the same
run) and peak memory. See README.md, "Benchmarks".
"""

from mmfast.bench.cases import Case, flops
from mmfast.bench.runner import Row

__all__ = ["Case", "Row", "flops", "main"]


def main(argv: list[str] | None = None) -> int:
    from mmfast.bench.__main__ import main as _main

    return _main(argv)
