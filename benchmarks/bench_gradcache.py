"""GradCache memory target (issue 14): tiny towers, a global batch of 65,536 on one CPU process.

    python benchmarks/bench_gradcache.py                       # the target run (a few minutes)
    python benchmarks/bench_gradcache.py --batch 8192 --plain 512,1024   # quick look

Towers: mmfast.train's default tiny CLIP (transformers CLIPConfig, two blocks per tower, width 96,
48 x 48 images in 8 x 8 patches, 32 text tokens, attention through mmfast), the CLIP loss through
mmfast.nn.ClipLoss. Inputs are random uint8 images and token ids (the training pipeline's layout:
uint8 until a chunk reaches the image tower).

Each measurement runs in a fresh subprocess, which reports its peak resident set size
(``ru_maxrss``), the resident size once model and inputs exist ("base"), and the step's time:
  gradcache  one GradCache step at --batch with --chunk rows per tower call;
  plain      loss(image_tower(images), text_tower(texts)).backward() on the whole batch, at the
             sizes of --plain, cheapest first, each run only while its predicted peak (a line
             through the previous two peaks) stays under --mem-budget-gb; the peak at --batch is
             then predicted from the same line (activations grow linearly with the batch).
Target: the GradCache peak at 65,536 at most --target-gb (4 GB). Printed as a table, written as
JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(mode: str, n: int, chunk: int) -> dict:
    """One measurement in this (fresh) process."""
    from mmfast.nn import ClipLoss
    from mmfast.train import GradCache
    from mmfast.train.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=41, context_length=32)
    images = torch.randint(0, 256, (n, 3, model.image_size, model.image_size), dtype=torch.uint8)
    ids = torch.randint(4, 41, (n, 32))
    ids[:, -1] = 3  # <eos>
    texts = {"input_ids": ids, "attention_mask": torch.ones(n, 32, dtype=torch.long)}
    loss_fn = ClipLoss()

    def objective(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(x, y, model.scale())

    base = _rss_mb()
    t = time.perf_counter()
    if mode == "gradcache":
        loss = GradCache(model.image_tower, model.text_tower, objective, chunk).step(images, texts)
    else:
        loss = objective(model.image_tower(images), model.text_tower(**texts))
        loss.backward()
    seconds = time.perf_counter() - t
    grads_ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "n": n, "chunk": chunk, "peak_mb": peak, "base_mb": base, "seconds": seconds,
            "loss": float(loss), "grads_finite": grads_ok}  # fmt: skip


def measure(mode: str, n: int, chunk: int, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--batch", str(n), "--chunk", str(chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} at N={n} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _line(points: list[dict], n: int) -> float:
    """Peak at n from the line through the last two (n, peak) points."""
    (n0, p0), (n1, p1) = [(p["n"], p["peak_mb"]) for p in points[-2:]]
    return p1 + (p1 - p0) / (n1 - n0) * (n - n1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--plain", default="256,512,1024,2048,4096", help="plain-loop batch sizes to measure")
    p.add_argument("--mem-budget-gb", type=float, default=6.0, help="largest plain-loop peak to run")
    p.add_argument("--target-gb", type=float, default=4.0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    p.add_argument("--out", default="bench-results/gradcache.json")
    p.add_argument("--child", choices=("gradcache", "plain"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.chunk)))
        return
    torch_threads = torch.get_num_threads()
    plain: list[dict] = []
    for n in (int(x) for x in args.plain.split(",")):
        if len(plain) >= 2 and _line(plain, n) > args.mem_budget_gb * 1024:
            break
        plain.append(measure("plain", n, n, args.timeout))
    predicted = _line(plain, args.batch) if len(plain) >= 2 else None
    gc = measure("gradcache", args.batch, args.chunk, args.timeout)
    rows = [*plain, gc]
    print(f"torch threads {torch_threads}; batch {args.batch}; GradCache chunk {args.chunk}\n")
    print("| mode | N | peak RSS MiB | base MiB | step s | finite grads |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = (
            r["mode"],
            r["n"],
            f"{r['peak_mb']:.0f}",
            f"{r['base_mb']:.0f}",
            f"{r['seconds']:.1f}",
            r["grads_finite"],
        )
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if predicted is not None:
        print(f"| plain (predicted from the last two) | {args.batch} | {predicted:.0f} | | | |")
    ok = gc["peak_mb"] <= args.target_gb * 1024 and gc["grads_finite"]
    print(f"\nGradCache peak at {args.batch}: {gc['peak_mb'] / 1024:.2f} GiB (target <= {args.target_gb} GB): "
          f"{'met' if ok else 'NOT met'}")  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "plain_predicted_mb": predicted, "target_met": ok}, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
