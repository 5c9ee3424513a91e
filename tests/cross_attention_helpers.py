"""Helpers for the cross-attention tests: run a backend and the float64 reference on the same inputs."""

from __future__ import annotations

import torch
from torch import Tensor
from utils import BWD_TOL, FWD_TOL

import mmfast
from mmfast.reference import cross_attention as ref_cross_attention


def leaves(*xs: Tensor | None) -> list[Tensor | None]:
    """Detached copies that require grad (None stays None; bool masks do not require grad)."""
    return [None if x is None else x.detach().clone().requires_grad_(x.is_floating_point()) for x in xs]


def run_with_grads(fn, q, k, v, attn_mask, grad_out, grad_lse=None, **kw) -> dict[str, Tensor | None]:
    """out, lse and every gradient of ``fn`` (mmfast.cross_attention-like) for upstream ``grad_out``
    on the output and ``grad_lse`` on the LSE's finite entries (the LSE is differentiable too)."""
    q, k, v, m = leaves(q, k, v, attn_mask)
    mask_grad = m is not None and m.is_floating_point()
    if m is not None and not mask_grad:
        m.requires_grad_(False)
    out, lse = fn(q, k, v, attn_mask=m, return_lse=True, **kw)
    loss = (out * grad_out.to(out.dtype)).sum()
    if grad_lse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0) * grad_lse.to(lse.dtype)).sum()
    loss.backward()
    return dict(out=out, lse=lse, dq=q.grad, dk=k.grad, dv=v.grad, dmask=m.grad if mask_grad else None)


def compare_with_reference(q, k, v, *, attn_mask=None, dropout_mask=None, grad_out=None, backend="cpu", **kw) -> dict:
    """Run ``backend`` in the inputs' dtype and the reference in float64; assert every result is close.

    Tolerances: the dtype's table; reduced-precision dtypes are compared against the reference run
    on the inputs rounded to that dtype (the rounding of q, k, v is not the kernel's error).
    Returns the backend's results.
    """
    dtype = q.dtype
    if grad_out is None:
        grad_out = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=torch.float64)
    # Own generator: callers seed torch's default one for the dropout seed the op draws.
    grad_lse = torch.randn(q.shape[:3], dtype=torch.float64, generator=torch.Generator().manual_seed(q.numel()))
    got = run_with_grads(mmfast.cross_attention, q, k, v, attn_mask, grad_out, grad_lse, backend=backend, **kw)

    def ref_fn(q, k, v, **kw2):
        return ref_cross_attention(q, k, v, dropout_mask=dropout_mask, **kw2)

    m64 = None if attn_mask is None else attn_mask.double() if attn_mask.is_floating_point() else attn_mask
    want = run_with_grads(ref_fn, q.double(), k.double(), v.double(), m64, grad_out, grad_lse, **kw)
    for name in ("out", "lse", "dq", "dk", "dv", "dmask"):
        if want[name] is None:
            assert got[name] is None, name
            continue
        g, w = got[name], want[name]
        assert g.shape == w.shape, name
        assert not torch.isnan(g).any(), f"{name} has NaN"
        tol = (FWD_TOL if name in ("out", "lse") else BWD_TOL)[dtype]
        if name == "lse":
            tol = FWD_TOL[torch.float64 if dtype == torch.float64 else torch.float32]
            fin = torch.isfinite(w)
            assert torch.equal(torch.isfinite(g), fin), "lse: -inf rows differ"
            g, w = g[fin], w[fin]
        # Gradients grow with Lq, Lk; compare relative to the gradient's scale.
        scale = max(1.0, w.abs().max().item()) if name not in ("out", "lse") else 1.0
        torch.testing.assert_close(g.double() / scale, w / scale, msg=lambda s, n=name: f"{n}: {s}", **tol)
    return got
