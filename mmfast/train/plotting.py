"""The training curves: loss and held-out recall against the step, from OUT/log.jsonl."""

from __future__ import annotations

import json

__all__ = ["plot_curves", "read_log"]


def read_log(path: str) -> tuple[list[dict], list[dict]]:
    """(step records, evaluation records) of a log; a later line for a step replaces an earlier one."""
    steps: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            (evals if "eval" in rec else steps)[int(rec["step"])] = rec
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]


def plot_curves(log_path: str, png_path: str, title: str | None = None) -> None:
    """Two panels: the training loss (and its running mean), and recall@1/5 both ways on the
    held-out pairs, against the step. Written to ``png_path``."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    steps, evals = read_log(log_path)
    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = [r["step"] for r in steps]
    ys = [r["loss"] for r in steps]
    ax_loss.plot(xs, ys, lw=0.8, alpha=0.5, label="loss")
    if len(ys) >= 10:
        w = max(5, len(ys) // 30)
        smooth = [sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1]) for i in range(len(ys))]
        ax_loss.plot(xs, smooth, lw=1.5, label=f"running mean ({w} steps)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    evals = [e for e in evals if "i2t_r1" in e["eval"]]
    if evals:
        ex = [e["step"] for e in evals]
        keys = [("i2t_r1", "o-"), ("t2i_r1", "s-"), ("i2t_r5", "o--"), ("t2i_r5", "s--")]
        if all("rerank_i2t_r1" in e["eval"] for e in evals):  # --objective itc+itm
            keys += [("rerank_i2t_r1", "^-"), ("rerank_t2i_r1", "v-"), ("itm_acc", "d:")]
        for key, style in keys:
            label = key.replace("_r", " R@").replace("rerank_", "re-ranked ").replace("itm_acc", "ITM accuracy")
            ax_rec.plot(ex, [100 * e["eval"][key] for e in evals], style, label=label)
        n = evals[-1]["eval"].get("n_images", 0)
        if n:
            ax_rec.axhline(100 / n, color="grey", lw=0.8, ls=":", label=f"chance R@1 ({n} pairs)")
    ax_rec.set_xlabel("step")
    ax_rec.set_ylabel("held-out recall / accuracy (%)")
    ax_rec.grid(alpha=0.3)
    ax_rec.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
