"""Per-rank peak memory and time of the CLIP loss across processes (issue 14): mmfast's ClipLoss with
dist_impl="gather" and "ring", and open_clip's ClipLoss, fwd+bwd, launched by torchrun on gloo.

    torchrun --nproc-per-node 4 benchmarks/bench_ring.py                      # n = 16384 per rank, D = 256
    torchrun --nproc-per-node 2 benchmarks/bench_ring.py --batch 2048 --reps 2    # a quick look

Every configuration uses gather_with_grad=True (the ring's semantics) and, by default, local_loss=True
(what large runs use; --global-loss for the other). Per rank:

  peak   the most resident memory the call needs beyond its inputs (x, y, logit_scale): RSS
         high-water mark minus RSS before, after returning freed heap pages and mmfast's block cache
         and resetting the mark (mmfast.bench.measure.PeakMemory), i.e. what a fresh process needs.
  time   forward + backward of the loss on that rank (perf_counter; the slowest rank is what a
         training step waits for). All ranks share this machine's cores: indicative only.

open_clip materializes its (n x world n) logits: at --batch it needs tens of GB per rank, so it runs at
--open-clip-n (default 1024, 2048, 4096) and its peak and time at --batch are predicted from those three
points (peak: the quadratic through them; time: c n^2 from the largest). Rank 0 prints a table,
checks the target (ring's peak at most half of gather's) and writes --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmfast.bench.measure import PeakMemory, cpu_model  # noqa: E402
from mmfast.nn import ClipLoss  # noqa: E402

MIB = 2**20


def make_loss(impl: str, rank: int, world: int, local_loss: bool):
    if impl == "open_clip":
        import open_clip.loss  # noqa: PLC0415 - optional peer

        return open_clip.loss.ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world)
    return ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world, dist_impl=impl)


def one_call(impl: str, n: int, d: int, dtype: torch.dtype, rank: int, world: int, local_loss: bool) -> dict:
    """Peak bytes beyond the inputs, seconds and the loss of one fwd+bwd on this rank."""
    gen = torch.Generator().manual_seed(1000 + rank)
    x = F.normalize(torch.randn(n, d, generator=gen), dim=-1).to(dtype).requires_grad_()
    y = F.normalize(torch.randn(n, d, generator=gen), dim=-1).to(dtype).requires_grad_()
    s = torch.tensor(2.659, requires_grad=True)
    loss_fn = make_loss(impl, rank, world, local_loss)
    dist.barrier()
    with PeakMemory(torch.device("cpu")) as peak:
        start = time.perf_counter()
        loss = loss_fn(x, y, s.exp())
        loss.backward()
        seconds = time.perf_counter() - start
    value = float(loss.detach())
    del loss, x, y, s
    dist.barrier()
    return {"peak": peak.bytes, "seconds": seconds, "loss": value}


def measure(impl: str, n: int, args, rank: int, world: int) -> dict:
    """The median of --reps calls on this rank (the peak is the largest)."""
    calls = [one_call(impl, n, args.dim, args.dtype, rank, world, not args.global_loss) for _ in range(args.reps)]
    return {
        "peak": max(c["peak"] for c in calls),
        "seconds": statistics.median(c["seconds"] for c in calls),
        "loss": calls[-1]["loss"],
    }


def quadratic_at(ns: list[int], ys: list[float], n: int) -> float:
    """The quadratic through three (n, y) points, evaluated at n (Lagrange form)."""
    total = 0.0
    for i, (ni, yi) in enumerate(zip(ns, ys)):
        term = yi
        for j, nj in enumerate(ns):
            if j != i:
                term *= (n - nj) / (ni - nj)
        total += term
    return total


def report(rows: list[dict], args, world: int) -> dict:
    """Rank 0: the table, the prediction for open_clip, the target check."""
    print(f"\nClipLoss fwd+bwd across {world} processes (gloo), D = {args.dim}, {args.dtype}, "
          f"local_loss={not args.global_loss}, gather_with_grad=True; {cpu_model()}, "
          f"{os.cpu_count()} logical CPUs, {torch.get_num_threads()} thread(s) per rank\n")  # fmt: skip
    print("| provider | n per rank | peak MiB per rank (max; all ranks) | time s (slowest rank) | loss (rank 0) |")
    print("|---|---|---|---|---|")
    out = {"world": world, "dim": args.dim, "dtype": str(args.dtype), "local_loss": not args.global_loss, "rows": []}
    for r in rows:
        peaks = [p / MIB for p in r["peaks"]]
        line = {"provider": r["impl"], "n": r["n"], "peak_mib": max(peaks), "peaks_mib": peaks,
                "seconds": max(r["seconds"]), "loss": r["loss"][0], "predicted": False}  # fmt: skip
        out["rows"].append(line)
        print(f"| {r['impl']} | {r['n']} | {max(peaks):.0f}; {', '.join(f'{p:.0f}' for p in peaks)} | "
              f"{max(r['seconds']):.2f} | {r['loss'][0]:.6f} |")  # fmt: skip
    oc = [line for line in out["rows"] if line["provider"] == "open_clip"]
    if len(oc) == 3:
        ns = [line["n"] for line in oc]
        peak = quadratic_at(ns, [line["peak_mib"] for line in oc], args.batch)
        secs = oc[-1]["seconds"] * (args.batch / ns[-1]) ** 2
        out["rows"].append(
            {"provider": "open_clip", "n": args.batch, "peak_mib": peak, "seconds": secs, "predicted": True}
        )
        print(
            f"| open_clip (predicted from n = {', '.join(map(str, ns))}) | {args.batch} | {peak:.0f} | {secs:.1f} | |"
        )
    got = {
        line["provider"]: line["peak_mib"] for line in out["rows"] if line["n"] == args.batch and not line["predicted"]
    }
    if "ring" in got and "gather" in got:
        ratio = got["ring"] / got["gather"]
        out["ring_over_gather_peak"] = ratio
        print(f"\nring / gather peak per rank: {ratio:.2f} (target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16384, help="n, the local batch per rank")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--impls", default="gather,ring,open_clip")
    p.add_argument("--open-clip-n", default="1024,2048,4096", help="open_clip's measured sizes (three)")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--global-loss", action="store_true", help="local_loss=False (every rank: the whole loss)")
    p.add_argument("--out", default="bench-results/ring.json")
    args = p.parse_args()
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for impl in args.impls.split(","):  # warm-up: gloo connections, thread pools, first-call allocations
        measure(impl, 256, argparse.Namespace(**{**vars(args), "reps": 1}), rank, world)
    rows = []
    for impl in args.impls.split(","):
        sizes = [int(v) for v in args.open_clip_n.split(",")] if impl == "open_clip" else [args.batch]
        for n in sizes:
            m = measure(impl, n, args, rank, world)
            seen = [None] * world
            dist.all_gather_object(seen, m)
            rows.append({"impl": impl, "n": n, "peaks": [s["peak"] for s in seen],
                         "seconds": [s["seconds"] for s in seen], "loss": [s["loss"] for s in seen]})  # fmt: skip
            if rank == 0:
                print(f"{impl} n={n}: peak {max(s['peak'] for s in seen) / MIB:.0f} MiB, "
                      f"{max(s['seconds'] for s in seen):.2f} s", flush=True)  # fmt: skip
    if rank == 0:
        out = report(rows, args, world)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from mmfast.train.distributed import finish_process

    finish_process(main)  # leaves with os._exit: no gloo thread meets a finalizing interpreter
