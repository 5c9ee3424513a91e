"""mmfast.cross_attention, cpu backend: forward, LSE and every gradient against the float64 reference
and F.scaled_dot_product_attention; masks, causal, GQA, odd head dims, strided inputs and out=.
Dropout, gradcheck, opcheck, torch.compile and bad inputs: test_cross_attention_ops.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cross_attention_helpers import compare_with_reference
from utils import FWD_TOL, attention_inputs, poison_

import mmfast

f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

# (B, Hq, Hkv, Lq, Lk, D, dtype): a covering subset of Lq {1, 7, 32, 77, 128} x Lk {1, 49, 197, 577,
# 1024} x D {16, 32, 64, 80, 128, 256} x GQA {1, 2, 8}, plus Lk > 1024 (online softmax over key
# blocks) and odd sizes (D = 100, 3).
SHAPES = [
    (2, 4, 4, 1, 197, 64, f32),
    (2, 4, 2, 7, 49, 32, f32),
    (2, 8, 1, 32, 577, 64, f32),
    (1, 2, 2, 77, 1024, 80, f32),
    (2, 2, 1, 128, 1, 16, f32),
    (1, 2, 2, 7, 49, 256, f32),
    (1, 2, 1, 128, 197, 128, f32),
    (1, 2, 2, 13, 97, 100, f32),
    (1, 1, 1, 77, 1500, 64, f32),
    (2, 3, 3, 5, 11, 3, f32),
    (2, 4, 2, 32, 577, 64, bf16),
    (2, 4, 4, 77, 197, 80, f16),
    (1, 8, 1, 7, 49, 64, bf16),
    (2, 2, 1, 9, 33, 16, f64),
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,dtype", SHAPES)
def test_matches_reference(B, Hq, Hkv, Lq, Lk, D, dtype):
    x = attention_inputs(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, dtype=dtype)
    compare_with_reference(x["query"], x["key"], x["value"])


def test_value_head_dim_differs():
    x = attention_inputs(B=2, Hq=4, Hkv=2, Lq=7, Lk=49, D=32, Dv=48)
    got = compare_with_reference(x["query"], x["key"], x["value"])
    assert got["out"].shape == (2, 4, 7, 48)


def random_masks(B, Hq, Lq, Lk, *, float_shape=None, bool_shape=None):
    """key_padding_mask with an all-padded batch item; bool / float attn_mask with all-masked rows."""
    kpm = torch.rand(B, Lk) < 0.3
    kpm[-1] = True  # every key of the last item padded
    bool_mask = None
    if bool_shape is not None:
        bool_mask = torch.rand(bool_shape) < 0.7
        bool_mask[..., 0, :] = False  # an all-masked query row (or batch item 0 for (B, 1, 1, Lk))
    float_mask = None
    if float_shape is not None:
        float_mask = torch.randn(float_shape)
        float_mask[..., 1 % float_shape[-2], :] = float("-inf")  # an all-masked row through the float mask
    return kpm, bool_mask, float_mask


@pytest.mark.parametrize(
    "B,Hq,Hkv,Lq,Lk,D,mask_shape",
    [
        (3, 4, 2, 7, 49, 32, "full"),
        (3, 4, 4, 32, 577, 64, "heads"),
        (3, 2, 1, 77, 197, 80, "lq_lk"),
        (2, 2, 2, 9, 1100, 16, "batch"),
    ],
)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks(B, Hq, Hkv, Lq, Lk, D, mask_shape, kind):
    """Padding + bool or float masks (broadcast views), all-masked rows and batch items: no NaN,
    out 0, lse -inf, zero gradients there; the float mask's gradient summed over broadcast dims."""
    shape = {"full": (B, Hq, Lq, Lk), "heads": (1, Hq, Lq, Lk), "lq_lk": (Lq, Lk), "batch": (B, 1, 1, Lk)}[mask_shape]
    x = attention_inputs(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D)
    kpm, bmask, fmask = random_masks(
        B, Hq, Lq, Lk, bool_shape=shape if kind == "bool" else None, float_shape=shape if kind == "float" else None
    )
    mask = bmask if kind == "bool" else fmask
    got = compare_with_reference(x["query"], x["key"], x["value"], key_padding_mask=kpm, attn_mask=mask)
    assert (got["out"][-1] == 0).all() and (got["lse"][-1] == float("-inf")).all()
    assert (got["dq"][-1] == 0).all() and (got["dk"][-1] == 0).all() and (got["dv"][-1] == 0).all()
    if mask_shape != "batch":
        assert (got["out"][:, :, 0 if kind == "bool" else 1 % Lq] == 0).all()


@pytest.mark.parametrize("Lq,Lk", [(7, 49), (32, 577), (77, 77), (128, 49), (49, 7)])
def test_causal_bottom_right(Lq, Lk):
    """Query i sees keys j <= i + Lk - Lq; with Lq > Lk the first rows see nothing (out 0)."""
    x = attention_inputs(B=2, Hq=4, Hkv=2, Lq=Lq, Lk=Lk, D=32, pad_frac=0.2)
    got = compare_with_reference(
        x["query"], x["key"], x["value"], key_padding_mask=x["key_padding_mask"], is_causal=True
    )
    if Lq > Lk:
        assert (got["out"][:, :, : Lq - Lk] == 0).all()


def sdpa_reference(q, k, v, mask, grad_out):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(grad_out)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D", [(2, 8, 2, 32, 577, 64), (2, 4, 4, 77, 197, 80), (1, 2, 1, 1, 49, 16)])
def test_matches_sdpa_float64(B, Hq, Hkv, Lq, Lk, D):
    """Against SDPA (float64), given the key-padding mask as SDPA's bool attn_mask (no empty rows)."""
    x = attention_inputs(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, dtype=f64, requires_grad=True)
    kpm = torch.rand(B, Lk) < 0.3
    kpm[:, 0] = False
    grad_out = torch.randn(B, Hq, Lq, D, dtype=f64)
    out = mmfast.cross_attention(x["query"], x["key"], x["value"], key_padding_mask=kpm, backend="cpu")
    out.backward(grad_out)
    want = sdpa_reference(x["query"], x["key"], x["value"], (~kpm).view(B, 1, 1, Lk), grad_out)
    for g, w in zip((out, x["query"].grad, x["key"].grad, x["value"].grad), want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("dtype", [f32, bf16])
def test_strided_inputs(dtype):
    """(B, L, H, D) storage viewed as (B, H, L, D), without a copy; a transposed-last-dim key too."""
    x = attention_inputs(B=2, Hq=4, Hkv=2, Lq=7, Lk=197, D=64, dtype=dtype, layout="blhd", pad_frac=0.3)
    assert not x["query"].is_contiguous()
    compare_with_reference(x["query"], x["key"], x["value"], key_padding_mask=x["key_padding_mask"])
    k_t = x["key"].detach().transpose(2, 3).contiguous().transpose(2, 3)  # last dim not contiguous
    compare_with_reference(x["query"], k_t, x["value"])


@pytest.mark.parametrize("requires_grad", [True, False])
def test_out_into_slice(requires_grad):
    """out= into a slice of a poisoned buffer: the slice gets the result, the rest stays untouched,
    the returned tensor is that slice, and gradients still reach q, k, v."""
    B, Hq, Lq, Lk, D = 2, 4, 7, 49, 32
    x = attention_inputs(B=B, Hq=Hq, Hkv=2, Lq=Lq, Lk=Lk, D=D, requires_grad=requires_grad)
    buf = poison_(torch.empty(B, Lq, Hq, 3 * D))  # e.g. Concat(T, Attn, ...) in (B, L, H, .) layout
    target = buf[..., D : 2 * D].transpose(1, 2)  # (B, Hq, Lq, D), strided
    out = mmfast.cross_attention(x["query"], x["key"], x["value"], out=target, backend="cpu")
    assert out.data_ptr() == target.data_ptr() and out.shape == (B, Hq, Lq, D)
    want = mmfast.cross_attention(x["query"], x["key"], x["value"], backend="reference")
    torch.testing.assert_close(buf[..., D : 2 * D].transpose(1, 2), want, **FWD_TOL[f32])
    assert buf[..., :D].isnan().all() and buf[..., 2 * D :].isnan().all()
    if requires_grad:
        grad_out = torch.randn(B, Hq, Lq, D)
        got = torch.autograd.grad(out, (x["query"], x["key"], x["value"]), grad_out)
        ref = torch.autograd.grad(want, (x["query"], x["key"], x["value"]), grad_out)
        for g, w in zip(got, ref):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_out_with_row_gaps_is_copied_back():
    """An out whose rows are not contiguous (last-dim stride 2) still receives the exact result."""
    x = attention_inputs(B=1, Hq=2, Lq=5, Lk=9, D=8)
    buf = poison_(torch.empty(1, 2, 5, 16))
    out = mmfast.cross_attention(x["query"], x["key"], x["value"], out=buf[..., ::2], backend="cpu")
    torch.testing.assert_close(out, mmfast.cross_attention(x["query"], x["key"], x["value"], backend="reference"))
    assert buf[..., 1::2].isnan().all()


def test_auto_picks_cpu_and_reference_beyond_head_dim_limit():
    x = attention_inputs(B=1, Hq=2, Lq=3, Lk=5, D=300)
    with pytest.raises(RuntimeError, match="limit of 256"):
        mmfast.cross_attention(x["query"], x["key"], x["value"], backend="cpu")
    out = mmfast.cross_attention(x["query"], x["key"], x["value"])  # auto: reference takes it
    assert out.shape == (1, 2, 3, 300)
