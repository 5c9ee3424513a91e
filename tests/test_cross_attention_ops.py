"""mmfast.cross_attention, cpu backend: dropout, float64 gradcheck, torch.library.opcheck,
torch.compile(fullgraph=True) and bad inputs."""

from __future__ import annotations

import pytest
import torch
from cross_attention_helpers import compare_with_reference
from utils import attention_inputs

import mmfast
from mmfast.reference.dropout import draw_seed, keep_mask

OPS = torch.ops.mmfast


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,p", [(2, 4, 2, 7, 49, 32, 0.1), (1, 2, 2, 32, 1100, 16, 0.5)])
def test_dropout_matches_reference_mask(B, Hq, Hkv, Lq, Lk, D, p):
    """The kernel drops exactly keep_mask(seed) (seed drawn from torch's generator), in the forward
    and in the backward: out and every gradient equal the reference given that mask."""
    x = attention_inputs(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, pad_frac=0.2)
    grad_out = torch.randn(B, Hq, Lq, D, dtype=torch.float64)
    torch.manual_seed(1234)
    seed = draw_seed()
    mask = keep_mask(seed, B, Hq, Lq, Lk, p)
    torch.manual_seed(1234)  # the op draws the same seed
    compare_with_reference(
        x["query"],
        x["key"],
        x["value"],
        key_padding_mask=x["key_padding_mask"],
        dropout_p=p,
        dropout_mask=mask,
        grad_out=grad_out,
    )


def test_dropout_rate_and_seeding():
    """Kept fraction ~ 1 - p; the same torch seed reproduces the output, another seed changes it."""
    B, H, Lq, Lk, p = 2, 4, 64, 512, 0.3
    q = torch.randn(B, H, Lq, 8) * 1e-3  # near-uniform attention: out ~ (kept / Lk) / (1 - p)
    k = torch.randn(B, H, Lk, 8)
    v = torch.ones(B, H, Lk, 8)
    torch.manual_seed(7)
    out = mmfast.cross_attention(q, k, v, dropout_p=p, backend="cpu")
    kept = (out[..., 0] * (1 - p)).mean().item()
    n = B * H * Lq * Lk
    assert abs(kept - (1 - p)) < 6 * (p * (1 - p) / n) ** 0.5 + 1e-3
    torch.manual_seed(7)
    assert torch.equal(out, mmfast.cross_attention(q, k, v, dropout_p=p, backend="cpu"))
    assert not torch.equal(out, mmfast.cross_attention(q, k, v, dropout_p=p, backend="cpu"))


def test_gradcheck_float64():
    """Finite differences vs the analytic backward, with padding, a broadcast float mask that
    receives a gradient, causal, GQA and dropout (fixed seed)."""
    x = attention_inputs(B=2, Hq=4, Hkv=2, Lq=5, Lk=7, D=3, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, 5:] = True
    mask = torch.randn(1, 4, 5, 7, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, m):
        return OPS.cross_attention_forward(q, k, v, kpm, m, True, 0.7, 0.2, torch.tensor(12345))[0]

    assert torch.autograd.gradcheck(fn, (x["query"], x["key"], x["value"], mask))


def test_gradcheck_out_path_float64():
    x = attention_inputs(B=1, Hq=2, Hkv=1, Lq=3, Lk=6, D=4, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v):
        buf = torch.zeros(1, 3, 2, 12, dtype=torch.float64)
        return mmfast.cross_attention(q, k, v, out=buf[..., 4:8].transpose(1, 2), backend="cpu") * 1.0

    assert torch.autograd.gradcheck(fn, (x["query"], x["key"], x["value"]))


def opcheck_args(requires_grad: bool):
    x = attention_inputs(B=2, Hq=4, Hkv=2, Lq=5, Lk=9, D=8, requires_grad=requires_grad, pad_frac=0.3)
    mask = torch.randn(4, 5, 9, requires_grad=requires_grad)
    return x["query"], x["key"], x["value"], x["key_padding_mask"], mask, False, 0.35, 0.0, torch.tensor(0)


def test_opcheck():
    args = opcheck_args(requires_grad=True)
    torch.library.opcheck(OPS.cross_attention_forward.default, args)
    q, k, v, kpm, mask = args[:5]
    out, lse = OPS.cross_attention_forward(*args)
    torch.library.opcheck(OPS.cross_attention_forward_out.default, (*opcheck_args(False), torch.empty(2, 4, 5, 8)))
    # The backward op is not differentiable (double backward raises), so its inputs do not require grad.
    q, k, v, mask, out, lse = (t.detach() for t in (q, k, v, mask, out, lse))
    dlse = torch.randn_like(lse)
    bwd_args = (torch.randn_like(out), q, k, v, out, lse, dlse, kpm, mask, True, 0.35, 0.1, torch.tensor(3), True)
    torch.library.opcheck(OPS.cross_attention_backward.default, bwd_args)


def test_torch_compile_fullgraph():
    x = attention_inputs(B=2, Hq=4, Hkv=2, Lq=7, Lk=33, D=16, requires_grad=True, pad_frac=0.3)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(q, k, v, kpm):
        return mmfast.cross_attention(q, k, v, key_padding_mask=kpm, backend="cpu").square().sum()

    loss = fn(x["query"], x["key"], x["value"], x["key_padding_mask"])
    grads = torch.autograd.grad(loss, (x["query"], x["key"], x["value"]))
    want = mmfast.cross_attention(
        x["query"], x["key"], x["value"], key_padding_mask=x["key_padding_mask"], backend="reference"
    )
    want_grads = torch.autograd.grad(want.square().sum(), (x["query"], x["key"], x["value"]))
    torch.testing.assert_close(loss, want.square().sum())
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def _bad_cases():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    meta = torch.randn(2, 2, 9, 8, device="meta")
    return [
        ("query rank", (q[0], k, v), {}, ValueError, "query must have 4 dims"),
        ("key rank", (q, k[0], v), {}, ValueError, "key must have 4 dims"),
        ("batch mismatch", (q, k[:1], v[:1]), {}, ValueError, "batch sizes differ"),
        ("D mismatch", (q, k[..., :4], v), {}, ValueError, "head dim D=8 but key has 4"),
        ("value length", (q, k, v[:, :, :8]), {}, ValueError, "value must have key's heads and length"),
        ("Hq % Hkv", (q, torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)), {}, ValueError, "multiple of"),
        ("int query", (q.long(), k, v), {}, TypeError, "query must be float32"),
        ("mixed dtypes", (q, k.double(), v), {}, TypeError, "key has dtype"),
        ("mixed devices", (q, meta, v), {}, ValueError, "key is on meta"),
        ("kpm dtype", (q, k, v), dict(key_padding_mask=kpm.float()), TypeError, "key_padding_mask must be bool"),
        ("kpm shape", (q, k, v), dict(key_padding_mask=kpm[:, :8]), ValueError, "key_padding_mask must have shape"),
        ("mask dtype", (q, k, v), dict(attn_mask=torch.ones(5, 9, dtype=torch.int32)), TypeError, "attn_mask must be"),
        ("mask shape", (q, k, v), dict(attn_mask=torch.ones(3, 5, 9)), ValueError, "attn_mask of shape"),
        ("mask rank", (q, k, v), dict(attn_mask=torch.ones(1, 2, 4, 5, 9)), ValueError, "attn_mask of shape"),
        ("dropout", (q, k, v), dict(dropout_p=1.0), ValueError, "dropout_p"),
        ("out shape", (q, k, v), dict(out=torch.empty(2, 4, 5, 7)), ValueError, "out must have shape"),
        ("out dtype", (q, k, v), dict(out=torch.empty(2, 4, 5, 8, dtype=torch.float64)), TypeError, "out must be"),
        ("out overlaps", (q, k, v), dict(out=torch.empty(8).expand(2, 4, 5, 8)), ValueError, "overlap"),
        ("out aliases query", (q, k, v), dict(out=q), ValueError, "share memory"),
        ("scale type", (q, k, v), dict(scale=torch.tensor(1.0)), TypeError, "scale must be"),
        ("head dim limit", (torch.randn(1, 1, 2, 300),) * 3, dict(backend="cpu"), RuntimeError, "limit of 256"),
        ("unknown backend", (q, k, v), dict(backend="gpu"), ValueError, "backend='gpu'"),
    ]


@pytest.mark.parametrize("name,args,kw,exc,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs(name, args, kw, exc, match):
    kw.setdefault("backend", "cpu")
    with pytest.raises(exc, match=match):
        mmfast.cross_attention(*args, **kw)


def test_lse_rows_empty():
    """return_lse gives float32 LSE; an all-padded item gives -inf and 0 (its gradient: see test_edges)."""
    x = attention_inputs(B=3, Hq=2, Lq=4, Lk=6, D=8, requires_grad=True, pad_frac=0.5)
    out, lse = mmfast.cross_attention(
        x["query"], x["key"], x["value"], key_padding_mask=x["key_padding_mask"], return_lse=True, backend="cpu"
    )
    assert lse.dtype == torch.float32 and lse.requires_grad and out.requires_grad
    assert (lse[-1] == float("-inf")).all() and (out[-1] == 0).all() and torch.isfinite(lse[:-1]).all()


def test_double_backward_raises():
    x = attention_inputs(B=1, Hq=2, Lq=3, Lk=5, D=4, requires_grad=True)
    out = mmfast.cross_attention(x["query"], x["key"], x["value"], backend="cpu")
    (dq,) = torch.autograd.grad(out.sum(), (x["query"],), create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        dq.sum().backward()
