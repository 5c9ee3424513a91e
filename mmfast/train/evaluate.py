"""Evaluation: retrieval recall@K in blocks, and zero-shot classification of scene attributes.

Retrieval: image->text and text->image recall@{1,5,10} over the held-out pairs. An image may have
several captions (COCO): image->text counts a hit when any of its captions is among the top K;
text->image when the caption's image is. The N x M similarity matrix is never formed: queries and
keys go block by block and a running top-k is merged per block (``blocked_topk``), so memory is
O(block_q * (block_k + k)).

Zero-shot (synthetic scenes): for each attribute (background, and the count, size, colour and shape
of the first group the caption lists), every image is classified among the captions that differ
from its own only in that attribute's value -- the attribute's class names in context. Accuracy
against chance 1/K.

Distributed: every rank embeds its share of the held-out items (item k on rank k % world, padded
so that every rank runs the same number of forward calls, which FSDP2 needs), then the embeddings
are all-gathered and every rank computes the same figures.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mmfast.train import synthetic
from mmfast.train.datasets import SampleError

__all__ = [
    "EvalSet",
    "Layout",
    "blocked_topk",
    "evaluate",
    "gathered_layout",
    "recall_from_rankings",
    "retrieval_recall",
    "zero_shot_texts",
]

log = logging.getLogger("mmfast.train")
KS = (1, 5, 10)


def blocked_topk(queries: Tensor, keys: Tensor, k: int, *, block: int = 2048) -> Tensor:
    """Indices (Q, k') of each query's k' = min(k, K) most similar keys (dot product), best first.

    queries (Q, D), keys (K, D). Computed over (block x block) tiles of the similarity matrix with a
    running top-k merged per key block.
    """
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries (Q, D) and keys (K, D) must agree on D, got {tuple(queries.shape)}, {tuple(keys.shape)}"
        )
    k = min(k, keys.shape[0])
    out = torch.empty(queries.shape[0], k, dtype=torch.long)
    for qs in range(0, queries.shape[0], block):
        q = queries[qs : qs + block].float()
        best_v = torch.full((q.shape[0], 0), float("-inf"))
        best_i = torch.empty((q.shape[0], 0), dtype=torch.long)
        for ks in range(0, keys.shape[0], block):
            sims = q @ keys[ks : ks + block].float().T
            idx = torch.arange(ks, ks + sims.shape[1]).expand(q.shape[0], -1)
            cand = torch.cat([best_v, sims], 1)
            v, pick = cand.topk(min(k, cand.shape[1]), dim=1)
            best_v, best_i = v, torch.cat([best_i, idx], 1).gather(1, pick)
        out[qs : qs + block] = best_i
    return out


def retrieval_recall(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, *, ks: Sequence[int] = KS, block: int = 2048
) -> dict[str, float]:
    """Recall@K both ways. image_emb (N, D), text_emb (M, D), text_to_image (M,): caption j's image."""
    if text_to_image.shape != (text_emb.shape[0],):
        raise ValueError(f"text_to_image must have shape ({text_emb.shape[0]},), got {tuple(text_to_image.shape)}")
    kmax = max(ks)
    top_t = blocked_topk(image_emb, text_emb, kmax, block=block)  # (N, k) texts per image
    top_i = blocked_topk(text_emb, image_emb, kmax, block=block)  # (M, k) images per text
    return recall_from_rankings(top_t, top_i, text_to_image, ks=ks)


def recall_from_rankings(
    top_t: Tensor, top_i: Tensor, text_to_image: Tensor, *, ks: Sequence[int] = KS
) -> dict[str, float]:
    """Recall@K both ways from rankings: top_t (N, >= max ks) texts per image, best first; top_i
    (M, >= max ks) images per text; text_to_image (M,) each caption's image."""
    hit_i2t = text_to_image[top_t] == torch.arange(top_t.shape[0])[:, None]
    hit_t2i = top_i == text_to_image[:, None]
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(hit_i2t[:, :k].any(1).float().mean())
        out[f"t2i_r{k}"] = float(hit_t2i[:, :k].any(1).float().mean())
    return out


def zero_shot_texts(attrs: dict[str, int]) -> dict[str, tuple[list[str], int]]:
    """Per attribute: the candidate captions (the scene's own with that attribute set to each
    value) and the index of the true one."""
    q = next(q for q in range(4) if int(attrs[f"q{q}_count"]) > 0)
    tasks = {}
    for name, classes in synthetic.ATTRIBUTES.items():
        key = "bg" if name == "bg" else f"q{q}_{name}"
        offset = 1 if name == "count" else 0  # counts are stored 1..3
        texts = [synthetic.caption({**attrs, key: v + offset}) for v in range(len(classes))]
        tasks[name] = (texts, int(attrs[key]) - offset)
    return tasks


@dataclass
class _Local:
    images: Tensor  # (n_pad, 3, S, S) uint8
    valid: Tensor  # (n_pad,) bool
    ids: Tensor  # (n_pad,) global item ids
    captions: list[list[str]]
    attrs: list[dict[str, int] | None]


class EvalSet:
    """The held-out items a rank embeds: item k of ``dataset`` goes to rank k % world_size.

    Loaded once (images transformed to uint8) and kept; unreadable items are dropped from the
    figures and counted (``skipped``).
    """

    def __init__(
        self, dataset: Any, transform: Callable, *, rank: int = 0, world_size: int = 1, limit: int | None = None
    ):
        n = len(dataset) if limit is None else min(limit, len(dataset))
        self.n_items, self.rank, self.world_size = n, rank, world_size
        per_rank = -(-n // world_size)
        images, valid, ids, caps, attrs = [], [], [], [], []
        self.skipped: list[str] = []
        for j in range(per_rank):
            k = rank + j * world_size
            item = None
            if k < n:
                try:
                    item = dataset[k]
                    item["image"] = transform(item["image"])
                except SampleError as e:
                    self.skipped.append(str(e))
                    item = None
            valid.append(item is not None)
            ids.append(k)
            images.append(item["image"] if item is not None else None)
            caps.append(item["captions"] if item is not None else [])
            attrs.append(item.get("attrs") if item is not None else None)
        shape = next((im.shape for im in images if im is not None), None)
        if shape is None and per_rank:
            raise ValueError(f"no readable held-out item on rank {rank}; skipped: {self.skipped[:3]}")
        images = [im if im is not None else torch.zeros(shape, dtype=torch.uint8) for im in images]
        self.local = _Local(torch.stack(images), torch.tensor(valid), torch.tensor(ids), caps, attrs)


@dataclass
class Layout:
    """Which rows of the all-gathered image / text outputs are held-out pairs, and who owns whom.

    image_rows (N,): rows of the gathered image outputs of the valid items, in item-id order.
    text_rows (M,): rows of the gathered text outputs of the captions of those items.
    text_to_image (M,): position in ``image_rows`` of each kept caption's image.
    """

    image_rows: Tensor
    text_rows: Tensor
    text_to_image: Tensor


def gathered_layout(evalset: EvalSet, owners: Tensor, n_text_pad: int) -> Layout:
    """The ``Layout`` of outputs gathered over ranks (collective: every rank calls it).

    Args:
        owners: (m,) local row of each of this rank's m captions' image.
        n_text_pad: the captions each rank embedded (m, padded to the maximum over ranks).
    """
    loc, world = evalset.local, evalset.world_size
    valid_all, ids_all = _gather(loc.valid, world), _gather(loc.ids, world)
    text_valid = torch.zeros(n_text_pad, dtype=torch.bool)
    text_valid[: owners.numel()] = True
    text_owner = torch.zeros(n_text_pad, dtype=torch.long)  # global row of each caption's image
    text_owner[: owners.numel()] = owners + evalset.rank * loc.images.shape[0]
    text_valid_all, owner_all = _gather(text_valid, world), _gather(text_owner, world)
    # keep valid images (renumbered in id order) and the captions of valid images
    order = torch.argsort(ids_all[valid_all])
    keep_rows = torch.nonzero(valid_all).squeeze(1)[order]
    new_pos = torch.full((valid_all.shape[0],), -1, dtype=torch.long)
    new_pos[keep_rows] = torch.arange(keep_rows.numel())
    text_keep = torch.nonzero(text_valid_all & (new_pos[owner_all] >= 0)).squeeze(1)
    return Layout(keep_rows, text_keep, new_pos[owner_all[text_keep]])


def _gather(t: Tensor, world_size: int) -> Tensor:
    """Concatenation over ranks of an equally shaped tensor (identity on one process)."""
    if world_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _max_over_ranks(n: int, world_size: int) -> int:
    if world_size == 1:
        return n
    t = torch.tensor([n])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def _embed(fn: Callable, inputs: Any, n: int, chunk: int) -> Tensor:
    """fn over ``inputs`` (a tensor or dict of tensors with n rows) in chunks; (n, D) float32 on CPU."""
    outs = []
    for s in range(0, n, chunk):
        part = {k: v[s : s + chunk] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[s : s + chunk]
        outs.append((fn(**part) if isinstance(part, dict) else fn(part)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def _embed_texts(text_fn: Callable, tokenizer: Callable, texts: list[str], n_pad: int, chunk: int, device) -> Tensor:
    """Embed ``texts`` padded (with their first) to n_pad rows, so every rank makes the same calls."""
    padded = texts + [texts[0] if texts else ""] * (n_pad - len(texts))
    tokens = {k: v.to(device) for k, v in tokenizer(padded).items()}
    return _embed(text_fn, tokens, n_pad, chunk)


@torch.no_grad()
def evaluate(
    image_fn: Callable,
    text_fn: Callable,
    tokenizer: Callable,
    evalset: EvalSet,
    *,
    device: torch.device,
    chunk: int = 256,
    zeroshot: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, Any]:
    """Retrieval recall (and zero-shot accuracy) of the towers on ``evalset``; the same dict on
    every rank: {"i2t_r1", ..., "t2i_r10", "n_pairs", "n_images", "n_texts", "skipped"[, "zeroshot"]}.

    ``zeroshot``: classify the attributes of (about) this many held-out images (0: skip; needs the
    items' "attrs", i.e. the synthetic scenes).
    """
    loc, world = evalset.local, evalset.world_size
    with autocast():
        img = _embed(image_fn, loc.images.to(device), loc.images.shape[0], chunk)
        texts = [c for caps in loc.captions for c in caps]
        owners = torch.tensor([i for i, caps in enumerate(loc.captions) for _ in caps], dtype=torch.long)
        n_text = _max_over_ranks(len(texts), world)
        txt = _embed_texts(text_fn, tokenizer, texts, n_text, chunk, device)
    lay = gathered_layout(evalset, owners, n_text)
    out: dict[str, Any] = retrieval_recall(
        _gather(img, world)[lay.image_rows], _gather(txt, world)[lay.text_rows], lay.text_to_image
    )
    n_texts = int(lay.text_rows.numel())
    out.update(n_pairs=n_texts, n_images=int(lay.image_rows.numel()), n_texts=n_texts)
    out["skipped"] = int(_sum_over_ranks(torch.tensor([len(evalset.skipped)]), world))
    if zeroshot and all(a is not None for a, v in zip(loc.attrs, loc.valid) if v):
        out["zeroshot"] = _zero_shot(img, text_fn, tokenizer, evalset, device, chunk, autocast, zeroshot)
    return out


def _sum_over_ranks(t: Tensor, world_size: int) -> Tensor:
    if world_size > 1:
        dist.all_reduce(t)
    return t


def _zero_shot(
    img: Tensor,
    text_fn: Callable,
    tokenizer: Callable,
    evalset: EvalSet,
    device,
    chunk: int,
    autocast: Callable,
    limit: int,
) -> dict[str, dict[str, float]]:
    """Accuracy per attribute over (up to limit / world) of this rank's valid items, summed over ranks."""
    loc = evalset.local
    rows = [i for i in range(len(loc.attrs)) if bool(loc.valid[i])][: -(-limit // evalset.world_size)]
    names = list(synthetic.ATTRIBUTES)
    texts, spans = [], []  # spans[(row, name)] = (start, count, target)
    for i in rows:
        for name, (cands, target) in zero_shot_texts(loc.attrs[i]).items():
            spans.append((i, name, len(texts), len(cands), target))
            texts.extend(cands)
    with autocast():
        emb = _embed_texts(text_fn, tokenizer, texts, _max_over_ranks(len(texts), evalset.world_size), chunk, device)
    correct = torch.zeros(len(names), dtype=torch.float64)
    total = torch.zeros(len(names), dtype=torch.float64)
    for i, name, start, count, target in spans:
        pred = int((emb[start : start + count] @ img[i]).argmax())
        correct[names.index(name)] += float(pred == target)
        total[names.index(name)] += 1
    correct, total = _sum_over_ranks(correct, evalset.world_size), _sum_over_ranks(total, evalset.world_size)
    return {
        n: {"acc": float(correct[k] / total[k].clamp(min=1)), "chance": 1.0 / len(synthetic.ATTRIBUTES[n])}
        for k, n in enumerate(names)
    }
