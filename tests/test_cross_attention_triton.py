"""Triton cross-attention against the float64 reference (interpreter on CPU; `gpu` tests on CUDA).

Every case checks out, LSE, dq, dk, dv (and the float attn_mask's gradient) with fresh random
inputs; the loss also uses the LSE, so its gradient path is exercised too.
"""

import pytest
import torch
from utils import BWD_TOL, FWD_TOL, attention_inputs, poison_

import mmfast
from mmfast.reference import cross_attention as ref_attention
from mmfast.reference.dropout import draw_seed, keep_mask
from mmfast.triton import cross_attention as tca

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64


def _with_grad(ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.is_floating_point()) for t in ts]


def _loss_grads(o, lse, go, gl, wrt):
    """<o, go> + <lse, gl> (gl zero where lse = -inf) and its gradients w.r.t. ``wrt``."""
    finite = torch.isfinite(lse)
    loss = (o.to(F64) * go).sum() + (torch.where(finite, lse.to(F64), 0.0) * gl).sum()
    return torch.autograd.grad(loss, wrt)


def check(
    q,
    k,
    v,
    *,
    dtype=torch.float32,
    key_padding_mask=None,
    attn_mask=None,
    is_causal=False,
    dropout_p=0.0,
    num_splits=0,
    out=None,
    fwd_tol=None,
    bwd_tol=None,
):
    """Run triton in ``dtype`` and the reference in float64 on the same values; compare all."""
    q64, k64, v64 = (t.detach().to(dtype).to(F64) for t in (q, k, v))  # the values both sides see
    float_mask = attn_mask is not None and attn_mask.is_floating_point()
    if float_mask:
        attn_mask = attn_mask.to(dtype).to(F64)
    qt, kt, vt = _with_grad((q64, k64, v64), dtype)
    mt = _with_grad([attn_mask], dtype)[0] if float_mask else attn_mask
    torch.manual_seed(1234)  # the dropout seed the op draws
    o, lse = tca.triton_cross_attention(
        qt, kt, vt, key_padding_mask=key_padding_mask, attn_mask=mt, is_causal=is_causal,
        dropout_p=dropout_p, return_lse=True, out=out, num_splits=num_splits,
    )  # fmt: skip
    keep = None
    if dropout_p > 0:
        torch.manual_seed(1234)
        B, Hq, Lq, _ = q.shape
        keep = keep_mask(draw_seed(), B, Hq, Lq, k.shape[2], dropout_p, device=q.device)
    qr, kr, vr = _with_grad((q64, k64, v64))
    mr = _with_grad([attn_mask], F64)[0] if float_mask else attn_mask
    ro, rlse = ref_attention(
        qr, kr, vr, key_padding_mask=key_padding_mask, attn_mask=mr, is_causal=is_causal,
        dropout_p=dropout_p, return_lse=True, dropout_mask=keep,
    )  # fmt: skip
    assert o.dtype == dtype and lse.dtype == torch.float32 and o.shape == ro.shape
    ftol, btol = fwd_tol or FWD_TOL[dtype], bwd_tol or BWD_TOL[dtype]
    torch.testing.assert_close(o.to(F64), ro, **ftol)
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse)), "LSE -inf pattern differs"
    torch.testing.assert_close(lse.to(F64), rlse, **ftol)
    go, gl = torch.randn_like(ro), torch.randn_like(rlse)
    wrt_t, wrt_r = [qt, kt, vt], [qr, kr, vr]
    if float_mask:
        wrt_t.append(mt)
        wrt_r.append(mr)
    got = _loss_grads(o, lse, go, gl, wrt_t)
    want = _loss_grads(ro, rlse, go, gl, wrt_r)
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), got, want):
        assert a.shape == b.shape and a.dtype == (dtype if name != "dmask" else mt.dtype), name
        assert torch.isfinite(a).all(), f"{name} has NaN/inf"
        torch.testing.assert_close(a.to(F64), b, **btol, msg=lambda m, n=name: f"{n}: {m}")
    return o, lse


# Shapes from the small set: (Hq, Hkv, Lq, Lk, D) with GQA ratios 1 and 2.
SHAPES = [
    (2, 2, 1, 1, 16),
    (4, 2, 1, 97, 80),
    (4, 2, 7, 49, 16),
    (2, 2, 7, 97, 80),
    (4, 4, 32, 49, 80),
    (4, 2, 32, 97, 16),
    (2, 1, 32, 1, 16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "Hq{}_Hkv{}_Lq{}_Lk{}_D{}".format(*s))
def test_matches_reference_fp32(shape):
    Hq, Hkv, Lq, Lk, D = shape
    check(**_qkv(attention_inputs(B=2, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, dtype=F64, device=DEVICE)))


FP16_FWD = dict(atol=3e-3, rtol=3e-3)
FP16_BWD = dict(atol=1e-2, rtol=1e-2)  # fp16 dS/p rounding over ~100 keys, vs a float64 reference


@pytest.mark.parametrize(
    "shape", [SHAPES[2], SHAPES[3], SHAPES[5]], ids=lambda s: "Hq{}_Hkv{}_Lq{}_Lk{}_D{}".format(*s)
)
def test_matches_reference_fp16(shape):
    Hq, Hkv, Lq, Lk, D = shape
    x = attention_inputs(B=2, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, dtype=F64, device=DEVICE, pad_frac=0.3)
    check(**_qkv(x), key_padding_mask=x["key_padding_mask"], dtype=torch.float16, fwd_tol=FP16_FWD, bwd_tol=FP16_BWD)


def _qkv(x):
    return dict(q=x["query"], k=x["key"], v=x["value"])


def test_head_dim_96_and_value_dim_differs():
    x = attention_inputs(B=2, Hq=2, Hkv=1, Lq=7, Lk=49, D=96, Dv=24, dtype=F64, device=DEVICE)
    check(**_qkv(x), is_causal=True)


def test_key_padding_mask_with_all_padded_item():
    # B=3: item 0 half padded, item 2 fully padded (out 0, LSE -inf, zero grads).
    x = attention_inputs(B=3, Hq=4, Hkv=2, Lq=7, Lk=97, D=16, dtype=F64, device=DEVICE, pad_frac=0.5)
    o, lse = check(**_qkv(x), key_padding_mask=x["key_padding_mask"])
    assert torch.isneginf(lse[2]).all() and (o[2] == 0).all()


def test_bool_mask_with_all_masked_rows():
    x = attention_inputs(B=2, Hq=4, Hkv=2, Lq=7, Lk=49, D=16, dtype=F64, device=DEVICE)
    mask = torch.rand(2, 1, 7, 49, device=DEVICE) < 0.6  # broadcast over heads (stride 0)
    mask[:, :, 3] = False  # fully masked rows
    o, lse = check(**_qkv(x), attn_mask=mask)
    assert torch.isneginf(lse[:, :, 3]).all() and (o[:, :, 3] == 0).all()


@pytest.mark.parametrize("mask_shape", [(1, 4, 32, 97), (32, 97), (2, 1, 1, 97)], ids=str)
def test_float_mask_and_its_gradient(mask_shape):
    x = attention_inputs(B=2, Hq=4, Hkv=2, Lq=32, Lk=97, D=16, dtype=F64, device=DEVICE)
    mask = torch.randn(mask_shape, dtype=F64, device=DEVICE)
    mask[..., :5] = float("-inf")  # -inf entries act as masked keys
    check(**_qkv(x), attn_mask=mask)


def test_all_masks_together():
    x = attention_inputs(B=3, Hq=4, Hkv=2, Lq=7, Lk=49, D=80, dtype=F64, device=DEVICE, pad_frac=0.25)
    mask = torch.rand(3, 4, 7, 49, device=DEVICE) < 0.8
    check(**_qkv(x), key_padding_mask=x["key_padding_mask"], attn_mask=mask, is_causal=True)


@pytest.mark.parametrize("Lq,Lk", [(7, 49), (32, 7), (32, 32)], ids=["Lq<Lk", "Lq>Lk", "square"])
def test_causal_bottom_right(Lq, Lk):
    x = attention_inputs(B=2, Hq=2, Hkv=1, Lq=Lq, Lk=Lk, D=16, dtype=F64, device=DEVICE)
    o, lse = check(**_qkv(x), is_causal=True)
    if Lq > Lk:  # rows i < Lq - Lk see no key
        assert torch.isneginf(lse[:, :, : Lq - Lk]).all() and (o[:, :, : Lq - Lk] == 0).all()


@pytest.mark.parametrize("splits", [2, 3])
def test_dropout_matches_keep_mask_exactly(splits):
    x = attention_inputs(B=2, Hq=4, Hkv=2, Lq=7, Lk=97, D=16, dtype=F64, device=DEVICE, pad_frac=0.3)
    check(**_qkv(x), key_padding_mask=x["key_padding_mask"], dropout_p=0.3, num_splits=splits)


def test_dropout_reproducible_and_rate():
    x = attention_inputs(B=2, Hq=2, Lq=32, Lk=97, D=16, device=DEVICE)
    v1 = torch.ones_like(x["value"])  # out = sum_j p z = mean keep rate per row when p is uniform
    q0 = torch.zeros_like(x["query"])
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(mmfast.cross_attention(q0, x["key"], v1, dropout_p=0.25, backend="triton"))
    assert torch.equal(outs[0], outs[1])
    kept = outs[0][..., 0].mean().item()  # E = 1 (kept weights are scaled by 1/(1-p))
    assert abs(kept - 1.0) < 0.05


@pytest.mark.parametrize("splits,Lq,causal", [(2, 1, False), (4, 7, True), (3, 32, False)])
def test_split_kv(splits, Lq, causal):
    x = attention_inputs(B=3, Hq=2, Hkv=1, Lq=Lq, Lk=97, D=80, dtype=F64, device=DEVICE, pad_frac=0.6)
    check(**_qkv(x), key_padding_mask=x["key_padding_mask"], is_causal=causal, num_splits=splits)


def test_strided_inputs_and_out_into_slice():
    # (B, L, H, D) storage viewed as (B, H, L, D); out is the second half of a fusion buffer.
    x = attention_inputs(B=2, Hq=4, Hkv=2, Lq=7, Lk=49, D=16, dtype=F64, device=DEVICE, layout="blhd")
    assert not x["query"].is_contiguous()
    buf = poison_(torch.empty(2, 7, 4, 48, device=DEVICE))
    text = torch.randn(2, 7, 4, 32, device=DEVICE)
    buf[..., :32] = text
    out = buf[..., 32:].transpose(1, 2)  # (B, Hq, Lq, Dv) view, non-contiguous
    o, _ = check(**_qkv(x), out=out)
    assert o.data_ptr() == out.data_ptr() and torch.equal(buf[..., :32], text)
    assert not torch.isnan(buf).any()


def test_out_is_differentiable_through_buffer():
    x = attention_inputs(B=2, Hq=2, Lq=7, Lk=49, D=16, device=DEVICE, requires_grad=True)
    buf = torch.zeros(2, 2, 7, 32, device=DEVICE)
    o = mmfast.cross_attention(x["query"], x["key"], x["value"], out=buf[..., 16:], backend="triton")
    assert o.data_ptr() == buf[..., 16:].data_ptr()
    g = torch.randn_like(buf)
    (buf * g).sum().backward()
    q, k, v = (t.detach().requires_grad_() for t in (x["query"], x["key"], x["value"]))
    (ref_attention(q, k, v) * g[..., 16:]).sum().backward()
    for a, b in ((x["query"], q), (x["key"], k), (x["value"], v)):
        torch.testing.assert_close(a.grad, b.grad, **BWD_TOL[torch.float32])


def test_fully_masked_everything_gives_zeros_not_nan():
    x = attention_inputs(B=2, Hq=2, Lq=7, Lk=49, D=16, device=DEVICE, requires_grad=True)
    kpm = torch.ones(2, 49, dtype=torch.bool, device=DEVICE)
    o, lse = mmfast.cross_attention(**{**x, "key_padding_mask": kpm}, return_lse=True, backend="triton")
    assert (o == 0).all() and torch.isneginf(lse).all()
    o.sum().backward()
    for t in (x["query"], x["key"], x["value"]):
        assert (t.grad == 0).all()


def test_dispatch_reasons_and_errors():
    x = attention_inputs(B=1, Hq=2, Lq=3, Lk=5, D=16, dtype=F64, device=DEVICE)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        mmfast.cross_attention(**x, backend="triton")
    big = attention_inputs(B=1, Hq=1, Lq=2, Lk=3, D=257, device=DEVICE)
    with pytest.raises(RuntimeError, match="limit of 256"):
        mmfast.cross_attention(**big, backend="triton")
    mmfast.cross_attention(**big, backend="reference")  # the reference still takes it
    assert tca.reasons(dtype=torch.float32, D=256, Dv=256) == []


def test_custom_op_opcheck():
    x = attention_inputs(B=1, Hq=2, Hkv=1, Lq=5, Lk=20, D=16, device=DEVICE, requires_grad=True, pad_frac=0.3)
    q, k, v, kpm = x["query"], x["key"], x["value"], x["key_padding_mask"]
    torch.library.opcheck(
        torch.ops.mmfast.cross_attention_forward_triton, (q, k, v, kpm, None, True, 0.25, 0.0, torch.tensor(0), 0)
    )
    mask = torch.randn(1, 2, 5, 20, device=DEVICE)
    out, lse = torch.empty(1, 2, 5, 16, device=DEVICE), torch.empty(1, 2, 5, device=DEVICE)
    args = (q.detach(), k.detach(), v.detach(), None, mask, False, 0.25, 0.1, torch.tensor(5), 2, out, lse)
    torch.library.opcheck(torch.ops.mmfast.cross_attention_forward_out_triton, args)


@pytest.mark.parametrize("into_out", [False, True], ids=["functional", "out="])
def test_torch_compile_fullgraph(into_out):
    x = attention_inputs(B=1, Hq=2, Lq=5, Lk=20, D=16, device=DEVICE, requires_grad=True)

    def f(q, k, v):
        buf = torch.zeros(1, 2, 5, 24, device=q.device)
        out = buf[..., 8:] if into_out else None
        o, lse = mmfast.cross_attention(q, k, v, is_causal=True, out=out, return_lse=True, backend="triton")
        return (buf if into_out else o).sum() + lse.sum()

    args = (x["query"], x["key"], x["value"])
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(*args), args)
    want = torch.autograd.grad(f(*args), args)
    torch.testing.assert_close(got, want)


def test_compile_specs_cover_every_kernel_argument():
    names = set()
    for name, fn, sig, cx in tca.compile_specs():
        assert list(sig) == list(fn.arg_names), name
        assert all(sig[c] == "constexpr" for c in cx), name
        attrs = tca.compile_attrs(fn, sig)
        assert (fn.arg_names.index("Q" if "Q" in sig else "O"),) in attrs, name  # data pointers get alignment
        assert all(not sig[fn.arg_names[i]] == "constexpr" for (i,) in attrs), name
        names.add(fn.__name__)
    assert names == {"attn_fwd", "attn_merge", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"}


# ---------------------------------------------------------------- GPU, realistic sizes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "B,Hq,Hkv,Lq,Lk,D,causal",
    [
        (32, 12, 12, 32, 577, 64, False),
        (4, 8, 8, 1024, 1024, 64, True),
        (2, 16, 2, 77, 197, 128, False),
        (2, 4, 4, 77, 1024, 256, False),
    ],
)
def test_gpu_realistic(dtype, B, Hq, Hkv, Lq, Lk, D, causal):
    x = attention_inputs(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, dtype=F64, device="cuda", pad_frac=0.5)
    low = dtype != torch.float32
    tol_f = dict(atol=2e-2, rtol=2e-2) if low else FWD_TOL[dtype]
    tol_b = dict(atol=5e-2, rtol=5e-2) if low else dict(atol=5e-4, rtol=5e-4)
    check(
        **_qkv(x), key_padding_mask=x["key_padding_mask"], is_causal=causal, dtype=dtype, fwd_tol=tol_f, bwd_tol=tol_b
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_dropout_and_float_mask(dtype):
    x = attention_inputs(B=2, Hq=8, Hkv=2, Lq=77, Lk=577, D=96, dtype=F64, device="cuda")
    mask = torch.randn(1, 8, 77, 577, dtype=F64, device="cuda")
    low = dtype != torch.float32
    tol_f = dict(atol=2e-2, rtol=2e-2) if low else FWD_TOL[dtype]
    tol_b = dict(atol=5e-2, rtol=5e-2) if low else dict(atol=5e-4, rtol=5e-4)
    check(**_qkv(x), attn_mask=mask, dropout_p=0.1, dtype=dtype, fwd_tol=tol_f, bwd_tol=tol_b)


@pytest.mark.gpu
def test_gpu_auto_split_kv_matches_unsplit():
    x = attention_inputs(B=1, Hq=4, Lq=16, Lk=4096, D=64, dtype=torch.bfloat16, device="cuda", pad_frac=0.3)
    assert tca.auto_splits(1, 4, 16, 4096, torch.device("cuda")) > 1
    a = tca.triton_cross_attention(x["query"], x["key"], x["value"], key_padding_mask=x["key_padding_mask"])
    b = tca.triton_cross_attention(
        x["query"], x["key"], x["value"], key_padding_mask=x["key_padding_mask"], num_splits=1
    )
    torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
