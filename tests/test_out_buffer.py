"""``out=`` into a slice of a shared buffer keeps every gradient of that buffer, on every backend.

A fusion layer writes its text half into the buffer first and the attention half through
``cross_attention(..., out=view)``; the gradient of the text half must survive the in-place write.
"""

import pytest
import torch

import mmfast

BACKENDS = [b for b in ("reference", "cpu", "triton") if mmfast.backends()["cross_attention"][b]["available"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_through_a_shared_buffer(backend):
    B, H, Lq, Lk, D, Dt = 2, 3, 5, 11, 16, 7
    q = torch.randn(B, H, Lq, D, requires_grad=True)
    k = torch.randn(B, H, Lk, D, requires_grad=True)
    v = torch.randn(B, H, Lk, D, requires_grad=True)
    text = torch.randn(B, Lq, Dt, requires_grad=True)
    weight = torch.randn(B, Lq, Dt + H * D)

    def run(backend):
        buf = torch.full((B, Lq, Dt + H * D), float("nan"))
        buf[..., :Dt] = text
        view = buf[..., Dt:].view(B, Lq, H, D).transpose(1, 2)
        mmfast.cross_attention(q, k, v, out=view, backend=backend)
        (buf * weight).sum().backward()
        grads = [t.grad.clone() for t in (q, k, v, text)]
        for t in (q, k, v, text):
            t.grad = None
        return buf.detach(), grads

    want_buf, want = run("reference")
    got_buf, got = run(backend)
    torch.testing.assert_close(got_buf, want_buf, atol=2e-5, rtol=2e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[3], weight[..., :Dt])
