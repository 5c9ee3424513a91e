"""The training loop of ``python -m mmfast.train``: a CLIP trained with GradCache over a global batch.

Per step: the rank's slice of the global batch -> GradCache (towers chunk by chunk, the loss over
the global batch through mmfast's fused contrastive kernels, gathered or ringed across ranks) ->
head gradients averaged over ranks -> gradient clipping -> AdamW -> LR schedule (linear warm-up,
cosine decay) -> logit scale clamped at 100. Logs JSON lines, evaluates every ``--val-every``
steps, checkpoints every ``--save-every`` steps, and writes ``summary.json`` and the curves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import time
from argparse import Namespace
from typing import Any

import torch
from torch import nn

from mmfast.train import checkpoint as ckpt
from mmfast.train.data_setup import make_data, make_tokenizer
from mmfast.train.distributed import (
    Dist,
    average_gradients,
    init_distributed,
    launcher_world_size,
    mean_over_ranks,
    wrap_towers,
)
from mmfast.train.evaluate import evaluate
from mmfast.train.gradcache import GradCache, call_model
from mmfast.train.itm_eval import evaluate_itm
from mmfast.train.models import ClipModel, build_model
from mmfast.train.objectives import build_objective

__all__ = ["itm_options", "peak_rss_mb", "train"]

log = logging.getLogger("mmfast.train")


def peak_rss_mb() -> float:
    """This process's peak resident set size (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_optimizer(model: ClipModel, args: Namespace) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases, embeddings' 1-D params and the head (as open_clip)."""
    decay, no_decay, fusion_decay, fusion_no_decay = [], [], [], []
    head = {id(p) for p in model.head_parameters()}
    fusion = {id(p) for p in model.fusion_parameters()}
    for p in model.parameters():
        if p.requires_grad:
            lists = (fusion_decay, fusion_no_decay) if id(p) in fusion else (decay, no_decay)
            lists[p.ndim < 2 or id(p) in head].append(p)
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    if fusion:
        fusion_lr = getattr(args, "fusion_lr", None) or args.lr
        groups += [
            {"params": fusion_decay, "weight_decay": args.wd, "lr": fusion_lr},
            {"params": fusion_no_decay, "weight_decay": 0.0, "lr": fusion_lr},
        ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr * min(1, (s + 1) / warmup) during warm-up, then a cosine from lr down to 0 at ``steps``."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = (s - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Total gradient norm over all parameters (sharded DTensors included); clipped to max_norm if > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    plain = [g for g in grads if not hasattr(g, "full_tensor")]
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    sq = torch.zeros((), dtype=torch.float64)
    for group in (plain, sharded):
        if group:
            norm = torch.nn.utils.get_total_norm(group)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            sq += norm.double().cpu() ** 2
    total = float(sq.sqrt())
    if max_norm > 0 and math.isfinite(total):
        for group in (plain, sharded):
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, torch.tensor(total))
    return total


def itm_options(args: Namespace) -> dict[str, Any] | None:
    """The ITM objective's options from ``--objective itc+itm`` and its flags (None for "itc")."""
    if getattr(args, "objective", "itc") != "itc+itm":
        return None
    return {
        "weight": args.itm_weight,
        "chunk_size": args.itm_chunk_size,
        "edit_fraction": args.itm_edit_fraction,
        "negatives": args.itm_negatives,
        "easy_steps": args.itm_easy_steps,
        "detach_steps": getattr(args, "itm_detach_steps", 0),
        "seed": args.seed,
    }


def _autocast(device: torch.device, precision: str) -> Any:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class _Log:
    """JSON lines in OUT/log.jsonl (rank 0); a resumed run drops the lines past its step first."""

    def __init__(self, path: str, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(keep)
        elif enabled and resume_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _resume_path(args: Namespace) -> str | None:
    if not args.resume:
        return None
    if args.resume == "latest":
        return ckpt.latest_checkpoint(args.out)  # None: nothing to resume, start fresh
    return args.resume


def _setup(args: Namespace, d: Dist) -> dict[str, Any]:
    """Tokenizer, model, data, evaluation set, wrapped towers, optimizer, schedule, objective."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    tokenizer = make_tokenizer(args)
    model = build_model(
        args.model, vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length, attn=args.attn
    )
    model.check_tokenizer(tokenizer)
    if args.loss == "siglip":
        model.add_logit_bias()
    itm = itm_options(args)
    if itm is not None:
        model.add_fusion(
            layers=args.fusion_layers, heads=args.fusion_heads, attn=args.fusion_attn, pool=args.fusion_pool
        )
        itm["tokenizer"] = tokenizer
    model.to(d.device).train()  # from_pretrained returns a model in eval mode
    batches, evalset = make_data(args, model, tokenizer, d)
    image_fn, text_fn = wrap_towers(model.image_tower, model.text_tower, d, fsdp=args.fsdp)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args.warmup, args.steps)
    objective = build_objective(
        args.loss, model, rank=d.rank, world_size=d.world_size, dist_impl=args.dist_impl,
        objective=getattr(args, "objective", "itc"), itm=itm if itm is None else {**itm, "rank": d.rank},
    )  # fmt: skip
    return dict(
        tokenizer=tokenizer,
        model=model,
        batches=batches,
        evalset=evalset,
        image_fn=image_fn,
        text_fn=text_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        objective=objective,
    )


def _step(s: dict[str, Any], batch: Any, args: Namespace, d: Dist, autocast: Any, step: int = 0) -> dict[str, float]:
    """One optimizer step on the rank's batch; the logged figures."""
    model, optimizer, objective = s["model"], s["optimizer"], s["objective"]
    objective.begin_step(batch, step)
    images, texts = objective.inputs(batch, d.device)
    with autocast():
        if args.no_gradcache:  # the plain loop, for comparisons
            loss = objective(call_model(s["image_fn"], images), call_model(s["text_fn"], texts))
            loss.backward()
            loss = loss.detach()
        else:
            loss = s["gradcache"].step(images, texts)
    average_gradients(model.head_parameters() + model.fusion_parameters(), d.world_size)
    fusion_grads = [p.grad for p in model.fusion_parameters() if p.grad is not None]
    fusion_norm = {"fusion_grad_norm": float(torch.nn.utils.get_total_norm(fusion_grads))} if fusion_grads else {}
    grad_norm = clip_gradients(list(model.parameters()), args.grad_clip_norm)
    optimizer.step()
    s["scheduler"].step()
    optimizer.zero_grad(set_to_none=True)
    model.clamp_logit_scale()
    parts = getattr(objective, "last_parts", {})  # ITC and ITM separately
    return {
        "loss": float(mean_over_ranks(loss.float(), d.world_size)),
        **{k: float(mean_over_ranks(torch.tensor(v), d.world_size)) for k, v in parts.items()},
        "grad_norm": grad_norm,
        **fusion_norm,
        "lr": optimizer.param_groups[0]["lr"],
        "logit_scale": float(model.scale().detach()),
    }


def _evaluate(s: dict[str, Any], args: Namespace, d: Dist, autocast: Any, zeroshot: int) -> dict[str, Any]:
    if s["evalset"] is None:  # --val-samples 0
        return {"n_pairs": 0}
    model = s["model"]
    model.eval()
    with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
        out = evaluate(
            model.image_tower,
            model.text_tower,
            s["tokenizer"],
            s["evalset"],
            device=d.device,
            chunk=args.eval_chunk_size,
            zeroshot=zeroshot,
            autocast=autocast,
        )
        if model.fusion is not None:
            out.update(
                evaluate_itm(
                    model, s["tokenizer"], s["evalset"], device=d.device, chunk=args.eval_chunk_size,
                    rerank_k=args.rerank_k, fusion_chunk=args.itm_chunk_size, autocast=autocast, seed=args.seed,
                )
            )  # fmt: skip
    model.train()
    return out


def train(args: Namespace) -> dict[str, Any]:
    """Run a training job described by the CLI's arguments; returns the summary (every rank)."""
    t0 = time.perf_counter()
    world = launcher_world_size()
    if args.batch_size % world:  # before joining the group: every rank fails alike, none waits
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the world size {world}")
    d = init_distributed(args.device)
    os.makedirs(args.out, exist_ok=True)
    s = _setup(args, d)
    s["gradcache"] = GradCache(s["image_fn"], s["text_fn"], s["objective"], args.chunk_size)
    resume = _resume_path(args)
    start = 0
    if resume is not None:
        start = ckpt.load_checkpoint(
            ckpt.read_checkpoint(resume),
            model=s["model"],
            optimizer=s["optimizer"],
            scheduler=s["scheduler"],
            d=d,
            fsdp=args.fsdp,
        )
        log.info(f"resumed from {resume} at step {start}")
    else:
        torch.manual_seed(args.seed + 1 + d.rank)  # the training stream (dropout) differs per rank
    logger = _Log(os.path.join(args.out, "log.jsonl"), d.is_main, start if resume else None)
    autocast = _autocast(d.device, args.precision)
    extra = {"model_spec": s["model"].spec, "tokenizer_spec": s["tokenizer"].spec(), "args": vars(args)}
    loop = _train_loop(s, args, d, autocast, logger, extra, start)
    val = _evaluate(s, args, d, autocast, zeroshot=args.zeroshot_images)
    logger.write({"step": args.steps, "eval": val})
    summary = _summary(args, d, val, loop, time.perf_counter() - t0)
    if d.is_main:
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if args.plot:
            from mmfast.train.plotting import plot_curves  # noqa: PLC0415

            plot_curves(os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "curves.png"))
    return summary


def _train_loop(s, args: Namespace, d: Dist, autocast, logger: _Log, extra: dict, start: int) -> dict[str, Any]:
    """Steps start .. args.steps - 1 with logging, evaluation and checkpoints."""
    from tqdm import tqdm  # noqa: PLC0415

    bar = tqdm(total=args.steps, initial=start, disable=not (d.is_main and args.progress), desc="train", unit="step")
    losses, skipped, t_steps = [], 0, time.perf_counter()
    batches = s["batches"](start)
    for step in range(start, args.steps):
        batch = next(batches)
        skipped += _count_skipped(batch, d)
        t = time.perf_counter()
        rec = _step(s, batch, args, d, autocast, step)
        rec.update(step=step + 1, seconds=time.perf_counter() - t, skipped=skipped)
        losses.append(rec["loss"])
        logger.write(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", scale=f"{rec['logit_scale']:.1f}")
        bar.update(1)
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(
                f"the loss is {rec['loss']} at step {step + 1}; lower --lr or use --precision fp32"
            )
        if args.val_every and (step + 1) % args.val_every == 0 and step + 1 < args.steps:
            logger.write({"step": step + 1, "eval": _evaluate(s, args, d, autocast, zeroshot=0)})
        if args.save_every and (step + 1) % args.save_every == 0:
            ckpt.save_checkpoint(
                args.out, step + 1, model=s["model"], optimizer=s["optimizer"], scheduler=s["scheduler"], d=d,
                fsdp=args.fsdp, extra=extra, keep=args.keep_checkpoints,
            )  # fmt: skip
    bar.close()
    if args.save_every and args.steps % args.save_every:
        ckpt.save_checkpoint(
            args.out, args.steps, model=s["model"], optimizer=s["optimizer"], scheduler=s["scheduler"], d=d,
            fsdp=args.fsdp, extra=extra, keep=args.keep_checkpoints,
        )  # fmt: skip
    return {"losses": losses, "skipped": skipped, "train_seconds": time.perf_counter() - t_steps}


def _count_skipped(batch: Any, d: Dist) -> int:
    for msg in batch.skipped[:3]:
        log.warning(f"rank {d.rank}: skipped a sample: {msg}")
    if len(batch.skipped) > 3:
        log.warning(f"rank {d.rank}: ... and {len(batch.skipped) - 3} more skipped samples in this batch")
    return len(batch.skipped)


def _summary(args: Namespace, d: Dist, val: dict[str, Any], loop: dict[str, Any], seconds: float) -> dict[str, Any]:
    skipped = int(mean_over_ranks(torch.tensor(float(loop["skipped"])), d.world_size) * d.world_size)
    zeroshot = val.pop("zeroshot", None)
    out: dict[str, Any] = {
        "val": val,
        "world_size": d.world_size,
        "global_batch": args.batch_size,
        "local_batch": args.batch_size // d.world_size,
        "chunk_size": args.chunk_size,
        "steps": args.steps,
        "seconds": seconds,
        "train_seconds": loop["train_seconds"],
        "losses": loop["losses"],
        "loss": args.loss,
        "objective": getattr(args, "objective", "itc"),
        "model": args.model,
        "dataset_type": args.dataset_type,
        "precision": args.precision,
        "skipped_samples": skipped,
        "peak_rss_mb": peak_rss_mb(),
        "chance_r1": 1.0 / max(1, val.get("n_images", 0)),
    }
    if zeroshot is not None:
        out["zeroshot"] = zeroshot
    return out
