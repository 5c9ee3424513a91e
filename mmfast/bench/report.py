"""Output: the Markdown table (stdout), CSV and JSON files, and PNG plots when matplotlib is installed."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

from mmfast.bench.cases import DTYPES
from mmfast.bench.providers import BASELINE
from mmfast.bench.runner import Row, asdict_rows

COLUMNS = (
    "op",
    "shape",
    "dtype",
    "mode",
    "provider",
    "median ms [p20, p80]",
    "n",
    "speed-up",
    "GFLOP/s model [algo]",
    "% matmul",
    "peak MiB",
    "max err",
    "note",
)


def _f(x: float | None, fmt: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ms(x: float) -> str:
    """Three significant digits without an exponent."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _cells(r: Row) -> list[str]:
    time_cell = "" if r.median_ms is None else f"{_ms(r.median_ms)} [{_ms(r.q20_ms)}, {_ms(r.q80_ms)}]"
    note = r.note if r.status in ("ok",) else f"**{r.status}**: {r.note}" if r.note else f"**{r.status}**"
    return [
        r.op,
        r.shape,
        r.dtype,
        r.mode,
        r.provider,
        time_cell,
        str(r.reps) if r.reps else "",
        _f(r.speedup, ".2f") + ("x" if r.speedup is not None else ""),
        _f(r.gflops, ".1f") + ("" if r.algo_gflops is None else f" [{r.algo_gflops:.1f}]"),
        _f(None if r.frac_matmul is None else 100 * r.frac_matmul, ".0f"),
        _f(r.peak_mib, ".0f"),
        _f(r.max_err, ".1e"),
        note.replace("|", "/"),
    ]


def caption(info: dict[str, Any]) -> str:
    where = info.get("gpu") or f"{info['cpu']}, {info['cpu_threads']} threads"
    rates = ", ".join(f"{k} {v:.3g}" for k, v in info.get("matmul_gflops", {}).items())
    base = ", ".join(sorted({f"{v} ({k})" for k, v in BASELINE.items()}))
    return (
        f"mmfast-bench on {where}; torch {info['torch']}; {info['date_utc']}.\n"
        f"Matmul rate measured in this run (GFLOP/s): {rates}. Speed-up over: {base}.\n"
        "GFLOP/s: model FLOPs (the math: forward 2·N·N·D or 4·Lq·Lk·D; fwd+bwd 3 x forward) per second; "
        "[algo]: the fused algorithm's FLOPs (its backward recomputes the logits: 4 x and 3.5 x forward). "
        "% matmul: the model rate over the matmul rate.\n"
        "Peak memory: the most one call needs beyond its inputs. Max err: vs the reference, "
        "max |diff| / max |ref| over the output and every gradient."
    )


def markdown(rows: list[Row], info: dict[str, Any], unavailable: dict[str, str], notes: dict[str, str]) -> str:
    """The table, with the machine caption above and what each provider is (and is not here) below."""
    lines = [caption(info), "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    used = dict.fromkeys(r.provider for r in rows)
    if used:
        lines += ["", "Providers: " + "; ".join(f"{p}: {notes[p]}" if notes.get(p) else p for p in used) + "."]
    if unavailable:
        lines += ["", f"Not run here: {not_run(unavailable)}."]
    return "\n".join(lines) + "\n"


def not_run(unavailable: dict[str, str]) -> str:
    """Providers that share a reason named together: "a, b (why); c (why)"."""
    by_reason: dict[str, list[str]] = {}
    for name, why in unavailable.items():
        by_reason.setdefault(why, []).append(name)
    return "; ".join(f"{', '.join(names)} ({why})" for why, names in by_reason.items())


def order_rows(rows: list[Row], op_order: list[str], provider_order: list[str]) -> list[Row]:
    """Group rows by op, shape, dtype and mode (first appearance order), providers in their order."""
    shape_index: dict[str, int] = {}
    for r in rows:
        shape_index.setdefault(r.shape, len(shape_index))

    def key(r: Row) -> tuple:
        return (
            op_order.index(r.op) if r.op in op_order else 99,
            r.N or 0,
            shape_index[r.shape],
            list(DTYPES).index(r.dtype) if r.dtype in DTYPES else 99,
            r.mode,
            provider_order.index(r.provider) if r.provider in provider_order else 99,
        )

    return sorted(rows, key=key)


def write_files(rows: list[Row], info: dict[str, Any], out_dir: str, stem: str, table: str) -> list[str]:
    """``stem``.csv, .json and .md in ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    records = asdict_rows(rows)
    paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("csv", "json", "md")]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]) if records else ["op"])
        w.writeheader()
        w.writerows(records)
    with open(paths[1], "w") as f:
        json.dump({"machine": info, "rows": records}, f, indent=1, default=str)
    with open(paths[2], "w") as f:
        f.write(table)
    return paths


# --------------------------------------------------------------------------------------------
# Plots.
# --------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def _baseline_label(ops: list[str]) -> str:
    by_baseline: dict[str, list[str]] = {}
    for op in ops:
        if op in BASELINE:
            by_baseline.setdefault(BASELINE[op], []).append(op)
    return "1x = the baseline: " + "; ".join(f"{b} ({', '.join(o)})" for b, o in by_baseline.items())


def speedup_figure(rows: list[Row], info: dict[str, Any]) -> Any:
    """Horizontal bars: each provider's speed-up over its op's PyTorch baseline, per case (None: nothing
    timed or no matplotlib). The left margin is sized from the drawn labels, so none is clipped."""
    plt = _pyplot()
    timed = [r for r in rows if r.speedup is not None and r.provider != BASELINE.get(r.op)]
    if plt is None or not timed:
        return None

    def label(r: Row) -> str:
        return f"{r.op} {r.dtype} {r.mode}\n{r.shape}"

    cases = list(dict.fromkeys(label(r) for r in timed))
    provs = list(dict.fromkeys(r.provider for r in timed))
    height = 0.8 / len(provs)
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(cases) * max(1, len(provs) / 2) + 1.8))
    for j, p in enumerate(provs):
        mine = [r for r in timed if r.provider == p]
        ax.barh([cases.index(label(r)) + j * height for r in mine], [r.speedup for r in mine], height=height, label=p)
    ax.axvline(1.0, color="k", lw=0.8, label=_baseline_label(list(dict.fromkeys(r.op for r in timed))))
    ax.set_xscale("log")
    lo, hi = min(r.speedup for r in timed), max(r.speedup for r in timed)
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if lo / 2 <= t <= hi * 2]
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))], cases, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the PyTorch baseline (log scale; > 1 is faster)")
    ax.set_title(f"mmfast-bench, {info.get('gpu') or info['cpu']}, {info['date_utc']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08 - 0.4 / fig.get_figheight()), ncol=2)
    # Size the margins from what was drawn: the labels' width on the left, the legend below.
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    label_w = max(t.get_window_extent(renderer).width for t in ax.get_yticklabels()) / fig.dpi
    legend_h = ax.get_legend().get_window_extent(renderer).height / fig.dpi
    fig.set_size_inches(label_w + 7.5, fig.get_figheight() + legend_h)
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=(label_w + 0.25) / w, right=1 - 0.3 / w, top=1 - 0.4 / h, bottom=(legend_h + 0.8) / h)
    ax.get_legend().set_bbox_to_anchor((0.5, -0.6 / (h * ax.get_position().height)))
    return fig


def plot_speedups(rows: list[Row], info: dict[str, Any], path: str) -> str | None:
    """The speed-up bars (``speedup_figure``) as a PNG at ``path``; None when there is nothing to plot."""
    fig = speedup_figure(rows, info)
    if fig is None:
        return None
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_sweep(rows: list[Row], info: dict[str, Any], mem_budget: int, path: str) -> str | None:
    """Time and peak memory against N (log-log); predicted OOM points hollow, at the memory needed."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    ops = list(dict.fromkeys(r.op for r in rows))
    fig, axes = plt.subplots(len(ops), 2, figsize=(11, 4 * len(ops)), squeeze=False)
    for (ax_t, ax_m), op in zip(axes, ops):
        for p in dict.fromkeys(r.provider for r in rows if r.op == op):
            mine = [r for r in rows if r.op == op and r.provider == p]
            ok = [r for r in mine if r.median_ms is not None]
            (line,) = ax_t.plot([r.N for r in ok], [r.median_ms for r in ok], "o-", label=p)
            mem = [r for r in ok if r.peak_mib is not None]
            ax_m.plot([r.N for r in mem], [r.peak_mib / 1024 for r in mem], "o-", color=line.get_color(), label=p)
            oom = [r for r in mine if r.needs_mib is not None]
            if oom:
                ax_m.plot(
                    [r.N for r in oom], [r.needs_mib / 1024 for r in oom], "o--", mfc="none", color=line.get_color()
                )
        ax_m.axhline(mem_budget / 2**30, color="r", ls=":", lw=1, label="memory budget")
        for ax, ylabel in ((ax_t, "fwd+bwd median (ms)"), (ax_m, "peak memory beyond inputs (GiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size N")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{op} ({rows[0].dtype}); hollow = predicted OOM, not run", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        ax_m.legend(fontsize=8)
    fig.suptitle(f"mmfast-bench --sweep-batch, {info.get('gpu') or info['cpu']}, {info['date_utc']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
