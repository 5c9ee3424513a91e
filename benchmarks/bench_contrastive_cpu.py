"""CPU benchmark of the fused contrastive loss (issue 3 targets), every figure from one run.

    python benchmarks/bench_contrastive_cpu.py                 # full run (several minutes)
    python benchmarks/bench_contrastive_cpu.py --n 4096 --reps 3  # quick look

Measures fp32 forward+backward of the CLIP loss (direction="both") at N = M = --n, D = --d for:
  mmfast_cpu    mmfast.info_nce(..., backend="cpu")
  naive         logits = s x yᵀ, then two F.cross_entropy (open_clip's ClipLoss)
  linear_ce_x2  two calls of F.linear_cross_entropy(options=LinearCrossEntropyOptions())
  mmfast_bf16   the cpu kernel on bf16 inputs (the vdpbf16ps kernel where the CPU has AVX512_BF16)
  mmfast_bf16_mkl  the same with MKL's bf16 GEMM (mmfast.cpu_options(gemm="blas")), the previous path
  mmfast_cpu_mkl   fp32 with MKL SGEMM tiles and separate softmax passes (gemm="blas"),
                   the path before the AVX-512 kernel
Providers run round-robin, one repetition each per round, so load changes hit them alike. Also
measured in the same run: the fp32 / bf16 torch.mm rate and the CPU's peak multiply-add rate
(mmfast._C.cpu_peak_gflops), the floors' denominators.
Memory: each provider runs once in a fresh subprocess at --mem-n; peak RSS minus the RSS after
inputs and gradient buffers exist ("extra"); and the cpu kernel at N = 131072, D = 256 (--big-n).
Results are printed and written as JSON (--out).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmfast  # noqa: E402


def flops(n: int, m: int, d: int) -> float:
    """FLOPs of the fused algorithm's forward+backward: 4 GEMMs of n x m x d (2 n m d each)."""
    return 8.0 * n * m * d


def setup(provider: str, n: int, d: int) -> tuple[list[torch.Tensor], Callable[[], None]]:
    """(leaf inputs, fn running forward+backward once) for one provider."""
    dtype = torch.bfloat16 if provider.startswith("mmfast_bf16") else torch.float32
    x = F.normalize(torch.randn(n, d), dim=-1).to(dtype).requires_grad_()
    y = F.normalize(torch.randn(n, d), dim=-1).to(dtype).requires_grad_()
    s = torch.tensor(14.3, requires_grad=True)
    target = torch.arange(n)

    def mmfast_cpu() -> None:
        mmfast.info_nce(x, y, s, backend="cpu").backward()

    def naive() -> None:
        logits = s * x @ y.t()
        (0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))).backward()

    def linear_ce_x2() -> None:
        opts = torch.nn.LinearCrossEntropyOptions()
        img = F.linear_cross_entropy(s * x, y, target, options=opts)
        txt = F.linear_cross_entropy(s * y, x, target, options=opts)
        (0.5 * (img + txt)).backward()

    def on_blas() -> None:  # MKL tiles for the tile products (the path before mmfast's own kernels)
        with mmfast.cpu_options(gemm="blas"):
            mmfast_cpu()

    fns = {
        "mmfast_cpu": mmfast_cpu,
        "mmfast_cpu_mkl": on_blas,
        "mmfast_bf16": mmfast_cpu,
        "mmfast_bf16_mkl": on_blas,
        "naive": naive,
        "linear_ce_x2": linear_ce_x2,
    }
    return [x, y, s], fns[provider]


def time_round_robin(providers: list[str], n: int, d: int, reps: int) -> dict:
    """Median and quantiles per provider; each round runs every provider once (after one warm-up round)."""
    setups = {p: setup(p, n, d) for p in providers}
    times: dict[str, list[float]] = {p: [] for p in providers}
    for i in range(reps + 1):
        for p, (inputs, fn) in setups.items():
            for t in inputs:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            if i:  # round 0 warms up
                times[p].append(time.perf_counter() - t0)
    out = {}
    for p, ts in times.items():
        q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else [ts[0]] * 4
        out[p] = {"median_s": statistics.median(ts), "q20_s": q[0], "q80_s": q[3], "reps": reps}
    return out


def matmul_rate(dtype: torch.dtype, reps: int) -> float:
    """GFLOP/s of torch.mm on (4096 x 512) @ (512 x 4096), the loss's GEMM shape class."""
    a, b = torch.randn(4096, 512).to(dtype), torch.randn(4096, 512).to(dtype)
    torch.mm(a, b.t())
    times = []
    for _ in range(max(3, reps)):
        t0 = time.perf_counter()
        torch.mm(a, b.t())
        times.append(time.perf_counter() - t0)
    return 2 * 4096 * 4096 * 512 / statistics.median(times) / 1e9


def rss_mb(field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak since start or since the last reset) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(provider: str, n: int, d: int) -> None:
    """Run in a fresh process: RSS with inputs + gradient buffers, then the peaks of one fwd+bwd."""
    inputs, fn = setup(provider, n, d)
    # Give back the heap pages that setup's temporaries left behind (randn before normalize): a
    # base that counts them is 16 MB high at N = 8192, and the step then reuses them unseen.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for t in inputs:
        t.grad = torch.ones_like(t)  # gradient buffers count as "inputs and gradients"
    base = rss_mb()
    for t in inputs:
        t.grad = None
    setup_peak = rss_mb("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the step's own peak from here
        f.write("5")
    fn()
    step_peak = rss_mb("VmHWM")
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not reset: includes setup
    peaks = {"peak_mb": step_peak, "setup_peak_mb": setup_peak, "process_peak_mb": process_peak}
    print(json.dumps({"base_mb": base, **peaks}))


def memory(provider: str, n: int, d: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", provider, "--n", str(n), "--d", str(d)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else f"exit {out.returncode}"}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["extra_mb"] = r["peak_mb"] - r["base_mb"]
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--mem-n", type=int, default=8192)
    p.add_argument("--big-n", type=int, default=131072)
    p.add_argument("--big-d", type=int, default=256)
    p.add_argument("--providers", default="mmfast_cpu,naive,linear_ce_x2,mmfast_bf16,mmfast_cpu_mkl")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out", default="bench-results/contrastive_cpu.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.n, a.d)
        return

    res: dict = {"config": vars(a), "threads": torch.get_num_threads(), "load_avg": os.getloadavg()}
    res["matmul_gflops"] = {"fp32": matmul_rate(torch.float32, a.reps), "bf16": matmul_rate(torch.bfloat16, a.reps)}
    res["peak_gflops"] = {"fp32": mmfast._C.cpu_peak_gflops("fp32"), "bf16": mmfast._C.cpu_peak_gflops("bf16")}
    res["time"] = time_round_robin(a.providers.split(","), a.n, a.d, a.reps)
    res["matmul_gflops_after"] = matmul_rate(torch.float32, a.reps)  # contention drift check
    t = {k: v["median_s"] for k, v in res["time"].items()}
    rate = flops(a.n, a.n, a.d) / t["mmfast_cpu"] / 1e9
    ratios = {
        "cpu_gflops": rate,
        "frac_of_fp32_matmul": rate / res["matmul_gflops"]["fp32"],
        "frac_of_fp32_peak": rate / res["peak_gflops"]["fp32"],
    }
    if "naive" in t:  # the best any 8 N M D algorithm could do against the naive loss on this machine
        ratios["vs_naive_at_fp32_peak"] = t["naive"] / (flops(a.n, a.n, a.d) / res["peak_gflops"]["fp32"] / 1e9)
    for peer in ("naive", "linear_ce_x2"):
        if peer in t:
            ratios[f"speedup_vs_{peer}"] = t[peer] / t["mmfast_cpu"]
    if "mmfast_bf16" in t:
        ratios["bf16_speedup_vs_fp32"] = t["mmfast_cpu"] / t["mmfast_bf16"]
    if "mmfast_bf16_mkl" in t:
        ratios["bf16_mkl_speedup_vs_fp32"] = t["mmfast_cpu"] / t["mmfast_bf16_mkl"]
    if "mmfast_cpu_mkl" in t:
        ratios["fp32_speedup_vs_mkl_path"] = t["mmfast_cpu_mkl"] / t["mmfast_cpu"]
    res["ratios"] = ratios
    if not a.skip_memory:
        res["memory"] = {prov: memory(prov, a.mem_n, a.d) for prov in ("mmfast_cpu", "naive", "linear_ce_x2")}
        m = res["memory"]
        if "extra_mb" in m["mmfast_cpu"] and "extra_mb" in m["naive"]:
            ratios["extra_mem_frac_of_naive"] = m["mmfast_cpu"]["extra_mb"] / m["naive"]["extra_mb"]
        if a.big_n > 0:  # --big-n 0 skips the long N = 131072 run
            res["memory_big"] = memory("mmfast_cpu", a.big_n, a.big_d)
    res["load_avg_after"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
