"""mmfast.train's evaluation: blocked top-k and recall@K against dense references, the zero-shot
candidate captions, and evaluate() on a small held-out set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmfast.train import synthetic
from mmfast.train.evaluate import EvalSet, blocked_topk, evaluate, retrieval_recall, zero_shot_texts
from mmfast.train.loader import make_transform


def dense_recall(img, txt, owner, ks=(1, 5, 10)):
    """Reference: the whole similarity matrix; rank of the best matching caption / the image."""
    sims = img @ txt.T
    out = {}
    order_t = sims.argsort(dim=1, descending=True)  # texts per image
    order_i = sims.T.argsort(dim=1, descending=True)  # images per text
    for k in ks:
        out[f"i2t_r{k}"] = float((owner[order_t[:, :k]] == torch.arange(img.shape[0])[:, None]).any(1).float().mean())
        out[f"t2i_r{k}"] = float((order_i[:, :k] == owner[:, None]).any(1).float().mean())
    return out


@pytest.mark.parametrize("q, k, block, top", [(97, 131, 16, 10), (5, 3, 2, 10), (64, 64, 64, 1), (200, 33, 7, 5)])
def test_blocked_topk_matches_dense(q, k, block, top):
    queries, keys = torch.randn(q, 12), torch.randn(k, 12)
    got = blocked_topk(queries, keys, top, block=block)
    want = (queries @ keys.T).topk(min(top, k), dim=1).indices
    assert torch.equal(got, want)


def test_recall_matches_dense_with_several_captions_per_image():
    n, per = 50, 3
    img = F.normalize(torch.randn(n, 16), dim=-1)
    owner = torch.arange(n).repeat_interleave(per)
    txt = F.normalize(img[owner] + 0.9 * torch.randn(n * per, 16), dim=-1)  # noisy, so recall is partial
    got = retrieval_recall(img, txt, owner, block=8)
    want = dense_recall(img, txt, owner)
    assert got == pytest.approx(want)
    assert 0.0 < got["i2t_r1"] < 1.0 and got["i2t_r1"] <= got["i2t_r5"] <= got["i2t_r10"]


def test_recall_extremes():
    img = F.normalize(torch.randn(30, 8), dim=-1)
    perfect = retrieval_recall(img, img.clone(), torch.arange(30), block=4)
    assert all(v == 1.0 for v in perfect.values())
    shifted = retrieval_recall(img, img.roll(1, 0), torch.arange(30), block=4)  # every caption points elsewhere
    assert shifted["i2t_r1"] == 0.0 and shifted["t2i_r1"] == 0.0
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_recall(img, img, torch.arange(29))


def test_zero_shot_candidates_differ_in_one_attribute():
    ds = synthetic.SyntheticScenes("val", 20, seed=2)
    for i in range(20):
        attrs = ds.attributes(i)
        own = synthetic.caption(attrs)
        for name, (cands, target) in zero_shot_texts(attrs).items():
            assert len(cands) == len(synthetic.ATTRIBUTES[name]) and len(set(cands)) == len(cands)
            assert cands[target] == own, name
            for c in cands:  # the same words except the one attribute's (and a noun's plural)
                diff = [a != b for a, b in zip(c.split(), own.split())]
                assert len(c.split()) == len(own.split()) and 0 <= sum(diff) <= 2, (name, c, own)


class _Oracle(torch.nn.Module):
    """Towers that embed an image by its scene index and a caption by its text, so that matching
    pairs coincide: recall must be 1 and zero-shot accuracy 1."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def image(self, pixels):
        keys = [self.table[bytes(p.flatten().tolist())] for p in pixels]
        return F.one_hot(torch.tensor(keys), 64).float()

    def text(self, input_ids, attention_mask):
        keys = [self.table.get(tuple(r.tolist()), 63) for r in input_ids]
        return F.one_hot(torch.tensor(keys), 64).float()


def test_evaluate_with_oracle_towers():
    from mmfast.train.tokenizers import WordTokenizer  # noqa: PLC0415

    tok = WordTokenizer(synthetic.vocabulary(), 32)
    ds = synthetic.SyntheticScenes("val", 40, seed=0)
    evalset = EvalSet(ds, make_transform(48, train=False, augment=False), limit=40)
    table = {}
    for i in range(40):
        table[bytes(ds[i]["image"].flatten().tolist())] = i
        table[tuple(tok([ds[i]["caption"]])["input_ids"][0].tolist())] = i
    oracle = _Oracle(table)
    out = evaluate(oracle.image, oracle.text, tok, evalset, device=torch.device("cpu"), chunk=16, zeroshot=40)
    assert out["n_pairs"] == out["n_images"] == 40 and out["skipped"] == 0
    assert all(out[f"{d}_r{k}"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert set(out["zeroshot"]) == set(synthetic.ATTRIBUTES)
    assert all(z["acc"] == 1.0 for z in out["zeroshot"].values())
