"""The ops' contracts (docs/ops.md), one set of cases run over every backend present here.

Backends: cpu, reference, triton (the interpreter on CPU tensors when no GPU is visible; fp32 and
fp16 only), cuda on a GPU, and the CUDA kernels under the SIMT emulation ("emu", called through
their test modules). Each clause: outputs, shapes and dtypes, the statistics' layout, what is
differentiable (the LSE too), ``out=`` returning ``out``, second-order gradients, and the shared
dropout mask.
"""

from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast import _dispatch
from mmfast.reference import cross_attention as ref_attention
from mmfast.reference.dropout import draw_seed, keep_mask
from tests import contrastive_backends as cb
from tests import emu_build
from tests.utils import attention_inputs, contrastive_inputs

DISPATCHED = [b for b in ("cpu", "reference", "triton", "cuda") if _dispatch.availability(b) is None]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _dtypes(backend: str) -> list[torch.dtype]:
    if backend == "triton":
        return [torch.float32] if DEVICE == "cpu" else [torch.float32, torch.bfloat16]
    if backend == "cuda":
        return [torch.float32, torch.bfloat16]
    return [torch.float32, torch.bfloat16, torch.float64]


CASES = [(b, dt) for b in DISPATCHED for dt in _dtypes(b)]
IDS = [f"{b}-{str(dt).split('.')[1]}" for b, dt in CASES]


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- cross_attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
def test_cross_attention_outputs_and_lse_gradient(backend, dtype):
    """out in query's dtype; the LSE float32 (float64 for float64) and differentiable: the gradient
    of the LSE alone equals the reference's (sum_j p_ij scale k_j for dq)."""
    x = attention_inputs(B=2, Hq=4, Hkv=2, Lq=9, Lk=21, D=16, Dv=24, dtype=dtype, device=DEVICE, pad_frac=0.3)
    q, k, v = (t.detach().requires_grad_() for t in (x["query"], x["key"], x["value"]))
    out, lse = mmfast.cross_attention(q, k, v, key_padding_mask=x["key_padding_mask"], return_lse=True, backend=backend)
    assert out.shape == (2, 4, 9, 24) and out.dtype == dtype
    assert lse.shape == (2, 4, 9) and lse.dtype == _lse_dtype(dtype) and lse.requires_grad
    g = torch.randn(lse.shape, dtype=lse.dtype, device=DEVICE)
    dq, dk = torch.autograd.grad((torch.where(torch.isfinite(lse), lse, 0) * g).sum(), (q, k))
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    _, lse64 = ref_attention(q64, k64, v.detach().double(), key_padding_mask=x["key_padding_mask"], return_lse=True)
    want = torch.autograd.grad((torch.where(torch.isfinite(lse64), lse64, 0) * g.double()).sum(), (q64, k64))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for got, w in zip((dq, dk), want):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), w, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", DISPATCHED)
def test_cross_attention_out_is_returned_and_second_order_is_refused(backend):
    x = attention_inputs(B=1, Hq=2, Lq=5, Lk=7, D=8, device=DEVICE, requires_grad=True)
    buf = torch.zeros(1, 5, 2, 16, device=DEVICE)
    out = buf[..., 4:12].transpose(1, 2)
    assert mmfast.cross_attention(x["query"], x["key"], x["value"], out=out, backend=backend) is out
    o = mmfast.cross_attention(x["query"], x["key"], x["value"], backend=backend)
    (dq,) = torch.autograd.grad(o.square().sum(), x["query"], create_graph=True)
    if backend == "reference":
        assert dq.requires_grad
        return
    with pytest.raises(NotImplementedError, match="double backward"):
        dq.sum().backward()


@pytest.mark.parametrize("backend", DISPATCHED)
def test_cross_attention_dropout_mask_is_shared(backend):
    """The same torch seed drops the same weights on every backend: the reference given the kernels'
    keep mask for that seed is what every backend computes."""
    x = attention_inputs(B=2, Hq=2, Lq=7, Lk=19, D=16, device=DEVICE)
    torch.manual_seed(5)
    got = mmfast.cross_attention(x["query"], x["key"], x["value"], dropout_p=0.4, backend=backend)
    torch.manual_seed(5)
    keep = keep_mask(draw_seed(), 2, 2, 7, 19, 0.4, device=DEVICE)
    want = ref_attention(x["query"].double(), x["key"].double(), x["value"].double(), dropout_mask=keep, dropout_p=0.4)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def cross_attention_emu():
    return emu_build.load_module(
        "cross_attention_emu", "emu/cross_attention_emu.cpp", extra_cflags=("-O2", "-std=c++20")
    )


def test_cross_attention_emulated_cuda_layout(cross_attention_emu):
    """The CUDA kernels (emulated) return the same layout: out in the input dtype, a float32 LSE, and
    take the LSE's gradient."""
    x = attention_inputs(B=1, Hq=2, Lq=5, Lk=9, D=16, dtype=torch.bfloat16)
    q, k, v = x["query"], x["key"], x["value"]
    out, lse = cross_attention_emu.forward(q, k, v, None, None, False, 0.25, 0.0, 0)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, 5, 16)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 5)
    dq, dk, dv, _ = cross_attention_emu.backward(
        torch.zeros_like(out), q, k, v, out, lse, None, None, False, 0.25, 0.0, 0, False, grad_lse=torch.ones_like(lse)
    )
    assert dq.dtype == torch.bfloat16 and dq.abs().sum() > 0 and (dv == 0).all()  # only the LSE's gradient


# ---- info_nce and siglip_loss ---------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("op", ["info_nce", "siglip_loss"])
def test_contrastive_outputs_and_gradients(op, backend, dtype):
    """The loss is float32 (float64 for float64 inputs), per row with reduction='none'; the features'
    gradients come back in their dtype, the scale's and the bias's as 0-dim tensors."""
    inp = contrastive_inputs(N=19, D=24, dtype=dtype, device=DEVICE, requires_grad=True)
    x, y, s, b = inp["image_features"], inp["text_features"], inp["logit_scale"], inp["logit_bias"]
    args = (x, y, s) if op == "info_nce" else (x, y, s, b)
    loss = getattr(mmfast, op)(*args, reduction="none", backend=backend)
    assert loss.shape == (19,) and loss.dtype == _lse_dtype(dtype)
    grads = torch.autograd.grad(loss.sum(), args)
    assert grads[0].dtype == grads[1].dtype == dtype and all(g.shape == () for g in grads[2:])
    (dx,) = torch.autograd.grad(getattr(mmfast, op)(*args, backend=backend), x, create_graph=True)
    if backend == "reference":
        return
    with pytest.raises(NotImplementedError, match="double backward"):
        dx.sum().backward()


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton", "emu") if cb.skip_reason(b, torch.float32) is None])
def test_contrastive_statistics_layout(backend):
    """The kernels' statistics: one log-sum-exp per row (N,) and per column (M,), float32."""
    inp = contrastive_inputs(N=13, M=13, D=8)
    x, y = inp["image_features"], inp["text_features"]
    s, b = torch.tensor(5.0), torch.tensor(0.0)
    if backend == "emu":
        _, row, col = cb.emu_module().forward(x, y, s, b, None, 0, 0, 0, 2)
    elif backend == "cpu":
        _, row, col = torch.ops.mmfast.contrastive_forward(x, y, s, b, None, 0, 0, 0)
    else:
        from mmfast.triton import contrastive as tc  # noqa: PLC0415

        _, row, col = tc.contrastive_forward(x, y, s, b, None, 0, 0, 0)  # the triton custom op
    assert row.shape == (13,) and col.shape == (13,) and row.dtype == col.dtype == torch.float32
    S = 5.0 * x.double() @ y.double().t()
    torch.testing.assert_close(row.double(), S.logsumexp(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(col.double(), S.logsumexp(0), atol=1e-5, rtol=1e-5)
