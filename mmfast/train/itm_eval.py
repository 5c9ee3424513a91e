"""ITM evaluation: matching accuracy on held-out pairs, and ITC retrieval re-ranked by the ITM head.

* **Re-ranked retrieval**: for each image the top ``rerank_k`` captions by ITC similarity
  (``blocked_topk``: the N x M similarity is never whole) are re-ordered by a new score, ties kept
  in ITC order; captions below rank ``rerank_k`` keep their ITC order. The same for each caption's
  images. Two scores, both reported beside ITC's recall@1/5/10:
  - the fusion encoder's match log-odds plus the ITC logit s_ij = scale * <x_i, y_j>
    (``rerank_i2t_r1`` ...). With CLIP's loss s_ij is log p_itc(j | i) up to a per-query
    constant, with SigLIP's the match log-odds up to its bias, so the sum ranks by the product of
    the two models' odds (BLIP, https://arxiv.org/abs/2201.12086, also adds the two);
  - the log-odds alone (``rerank_itm_i2t_r1`` ...; ALBEF's).
* **ITM accuracy** on held-out positives (every caption with its image) and hard negatives (each
  image with its most ITC-similar caption of another image, each caption with its most similar
  other image): ``itm_acc_pos``, ``itm_acc_neg`` (score > 0 means "match") and their mean
  ``itm_acc`` (balanced accuracy; chance 50%).
* **One-attribute edits** (synthetic scenes only): each image against its caption and the caption
  with one attribute changed (``synthetic.edit_one_attribute``, seeded by the item id): the
  fraction where the true caption wins, by ITM score (``itm_edit_acc``) and by ITC similarity
  (``itc_edit_acc``); chance 50%.

Distributed: the towers run on each rank's share (the same number of calls everywhere, for FSDP2);
embeddings and tokens are all-gathered (O(items x tokens x width) on every rank), the pairs to
score are split evenly over ranks and the scores all-gathered, so every rank returns the same dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmfast.train import synthetic
from mmfast.train.evaluate import (
    KS,
    EvalSet,
    _gather,
    _max_over_ranks,
    _sum_over_ranks,
    blocked_topk,
    gathered_layout,
    recall_from_rankings,
)
from mmfast.train.fusion import FusionEncoder, by_caption_length

__all__ = ["evaluate_itm", "first_other", "rerank", "score_pairs"]

Autocast = Callable[[], contextlib.AbstractContextManager]


def _run(fn: Callable, inputs: dict[str, Any], n: int, chunk: int) -> tuple[Tensor, ...]:
    """fn(**inputs, return_tokens=True) over n rows in chunks; its outputs concatenated, on CPU
    (floating outputs as float32)."""
    outs: list[tuple[Tensor, ...]] = []
    for s in range(0, n, chunk):
        part = {k: v[s : s + chunk] for k, v in inputs.items()}
        res = fn(**part, return_tokens=True)
        outs.append(tuple(t.float().cpu() if t.is_floating_point() else t.cpu() for t in res))
    return tuple(torch.cat(ts) for ts in zip(*outs))


def _embed_texts(text_fn: Callable, tokenizer: Callable, texts: list[str], n_pad: int, chunk: int, device):
    padded = texts + [texts[0] if texts else ""] * (n_pad - len(texts))
    tokens = {k: v.to(device) for k, v in tokenizer(padded).items()}
    return _run(text_fn, tokens, n_pad, chunk)


def score_pairs(
    fusion: torch.nn.Module,
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_padding: Tensor,
    image_rows: Tensor,
    text_rows: Tensor,
    *,
    device: torch.device,
    chunk: int,
    autocast: Autocast = contextlib.nullcontext,
    rank: int = 0,
    world_size: int = 1,
) -> Tensor:
    """(P,) ITM log-odds of the pairs (image_tokens[image_rows[p]], text_tokens[text_rows[p]]).

    Rank r scores the r-th of ``world_size`` equal slices of the pairs; the scores are all-gathered
    (collective when world_size > 1). image_tokens (N, Lv, Wv), text_tokens (M, Lt, Wt),
    text_padding (M, Lt) bool.
    """
    P = image_rows.numel()
    per = -(-P // world_size)
    lo, hi = min(P, rank * per), min(P, (rank + 1) * per)
    scores = torch.zeros(per)
    order = lo + by_caption_length(text_padding, text_rows[lo:hi])  # alike lengths per chunk
    for s in range(0, hi - lo, chunk):
        p = order[s : s + chunk]
        i, j = image_rows[p], text_rows[p]
        with autocast():
            logits = fusion(text_tokens[j].to(device), text_padding[j].to(device), image_tokens[i].to(device))
        scores[p - lo] = FusionEncoder.match_score(logits).cpu()
    return _gather(scores, world_size)[:P]


def first_other(ranking: Tensor, owner_of_candidate: Tensor, owner_of_query: Tensor) -> Tensor:
    """(Q,) the best-ranked candidate of each query that is not the query's own (-1 if none).

    ranking (Q, k) candidate indices, best first; owner_of_candidate maps a candidate to the id
    it belongs to, owner_of_query (Q,) the query's id.
    """
    other = owner_of_candidate[ranking] != owner_of_query[:, None]
    first = torch.where(other.any(1), other.float().argmax(1), -1)
    picked = ranking.gather(1, first.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(first >= 0, picked, -1)


def _reorder(top: Tensor, scores: Tensor, k: int) -> Tensor:
    """The first k columns of ``top`` sorted by ``scores`` (Q, k) descending (stable), then the rest."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    return torch.cat([top[:, :k].gather(1, order), top[:, k:]], 1)


def rerank(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    score: Callable[[Tensor, Tensor], Tensor],
    *,
    k: int,
    itc_scale: float = 0.0,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Recall@1/5/10 from ITC alone and with the top ``k`` re-ranked, two ways.

    Args:
        image_emb (N, D), text_emb (M, D): ITC embeddings; text_to_image (M,): each caption's image.
        score: (image rows (P,), text rows (P,)) -> (P,) ITM scores (higher = better match).
        k: candidates re-ranked per query.
        itc_scale: the contrastive logit multiplier; the ``rerank_*`` order is by
            score + itc_scale * <image, text> (ITM log-odds plus the ITC logit), the
            ``rerank_itm_*`` order by the ITM score alone.

    Returns:
        ({"i2t_r1", ..., "rerank_i2t_r1", ..., "rerank_itm_i2t_r1", ...},
         {"top_t": (N, kk), "top_i": (M, kk)} the ITC rankings).
    """
    kk = max(k, *KS)
    top_t = blocked_topk(image_emb, text_emb, kk)  # (N, kk') texts per image
    top_i = blocked_topk(text_emb, image_emb, kk)  # (M, kk') images per text
    kt, ki = min(k, top_t.shape[1]), min(k, top_i.shape[1])
    N, M = top_t.shape[0], top_i.shape[0]
    pairs_t = (torch.arange(N).repeat_interleave(kt), top_t[:, :kt].reshape(-1))
    pairs_i = (top_i[:, :ki].reshape(-1), torch.arange(M).repeat_interleave(ki))
    s_t, s_i = score(*pairs_t).view(N, kt), score(*pairs_i).view(M, ki)

    def itc(rows: tuple[Tensor, Tensor], shape: tuple[int, int]) -> Tensor:
        return itc_scale * (image_emb[rows[0]].float() * text_emb[rows[1]].float()).sum(-1).view(shape)

    out = recall_from_rankings(top_t, top_i, text_to_image)
    both = (s_t + itc(pairs_t, (N, kt)), s_i + itc(pairs_i, (M, ki)))
    for prefix, (st, si) in (("rerank_", both), ("rerank_itm_", (s_t, s_i))):
        reranked = recall_from_rankings(_reorder(top_t, st, kt), _reorder(top_i, si, ki), text_to_image)
        out.update({f"{prefix}{name}": v for name, v in reranked.items()})
    return out, {"top_t": top_t, "top_i": top_i}


def _edit_accuracy(
    model: Any, tokenizer: Callable, evalset: EvalSet, img_emb: Tensor, img_tok: Tensor, *, device, chunk: int,
    fusion_chunk: int, autocast: Autocast, seed: int,
) -> dict[str, float]:  # fmt: skip
    """ITM and ITC pairwise accuracy of true captions against one-attribute edits (this rank's
    items, summed over ranks); img_emb / img_tok are this rank's local rows."""
    loc, world = evalset.local, evalset.world_size
    rows = [i for i in range(len(loc.attrs)) if bool(loc.valid[i])]
    true, edited = [], []
    for i in rows:
        rng = np.random.default_rng((seed, 17, int(loc.ids[i])))
        true.append(loc.captions[i][0])
        edited.append(synthetic.caption(synthetic.edit_one_attribute(loc.attrs[i], rng)[0]))
    n_pad = _max_over_ranks(2 * len(rows), world)
    with autocast():
        t_emb, t_tok, t_pad = _embed_texts(model.text_tower, tokenizer, true + edited, n_pad, chunk, device)
    n = len(rows)
    r = torch.tensor(rows, dtype=torch.long)
    img_rows = torch.cat([r, r])
    s = score_pairs(
        model.fusion, img_tok, t_tok, t_pad, img_rows, torch.arange(2 * n), device=device, chunk=fusion_chunk,
        autocast=autocast,
    )  # fmt: skip
    sims = (img_emb[img_rows] * t_emb[: 2 * n]).sum(1)
    counts = torch.tensor(
        [float((s[:n] > s[n:]).sum()), float((sims[:n] > sims[n:]).sum()), float(n)], dtype=torch.float64
    )
    itm, itc, total = _sum_over_ranks(counts, world).tolist()
    return {"itm_edit_acc": itm / max(total, 1.0), "itc_edit_acc": itc / max(total, 1.0)}


@torch.no_grad()
def evaluate_itm(
    model: Any,
    tokenizer: Callable,
    evalset: EvalSet,
    *,
    device: torch.device,
    chunk: int = 256,
    rerank_k: int = 16,
    fusion_chunk: int = 512,
    autocast: Autocast = contextlib.nullcontext,
    seed: int = 0,
) -> dict[str, Any]:
    """Re-ranked retrieval and ITM accuracy of ``model`` (a ``ClipModel`` with a fusion encoder) on
    ``evalset``; the same dict on every rank (see the module docstring for the keys)."""
    if model.fusion is None:
        raise ValueError("evaluate_itm needs a model with a fusion encoder")
    if rerank_k < 1:
        raise ValueError(f"--rerank-k must be >= 1, got {rerank_k}")
    loc, world, rank = evalset.local, evalset.world_size, evalset.rank
    with autocast():
        img_emb, img_tok = _run(model.image_tower, {"pixels": loc.images.to(device)}, loc.images.shape[0], chunk)
        texts = [c for caps in loc.captions for c in caps]
        owners = torch.tensor([i for i, caps in enumerate(loc.captions) for _ in caps], dtype=torch.long)
        n_text = _max_over_ranks(len(texts), world)
        txt = _embed_texts(model.text_tower, tokenizer, texts, n_text, chunk, device)
    lay = gathered_layout(evalset, owners, n_text)
    g_img_emb, g_img_tok = (_gather(t, world)[lay.image_rows] for t in (img_emb, img_tok))
    g_txt_emb, g_txt_tok, g_txt_pad = (_gather(t, world)[lay.text_rows] for t in txt)
    owner = lay.text_to_image

    def score(image_rows: Tensor, text_rows: Tensor) -> Tensor:
        return score_pairs(
            model.fusion, g_img_tok, g_txt_tok, g_txt_pad, image_rows, text_rows, device=device, chunk=fusion_chunk,
            autocast=autocast, rank=rank, world_size=world,
        )  # fmt: skip

    itc_scale = float(model.scale().detach())
    out, ranks = rerank(g_img_emb, g_txt_emb, owner, score, k=rerank_k, itc_scale=itc_scale)
    N, M = g_img_emb.shape[0], g_txt_emb.shape[0]
    neg_t = first_other(ranks["top_t"], owner, torch.arange(N))  # per image: a caption of another image
    neg_i = first_other(ranks["top_i"], torch.arange(N), owner)  # per caption: another image
    has_t, has_i = neg_t >= 0, neg_i >= 0
    s = score(
        torch.cat([owner, torch.arange(N)[has_t], neg_i[has_i]]),
        torch.cat([torch.arange(M), neg_t[has_t], torch.arange(M)[has_i]]),
    )
    acc_pos = float((s[:M] > 0).float().mean()) if M else 0.0
    acc_neg = float((s[M:] <= 0).float().mean()) if s.numel() > M else 0.0
    out.update(itm_acc=0.5 * (acc_pos + acc_neg), itm_acc_pos=acc_pos, itm_acc_neg=acc_neg, rerank_k=rerank_k)
    out["itm_pairs"] = {"positives": M, "hard_negatives": int(s.numel() - M)}
    if all(a is not None and "bg" in a for a, v in zip(loc.attrs, loc.valid) if v):
        out.update(
            _edit_accuracy(
                model, tokenizer, evalset, img_emb, img_tok, device=device, chunk=chunk, fusion_chunk=fusion_chunk,
                autocast=autocast, seed=seed,
            )
        )  # fmt: skip
    return out
