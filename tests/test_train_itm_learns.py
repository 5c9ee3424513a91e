"""ITM must learn: the fusion encoder, trained through ``ItcItmObjective.itm_loss`` (pairs sorted by
caption length, chunked, labels re-ordered with them) on fixed tokens with random negatives, must
separate matching from non-matching pairs on held-out tokens.

The tokens are a planted matching task: an "image" is patch noise plus a code vector (one of
``CODES``), a caption is token noise with its image's code at one random real position (not the
last, which the head reads) and large garbage in its padding columns. A pair matches when the codes agree, so the head has to
compare what the caption's tokens say with what the patches say (self- and cross-attention), and a
key-padding mask of the wrong polarity or pairs and labels out of step leave it at chance (both
checked by hand: 50-53% against > 94% on five seeds). Issue 20's failure mode was the ITM loss stuck
at the class prior; this is its cheap regression test."""

from __future__ import annotations

import pytest
import torch

from mmfast.train.fusion import FusionEncoder
from mmfast.train.itm import ItcItmObjective

WIDTH, LV, LT, CODES, BATCH, STEPS, LR, SEED = 32, 9, 12, 8, 32, 80, 3e-3, 0


class _Model:
    def __init__(self, fusion: FusionEncoder):
        self.fusion = fusion

    def scale(self):
        return torch.tensor(10.0)


class _NoItc:
    pass


def planted_tokens(n: int, codebook: torch.Tensor, gen: torch.Generator):
    """(image tokens (n, LV, W), text tokens (n, LT, W), text padding (n, LT), codes (n,))."""
    codes = torch.randint(0, CODES, (n,), generator=gen)
    image = 0.5 * torch.randn(n, LV, WIDTH, generator=gen)
    image += codebook[codes][:, None, :]
    lengths = torch.randint(3, LT + 1, (n,), generator=gen)
    padding = torch.arange(LT)[None, :] >= lengths[:, None]
    text = 0.5 * torch.randn(n, LT, WIDTH, generator=gen)
    where = (torch.rand(n, generator=gen) * (lengths - 1)).long()  # a real position, never the last
    text[torch.arange(n), where] += codebook[codes]
    text[padding] = 20.0 * torch.randn(int(padding.sum()), WIDTH, generator=gen)
    return image, text, padding, codes


@pytest.fixture
def one_thread():
    """Small tensors: one thread takes ~3 s here, two under a loaded machine's contention ~50 s."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_fusion_learns_planted_matching_through_itm_loss(one_thread, attn="mmfast"):
    """(The default attention; test_train_itm.py checks that "sdpa" computes the same.)"""
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    codebook = torch.nn.functional.normalize(torch.randn(CODES, WIDTH, generator=gen), dim=-1) * WIDTH**0.5
    fusion = FusionEncoder(WIDTH, WIDTH, layers=2, heads=2, attn=attn)
    obj = ItcItmObjective(_NoItc(), _Model(fusion), tokenizer=None, chunk_size=48, easy_steps=10**9)
    opt = torch.optim.AdamW(fusion.parameters(), lr=LR)
    for _ in range(STEPS):
        image, text, padding, codes = planted_tokens(BATCH, codebook, gen)
        obj._keys = torch.stack([torch.arange(BATCH), codes], 1)  # equal codes match: never a negative
        obj._easy = True  # uniform negatives (the embeddings below only feed the mining's shapes)
        emb = torch.randn(BATCH, 8, generator=gen)
        obj.itm_loss(image, text, padding, obj.pairs(emb, emb))  # backpropagates into the fusion encoder
        opt.step()
        opt.zero_grad(set_to_none=True)
    image, text, padding, codes = planted_tokens(512, codebook, gen)
    with torch.no_grad():
        pos = FusionEncoder.match_score(fusion(text, padding, image))
        neg = FusionEncoder.match_score(fusion(text, padding, image.roll(1, 0)))[codes != codes.roll(1, 0)]
    acc = 0.5 * ((pos > 0).float().mean() + (neg < 0).float().mean())
    assert acc > 0.8, f"balanced ITM accuracy {acc:.3f} on held-out planted pairs"
