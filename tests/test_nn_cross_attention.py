"""mmfast.nn.CrossAttention against torch.nn.MultiheadAttention: outputs, weights and every gradient."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfast
from mmfast.nn import CrossAttention
from tests.nn_utils import assert_grads_close

TOL = dict(atol=2e-5, rtol=2e-5)


def _pair(E=32, H=4, kdim=None, vdim=None, bias=True, batch_first=False, dropout=0.0, dtype=torch.float32):
    mha = nn.MultiheadAttention(E, H, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)
    mha = mha.to(dtype)
    with torch.no_grad():  # non-zero biases, so a bias mix-up shows
        for p in mha.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mha, CrossAttention.from_multihead_attention(copy.deepcopy(mha))


def _inputs(N, L, S, E, kdim, vdim, batch_first, dtype=torch.float32, self_attn=False):
    def make(length, width):
        shape = (N, length, width) if batch_first else (length, N, width)
        return torch.randn(shape, dtype=dtype, requires_grad=True)

    q = make(L, E)
    if self_attn:
        return q, q, q
    return q, make(S, kdim), make(S, vdim)


def _run_both(mha, ca, q, k, v, **kw):
    """Forward and backward through both modules on cloned inputs; returns (outs, input grads)."""
    results = []
    for module in (mha, ca):
        same_kv = k is v
        qq = q.detach().clone().requires_grad_()
        kk = qq if k is q else k.detach().clone().requires_grad_()
        vv = kk if same_kv else v.detach().clone().requires_grad_()
        out, w = module(qq, kk, vv, **kw)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads = [t.grad for t in {id(t): t for t in (qq, kk, vv)}.values()]
        results.append((out, w, grads))
    return results


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize(
    "N,L,S,E,H,kdim,vdim",
    [(2, 7, 49, 32, 4, None, None), (3, 1, 5, 24, 3, 10, 7), (1, 13, 13, 8, 8, None, None), (2, 97, 33, 12, 2, 5, 12)],
)
def test_matches_multihead_attention(batch_first, N, L, S, E, H, kdim, vdim):
    mha, ca = _pair(E, H, kdim, vdim, batch_first=batch_first)
    q, k, v = _inputs(N, L, S, E, kdim or E, vdim or E, batch_first)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, S // 2 :] = True
    (a, _, ga), (b, wb, gb) = _run_both(mha, ca, q, k, v, key_padding_mask=kpm, need_weights=False)
    assert wb is None
    torch.testing.assert_close(b, a, **TOL)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, **TOL)
    assert_grads_close(mha, ca)


@pytest.mark.parametrize("mask", ["bool2d", "float3d", "float_kpm", "bool2d+float_kpm", "causal_hint", "causal_kpm"])
def test_masks_match(mask):
    N, L, E, H = 3, 11, 16, 4
    S = L
    mha, ca = _pair(E, H, batch_first=True)
    q, k, v = _inputs(N, L, S, E, E, E, True, self_attn=True)
    causal = torch.triu(torch.ones(L, S, dtype=torch.bool), 1)  # True = not allowed
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, -4:] = True
    kw = {}
    if mask == "bool2d":
        kw = dict(attn_mask=(torch.rand(L, S) < 0.3) & ~torch.eye(L, S, dtype=torch.bool), key_padding_mask=kpm)
    elif mask == "float3d":
        kw = dict(attn_mask=torch.randn(N * H, L, S))
    elif mask == "float_kpm":
        kw = dict(key_padding_mask=torch.randn(N, S))
    elif mask == "bool2d+float_kpm":
        kw = dict(attn_mask=causal, key_padding_mask=torch.where(kpm, -1e4, 0.5 * torch.randn(N, S)))
    elif mask == "causal_hint":
        kw = dict(attn_mask=causal, is_causal=True)
    else:
        kw = dict(attn_mask=causal, key_padding_mask=kpm, is_causal=True)
    (a, _, ga), (b, _, gb) = _run_both(mha, ca, q, k, v, need_weights=False, **kw)
    torch.testing.assert_close(b, a, **TOL)
    torch.testing.assert_close(gb[0], ga[0], **TOL)
    assert_grads_close(mha, ca)


@pytest.mark.parametrize("average", [True, False])
def test_need_weights(average):
    mha, ca = _pair(24, 3, kdim=9, vdim=9)
    q, k, v = _inputs(2, 5, 8, 24, 9, 9, False)
    kpm = torch.zeros(2, 8, dtype=torch.bool)
    kpm[1, 5:] = True
    (a, wa, ga), (b, wb, gb) = _run_both(
        mha, ca, q, k, v, key_padding_mask=kpm, need_weights=True, average_attn_weights=average
    )
    torch.testing.assert_close(b, a, **TOL)
    torch.testing.assert_close(wb, wa, **TOL)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, **TOL)


def test_unbatched_and_float64():
    mha, ca = _pair(16, 2, dtype=torch.float64)
    q, k, v = torch.randn(6, 16, dtype=torch.float64), torch.randn(9, 16, dtype=torch.float64), None
    v = torch.randn(9, 16, dtype=torch.float64)
    kpm = torch.zeros(9, dtype=torch.bool)
    kpm[-2:] = True
    a, wa = mha(q, k, v, key_padding_mask=kpm, need_weights=True)
    b, wb = ca(q, k, v, key_padding_mask=kpm, need_weights=True)
    torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(wb, wa, atol=1e-12, rtol=1e-10)
    assert b.shape == (6, 16) and wb.shape == (6, 9)


def test_gqa_against_repeated_heads():
    """num_kv_heads=2 of 6 heads equals ordinary attention with each k/v head repeated 3 times."""
    E, H, Hkv, N, L, S = 48, 6, 2, 2, 7, 10
    ca = CrossAttention(E, H, num_kv_heads=Hkv, kdim=20, vdim=12, batch_first=True)
    assert ca.k_proj_weight.shape == (Hkv * 8, 20) and ca.in_proj_bias.shape == (E + 2 * Hkv * 8,)
    q, k, v = torch.randn(N, L, E), torch.randn(N, S, 20), torch.randn(N, S, 12)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, 6:] = True
    out, _ = ca(q, k, v, key_padding_mask=kpm)
    bq, bk, bv = ca.in_proj_bias.split([E, Hkv * 8, Hkv * 8])
    qh = F.linear(q, ca.q_proj_weight, bq).view(N, L, H, 8).transpose(1, 2)
    kh = F.linear(k, ca.k_proj_weight, bk).view(N, S, Hkv, 8).transpose(1, 2).repeat_interleave(3, dim=1)
    vh = F.linear(v, ca.v_proj_weight, bv).view(N, S, Hkv, 8).transpose(1, 2).repeat_interleave(3, dim=1)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=~kpm.view(N, 1, 1, S))
    expected = ca.out_proj(o.transpose(1, 2).reshape(N, L, E))
    torch.testing.assert_close(out, expected, **TOL)


def test_fully_masked_row_is_zero_not_nan():
    ca = CrossAttention(8, 2, batch_first=True)
    kpm = torch.zeros(2, 4, dtype=torch.bool)
    kpm[1] = True
    q = torch.randn(2, 3, 8, requires_grad=True)
    out, _ = ca(q, torch.randn(2, 4, 8), torch.randn(2, 4, 8), key_padding_mask=kpm)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    torch.testing.assert_close(out[1], ca.out_proj.bias.expand(3, 8))


def test_from_multihead_attention_copies_state():
    mha = nn.MultiheadAttention(16, 4, dropout=0.25, kdim=6, vdim=5, batch_first=True).double().eval()
    mha.in_proj_bias.requires_grad_(False)
    ca = CrossAttention.from_multihead_attention(mha)
    assert not ca.training and ca.dropout == 0.25 and ca.batch_first
    assert ca.q_proj_weight.dtype == torch.float64 and not ca.in_proj_bias.requires_grad
    for (n, p), (_, r) in zip(sorted(ca.state_dict().items()), sorted(mha.state_dict().items())):
        torch.testing.assert_close(p, r, msg=n)
        assert p.data_ptr() != r.data_ptr()  # a copy, not shared
    assert mmfast.nn.CrossAttention is CrossAttention


def test_dropout_only_in_training():
    mha, ca = _pair(16, 4, dropout=0.5, batch_first=True)
    q, k, v = (torch.randn(2, 6, 16) for _ in range(3))
    mha.eval()
    ca.eval()
    torch.testing.assert_close(ca(q, k, v)[0], mha(q, k, v)[0], **TOL)
    ca.train()
    assert not torch.allclose(ca(q, k, v)[0], mha(q, k, v)[0], atol=1e-3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(embed_dim=10, num_heads=3), "divisible"),
        (dict(embed_dim=12, num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
        (dict(embed_dim=12, num_heads=4, add_bias_kv=True), "add_bias_kv"),
        (dict(embed_dim=12, num_heads=4, dropout=1.0), "dropout"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossAttention(**kwargs)


def test_forward_errors_name_the_argument():
    ca = CrossAttention(8, 2, kdim=5, batch_first=True)
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 4, 5), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="key must have width kdim=5"):
        ca(q, torch.randn(2, 4, 6), v)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        ca(q, k, v, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        ca(q, k, v, attn_mask=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="3-D"):
        ca(q, k[0], v)
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        CrossAttention.from_multihead_attention(nn.Linear(2, 2))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("which", ["key_padding_mask", "attn_mask"])
def test_integer_masks_are_refused(dtype, which):
    """nn.MultiheadAttention refuses integer masks; reading one as additive once let padding through."""
    attn = CrossAttention(16, 4, batch_first=True)
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    mask = torch.zeros(2, 7, dtype=dtype) if which == "key_padding_mask" else torch.zeros(5, 7, dtype=dtype)
    with pytest.raises(TypeError, match=which):
        attn(q, kv, kv, **{which: mask})


@pytest.mark.parametrize("kw", [dict(batch_first=True), dict(kdim=8, vdim=12, batch_first=True), {}])
def test_torch_jit_script(kw):
    """torch.jit.script compiles an nn.MultiheadAttention holding the same parameters: same output,
    and training the scripted module trains this one."""
    attn = CrossAttention(16, 4, **kw).eval()
    scripted = torch.jit.script(attn)
    bf = kw.get("batch_first", False)
    shape = (lambda L, E: (2, L, E)) if bf else (lambda L, E: (L, 2, E))
    q, k, v = (
        torch.randn(shape(5, 16)),
        torch.randn(shape(7, kw.get("kdim", 16))),
        torch.randn(shape(7, kw.get("vdim", 16))),
    )
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    torch.testing.assert_close(scripted(q, k, v, key_padding_mask=pad)[0], attn(q, k, v, key_padding_mask=pad)[0])
    assert {id(p) for p in scripted.parameters()} == {id(p) for p in attn.parameters()}
    with pytest.raises(RuntimeError, match="grouped-query"):
        torch.jit.script(CrossAttention(16, 4, num_kv_heads=2))
