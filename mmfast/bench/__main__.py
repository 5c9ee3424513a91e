"""``python -m mmfast.bench`` / ``mmfast-bench``: mmfast's kernels against their peers, side by side.

Default: the standard suite on the best device present, in about 5 to 6 minutes. See README.md, "Benchmarks".
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from mmfast.bench import measure, report
from mmfast.bench.cases import CONTRASTIVE_OPS, DEFAULT_DTYPES, DTYPE_NAMES, DTYPES, MODES, OPS, suite, sweep_sizes
from mmfast.bench.providers import BASELINE, all_providers, select_providers
from mmfast.bench.runner import Runner, Settings, add_speedups
from mmfast.bench.suites import run_suite, run_sweep

# Per preset: total seconds for the rows (start-up and the matmul-rate runs come on top),
# seconds of timed calls per row, minimum repetitions, seconds per matmul-rate measurement.
PRESETS = {
    "default": dict(budget=300.0, row_time=1.0, min_reps=3, matmul_s=0.5),
    "quick": dict(budget=45.0, row_time=0.3, min_reps=3, matmul_s=0.2),
    "smoke": dict(budget=20.0, row_time=0.02, min_reps=2, matmul_s=0.02, matmul_scale=8),
}


def _csv(kind: str, choices: tuple[str, ...]):  # noqa: ANN202 - an argparse type
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{kind} must be a comma list of {', '.join(choices)}; got {text!r}")
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mmfast-bench",
        description="Benchmark mmfast's kernels against PyTorch and other peers: time, FLOP rate, "
        "peak memory, agreement with the reference. Markdown table on stdout; CSV, JSON and PNG in --out.",
    )
    p.add_argument("--quick", action="store_true", help="a small suite, under a minute")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the harness; numbers mean nothing")
    p.add_argument("--sweep-batch", action="store_true", help="contrastive losses: time and memory against N")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--ops", type=_csv("--ops", OPS), default=list(OPS), help="comma list, default all")
    p.add_argument("--dtype", type=_csv("--dtype", tuple(DTYPES)), default=None, help="comma list: fp32,bf16,fp16")
    p.add_argument("--modes", type=_csv("--modes", MODES), default=list(MODES), help="fwd,fwd+bwd (default both)")
    p.add_argument(
        "--providers",
        default=None,
        help="comma list of providers (default: all available); opt-in: mmfast-reference, torch-compile, "
        "mmfast-cpu:<path> (the cpu backend on one tile-product path: avx512, avx2, avx512_bf16, amx, blas)",
    )
    p.add_argument("--compile", action="store_true", help="add torch.compile of the reference (slow to compile)")
    p.add_argument(
        "--out", default="bench-results", help="folder for CSV, JSON, Markdown and PNG (default %(default)s)"
    )
    p.add_argument("--budget", type=float, default=None, help="seconds for the rows (default: 300; quick 45)")
    p.add_argument(
        "--mem-budget-gb", type=float, default=None, help="most one call may need (default: half the free memory)"
    )
    p.add_argument("--max-n", type=int, default=262144, help="sweep: largest N (default %(default)s)")
    p.add_argument("--point-s", type=float, default=60.0, help="sweep: most seconds per (N, provider)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and mmfast (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible to torch")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda[:i], got {name!r}")
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = "smoke" if args.smoke else "quick" if args.quick else "default"
    cfg = PRESETS[preset]
    device = pick_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    dtypes = [DTYPES[d] for d in (args.dtype or DEFAULT_DTYPES[preset])]
    names = [n.strip() for n in args.providers.split(",")] if args.providers else None
    providers = select_providers(device, names, args.compile)
    usable = [p for p in providers if p.why_not(device) is None]
    listed = [p for p in all_providers(device) if p.default or p.name in (names or ())]  # opt-ins when named
    unavailable = {p.name: p.why_not(device) for p in listed if p.why_not(device)}
    if names is None and not any(p.name.startswith("mmfast-") for p in usable):
        # A table of the peers alone would read as a result; say why mmfast is missing instead.
        why = report.not_run({k: v for k, v in unavailable.items() if k.startswith("mmfast-")})
        sys.stderr.write(
            f"mmfast-bench: none of mmfast's kernels can run on {device}: {why}.\n"
            "Time the peers alone with --providers (e.g. --providers torch-naive,torch-sdpa).\n"
        )
        return 2
    mem_budget = int(args.mem_budget_gb * 2**30) if args.mem_budget_gb else measure.available_memory(device) // 2
    # The sweep's big points get the checked call and two timed ones (the first measures memory).
    min_reps = 2 if args.sweep_batch else cfg["min_reps"]
    settings = Settings(row_time=cfg["row_time"], min_reps=min_reps, mem_budget=mem_budget)
    if args.sweep_batch:
        dtypes = dtypes[:1]

    t0 = time.perf_counter()
    rates = {d: measure.matmul_rate(device, d, cfg["matmul_s"], cfg.get("matmul_scale", 1)) for d in dtypes}
    info = measure.machine_info(device)
    info["matmul_gflops"] = {DTYPE_NAMES.get(d, str(d)): r for d, r in rates.items()}
    info.update(preset=preset, mem_budget_gib=mem_budget / 2**30, providers=[p.name for p in usable])
    runner = Runner(device, settings, rates)
    progress = not args.no_progress
    if args.sweep_batch:
        budget = args.budget if args.budget is not None else 300.0
        D = 32 if preset == "smoke" else 512
        sizes = sweep_sizes(64 if preset == "smoke" else 1024, args.max_n)
        ops = [op for op in args.ops if op in CONTRASTIVE_OPS]
        if not ops:
            raise SystemExit(f"--sweep-batch covers {' and '.join(CONTRASTIVE_OPS)}; --ops selects none of them")
        rows = run_sweep(ops, dtypes[0], usable, runner, sizes, D, budget, args.point_s, progress)
        stem = "sweep"
    else:
        budget = args.budget if args.budget is not None else cfg["budget"]
        cases = suite(preset, args.ops, dtypes, args.modes)
        rows = run_suite(cases, usable, runner, budget, progress)
        stem = "results"
    add_speedups(rows, BASELINE)
    rows = report.order_rows(rows, list(OPS), [p.name for p in usable])
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    table = report.markdown(rows, info, unavailable, {p.name: p.note for p in usable})
    sys.stdout.write(table)
    written = report.write_files(rows, info, args.out, stem, table)
    if args.sweep_batch:
        plot = report.plot_sweep(rows, info, mem_budget, f"{args.out}/sweep.png")
    else:
        plot = report.plot_speedups(rows, info, f"{args.out}/speedup.png")
    written += [plot] if plot else ["(no plot: matplotlib not installed or nothing timed)"]
    sys.stderr.write("wrote " + ", ".join(written) + f" in {info['wall_s']} s\n")
    # Exit status 1 when one of mmfast's own kernels failed or disagreed with the reference.
    bad = [r for r in rows if r.provider.startswith("mmfast-") and r.status in ("error", "disagrees")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
