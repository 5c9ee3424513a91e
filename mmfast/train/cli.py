"""Command line of ``python -m mmfast.train`` (training) and ``python -m mmfast.train eval``."""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main", "parse_train_args"]

log = logging.getLogger("mmfast.train")

# --steps by --objective: the fusion encoder of itc+itm learns from scratch once the towers' tokens
# say something (on the embedded default its ITM loss leaves the class prior after ~100 steps).
DEFAULT_STEPS = {"itc": 150, "itc+itm": 300}

DESCRIPTION = """\
Train a CLIP with very large negative batches (GradCache + mmfast's fused contrastive loss).

With no arguments: a tiny CLIP (transformers' CLIPConfig, attention through mmfast, random init)
trained on the embedded synthetic scenes, then evaluated on 1,000 held-out pairs; a summary table is
printed and OUT/summary.json, OUT/log.jsonl, OUT/curves.png and a checkpoint are written.

Many processes: torchrun --standalone --nproc_per_node 2 -m mmfast.train [...]
(--batch-size is the global batch; DDP by default, --fsdp for FSDP2; gloo on CPU, NCCL on GPU).
Evaluate a checkpoint: python -m mmfast.train eval --checkpoint OUT/checkpoints/step_00000150.pt
Image-text matching (ALBEF's recipe): --objective itc+itm adds a fusion encoder trained on mined hard
negatives; evaluation then adds ITM accuracy and retrieval re-ranked by ITM beside ITC's.
"""

EPILOG = """\
data formats:
  synthetic   the embedded procedural scenes (default; no files needed)
  csv         --train-data file.csv with --csv-img-key / --csv-caption-key / --csv-separator
              (open_clip's flags and defaults: filepath, title, tab); image paths relative to the
              CSV's folder or --data-root
  coco        --train-data captions_train2017.json --coco-images DIR[,DIR] [--val-data
              captions_val2017.json] or a Karpathy split: --coco-karpathy dataset_coco.json
              (train = train + restval, held out = --coco-val-split)
  pairs       --train-data train.json --image-dir images [--val-data val.json]: a JSON list of
              {"image_id", "caption"} objects, image_id's image at IMAGE_DIR/<image_id>.jpg
  webdataset  --train-data 'shards/{000000..000099}.tar' --val-data 'val/{0..3}.tar'
              (samples with jpg/jpeg/png/webp and txt entries)
unreadable samples (missing or corrupt image files) are skipped, replaced, counted in the log and in
summary.json's skipped_samples; a data set with no readable sample is an error.
"""


def _separator(text: str) -> str:
    return codecs.decode(text, "unicode_escape") if "\\" in text else text


def _add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps (default: {DEFAULT_STEPS['itc']}, or {DEFAULT_STEPS['itc+itm']} with --objective "
        "itc+itm: its fusion encoder starts from scratch after the towers)",
    )
    g.add_argument("--batch-size", type=int, default=512, help="GLOBAL batch over all processes (default: %(default)s)")
    g.add_argument(
        "--chunk-size", type=int, default=256, help="GradCache chunk: rows per tower call (default: %(default)s)"
    )
    g.add_argument(
        "--no-gradcache", action="store_true", help="plain loop: whole local batch through the towers at once"
    )
    g.add_argument("--loss", choices=("clip", "siglip"), default="clip", help="contrastive loss (default: %(default)s)")
    g.add_argument("--dist-impl", choices=("gather", "ring"), default="gather", help="feature exchange across ranks")
    g.add_argument("--fsdp", action="store_true", help="shard the towers with FSDP2 (fully_shard) instead of DDP")
    g.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (default: %(default)s)"
    )
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW (default: %(default)s)")
    g.add_argument("--wd", type=float, default=0.1, help="weight decay of matrices (default: %(default)s)")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.98)
    g.add_argument("--eps", type=float, default=1e-6)
    g.add_argument(
        "--warmup", type=int, default=50, help="linear warm-up steps, then cosine decay (default: %(default)s)"
    )
    g.add_argument("--grad-clip-norm", type=float, default=1.0, help="clip the total gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=0, help="weights, data and dropout (default: %(default)s)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="data-loading processes per rank (default: %(default)s; webdataset reads in the main process)",
    )


def _add_itm(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image-text matching (--objective itc+itm)")
    g.add_argument(
        "--objective",
        choices=("itc", "itc+itm"),
        default="itc",
        help="itc: the contrastive loss alone; itc+itm: plus a fusion encoder (text self-attention + text->image "
        "cross-attention) and a match/no-match head trained on hard negatives mined from the contrastive "
        "similarities (ALBEF); evaluation adds ITM accuracy and ITM-re-ranked recall (default: %(default)s)",
    )
    g.add_argument("--fusion-layers", type=int, default=2, help="fusion encoder blocks (default: %(default)s)")
    g.add_argument("--fusion-heads", type=int, default=4, help="fusion encoder attention heads (default: %(default)s)")
    g.add_argument(
        "--fusion-attn",
        choices=("mmfast", "sdpa"),
        default="mmfast",
        help="the fusion encoder's attention: mmfast.nn.CrossAttention (fused kernels) or torch.nn.MultiheadAttention "
        "(PyTorch SDPA); the same weights either way (default: %(default)s)",
    )
    g.add_argument(
        "--fusion-pool",
        choices=("eos", "bos"),
        default="eos",
        help="the text token the matching head reads: the caption's last real token (<eos>) or the first (<bos>) "
        "(default: %(default)s)",
    )
    g.add_argument("--itm-weight", type=float, default=1.0, help="loss = ITC + w * ITM (default: %(default)s)")
    g.add_argument(
        "--itm-chunk-size", type=int, default=512, help="pairs per fusion-encoder call (default: %(default)s)"
    )
    g.add_argument(
        "--itm-negatives",
        choices=("sample", "hardest"),
        default="sample",
        help="sample: drawn by contrastive similarity, as ALBEF; hardest: the most similar (default: %(default)s)",
    )
    g.add_argument(
        "--itm-edit-fraction",
        type=float,
        default=0.5,
        help="synthetic data: the share of images whose negative caption is their own with one attribute changed "
        "(the others' is mined; 0: mined only) (default: %(default)s)",
    )
    g.add_argument(
        "--itm-easy-steps",
        type=int,
        default=0,
        help="the first N steps draw ITM negatives uniformly from the batch's non-matching items, without "
        "edits, before the hard ones (default: %(default)s)",
    )
    g.add_argument(
        "--itm-detach-steps",
        type=int,
        default=None,
        help="the first N steps, ITM's gradient stops at the towers' tokens: it trains the fusion encoder only, "
        "while the towers learn from ITC alone (default: a quarter of --steps)",
    )
    g.add_argument(
        "--fusion-lr", type=float, default=None, help="peak learning rate of the fusion encoder (default: --lr)"
    )
    g.add_argument("--rerank-k", type=int, default=16, help="ITC candidates re-ranked by ITM in evaluation")


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default="tiny",
        help="tiny (default: a small transformers CLIP), hf:PATH (from_pretrained of a local folder), or "
        "open_clip:ARCH[:CHECKPOINT_FILE] (a built-in name or a model-config .json; never downloads)",
    )
    g.add_argument("--attn", choices=("mmfast", "sdpa"), default="mmfast", help="the towers' attention kernels")
    g.add_argument(
        "--tokenizer",
        default="auto",
        help="auto, words (the synthetic grammar's), bytes (UTF-8), hf:PATH (a local tokenizer folder)",
    )
    g.add_argument("--context-length", type=int, default=77, help="tokens per caption for bytes / hf tokenizers")


def _add_data(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    d = (lambda v: v) if defaults else (lambda v: None)
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset-type", choices=("auto", "synthetic", "csv", "coco", "pairs", "webdataset"), default=d("auto")
    )
    g.add_argument("--train-data", default=d(None), help="CSV file, COCO captions JSON(s, comma-separated) or shards")
    g.add_argument("--val-data", default=d(None), help="held-out data in the same format")
    g.add_argument("--csv-img-key", default=d("filepath"), help="CSV column of image paths (default: filepath)")
    g.add_argument("--csv-caption-key", default=d("title"), help="CSV column of captions (default: title)")
    g.add_argument("--csv-separator", type=_separator, default=d("\t"), help="CSV field separator (default: tab)")
    g.add_argument("--data-root", default=d(None), help="folder relative CSV image paths start from")
    g.add_argument("--coco-images", default=d(None), help="COCO image folder(s), comma-separated")
    g.add_argument("--image-dir", default=d(None), help="pairs: folder(s) of <image_id>.jpg, comma-separated")
    g.add_argument("--coco-karpathy", default=d(None), help="Karpathy split JSON (dataset_coco.json)")
    g.add_argument("--coco-val-split", choices=("val", "test"), default=d("val"))
    g.add_argument("--train-samples", type=int, default=d(0), help="synthetic: distinct training scenes (0: endless)")
    g.add_argument("--val-samples", type=int, default=d(1000), help="held-out pairs to evaluate (0: no evaluation)")
    g.add_argument("--zeroshot-images", type=int, default=d(500), help="synthetic: images for zero-shot (0: off)")
    g.add_argument("--eval-chunk-size", type=int, default=d(512), help="rows per tower call in evaluation")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no random resized crop (real data)")


def _add_output(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", default="train-out", help="output folder (default: %(default)s)")
    g.add_argument("--val-every", type=int, default=25, help="evaluate every K steps (0: only at the end)")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every K steps and at the end (0: never)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep the newest N checkpoints (0: all)")
    g.add_argument("--resume", default=None, help="'latest' (the newest in OUT/checkpoints) or a checkpoint file")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="no OUT/curves.png")


def build_parser() -> argparse.ArgumentParser:
    """The training parser (``eval`` is handled by ``main`` before it)."""
    p = argparse.ArgumentParser(
        prog="python -m mmfast.train",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_training(p)
    _add_model(p)
    _add_itm(p)
    _add_data(p)
    _add_output(p)
    return p


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmfast.train eval",
        description="Evaluate a training checkpoint: held-out recall@1/5/10 both ways (and zero-shot on synthetic "
        "data). Data flags default to the ones the checkpoint was trained with.",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (OUT/checkpoints/step_*.pt)")
    p.add_argument("--out", default=None, help="write eval.json here (default: beside the checkpoint)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None)
    p.add_argument("--fusion-attn", choices=("mmfast", "sdpa"), default=None, help="the fusion encoder's attention")
    p.add_argument("--rerank-k", type=int, default=None, help="ITC candidates re-ranked by ITM")
    _add_data(p, defaults=False)
    return p


def parse_train_args(argv: Sequence[str]) -> argparse.Namespace:
    """The training flags of ``argv``, with the defaults that depend on other flags filled in and
    every value checked (SystemExit with a message naming the flag)."""
    args = build_parser().parse_args(argv)
    _fill_defaults(args)
    _validate(args)
    return args


def _fill_defaults(args: argparse.Namespace) -> None:
    """The defaults that depend on other flags: --steps on --objective, --itm-detach-steps on --steps."""
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.objective]
    if args.itm_detach_steps is None:
        args.itm_detach_steps = args.steps // 4


def _validate(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "chunk_size", "eval_chunk_size", "fusion_layers", "fusion_heads",
                 "itm_chunk_size", "rerank_k"):  # fmt: skip
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "val_every", "save_every", "keep_checkpoints", "workers", "val_samples", "train_samples",
                 "itm_easy_steps", "itm_detach_steps"):  # fmt: skip
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.lr <= 0:
        raise SystemExit(f"--lr must be > 0, got {args.lr}")


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[mmfast.train{f' rank {rank}' if rank else ''}] %(message)s",
        stream=sys.stderr,
    )


def format_summary(summary: dict[str, Any]) -> str:
    """A Markdown table of a run's summary."""
    val = summary.get("val", {})
    rows = [("world size", summary.get("world_size")), ("global batch", summary.get("global_batch"))]
    rows += [("steps", summary.get("steps")), ("seconds", f"{summary.get('seconds', 0):.1f}")]
    if summary.get("losses"):
        rows.append(("final loss", f"{summary['losses'][-1]:.4f}"))
    if "i2t_r1" in val:
        n = val["n_images"]
        rows.append(("held-out pairs", f"{val['n_pairs']} ({n} images; chance R@1 {100 / n:.2f}%)"))
        for k in (1, 5, 10):
            value = f"{100 * val[f'i2t_r{k}']:.1f}% / {100 * val[f't2i_r{k}']:.1f}%"
            if f"rerank_i2t_r{k}" in val:
                again = f"{100 * val[f'rerank_i2t_r{k}']:.1f}% / {100 * val[f'rerank_t2i_r{k}']:.1f}%"
                value = f"ITC {value}; re-ranked by ITM + ITC {again}"
                if f"rerank_itm_i2t_r{k}" in val:
                    alone = f"{100 * val[f'rerank_itm_i2t_r{k}']:.1f}% / {100 * val[f'rerank_itm_t2i_r{k}']:.1f}%"
                    value += f"; by ITM alone {alone}"
            rows.append((f"R@{k} image->text / text->image", value))
    rows += _itm_rows(val)
    for name, z in (summary.get("zeroshot") or {}).items():
        rows.append((f"zero-shot {name}", f"{100 * z['acc']:.1f}% (chance {100 * z['chance']:.1f}%)"))
    if "peak_rss_mb" in summary:
        rows.append(("peak RSS (rank 0)", f"{summary['peak_rss_mb']:.0f} MiB"))
    if summary.get("skipped_samples"):
        rows.append(("skipped samples", summary["skipped_samples"]))
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {str(k).ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _itm_rows(val: dict[str, Any]) -> list[tuple[str, Any]]:
    """The ITM figures of an evaluation (none without them)."""
    rows: list[tuple[str, Any]] = []
    if "itm_acc" in val:
        rows.append(("re-ranked candidates", f"top {val['rerank_k']} by ITC"))
        rows.append(
            ("ITM accuracy (balanced)", f"{100 * val['itm_acc']:.1f}% (positives {100 * val['itm_acc_pos']:.1f}%, "
             f"hard negatives {100 * val['itm_acc_neg']:.1f}%)")
        )  # fmt: skip
    if "itm_edit_acc" in val:
        rows.append(
            (
                "true vs one-attribute edit",
                f"ITM {100 * val['itm_edit_acc']:.1f}% / ITC {100 * val['itc_edit_acc']:.1f}%",
            )
        )
    return rows


def run_eval(argv: Sequence[str]) -> dict[str, Any]:
    """``python -m mmfast.train eval``: rebuild the checkpoint's model and evaluate it."""
    import torch  # noqa: PLC0415

    from mmfast.train import checkpoint as ckpt  # noqa: PLC0415
    from mmfast.train.data_setup import make_data  # noqa: PLC0415
    from mmfast.train.distributed import init_distributed  # noqa: PLC0415
    from mmfast.train.evaluate import evaluate  # noqa: PLC0415
    from mmfast.train.itm_eval import evaluate_itm  # noqa: PLC0415
    from mmfast.train.models import model_from_spec  # noqa: PLC0415
    from mmfast.train.tokenizers import build_tokenizer  # noqa: PLC0415
    from mmfast.train.trainer import _autocast  # noqa: PLC0415

    opts = build_eval_parser().parse_args(argv)
    state = ckpt.read_checkpoint(opts.checkpoint)
    args = argparse.Namespace(**state["args"])
    for k, v in vars(opts).items():
        if v is not None and k not in ("checkpoint", "out"):
            setattr(args, k, v)
    d = init_distributed(args.device)
    tokenizer = build_tokenizer(state["tokenizer_spec"])
    model = model_from_spec(state["model_spec"], attn=args.attn, fusion_attn=getattr(args, "fusion_attn", "mmfast"))
    model.load_state_dict(state["model"])
    model.to(d.device).eval()
    if args.val_samples <= 0:
        raise SystemExit("--val-samples must be > 0 to evaluate")
    _, evalset = make_data(args, model, tokenizer, d)
    with torch.no_grad():
        result = evaluate(
            model.image_tower, model.text_tower, tokenizer, evalset, device=d.device, chunk=args.eval_chunk_size,
            zeroshot=args.zeroshot_images, autocast=_autocast(d.device, args.precision),
        )  # fmt: skip
        if model.fusion is not None:
            result.update(
                evaluate_itm(
                    model, tokenizer, evalset, device=d.device, chunk=args.eval_chunk_size,
                    rerank_k=getattr(args, "rerank_k", 16), fusion_chunk=getattr(args, "itm_chunk_size", 512),
                    autocast=_autocast(d.device, args.precision), seed=args.seed,
                )
            )  # fmt: skip
    zeroshot = result.pop("zeroshot", None)
    summary = {"checkpoint": opts.checkpoint, "step": state["step"], "val": result, "world_size": d.world_size}
    if zeroshot is not None:
        summary["zeroshot"] = zeroshot
    if d.is_main:
        out_dir = opts.out or os.path.dirname(os.path.abspath(opts.checkpoint))
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "eval.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(format_summary(summary))
    return summary


def _end_group() -> None:
    """Barrier, then destroy the process group ``init_distributed`` started (if any)."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point; returns the summary dict (also written to OUT/summary.json). A process group it
    started is torn down before it returns; ``python -m mmfast.train`` under a launcher then leaves
    through ``distributed.finish_process`` (no interpreter finalization with gloo threads alive)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    if argv[:1] == ["eval"]:
        summary = run_eval(argv[1:])
        _end_group()
        return summary
    args = parse_train_args(argv)
    from mmfast.train.trainer import train  # noqa: PLC0415 - keep --help fast

    summary = train(args)
    _end_group()
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(format_summary(summary))
        print(f"wrote {os.path.join(args.out, 'summary.json')}")
    return summary
