"""CPU cross-attention benchmark: mmfast's cpu kernel vs F.scaled_dot_product_attention, one run.

Usage (from the repository root, after building the extension in place):

    python benchmarks/bench_cross_attention_cpu.py [--reps 20] [--json out.json] [--quick]

For each case it times forward alone and forward + backward (median, with 20% / 80% quantiles),
and reports ratios measured in this run (the machine is shared: absolute times drift between
runs, ratios much less). The matmul rate of the same run gives the floor (FLOPs / rate): attention
forward is 2 GEMMs, 4 * B * H * Lq * Lk * D FLOPs; the backward recomputes scores and adds 4 more
(dv, dp, dq, dk): fwd + bwd = 7 GEMMs, 14 * B * H * Lq * Lk * D.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmfast  # noqa: E402


@dataclass
class Case:
    name: str
    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    padded: bool = False  # half the keys padded in half the batch


CASES = [
    Case("text->image", 32, 12, 32, 577, 64),
    Case("text->image, key padding", 32, 12, 32, 577, 64, padded=True),
    Case("square", 4, 8, 1024, 1024, 64),
]


def flops(c: Case, backward: bool) -> float:
    return (14 if backward else 4) * c.B * c.H * c.Lq * c.Lk * c.D


def timeit(fns: dict, reps: int) -> dict:
    """Median and 20% / 80% quantiles per provider; providers run round-robin, so a change of load
    on the shared machine hits all of them alike."""
    times: dict = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    out = {}
    for name, ts in times.items():
        ts.sort()
        q = lambda f, ts=ts: ts[min(int(f * len(ts)), len(ts) - 1)]  # noqa: E731
        out[name] = {"median": q(0.5), "q20": q(0.2), "q80": q(0.8)}
    return out


def setup(c: Case, provider: str, dtype: torch.dtype, backward: bool) -> Callable[[], object]:
    """Inputs for one case and a closure running it with ``provider``: "mmfast", "mmfast-generic" (fp32
    fast path off), "mmfast-avx2" (fast path without its AVX-512 tiles) or "sdpa"."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(c.B, c.H, c.Lq, c.D, generator=g).to(dtype).requires_grad_(backward)
    k = torch.randn(c.B, c.H, c.Lk, c.D, generator=g).to(dtype).requires_grad_(backward)
    v = torch.randn(c.B, c.H, c.Lk, c.D, generator=g).to(dtype).requires_grad_(backward)
    kpm = None
    if c.padded:
        kpm = torch.zeros(c.B, c.Lk, dtype=torch.bool)
        kpm[::2, c.Lk // 2 :] = True
    grad = torch.randn(c.B, c.H, c.Lq, c.D, generator=g).to(dtype)
    if provider.startswith("mmfast"):
        # generic: the MKL-GEMM kernels (no fast path); avx2: the fast path without AVX-512 tiles.
        gemm = {"mmfast-generic": "blas", "mmfast-avx2": "avx2"}.get(provider, "auto")

        def run() -> torch.Tensor:
            with mmfast.cpu_options(gemm=gemm):
                return mmfast.cross_attention(q, k, v, key_padding_mask=kpm, backend="cpu")

    else:
        mask = None if kpm is None else (~kpm).view(c.B, 1, 1, c.Lk)  # SDPA: True = take part
        run = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    if not backward:

        def fwd() -> object:
            with torch.no_grad():
                return run()

        return fwd
    return lambda: torch.autograd.grad(run(), (q, k, v), grad)


def matmul_rate(dtype: torch.dtype, reps: int) -> float:
    """FLOP/s of a 1024^3 torch.mm on all threads: the machine's GEMM rate in this run."""
    a, b = torch.randn(1024, 1024).to(dtype), torch.randn(1024, 1024).to(dtype)
    t = timeit({"mm": lambda: torch.mm(a, b)}, reps)["mm"]["median"]
    return 2 * 1024**3 / t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="text->image only, fewer repetitions")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--generic", action="store_true", help="also time the fp32 kernel without its fast path")
    ap.add_argument("--avx2", action="store_true", help="also time the fp32 fast path without AVX-512")
    ap.add_argument("--cases", default="", help="comma-separated case indices (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = CASES[:2] if args.quick else CASES
    if args.cases:
        cases = [CASES[int(i)] for i in args.cases.split(",")]
    reps = 5 if args.quick else args.reps
    rate = {dt: matmul_rate(dt, reps) for dt in (torch.float32, torch.bfloat16)}
    print(
        f"load {os.getloadavg()[0]:.1f}; threads {torch.get_num_threads()}; "
        f"torch.mm 1024^3: fp32 {rate[torch.float32] / 1e9:.1f} GFLOP/s, "
        f"bf16 {rate[torch.bfloat16] / 1e9:.1f} GFLOP/s"
    )
    rows = []
    for c in cases:
        for backward in (False, True):
            providers = [("mmfast", torch.float32), ("sdpa", torch.float32), ("mmfast", torch.bfloat16)]
            if args.generic:
                providers.append(("mmfast-generic", torch.float32))
            if args.avx2:
                providers.append(("mmfast-avx2", torch.float32))
            res = timeit({pd: setup(c, *pd, backward) for pd in providers}, reps)
            t_mm, t_sdpa = res[("mmfast", torch.float32)]["median"], res[("sdpa", torch.float32)]["median"]
            t_bf16 = res[("mmfast", torch.bfloat16)]["median"]
            floor = flops(c, backward) / rate[torch.float32]
            row = {
                "case": c.name,
                "pass": "fwd+bwd" if backward else "fwd",
                "mmfast_fp32_ms": 1e3 * t_mm,
                "sdpa_fp32_ms": 1e3 * t_sdpa,
                "mmfast_bf16_ms": 1e3 * t_bf16,
                "speedup_vs_sdpa": t_sdpa / t_mm,
                "bf16_vs_fp32": t_mm / t_bf16,
                "floor_fp32_ms": 1e3 * floor,
                "fraction_of_matmul_rate": floor / t_mm,
                "quantiles_ms": {
                    f"{p}_{d}".replace("torch.", ""): [1e3 * v["q20"], 1e3 * v["q80"]] for (p, d), v in res.items()
                },
            }
            if args.generic:
                row["generic_fp32_ms"] = 1e3 * res[("mmfast-generic", torch.float32)]["median"]
            if args.avx2:
                row["avx2_fp32_ms"] = 1e3 * res[("mmfast-avx2", torch.float32)]["median"]
            rows.append(row)
            print(
                f"{c.name:26s} {row['pass']:8s} mmfast {row['mmfast_fp32_ms']:8.2f} ms  sdpa "
                f"{row['sdpa_fp32_ms']:8.2f} ms  x{row['speedup_vs_sdpa']:.2f}  | bf16 {row['mmfast_bf16_ms']:8.2f} ms "
                f"x{row['bf16_vs_fp32']:.2f} of fp32 | floor {row['floor_fp32_ms']:.2f} ms "
                f"({100 * row['fraction_of_matmul_rate']:.0f}% of mm rate)"
                + (f" | generic {row['generic_fp32_ms']:8.2f} ms" if args.generic else "")
                + (f" | avx2 {row['avx2_fp32_ms']:8.2f} ms" if args.avx2 else "")
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_gflops": {str(k): v / 1e9 for k, v in rate.items()}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
