"""CPU benchmark of the fused contrastive loss (issue 3 targets), every figure from one run.

    python benchmarks/bench_contrastive_cpu.py                 # full run (several minutes)
    python benchmarks/bench_contrastive_cpu.py --n 4096 --reps 3  # quick look

Measures fp32 forward+backward of the CLIP loss (direction="both") at N = M = --n, D = --d for:
  mmfast_cpu    mmfast.info_nce(..., backend="cpu")
  naive         logits = s x yᵀ, then two F.cross_entropy (open_clip's ClipLoss)
  linear_ce_x2  two calls of F.linear_cross_entropy(options=LinearCrossEntropyOptions())
  mmfast_bf16   the cpu kernel on bf16 inputs
and the machine's fp32 / bf16 matmul rate (torch.mm, same thread count), and reports ratios.
Memory: each provider runs once in a fresh subprocess at --mem-n; peak RSS minus the RSS after
inputs and gradient buffers exist ("extra"); and the cpu kernel at N = 131072, D = 256 (--big-n).
Results are printed and written as JSON (--out).
"""

from __future__ import annotations

import argparse
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
    dtype = torch.bfloat16 if provider == "mmfast_bf16" else torch.float32
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

    fns = {"mmfast_cpu": mmfast_cpu, "mmfast_bf16": mmfast_cpu, "naive": naive, "linear_ce_x2": linear_ce_x2}
    return [x, y, s], fns[provider]


def timeit(fn: Callable[[], None], reps: int, inputs: list[torch.Tensor]) -> dict:
    times = []
    for i in range(reps + 1):
        for t in inputs:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median_s": statistics.median(times), "q20_s": q[0], "q80_s": q[3], "reps": reps}


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


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(provider: str, n: int, d: int) -> None:
    """Run in a fresh process: peak RSS of one forward+backward, and the RSS with inputs + grads."""
    inputs, fn = setup(provider, n, d)
    for t in inputs:
        t.grad = torch.zeros_like(t)  # gradient buffers count as "inputs and gradients"
    base = rss_mb()
    for t in inputs:
        t.grad = None
    fn()
    print(json.dumps({"peak_mb": rss_mb(), "base_mb": base}))


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
    p.add_argument("--providers", default="mmfast_cpu,naive,linear_ce_x2,mmfast_bf16")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out", default="bench-results/contrastive_cpu.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.n, a.d)
        return

    res: dict = {"config": vars(a), "threads": torch.get_num_threads(), "load_avg": os.getloadavg()}
    res["matmul_gflops"] = {"fp32": matmul_rate(torch.float32, a.reps), "bf16": matmul_rate(torch.bfloat16, a.reps)}
    res["time"] = {}
    for prov in a.providers.split(","):
        inputs, fn = setup(prov, a.n, a.d)
        res["time"][prov] = timeit(fn, a.reps, inputs)
        del inputs, fn
    res["matmul_gflops_after"] = matmul_rate(torch.float32, a.reps)  # contention drift check
    t = {k: v["median_s"] for k, v in res["time"].items()}
    rate = flops(a.n, a.n, a.d) / t["mmfast_cpu"] / 1e9
    ratios = {"cpu_gflops": rate, "frac_of_fp32_matmul": rate / res["matmul_gflops"]["fp32"]}
    for peer in ("naive", "linear_ce_x2"):
        if peer in t:
            ratios[f"speedup_vs_{peer}"] = t[peer] / t["mmfast_cpu"]
    if "mmfast_bf16" in t:
        ratios["bf16_speedup_vs_fp32"] = t["mmfast_cpu"] / t["mmfast_bf16"]
    res["ratios"] = ratios
    if not a.skip_memory:
        res["memory"] = {prov: memory(prov, a.mem_n, a.d) for prov in ("mmfast_cpu", "naive", "linear_ce_x2")}
        m = res["memory"]
        if "extra_mb" in m["mmfast_cpu"] and "extra_mb" in m["naive"]:
            ratios["extra_mem_frac_of_naive"] = m["mmfast_cpu"]["extra_mb"] / m["naive"]["extra_mb"]
        res["memory_big"] = memory("mmfast_cpu", a.big_n, a.big_d)
    res["load_avg_after"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
