"""``--objective itc+itm``: the contrastive loss plus image-text matching on mined hard negatives.

Per step, on the rank's local batch of n pairs (ALBEF's recipe, https://arxiv.org/abs/2107.07651):

1. The towers return embeddings and tokens: images (n, D) + (n, Lv, Wv), texts (n + e, D) +
   (n + e, Lt, Wt) + padding (n + e, Lt). The e extra captions exist when the batch has synthetic
   scene attributes: for a random ``edit_fraction`` of the images, the true caption with exactly
   one attribute changed (``synthetic.edit_one_attribute``), a negative that embedding distance
   hardly separates from the positive.
2. ITC: the contrastive objective on the first n text rows (global batch across ranks).
3. Hard negatives (``mining.mine_negatives``, in tiles): per image a caption drawn with probability
   ~ exp(scale * s_ij), per caption an image likewise, pairs with the same image or the same caption
   text excluded. Mined within the rank's local batch (as ALBEF): no token crosses ranks.
4. ITM: the fusion encoder scores 3n pairs, as ALBEF: n positives, per image a negative caption
   (its edit where it has one, else the mined one) and per caption a mined negative image; the loss
   is the mean cross-entropy over those pairs.
5. loss = ITC + weight * ITM.

With ``easy_steps`` = K > 0, steps 0 .. K - 1 draw both negatives uniformly among the batch's
non-matching items (the mining at scale 0) and edit no caption: a warm-up on easy negatives before
the hard ones.

With ``detach_steps`` = K > 0, steps 0 .. K - 1 stop ITM's gradient at the towers' tokens: the
fusion encoder learns, the towers learn from ITC alone. From scratch, a fusion encoder on the
tokens of untrained towers says nothing for its first ~100 steps, and its gradient into the towers
only disturbs the contrastive training (on the embedded default, 150 steps: ITC R@1 43% with the
gradient from step 0, 75% with it from step 75 or never; the README's ITC + ITM section). The
trainer's default is a quarter of the steps (``--itm-detach-steps``).

How ITM fits GradCache (the chunked step): GradCache's pass 1 caches the towers' outputs for the
whole batch, tokens included; this objective is its ``loss_fn``. The fusion encoder runs over the
pairs in chunks of ``chunk_size``, pairs sorted by caption length (a chunk runs at its longest
caption's length, ``fusion.text_extent``); each chunk's loss is backpropagated at once, into the fusion
encoder's parameters and into detached copies of the token tensors, so only one chunk's fusion
activations exist at a time. The accumulated token gradients G are then handed to the caller's
``backward`` through the returned loss, which adds sum(tokens * G) - sum(tokens * G).detach()
(value 0, gradient G with respect to the tokens): GradCache's pass 2 replays the towers with them,
and a plain loop backpropagates them through its graph. The gradient of every parameter is that of
the whole-batch loss; tests/test_train_itm.py checks it against a plain autograd run. Memory:
the cache holds the last layer's tokens, O(n (Lv Wv + Lt Wt)) per rank (~26 KB per pair with the
tiny towers), the fusion encoder's activations O(chunk_size).

Because the fusion encoder's gradient is accumulated while the loss is computed, call the
objective only when its ``backward`` follows (the trainer does); under ``torch.no_grad`` it only
computes the loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmfast.train import synthetic
from mmfast.train.fusion import FusionEncoder, by_caption_length
from mmfast.train.mining import mine_negatives
from mmfast.train.models import ClipModel

__all__ = ["ITM_NEGATIVES", "ItcItmObjective"]

ITM_NEGATIVES = ("sample", "hardest")


def _caption_ids(captions: list[str]) -> Tensor:
    """(n,) int64: equal captions get equal ids (within the batch)."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions], dtype=torch.long)


class ItcItmObjective:
    """ITC (a ``ContrastiveObjective``) + ITM with the model's fusion encoder (see the module doc).

    Args:
        contrastive: the ITC objective (``objectives.ContrastiveObjective``).
        model: the ``ClipModel``, with a fusion encoder (``add_fusion``).
        tokenizer: tokenizes the edited captions.
        weight: the ITM loss's weight.
        chunk_size: pairs per fusion-encoder call.
        edit_fraction: the share of images whose negative caption is their own caption with one
            attribute changed, when the batch has synthetic scene attributes (0: mined only).
        negatives: "sample" (ALBEF: drawn by contrastive similarity) or "hardest" (the argmax).
        block: tile side of the mining sweep.
        easy_steps: the first ``easy_steps`` steps use uniform negatives and no edits (see above).
        detach_steps: the first ``detach_steps`` steps train the fusion encoder only (see above).
        seed, rank: with the step number, they fix the step's draws (edits and negatives), so a
            resumed run draws what the uninterrupted one did and ranks draw differently.
    """

    def __init__(
        self,
        contrastive: Any,
        model: ClipModel,
        tokenizer: Any,
        *,
        weight: float = 1.0,
        chunk_size: int = 512,
        edit_fraction: float = 0.5,
        negatives: str = "sample",
        block: int = 1024,
        easy_steps: int = 0,
        detach_steps: int = 0,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        if model.fusion is None:
            raise ValueError("--objective itc+itm needs a model with a fusion encoder (ClipModel.add_fusion)")
        if negatives not in ITM_NEGATIVES:
            raise ValueError(f"--itm-negatives must be one of {ITM_NEGATIVES}, got {negatives!r}")
        if not 0.0 <= edit_fraction <= 1.0:
            raise ValueError(f"--itm-edit-fraction must be in [0, 1], got {edit_fraction}")
        if chunk_size < 1:
            raise ValueError(f"--itm-chunk-size must be >= 1, got {chunk_size}")
        if easy_steps < 0:
            raise ValueError(f"--itm-easy-steps must be >= 0, got {easy_steps}")
        if detach_steps < 0:
            raise ValueError(f"--itm-detach-steps must be >= 0, got {detach_steps}")
        self.contrastive, self.model, self.tokenizer = contrastive, model, tokenizer
        self.weight, self.chunk_size, self.negatives = float(weight), chunk_size, negatives
        self.edit_fraction = float(edit_fraction)
        self.block, self.seed, self.rank = block, int(seed), int(rank)
        self.easy_steps, self._easy = int(easy_steps), False
        self.detach_steps, self._detach = int(detach_steps), False
        self.last_parts: dict[str, float] = {}
        self._generator: torch.Generator | None = None
        self._keys: Tensor | None = None
        self._edited: list[str] = []
        self._edit_rows = torch.empty(0, dtype=torch.long)

    # before the towers ---------------------------------------------------------------------------
    def begin_step(self, batch: Any, step: int = 0) -> None:
        """Seed this step's draws from (seed, step, rank), note which pairs match (same image index
        or same caption text) and draw the edited captions."""
        self.contrastive.begin_step(batch, step)
        seed = int(np.random.SeedSequence((self.seed, int(step), self.rank)).generate_state(1, np.uint64)[0] >> 2)
        self._generator = torch.Generator().manual_seed(seed)
        self._easy = int(step) < self.easy_steps
        self._detach = int(step) < self.detach_steps
        self._keys = torch.stack([batch.indices.long(), _caption_ids(list(batch.captions))], 1)
        self._edited, rows = [], []
        if self.edit_fraction > 0 and not self._easy and batch.attrs is not None and "bg" in batch.attrs:
            rng = np.random.default_rng(seed)
            rows = np.flatnonzero(rng.random(len(batch.captions)) < self.edit_fraction).tolist()
            for i in rows:
                attrs = {k: int(v[i]) for k, v in batch.attrs.items()}
                self._edited.append(synthetic.caption(synthetic.edit_one_attribute(attrs, rng)[0]))
        self._edit_rows = torch.tensor(rows, dtype=torch.long)

    def inputs(self, batch: Any, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
        """The towers' inputs: images and texts (with the edited captions appended) on ``device``,
        asking for tokens."""
        images, texts = self.contrastive.inputs(batch, device)
        if self._edited:
            extra = self.tokenizer(self._edited)
            texts = {k: torch.cat([v, extra[k].to(device)]) for k, v in texts.items()}
        return {"pixels": images, "return_tokens": True}, {**texts, "return_tokens": True}

    # the loss --------------------------------------------------------------------------------------
    def pairs(self, image_emb: Tensor, text_emb: Tensor, edit_rows: Tensor | None = None) -> tuple[Tensor, ...]:
        """(image rows, text rows, labels) of the ITM pairs: positives, a negative caption per image
        (for image ``edit_rows[k]``, text row n + k: its edited caption; else mined), a mined
        negative image per caption. image_emb (n, D), text_emb (n, D): the true pairs' embeddings."""
        n = image_emb.shape[0]
        edit_rows = torch.empty(0, dtype=torch.long) if edit_rows is None else edit_rows.cpu()
        keys = torch.arange(n)[:, None] if self._keys is None else self._keys
        if keys.shape[0] != n:
            raise ValueError(f"begin_step saw {keys.shape[0]} pairs but the towers returned {n}")
        gen = self._generator if self.negatives == "sample" or self._easy else None
        if gen is None and (self.negatives == "sample" or self._easy):
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        scale = 0.0 if self._easy else self.model.scale().detach()  # 0: uniform over the non-matches
        neg_t, neg_i = mine_negatives(
            image_emb, text_emb, scale, x_keys=keys, y_keys=keys, generator=gen, block=self.block
        )
        neg_t[edit_rows] = n + torch.arange(edit_rows.numel())
        ar = torch.arange(n)
        has_t, has_i = neg_t >= 0, neg_i >= 0
        img, txt = torch.cat([ar, ar[has_t], neg_i[has_i]]), torch.cat([ar, neg_t[has_t], ar[has_i]])
        labels = torch.zeros(img.numel(), dtype=torch.long)
        labels[:n] = 1
        return img, txt, labels

    def itm_loss(self, image_tokens: Tensor, text_tokens: Tensor, text_padding: Tensor, pairs: tuple) -> Tensor:
        """Mean ITM cross-entropy over ``pairs``, chunk by chunk (see the module doc for the gradient)."""
        img_rows, txt_rows, labels = (t.to(image_tokens.device) for t in pairs)
        P, fusion = labels.numel(), self.model.fusion
        grad = torch.is_grad_enabled() and not self._detach
        leaves = [t.detach().requires_grad_(grad and t.requires_grad) for t in (image_tokens, text_tokens)]
        total = torch.zeros((), device=image_tokens.device)
        order = by_caption_length(text_padding, txt_rows)
        for s in range(0, P, self.chunk_size):
            p = order[s : s + self.chunk_size]
            i, j = img_rows[p], txt_rows[p]
            logits = fusion(leaves[1][j], text_padding[j], leaves[0][i])
            loss = FusionEncoder.loss(logits, labels[p], reduction="sum") / P
            if loss.requires_grad:
                loss.backward()
            total += loss.detach()
        surrogate = total.new_zeros(())
        for t, leaf in zip((image_tokens, text_tokens), leaves):
            if leaf.grad is not None:
                surrogate = surrogate + (t * leaf.grad).sum()
        return total + (surrogate - surrogate.detach())

    def __call__(self, image_out: tuple[Tensor, Tensor], text_out: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """ITC + weight * ITM from the towers' outputs: images (emb (n, D), tokens (n, Lv, Wv)),
        texts (emb (n + e, D), tokens (n + e, Lt, Wt), padding (n + e, Lt)), e = the edited captions
        ``inputs`` appended."""
        image_emb, image_tokens = image_out
        text_emb, text_tokens, text_padding = text_out
        n, e = image_emb.shape[0], self._edit_rows.numel()
        if text_emb.shape[0] != n + e:
            raise ValueError(f"expected {n + e} text rows ({n} pairs and {e} edited captions), got {text_emb.shape[0]}")
        itc = self.contrastive(image_emb, text_emb[:n])
        pairs = self.pairs(image_emb, text_emb[:n], self._edit_rows)
        itm = self.itm_loss(image_tokens, text_tokens, text_padding, pairs)
        self.last_parts = {"itc": float(itc.detach()), "itm": float(itm.detach())}
        return itc + self.weight * itm
