"""ITC + ITM (mmfast.train.itm, mining, fusion, itm_eval): hard-negative mining against a dense
reference, the objective's gradients against one whole-batch autograd run (GradCache and the plain
loop), ITM gradients reaching the fusion encoder and both towers, the fusion encoder's attention
swap, and the re-ranking evaluation against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmfast.train import synthetic
from mmfast.train.evaluate import EvalSet
from mmfast.train.fusion import FusionEncoder, by_caption_length, text_extent
from mmfast.train.gradcache import GradCache, call_model
from mmfast.train.itm import ItcItmObjective
from mmfast.train.itm_eval import evaluate_itm, first_other, rerank
from mmfast.train.loader import collate, make_transform
from mmfast.train.mining import excluded, mine_negatives
from mmfast.train.models import build_model
from mmfast.train.objectives import build_objective
from mmfast.train.tokenizers import WordTokenizer

SIZE, CTX = 16, 24
CPU = torch.device("cpu")


def tiny_itm_model():
    tok = WordTokenizer(synthetic.vocabulary(), CTX)
    model = build_model(
        "tiny", vocab_size=tok.vocab_size, context_length=CTX, image_size=SIZE, patch_size=8, width=32, layers=1,
        heads=2, embed_dim=16,
    )  # fmt: skip
    model.add_fusion(layers=1, heads=2)
    return model, tok


def scene_batch(tok, n: int, seed: int = 0):
    ds = synthetic.SyntheticScenes("train", n, seed=seed, image_size=SIZE)
    items = [ds[i] for i in range(n)]
    return collate(items, tok, [it["caption"] for it in items])


def grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------
# hard-negative mining
# ------------------------------------------------------------------------------------------------


def dense_negatives(x, y, scale, xk, yk):
    s = scale * x @ y.T
    s[excluded(xk, yk)] = float("-inf")
    rows = torch.where(torch.isinf(s).all(1), -1, s.argmax(1))
    cols = torch.where(torch.isinf(s).all(0), -1, s.argmax(0))
    return rows, cols


@pytest.mark.parametrize(
    "n,m,d,block", [(7, 7, 5, 3), (33, 20, 16, 8), (5, 9, 3, 64), (40, 40, 8, 40), (97, 61, 1, 16)]
)
def test_hardest_negatives_match_dense(n, m, d, block):
    x, y = torch.randn(n, d), torch.randn(m, d)
    xk, yk = torch.randint(0, 6, (n, 4)), torch.randint(0, 6, (m, 4))
    xk[:, 2], yk[:, 2] = -1, 5  # column 2: row 0 shares a key with every column -> no negative
    xk[0, 2] = 5
    xk[:, 3], yk[:, 3] = 7, -2  # column 3: column 0 shares a key with every row -> no negative
    yk[0, 3] = 7
    got = mine_negatives(x, y, 3.7, x_keys=xk, y_keys=yk, generator=None, block=block)
    want = dense_negatives(x, y, 3.7, xk, yk)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0][0] == -1 and got[1][0] == -1


def copies_keys(R: int, n: int) -> torch.Tensor:
    """(R * n, 1 + bits) keys of R stacked copies of an n-row problem: column 0 the row within its
    copy (pair i = (image i, text i)); column 1 + b bit b of the copy (for x) or its complement
    (for y, see ``complement``): rows and columns of different copies share a key, so each copy's
    draws stay within the copy, and one call draws R times."""
    bits = max(1, (R - 1).bit_length())
    r = torch.arange(R).repeat_interleave(n)
    return torch.cat([torch.arange(n).repeat(R)[:, None], (r[:, None] >> torch.arange(bits)) & 1], 1)


def complement(keys: torch.Tensor) -> torch.Tensor:
    return torch.cat([keys[:, :1], 1 - keys[:, 1:]], 1)


def test_sampled_negatives_follow_the_contrastive_softmax():
    n, m, scale, R, calls = 3, 5, 2.5, 512, 4
    x, y = torch.randn(n, 4), torch.randn(m, 4)
    s = scale * x @ y.T
    s.fill_diagonal_(float("-inf"))  # pair i is (image i, text i)
    xk, yk = copies_keys(R, n), complement(copies_keys(R, m))
    gen = torch.Generator().manual_seed(1)
    rows, cols = torch.zeros(n, m), torch.zeros(m, n)
    for _ in range(calls):
        r, c = mine_negatives(x.repeat(R, 1), y.repeat(R, 1), scale, x_keys=xk, y_keys=yk, generator=gen, block=700)
        assert torch.equal(r // m, torch.arange(R).repeat_interleave(n))  # within the copy
        assert torch.equal(c // n, torch.arange(R).repeat_interleave(m))
        rows.index_put_((torch.arange(n).repeat(R), r % m), torch.ones(R * n), accumulate=True)
        cols.index_put_((torch.arange(m).repeat(R), c % n), torch.ones(R * m), accumulate=True)
    draws = R * calls
    assert rows.diagonal().sum() == 0 and cols[:n].diagonal().sum() == 0  # positives never drawn
    assert (rows / draws - s.softmax(1)).abs().max() < 0.045
    assert (cols / draws - s.softmax(0).T).abs().max() < 0.045
    # harder negatives are drawn more often: where s_ij beats s_ik by > 1 (and j is drawn with
    # probability > 5%), j was drawn more often than k
    for freq, logits in ((rows, s), (cols, s.T)):
        p = logits.softmax(1)
        harder = (logits[:, :, None] - logits[:, None, :] > 1.0) & (p[:, :, None] > 0.05)
        assert harder.any()
        assert (freq[:, :, None] > freq[:, None, :])[harder].all()


def test_mining_under_bf16_autocast_computes_in_fp32():
    x, y = torch.randn(37, 8), torch.randn(29, 8)
    keys_x, keys_y = torch.arange(37)[:, None], torch.arange(29)[:, None]
    want = mine_negatives(x, y, 5.0, x_keys=keys_x, y_keys=keys_y, block=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mine_negatives(x, y, 5.0, x_keys=keys_x, y_keys=keys_y, block=8)
        sampled = mine_negatives(x, y, 5.0, x_keys=keys_x, y_keys=keys_y, block=8, generator=torch.Generator())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert sampled[0].dtype == torch.long and (sampled[0] >= 0).all()


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("generator", [None, 0])
def test_mining_never_builds_the_n_by_n_similarity(generator):
    """Every tensor the sweep creates is a tile (<= block per dimension of the similarity) or a
    per-row / per-column vector: no N x M (nor N x anything-larger-than-block) intermediate."""
    n, m, d, block = 300, 260, 8, 32
    model, tok = tiny_itm_model()
    obj = ItcItmObjective(_NoItc(), model, tok, block=block, negatives="sample" if generator is not None else "hardest")
    x, y = F.normalize(torch.randn(n, d), dim=-1), F.normalize(torch.randn(m, d), dim=-1)
    with _Shapes() as rec:
        mine_negatives(x, y, 10.0, x_keys=torch.arange(n)[:, None], y_keys=torch.arange(m)[:, None], block=block,
                       generator=None if generator is None else torch.Generator().manual_seed(generator))  # fmt: skip
    with _Shapes() as rec_pairs:
        obj.pairs(x[:m], y)  # the objective's call: n pairs, all within one local batch
    for shapes in (rec.shapes, rec_pairs.shapes):
        assert shapes, "nothing recorded"
        big = {sh for sh in shapes if sum(dim > block for dim in sh) >= 2 or math.prod(sh) > 4 * block * block}
        assert big <= {(n, d), (m, d)}, big  # beyond tiles, only the inputs' fp32 copies
        assert (block, block) in shapes  # the tiles are there
    assert max(math.prod(sh) for sh in rec.shapes) < n * m / 4


def test_mining_rejects_bad_shapes():
    with pytest.raises(ValueError, match="agree on D"):
        mine_negatives(torch.randn(3, 4), torch.randn(3, 5), 1.0, x_keys=torch.zeros(3, 1), y_keys=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="x_keys"):
        mine_negatives(torch.randn(3, 4), torch.randn(3, 4), 1.0, x_keys=torch.zeros(2, 1), y_keys=torch.zeros(3, 1))


def test_edit_one_attribute_changes_exactly_one():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        attrs = synthetic.sample_attributes(rng)
        edited, name = synthetic.edit_one_attribute(attrs, rng)
        diff = [k for k in attrs if attrs[k] != edited[k]]
        assert len(diff) == 1 and (diff[0] == name if name == "bg" else diff[0].endswith(name)), (diff, name)
        assert synthetic.caption(edited) != synthetic.caption(attrs)
        seen.add(name)
    assert seen == set(synthetic.ATTRIBUTES)


def test_itm_pairs_follow_albef_with_edits():
    model, tok = tiny_itm_model()
    batch = scene_batch(tok, 9)
    obj = ItcItmObjective(_NoItc(), model, tok, edit_fraction=0.5)
    torch.manual_seed(3)
    obj.begin_step(batch)
    edits = obj._edit_rows
    assert 0 < edits.numel() < 9 and len(obj._edited) == edits.numel()
    for k, i in enumerate(edits.tolist()):
        assert obj._edited[k] != batch.captions[i]
    images, texts = obj.inputs(batch, CPU)
    assert texts["input_ids"].shape[0] == 9 + edits.numel() and texts["return_tokens"] and images["return_tokens"]
    emb = F.normalize(torch.randn(9, 8), dim=-1)
    img, txt, labels = obj.pairs(emb, emb, edits)
    assert img.numel() == txt.numel() == labels.numel() == 27  # n positives, n negative captions, n images
    assert torch.equal(img[:9], torch.arange(9)) and torch.equal(txt[:9], torch.arange(9)) and labels[:9].all()
    assert not labels[9:].any()
    assert torch.equal(img[9:18], torch.arange(9)) and torch.equal(txt[18:], torch.arange(9))
    edited = txt[9:18] >= 9
    assert torch.equal(torch.nonzero(edited).squeeze(1), edits)
    assert torch.equal(txt[9:18][edits], 9 + torch.arange(edits.numel()))
    assert (txt[9:18][~edited] != torch.arange(9)[~edited]).all() and (img[18:] != torch.arange(9)).all()


def test_itm_easy_steps_draw_uniform_negatives_without_edits():
    """During the first ``easy_steps`` steps the negatives ignore the similarities (uniform over the
    non-matching items, whatever the scale) and no caption is edited; from then on, as before."""
    model, tok = tiny_itm_model()
    batch = scene_batch(tok, 12)
    obj = ItcItmObjective(_NoItc(), model, tok, edit_fraction=1.0, easy_steps=2)
    emb = F.normalize(torch.randn(12, 8), dim=-1)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1e4))  # hard mining would always draw the argmax
    obj.begin_step(batch, step=0)
    hardest = mine_negatives(emb, emb, 1e4, x_keys=obj._keys, y_keys=obj._keys)[0]
    drawn = []
    for trial in range(40):
        obj.begin_step(batch, step=trial % 2)
        assert obj._edit_rows.numel() == 0 and not obj._edited
        img, txt, labels = obj.pairs(emb, emb, obj._edit_rows)
        assert labels.sum() == 12 and (txt[12:24] != torch.arange(12)).all() and (img[24:] != torch.arange(12)).all()
        drawn.append(txt[12:24])
    assert (torch.stack(drawn) != hardest).float().mean() > 0.5  # hard mining would give ~0
    obj.begin_step(batch, step=2)
    assert obj._edit_rows.numel() == 12


# ------------------------------------------------------------------------------------------------
# the objective's gradients
# ------------------------------------------------------------------------------------------------


def reference_step(model, obj, batch):
    """ITC + ITM of the whole batch in one autograd graph: towers once, fusion on all pairs at once."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    obj.begin_step(batch)
    images, texts = obj.inputs(batch, CPU)
    img_emb, img_tok = call_model(model.image_tower, images)
    txt_emb, txt_tok, txt_pad = call_model(model.text_tower, texts)
    n = img_emb.shape[0]
    i, j, labels = obj.pairs(img_emb.detach(), txt_emb[:n].detach(), obj._edit_rows)
    loss = obj.contrastive(img_emb, txt_emb[:n]) + F.cross_entropy(
        model.fusion(txt_tok[j], txt_pad[j], img_tok[i]), labels
    )
    loss.backward()
    return loss.detach(), grads(model)


@pytest.mark.parametrize("edits", [0.5, 0.0])
def test_itm_gradients_equal_one_whole_batch_autograd(edits):
    model, tok = tiny_itm_model()
    batch = scene_batch(tok, 7)
    obj = build_objective(
        "clip", model, objective="itc+itm", itm=dict(tokenizer=tok, chunk_size=4, edit_fraction=edits)
    )
    ref_loss, ref = reference_step(model, obj, batch)
    assert (obj._edit_rows.numel() > 0) == (edits > 0)

    def run(step):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        obj.begin_step(batch)
        images, texts = obj.inputs(batch, CPU)
        return step(images, texts), grads(model)

    gc_loss, gc = run(lambda im, tx: GradCache(model.image_tower, model.text_tower, obj, chunk_size=3).step(im, tx))

    def plain(im, tx):
        loss = obj(call_model(model.image_tower, im), call_model(model.text_tower, tx))
        loss.backward()
        return loss.detach()

    plain_loss, pl = run(plain)
    assert obj.last_parts["itm"] > 0 and len(ref) == len(list(model.parameters()))
    for name, g in ref.items():
        atol = 1e-6 * max(1.0, float(g.abs().max()))  # fp32 sums in another order, on the tensor's scale
        torch.testing.assert_close(gc[name], g, rtol=1e-4, atol=atol, msg=f"GradCache: {name}")
        torch.testing.assert_close(pl[name], g, rtol=1e-4, atol=atol, msg=f"plain: {name}")
    torch.testing.assert_close(gc_loss, ref_loss)
    torch.testing.assert_close(plain_loss, ref_loss)


class _NoItc:
    """A contrastive stand-in with zero loss, so that only ITM's gradient remains."""

    def begin_step(self, batch, step=0):
        pass

    def inputs(self, batch, device):
        return batch.images.to(device), dict(batch.texts)

    def __call__(self, image_emb, text_emb):
        return (image_emb.sum() + text_emb.sum()) * 0.0


def test_itm_gradient_reaches_fusion_and_both_towers():
    model, tok = tiny_itm_model()
    batch = scene_batch(tok, 6)
    obj = ItcItmObjective(_NoItc(), model, tok, chunk_size=5)
    obj.begin_step(batch)
    images, texts = obj.inputs(batch, CPU)
    GradCache(model.image_tower, model.text_tower, obj, chunk_size=4).step(images, texts)
    g = {k: p.grad for k, p in model.named_parameters()}

    def reached(prefix):
        names = [k for k in g if k.startswith(prefix)]
        assert names, prefix
        return {k: g[k] is not None and bool(g[k].abs().sum() > 0) for k in names}

    for prefix in ("fusion.", "image_tower.backbone.encoder.", "text_tower.backbone.encoder.",
                   "text_tower.backbone.embeddings.token_embedding", "image_tower.backbone.embeddings.patch"):  # fmt: skip
        assert all(reached(prefix).values()), (prefix, reached(prefix))
    # the projections feed only the contrastive embeddings
    assert not any(reached("image_tower.projection").values())


@pytest.mark.parametrize("gradcache", [True, False])
def test_itm_detach_steps_stop_the_gradient_at_the_towers(gradcache):
    """Steps before ``detach_steps``: ITM trains the fusion encoder only (its gradient there equals the
    undetached step's) and no tower parameter gets any ITM gradient; from ``detach_steps`` on the
    towers get it again."""
    model, tok = tiny_itm_model()
    batch = scene_batch(tok, 6)

    def step(detach_steps, at):
        model.zero_grad(set_to_none=True)
        obj = ItcItmObjective(_NoItc(), model, tok, chunk_size=5, detach_steps=detach_steps)
        obj.begin_step(batch, step=at)
        images, texts = obj.inputs(batch, CPU)
        if gradcache:
            loss = GradCache(model.image_tower, model.text_tower, obj, chunk_size=4).step(images, texts)
        else:
            loss = obj(call_model(model.image_tower, images), call_model(model.text_tower, texts))
            loss.backward()
        towers = [p.grad for k, p in model.named_parameters() if not k.startswith("fusion.")]
        return loss.detach(), grads(model), any(g is not None and bool(g.abs().sum() > 0) for g in towers)

    loss0, ref, reached = step(0, at=3)
    assert reached
    loss1, got, reached = step(4, at=3)
    assert not reached
    torch.testing.assert_close(loss1, loss0)
    for name in (k for k in ref if k.startswith("fusion.")):
        torch.testing.assert_close(got[name], ref[name], msg=name)
    assert step(4, at=4)[2]
    with pytest.raises(ValueError, match="--itm-detach-steps"):
        ItcItmObjective(_NoItc(), model, tok, detach_steps=-1)


@pytest.mark.parametrize("attn", ["mmfast", "sdpa"])
def test_itm_step_under_bf16_autocast(attn):
    """--precision bf16: the GradCache step runs (mining in fp32), its loss is near fp32's and
    every parameter gets a finite gradient."""
    model, tok = tiny_itm_model()
    model.fusion = FusionEncoder(32, 32, layers=1, heads=2, attn=attn)
    batch = scene_batch(tok, 6)
    losses = []
    for dtype in (None, torch.bfloat16):
        obj = build_objective("clip", model, objective="itc+itm", itm=dict(tokenizer=tok, chunk_size=5))
        obj.begin_step(batch, 1)
        images, texts = obj.inputs(batch, CPU)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            losses.append(float(GradCache(model.image_tower, model.text_tower, obj, chunk_size=4).step(images, texts)))
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
    g = grads(model)
    fusion = {k for k, _ in model.named_parameters() if k.startswith("fusion.")}
    assert fusion <= g.keys() and all(torch.isfinite(v).all() for v in g.values())


def test_fusion_attention_swap_computes_the_same():
    a = FusionEncoder(32, 24, layers=2, heads=4, attn="mmfast")
    b = FusionEncoder(32, 24, layers=2, heads=4, attn="sdpa")
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    text, image = torch.randn(5, 9, 32), torch.randn(5, 7, 24)
    pad = torch.arange(9)[None] >= torch.tensor([9, 3, 1, 6, 8])[:, None]
    outs = []
    for m in (a, b):
        t, v = text.clone().requires_grad_(), image.clone().requires_grad_()
        logits = m(t, pad, v)
        (logits * torch.arange(1.0, 3.0)).sum().backward()
        outs.append((logits, t.grad, v.grad, {k: p.grad for k, p in m.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0][2], outs[1][2], rtol=1e-4, atol=1e-5)
    for k, g in outs[0][3].items():
        torch.testing.assert_close(g, outs[1][3][k], rtol=1e-4, atol=1e-5, msg=k)
    with pytest.raises(ValueError, match="fusion-attn"):
        FusionEncoder(32, 24, attn="flash")
    with pytest.raises(ValueError, match="text_padding"):
        a(text, pad.long(), image)


def test_text_extent():
    pad = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert text_extent(pad).tolist() == [2, 3, 0, 4, 3]
    assert by_caption_length(pad, torch.tensor([3, 0, 2, 0, 4])).tolist() == [2, 1, 3, 4, 0]


@pytest.mark.parametrize("pool", ["eos", "bos"])
@pytest.mark.parametrize("attn", ["mmfast", "sdpa"])
def test_fusion_drops_trailing_padding_without_changing_results(attn, pool):
    """The encoder runs at the batch's longest caption; logits and gradients equal those of all
    blocks run over every column, the head reading the last real token (eos) or the first (bos)
    (the padding columns get no gradient)."""
    enc = FusionEncoder(16, 12, layers=2, heads=2, attn=attn, pool=pool)
    text, image = torch.randn(4, 11, 16, requires_grad=True), torch.randn(4, 5, 12, requires_grad=True)
    pad = torch.arange(11)[None] >= torch.tensor([6, 2, 1, 4])[:, None]  # columns 6.. are padding everywhere
    got = enc(text, pad, image)
    (g_text, g_image) = torch.autograd.grad((got * torch.tensor([1.0, -2.0])).sum(), (text, image))
    full = text
    for layer in enc.layers:
        full = layer(full, pad, image)
    read = torch.tensor([5, 1, 0, 3]) if pool == "eos" else torch.zeros(4, dtype=torch.long)
    want = enc.head(enc.norm(full[torch.arange(4), read]))
    (w_text, w_image) = torch.autograd.grad((want * torch.tensor([1.0, -2.0])).sum(), (text, image))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_image, w_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_text, w_text, rtol=1e-5, atol=1e-6)
    assert not g_text[:, 6:].any() and g_text[:, :6].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# re-ranking and ITM accuracy
# ------------------------------------------------------------------------------------------------


def brute_rankings(sim, itm, k):
    """Per query (rows of sim / itm): all keys by ITC, the first k re-sorted by ITM (stable)."""
    out = []
    for s_row, m_row in zip(sim, itm):
        order = sorted(range(len(s_row)), key=lambda j: -float(s_row[j]))
        top = sorted(order[:k], key=lambda j: -float(m_row[j]))
        out.append(top + order[k:])
    return out


def brute_recall(sim, itm, owner, k):
    i2t = brute_rankings(sim, itm, k)
    t2i = brute_rankings(sim.T, itm.T, k)
    out = {}
    for K in (1, 5, 10):
        out[f"i2t_r{K}"] = float(np.mean([any(owner[j] == i for j in r[:K]) for i, r in enumerate(i2t)]))
        out[f"t2i_r{K}"] = float(np.mean([owner[j] in r[:K] for j, r in enumerate(t2i)]))
    return out


@pytest.mark.parametrize("itc_scale", [0.0, 2.5])
@pytest.mark.parametrize("k", [1, 3, 16])
def test_rerank_matches_brute_force(k, itc_scale):
    """ITC recall, re-ranked by ITM + itc_scale * ITC similarity (``rerank_*``) and by ITM alone
    (``rerank_itm_*``), each against sorting every query's candidates in Python."""
    N, M = 13, 20
    owner = torch.cat([torch.arange(N), torch.randint(0, N, (M - N,))])
    img, txt = F.normalize(torch.randn(N, 8), dim=-1), F.normalize(torch.randn(M, 8), dim=-1)
    itm = torch.randint(0, 3, (N, M)).float()  # many ties: re-ranking must keep ITC order among them
    out, ranks = rerank(img, txt, owner, lambda i, j: itm[i, j], k=k, itc_scale=itc_scale)
    sim = img @ txt.T
    want_itc = brute_recall(sim, torch.zeros(N, M), owner, 0)
    want_both = brute_recall(sim, itm + itc_scale * sim, owner, k)
    want_itm = brute_recall(sim, itm, owner, k)
    for name in want_itc:
        assert out[name] == pytest.approx(want_itc[name]), name
        assert out[f"rerank_{name}"] == pytest.approx(want_both[name]), name
        assert out[f"rerank_itm_{name}"] == pytest.approx(want_itm[name]), name
    assert ranks["top_t"].shape == (N, max(k, 10))


def test_first_other():
    ranking = torch.tensor([[2, 0, 1], [1, 1, 1], [0, 2, 1]])
    got = first_other(ranking, torch.tensor([0, 1, 1]), torch.tensor([1, 1, 0]))
    assert got.tolist() == [0, -1, 2]


class _TwoCaptions(torch.utils.data.Dataset):
    """Synthetic scenes where every third item has a second caption."""

    def __init__(self, n):
        self.ds = synthetic.SyntheticScenes("val", n, seed=0, image_size=SIZE)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        if i % 3 == 0:
            item["captions"] = [item["caption"], "a scene : " + item["caption"]]
        return item


def test_evaluate_itm_matches_brute_force():
    model, tok = tiny_itm_model()
    model.eval()
    ds = _TwoCaptions(11)
    evalset = EvalSet(ds, make_transform(SIZE, train=False, augment=False))
    out = evaluate_itm(model, tok, evalset, device=CPU, chunk=4, rerank_k=4, fusion_chunk=7, seed=3)
    with torch.no_grad():
        img_emb, img_tok = model.image_tower(evalset.local.images, return_tokens=True)
        texts = [c for caps in evalset.local.captions for c in caps]
        owner = torch.tensor([i for i, caps in enumerate(evalset.local.captions) for _ in caps])
        txt_emb, txt_tok, txt_pad = model.text_tower(**tok(texts), return_tokens=True)
        N, M = len(ds), len(texts)
        i, j = torch.arange(N).repeat_interleave(M), torch.arange(M).repeat(N)
        itm = FusionEncoder.match_score(model.fusion(txt_tok[j], txt_pad[j], img_tok[i])).view(N, M)
    sim = img_emb @ txt_emb.T
    scale = float(model.scale().detach())
    for name, v in brute_recall(sim, itm + scale * sim, owner, 4).items():
        assert out[f"rerank_{name}"] == pytest.approx(v), name
    for name, v in brute_recall(sim, itm, owner, 4).items():
        assert out[f"rerank_itm_{name}"] == pytest.approx(v), name
    for name, v in brute_recall(sim, torch.zeros(N, M), owner, 0).items():
        assert out[name] == pytest.approx(v), name
    own = owner[None, :] == torch.arange(N)[:, None]  # (N, M): caption j belongs to image i
    neg_t = sim.masked_fill(own, float("-inf")).argmax(1)
    neg_i = sim.masked_fill(own, float("-inf")).argmax(0)
    pos = itm[owner, torch.arange(M)] > 0
    neg = torch.cat([itm[torch.arange(N), neg_t], itm[neg_i, torch.arange(M)]]) <= 0
    assert out["itm_acc_pos"] == pytest.approx(float(pos.float().mean()))
    assert out["itm_acc_neg"] == pytest.approx(float(neg.float().mean()))
    assert out["itm_pairs"] == {"positives": M, "hard_negatives": N + M}
    # one-attribute edits: the true caption against its edit, by ITM and by ITC
    edits = [
        synthetic.caption(synthetic.edit_one_attribute(ds[i]["attrs"], np.random.default_rng((3, 17, i)))[0])
        for i in range(N)
    ]
    with torch.no_grad():
        e_emb, e_tok, e_pad = model.text_tower(**tok(edits), return_tokens=True)
        t_emb, t_tok, t_pad = model.text_tower(**tok([ds[i]["caption"] for i in range(N)]), return_tokens=True)
        s_edit = FusionEncoder.match_score(model.fusion(e_tok, e_pad, img_tok))
        s_true = FusionEncoder.match_score(model.fusion(t_tok, t_pad, img_tok))
    assert out["itm_edit_acc"] == pytest.approx(float((s_true > s_edit).float().mean()))
    itc_true, itc_edit = (img_emb * t_emb).sum(1), (img_emb * e_emb).sum(1)
    assert out["itc_edit_acc"] == pytest.approx(float((itc_true > itc_edit).float().mean()))
