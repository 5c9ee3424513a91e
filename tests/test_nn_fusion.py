"""mmfast.nn.AttentionFusion: Concat(T, Attn(T -> V)) against a plain-PyTorch composition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmfast.nn.fusion as fusion_mod
from mmfast.nn import AttentionFusion

TOL = dict(atol=2e-5, rtol=2e-5)


def _expected(m: AttentionFusion, T, V, pad):
    """torch.cat([T, SDPA(...)]) with k/v heads repeated for GQA."""
    B, Lt, _ = T.shape
    Lv = V.shape[1]
    H, Hkv, hd = m.num_heads, m.num_kv_heads, m.head_dim
    q = m.q_proj(T).view(B, Lt, H, hd).transpose(1, 2)
    k = m.k_proj(V).view(B, Lv, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    v = m.v_proj(V).view(B, Lv, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    mask = None if pad is None else ~pad.view(B, 1, 1, Lv)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.cat([T, o.transpose(1, 2).reshape(B, Lt, H * hd)], dim=-1)


@pytest.mark.parametrize(
    "B,Lt,Lv,Dt,Dv,H,hd,Hkv",
    [(2, 16, 49, 64, 48, 4, None, None), (3, 1, 7, 12, 5, 3, None, 1), (1, 97, 13, 10, 20, 2, 3, None)],
)
def test_matches_concat_of_attention(B, Lt, Lv, Dt, Dv, H, hd, Hkv):
    m = AttentionFusion(Dt, Dv, H, hd, num_kv_heads=Hkv)
    T = torch.randn(B, Lt, Dt, requires_grad=True)
    V = torch.randn(B, Lv, Dv, requires_grad=True)
    pad = torch.zeros(B, Lv, dtype=torch.bool)
    pad[0, Lv // 2 :] = True
    w = torch.randn(B, Lt, m.out_dim)

    out = m(T, V, image_padding_mask=pad)
    assert out.shape == (B, Lt, Dt + m.embed_dim)
    (out * w).sum().backward()
    got = [T.grad.clone(), V.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    T.grad = V.grad = None
    m.zero_grad()

    exp = _expected(m, T, V, pad)
    (exp * w).sum().backward()
    want = [T.grad, V.grad] + [p.grad for p in m.parameters()]
    torch.testing.assert_close(out, exp, **TOL)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **TOL)


def test_attention_half_written_in_place(monkeypatch):
    """The op receives a view of the output buffer: the attention half is never copied."""
    seen = {}
    real = fusion_mod.cross_attention

    def spy(*args, out=None, **kw):
        seen["out"] = out
        return real(*args, out=out, **kw)

    monkeypatch.setattr(fusion_mod, "cross_attention", spy)
    m = AttentionFusion(8, 6, 2)
    fused = m(torch.randn(2, 5, 8), torch.randn(2, 3, 6))
    out = seen["out"]
    assert out is not None and out.shape == (2, 2, 5, 4)
    assert out.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    torch.testing.assert_close(fused[..., 8:], out.transpose(1, 2).reshape(2, 5, 8))


def test_no_grad_and_all_padding():
    m = AttentionFusion(8, 6, 2).eval()
    T, V = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    pad = torch.tensor([[False, False, True], [True, True, True]])
    with torch.no_grad():
        out = m(T, V, pad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[..., :8], T)
    assert not out[1, :, 8:].any()  # a text row with no image keys gets zeros


def test_errors_name_the_argument():
    m = AttentionFusion(8, 6, 2)
    with pytest.raises(ValueError, match="text must be"):
        m(torch.randn(2, 5, 7), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="image must be"):
        m(torch.randn(2, 5, 8), torch.randn(3, 3, 6))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(torch.randn(2, 5, 8), torch.randn(2, 3, 6), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        AttentionFusion(7, 6, 2)
