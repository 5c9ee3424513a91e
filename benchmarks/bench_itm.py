"""ITC + ITM training step (issue 20): the fusion encoder's attention through mmfast or SDPA.

    python benchmarks/bench_itm.py                      # default step: 512 pairs, fp32 and bf16
    python benchmarks/bench_itm.py --rounds 3 --batch 128   # quick look

What is timed, in one process, round-robin (one call of each row per round; medians with 20% / 80%
quantiles, as benchmarks/PERFORMANCE.md asks):
  step    ``mmfast.train``'s own training step (``trainer._step``: tokens, GradCache over the
          towers, ITC + ITM on mined hard negatives, AdamW) with the CLI's defaults for
          ``--objective itc+itm`` (tiny towers, 2 fusion layers, the embedded synthetic data), on
          one fixed batch; two trainers built from the same seed, ``--fusion-attn mmfast`` and
          ``--fusion-attn sdpa`` (the same weights; the towers' attention is mmfast in both).
  fusion  the part that differs: the fusion encoder's forward and backward over one step's ITM
          pairs (3 per image), in chunks of ``--itm-chunk-size`` sorted by caption length as
          training runs them.
for --precision fp32 and bf16 (autocast, as ``--precision bf16``). The torch.mm fp32 rate
(2 threads, 1024^3) before and after tells how busy the machine was. Printed as a table, written
as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ATTNS = ("mmfast", "sdpa")
PRECISIONS = ("fp32", "bf16")


def mm_gflops(n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def make_trainer(attn: str, precision: str, batch: int, extra: list[str]) -> dict[str, Any]:
    """A trainer's state (``trainer._setup``) for the CLI arguments, its step's batch and autocast."""
    from mmfast.train.cli import parse_train_args
    from mmfast.train.distributed import Dist
    from mmfast.train.gradcache import GradCache
    from mmfast.train.trainer import _autocast, _setup

    argv = ["--objective", "itc+itm", "--fusion-attn", attn, "--precision", precision, "--batch-size", str(batch)]
    argv += ["--workers", "0", "--val-samples", "0", "--zeroshot-images", "0", "--out", "/tmp/bench-itm"]
    argv += ["--itm-detach-steps", "0", *extra]  # the timed step (step 0) backpropagates ITM into the towers
    args = parse_train_args(argv)
    d = Dist()
    s = _setup(args, d)
    s["gradcache"] = GradCache(s["image_fn"], s["text_fn"], s["objective"], args.chunk_size)
    s.update(args=args, d=d, autocast=_autocast(d.device, precision), batch=next(s["batches"](0)))
    return s


def train_step(s: dict[str, Any]) -> None:
    from mmfast.train.trainer import _step

    _step(s, s["batch"], s["args"], s["d"], s["autocast"], step=0)


def fusion_inputs(s: dict[str, Any]) -> dict[str, Any]:
    """The step's ITM pairs and the towers' tokens (detached leaves), as the objective sees them."""
    obj, batch = s["objective"], s["batch"]
    obj.begin_step(batch, 0)
    images, texts = obj.inputs(batch, s["d"].device)
    model = s["model"]
    with torch.no_grad():
        img_emb, img_tok = model.image_tower(**images)
        txt_emb, txt_tok, txt_pad = model.text_tower(**texts)
    n = img_emb.shape[0]
    pairs = obj.pairs(img_emb, txt_emb[:n], obj._edit_rows)
    return {"tokens": (img_tok, txt_tok, txt_pad), "pairs": pairs}


def fusion_step(s: dict[str, Any], inputs: dict[str, Any]) -> None:
    img_tok, txt_tok, txt_pad = (t.detach().requires_grad_(t.is_floating_point()) for t in inputs["tokens"])
    with s["autocast"]():
        s["objective"].itm_loss(img_tok, txt_tok, txt_pad, inputs["pairs"])
    s["model"].zero_grad(set_to_none=True)


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    return tuple(float(torch.quantile(t, q)) for q in (0.5, 0.2, 0.8))


def run(opts: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(opts.threads)
    gauge_before = mm_gflops()
    rows: dict[tuple[str, str, str], list[float]] = {}
    trainers = {(p, a): make_trainer(a, p, opts.batch, opts.extra) for p in opts.precisions for a in ATTNS}
    fusion = {k: fusion_inputs(s) for k, s in trainers.items()}
    calls = {("step", *k): (lambda s=s: train_step(s)) for k, s in trainers.items()}
    calls |= {("fusion", *k): (lambda s=s, f=fusion[k]: fusion_step(s, f)) for k, s in trainers.items()}
    for fn in calls.values():  # warm-up: kernels, allocator
        fn()
    for _ in range(opts.rounds):
        for key, fn in calls.items():
            t = time.perf_counter()
            fn()
            rows.setdefault(key, []).append(time.perf_counter() - t)
    gauge_after = mm_gflops()
    out = {"batch": opts.batch, "threads": opts.threads, "rounds": opts.rounds, "extra_args": opts.extra,
           "mm_gflops_before": gauge_before, "mm_gflops_after": gauge_after, "rows": []}  # fmt: skip
    for (part, prec, attn), ts in rows.items():
        med, q20, q80 = quantiles(ts)
        out["rows"].append({"part": part, "precision": prec, "fusion_attn": attn, "median_s": med,
                            "q20_s": q20, "q80_s": q80, "times_s": ts})  # fmt: skip
    return out


def table(res: dict[str, Any]) -> str:
    by = {(r["part"], r["precision"], r["fusion_attn"]): r for r in res["rows"]}
    lines = [
        f"ITC+ITM step, batch {res['batch']}, {res['threads']} threads, {res['rounds']} rounds; torch.mm fp32 "
        f"{res['mm_gflops_before']:.0f} -> {res['mm_gflops_after']:.0f} GFLOP/s",
        "| part | precision | mmfast s (q20-q80) | sdpa s (q20-q80) | sdpa / mmfast |",
        "|---|---|---|---|---|",
    ]
    for part in ("step", "fusion"):
        for prec in PRECISIONS:
            if (part, prec, "mmfast") not in by:
                continue
            m, s = by[(part, prec, "mmfast")], by[(part, prec, "sdpa")]
            cell = lambda r: f"{r['median_s']:.3f} ({r['q20_s']:.3f}-{r['q80_s']:.3f})"  # noqa: E731
            lines.append(f"| {part} | {prec} | {cell(m)} | {cell(s)} | {s['median_s'] / m['median_s']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=512, help="pairs per step (the CLI default)")
    p.add_argument("--rounds", type=int, default=5, help="timed calls of each row (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("extra", nargs="*", help="more mmfast.train flags after --, e.g. -- --fusion-layers 1")
    opts = p.parse_args(argv)
    bad = [x for x in opts.precisions if x not in PRECISIONS]
    if bad:
        p.error(f"--precisions must name {PRECISIONS}, got {bad}")
    res = run(opts)
    print(table(res))
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
