"""The CUDA cross-attention kernels, run on CPU under the SIMT emulation, against the reference.

csrc/emu/cross_attention_emu.cpp compiles csrc/cross_attention/kernel*.cuh (the same device code
and launch glue as the GPU build) as plain C++; every CUDA thread is an OS thread, so shapes stay
tiny. Each case checks out, lse, dq, dk, dv (and the float mask's gradient) against
mmfast.reference in float64 on the same rounded inputs, with the dropout mask rebuilt bit-exactly
from the counter hash. The `gpu`-marked tests at the end run the same checks on the registered
CUDA ops (torch.ops.mmfast.*) at realistic sizes when a GPU is visible.
"""

from __future__ import annotations

import pytest
import torch

import mmfast.reference as ref
from mmfast.reference.dropout import keep_mask
from tests import emu_build
from tests.utils import BWD_TOL, FWD_TOL, poison_

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp16 differs from bf16 only in the mma instruction and conversions: its repeats of the mask and
# layout cases are `slow` (CI's fast run keeps fp16 in the dense, causal, mask-gradient, dropout cases).
DTYPES_FP16_SLOW = [torch.float32, torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def emu():
    # torch's headers need C++20 (emu_build's default flags say C++17; the later flag wins).
    return emu_build.load_module(
        "cross_attention_emu", "emu/cross_attention_emu.cpp", extra_cflags=("-O2", "-std=c++20")
    )


def _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, layout="bhld"):
    def make(h, L, d):
        if layout == "blhd":
            return torch.randn(B, L, h, d).to(dtype).transpose(1, 2)
        return torch.randn(B, h, L, d).to(dtype)

    return make(Hq, Lq, D), make(Hkv, Lk, D), make(Hkv, Lk, Dv)


def _check(
    emu,
    q,
    k,
    v,
    *,
    kpm=None,
    mask=None,
    causal=False,
    dropout_p=0.0,
    splits=0,
    out=None,
    backward=True,
    seed=1234567890123,
):
    """Run the emulated forward (and backward) and compare every output with the reference."""
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D**-0.5
    mask_grad = mask is not None and mask.is_floating_point()
    o, lse = emu.forward(q, k, v, kpm, mask, causal, scale, dropout_p, seed, out=out, splits=splits)
    if out is not None:
        assert o.data_ptr() == out.data_ptr()

    keep = keep_mask(seed, B, Hq, Lq, Lk, dropout_p, device=q.device) if dropout_p > 0 else None
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    m64 = mask.detach().double().requires_grad_() if mask_grad else mask
    ro, rlse = ref.cross_attention(
        q64,
        k64,
        v64,
        key_padding_mask=kpm,
        attn_mask=m64,
        is_causal=causal,
        dropout_p=dropout_p,
        dropout_mask=keep,
        return_lse=True,
    )
    torch.testing.assert_close(o.double(), ro.detach(), **FWD_TOL[q.dtype])
    torch.testing.assert_close(lse.double(), rlse, **FWD_TOL[torch.float32])
    if not backward:
        return
    go = torch.randn_like(ro).to(q.dtype)
    gl = torch.randn_like(rlse).float()  # the LSE's gradient too (it is a differentiable output)
    dq, dk, dv, dm = emu.backward(
        go, q, k, v, o, lse, kpm, mask, causal, scale, dropout_p, seed, mask_grad, grad_lse=gl
    )
    (ro * go.double()).sum().add((torch.where(torch.isfinite(rlse), rlse, 0) * gl.double()).sum()).backward()
    tol = BWD_TOL[q.dtype]
    torch.testing.assert_close(dq.double(), q64.grad, **tol)
    torch.testing.assert_close(dk.double(), k64.grad, **tol)
    torch.testing.assert_close(dv.double(), v64.grad, **tol)
    if mask_grad:
        assert dm.shape == mask.shape and dm.dtype == mask.dtype
        mtol = BWD_TOL[mask.dtype] if mask.element_size() < q.element_size() else tol  # rounded to mask's dtype
        torch.testing.assert_close(dm.double(), m64.grad, **mtol)
    else:
        assert dm.numel() == 0


# D = 40 runs the 64-wide tiles, D = 100 / Dv = 72 the 128-wide ones (zero-padded columns).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,Dv", [(40, 40), (100, 72)])
def test_dense(emu, dtype, D, Dv):
    _check(emu, *_inputs(1, 2, 2, 19, 37, D, Dv, dtype))


@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW, ids=str)
def test_key_padding_mask_with_fully_padded_item(emu, dtype):
    q, k, v = _inputs(3, 2, 2, 7, 70, 64, 64, dtype)
    kpm = torch.rand(3, 70) < 0.4
    kpm[1] = True  # every key of item 1 is padding: out 0, lse -inf, zero gradients
    _check(emu, q, k, v, kpm=kpm)


@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW, ids=str)
def test_bool_mask_broadcast_with_empty_rows(emu, dtype):
    q, k, v = _inputs(2, 2, 2, 9, 41, 32, 32, dtype)
    mask = torch.rand(1, 2, 9, 41) < 0.6  # broadcast over the batch (stride 0)
    mask[0, 1, 3] = False  # an empty row
    _check(emu, q, k, v, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float_mask_gradient(emu, dtype):
    q, k, v = _inputs(2, 2, 1, 11, 45, 64, 64, dtype)
    mask = torch.randn(2, 1, 11, 45)  # broadcast over heads: its gradient sums over them
    mask[..., :3] = float("-inf")
    _check(emu, q, k, v, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float_mask_2d_half_precision_mask(emu, dtype):
    q, k, v = _inputs(1, 2, 2, 5, 23, 32, 32, dtype)
    mask = torch.randn(5, 23).to(torch.float16)  # (Lq, Lk), another float dtype than the inputs
    _check(emu, q, k, v, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk", [(13, 70), (70, 13), (66, 66)])
def test_causal_bottom_right(emu, dtype, Lq, Lk):
    # Lq > Lk leaves the first Lq - Lk query rows with no key at all.
    _check(emu, *_inputs(1, 2, 2, Lq, Lk, 32, 32, dtype), causal=True)


@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW, ids=str)
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 1)])
def test_gqa(emu, dtype, Hq, Hkv):
    _check(emu, *_inputs(1, Hq, Hkv, 7, 29, 64, 64, dtype))


@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW, ids=str)
def test_split_kv_matches(emu, dtype):
    q, k, v = _inputs(2, 2, 1, 5, 150, 64, 64, dtype)
    kpm = torch.zeros(2, 150, dtype=torch.bool)
    kpm[1, 40:] = True  # later splits of item 1 are empty: merged with weight 0
    _check(emu, q, k, v, kpm=kpm, splits=3, causal=False, backward=False)
    _check(emu, q, k, v, splits=2, causal=True, backward=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_bit_exact(emu, dtype):
    q, k, v = _inputs(2, 2, 2, 9, 37, 32, 32, dtype)
    _check(emu, q, k, v, dropout_p=0.3, seed=2**62 + 12345)


def test_dropout_with_split_kv(emu):
    q, k, v = _inputs(1, 2, 2, 3, 100, 32, 32, torch.float32)
    _check(emu, q, k, v, dropout_p=0.2, splits=2, backward=False)


@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW, ids=str)
def test_strided_inputs_and_out_slice(emu, dtype):
    q, k, v = _inputs(2, 2, 2, 7, 33, 32, 32, dtype, layout="blhd")  # (B, L, H, D).transpose(1, 2)
    buf = poison_(torch.empty(2, 7, 2, 3 * 32, dtype=dtype))  # Concat(T, Attn)-style buffer
    out = buf[..., 32:64].transpose(1, 2)
    _check(emu, q, k, v, out=out)
    assert torch.isnan(buf[..., :32]).all() and torch.isnan(buf[..., 64:]).all()  # nothing else written


def test_out_with_strided_last_dim(emu):
    q, k, v = _inputs(1, 2, 2, 5, 17, 16, 16, torch.float32)
    out = poison_(torch.empty(1, 2, 5, 32))[..., ::2]
    _check(emu, q, k, v, out=out, backward=False)


def test_unaligned_rows_take_the_element_path(emu):
    # D = 3: rows are 6 bytes apart, so no 16-byte cp.async; the element-wise loads must agree.
    _check(emu, *_inputs(1, 2, 2, 4, 9, 3, 5, torch.bfloat16))
    _check(emu, *_inputs(1, 1, 1, 1, 1, 1, 1, torch.float32))


def test_head_dim_above_limit_names_it(emu):
    q, k, v = _inputs(1, 1, 1, 2, 2, 160, 160, torch.float32)
    with pytest.raises(RuntimeError, match="up to 128"):
        emu.forward(q, k, v, None, None, False, 1.0, 0.0, 0)


def test_bad_inputs_name_the_argument(emu):
    q, k, v = _inputs(2, 2, 2, 3, 5, 16, 16, torch.float32)
    with pytest.raises(RuntimeError, match="key_padding_mask"):
        emu.forward(q, k, v, torch.zeros(2, 5), None, False, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="multiple of key heads"):
        emu.forward(q, k[:, :1].expand(2, 3, 5, 16), v[:, :1].expand(2, 3, 5, 16), None, None, False, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="out must have shape"):
        emu.forward(q, k, v, None, None, False, 1.0, 0.0, 0, out=torch.empty(2, 2, 3, 15))


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("poison", ["query-row", "inf-key", "nan-scale"])
def test_non_finite_rows(emu, splits, poison):
    """docs/numerics.md: a NaN query row, or an allowed +inf score, makes that row's out and lse NaN
    (also through the split-KV merge); the other rows equal the reference; fully padded rows 0, -inf."""
    q, k, v = _inputs(2, 2, 1, 9, 70, 40, 40, torch.float32)
    kpm = torch.zeros(2, 70, dtype=torch.bool)
    kpm[1] = True  # item 1 fully padded
    scale = 40**-0.5
    if poison == "query-row":
        q[0, 1, 4, 7] = float("nan")
    elif poison == "inf-key":
        k[0, 0, 33] = float("inf")
    else:
        scale = float("nan")
    o, lse = emu.forward(q, k, v, kpm, None, False, scale, 0.0, 0, splits=splits)
    ro, rl = ref.cross_attention(q.double(), k.double(), v.double(), key_padding_mask=kpm, scale=scale, return_lse=True)
    bad = torch.isnan(ro).any(-1)
    assert bad.any() and torch.equal(torch.isnan(o).any(-1), bad) and torch.equal(torch.isnan(lse), torch.isnan(rl))
    assert (o[1] == 0).all() and (lse[1] == float("-inf")).all()
    torch.testing.assert_close(o.double()[~bad], ro[~bad], **FWD_TOL[torch.float32])


# ---- the same checks on a real GPU (torch.ops.mmfast.* registered by cuda.cu) -------------------


class _CudaOps:
    """The CUDA ops with the emulation module's signature (`splits` is left to the heuristic)."""

    def forward(self, q, k, v, kpm, mask, causal, scale, p, seed, out=None, splits=0):
        seed = torch.tensor(seed)
        if out is None:
            return torch.ops.mmfast.cross_attention_forward(q, k, v, kpm, mask, causal, scale, p, seed)
        return out, torch.ops.mmfast.cross_attention_forward_out(q, k, v, kpm, mask, causal, scale, p, seed, out)

    def backward(self, go, q, k, v, o, lse, kpm, mask, causal, scale, p, seed, mask_grad, grad_lse=None):
        return torch.ops.mmfast.cross_attention_backward(
            go, q, k, v, o, lse, grad_lse, kpm, mask, causal, scale, p, torch.tensor(seed), mask_grad
        )


@pytest.fixture(scope="module")
def cuda_ops():
    from mmfast import _dispatch

    ext, why = _dispatch.extension()
    if ext is None or not getattr(ext, "with_cuda", False):
        pytest.fail(f"a GPU is visible but mmfast._C has no CUDA kernels: {why or 'built without CUDA'}")
    return _CudaOps()


def _gpu(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_text_to_image_with_padding(cuda_ops, dtype):
    q, k, v = _gpu(*_inputs(4, 12, 12, 77, 577, 64, 64, dtype, layout="blhd"))
    kpm = torch.rand(4, 577, device="cuda") < 0.3
    kpm[-1] = True
    _check(cuda_ops, q, k, v, kpm=kpm)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_square_causal_gqa(cuda_ops, dtype):
    _check(cuda_ops, *_gpu(*_inputs(2, 8, 2, 1024, 1024, 128, 128, dtype)), causal=True)


@pytest.mark.gpu
def test_gpu_short_queries_split_kv_float_mask(cuda_ops):
    # 2 x 4 heads x 1 query tile = 8 blocks: the heuristic splits the 1024 keys.
    q, k, v = _gpu(*_inputs(2, 4, 4, 32, 1024, 64, 64, torch.bfloat16))
    mask = torch.randn(2, 1, 32, 1024, device="cuda")
    _check(cuda_ops, q, k, v, mask=mask)


@pytest.mark.gpu
def test_gpu_dropout_bool_mask_out_slice(cuda_ops):
    q, k, v = _gpu(*_inputs(2, 4, 4, 128, 197, 80, 80, torch.float32))
    mask = torch.rand(128, 197, device="cuda") < 0.8
    out = torch.empty(2, 128, 4, 160, device="cuda")[..., 80:].transpose(1, 2)
    _check(cuda_ops, q, k, v, mask=mask, dropout_p=0.1, out=out)
