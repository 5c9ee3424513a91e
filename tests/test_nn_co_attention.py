"""mmfast.nn.CoAttentionLayer against transformers' LxmertXLayer given the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

import mmfast.nn.co_attention as co_mod
from mmfast.nn import CoAttentionLayer
from tests.nn_utils import assert_grads_close

lxmert = pytest.importorskip("transformers.models.lxmert.modeling_lxmert")

TOL = dict(atol=3e-5, rtol=3e-5)


def _xlayer(h=32, heads=4, inter=48):
    cfg = lxmert.LxmertConfig(hidden_size=h, num_attention_heads=heads, intermediate_size=inter)
    layer = lxmert.LxmertXLayer(cfg).eval()
    with torch.no_grad():  # LayerNorm weights away from 1/0 so a mix-up shows
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def _extended(pad):
    """LXMERT's additive mask from a (B, L) bool padding mask."""
    return None if pad is None else (pad.float() * torch.finfo(torch.float32).min)[:, None, None, :]


def _pad(B, L, n):
    p = torch.zeros(B, L, dtype=torch.bool)
    p[0, L - n :] = True
    return p


@pytest.mark.parametrize(
    "B,Ll,Lv,padded,stack",
    [
        (2, 20, 36, True, None),
        (2, 20, 36, True, True),
        (3, 9, 9, True, None),
        (2, 7, 8, False, False),
        (1, 1, 5, True, None),
    ],
)
def test_equals_lxmert_xlayer(B, Ll, Lv, padded, stack):
    ref = _xlayer()
    layer = CoAttentionLayer(32, 4, 48)
    layer.load_state_dict(ref.state_dict())
    layer.eval()
    lang = torch.randn(B, Ll, 32, requires_grad=True)
    vis = torch.randn(B, Lv, 32, requires_grad=True)
    lp, vp = (_pad(B, Ll, Ll // 3), _pad(B, Lv, Lv // 2)) if padded else (None, None)
    wl, wv = torch.randn(B, Ll, 32), torch.randn(B, Lv, 32)

    a_l, a_v = ref(lang, _extended(lp), vis, _extended(vp))
    ((a_l * wl).sum() + (a_v * wv).sum()).backward()
    ga = (lang.grad.clone(), vis.grad.clone())
    lang.grad = vis.grad = None
    b_l, b_v = layer(lang, vis, lp, vp, stack_directions=stack)
    ((b_l * wl).sum() + (b_v * wv).sum()).backward()

    torch.testing.assert_close(b_l, a_l, **TOL)
    torch.testing.assert_close(b_v, a_v, **TOL)
    torch.testing.assert_close(lang.grad, ga[0], **TOL)
    torch.testing.assert_close(vis.grad, ga[1], **TOL)
    assert_grads_close(ref, layer, atol=3e-5)


@pytest.mark.parametrize("Ll,Lv,stack,calls", [(9, 9, None, 1), (20, 36, None, 2), (20, 36, True, 1), (9, 10, None, 1)])
def test_cross_directions_in_one_call(monkeypatch, Ll, Lv, stack, calls):
    """The cross step makes one op call when stacking (auto: while the padding waste is small)."""
    count = {"n": 0}
    real = co_mod.cross_attention

    def spy(*args, **kw):
        count["n"] += 1
        return real(*args, **kw)

    layer = CoAttentionLayer(16, 2, 32).eval()
    monkeypatch.setattr(co_mod, "cross_attention", spy)
    layer.cross_att(torch.randn(2, Ll, 16), torch.randn(2, Lv, 16), stack_directions=stack)
    assert count["n"] == calls


def test_from_lxmert_adopts_parameters():
    ref = _xlayer()
    layer = CoAttentionLayer.from_lxmert(ref)
    assert {id(p) for p in layer.parameters()} == {id(p) for p in ref.parameters()}
    assert layer.num_heads == 4 and not layer.training
    lang, vis = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    other = copy.deepcopy(ref)
    out = layer(lang, vis)
    exp = other(lang, None, vis, None)
    torch.testing.assert_close(out[0], exp[0], **TOL)
    torch.testing.assert_close(out[1], exp[1], **TOL)


def test_errors():
    layer = CoAttentionLayer(16, 2)
    with pytest.raises(ValueError, match="share B"):
        layer(torch.randn(2, 3, 16), torch.randn(3, 3, 16))
    with pytest.raises(ValueError, match="one width"):
        layer(torch.randn(2, 3, 16), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="divisible"):
        CoAttentionLayer(10, 3)
