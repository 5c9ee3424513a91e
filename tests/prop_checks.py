"""Comparison with the float64 reference for the property tests: non-finite patterns, then values
within a bound derived from the dtype's tolerance table, the problem's conditioning and PyTorch's
own error at the same precision.

For a result T (an output or a gradient) with float64 reference R, the kernel's value G passes when,
elementwise on the entries where R is finite,

    |G - R| <= atol * max(1, max|R|) + rtol * |R|          (the dtype's table, tests/utils.py)
             + 8 * logit_err * natural(T)                   (conditioning: large logits)
             + 2 * err_torch(T)                             (PyTorch's own error in that dtype)

* ``logit_err`` bounds the rounding error of one logit computed with fp32 accumulation:
  (sqrt(D) + 2) * u * (|scale| * max_ij sum_d |a_id b_jd| + max|additive mask|), u the unit
  roundoff of the accumulation (2^-24; 2^-53 for float64). A softmax moves by at most twice the
  largest logit error (relative), so every result moves by at most ~2 * logit_err times its
  natural magnitude ``natural(T)``, a bound on |T| from the inputs' magnitudes (the caller
  derives it per result). At ordinary scales this term is far below the table's; at scale 1e3 it
  is what fp32 can honestly promise.
* ``err_torch`` is max |naive PyTorch in the same dtype - R| (flash-attention's criterion): a kernel
  may be as inaccurate as twice PyTorch at that precision. 0 for float64.

Non-finite entries must match exactly: NaN where R is NaN, +inf / -inf where R is.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from utils import BWD_TOL, FWD_TOL


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the accumulation the kernels use for ``dtype`` inputs (fp32 for low precision)."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def logit_error(a: Tensor, b: Tensor, scale: float, dtype: torch.dtype, extra: float = 0.0) -> float:
    """Bound on one logit's rounding error, a (n, D) x b (m, D) -> scale * a @ b.T (+ a mask of size
    ``extra``), accumulated in fp32 (float64 for float64)."""
    if a.numel() == 0 or b.numel() == 0:
        return 0.0
    absdot = (a.abs().double() @ b.abs().double().t()).max().item()
    return (math.sqrt(a.shape[-1]) + 2) * unit_roundoff(dtype) * (abs(scale) * absdot + extra)


def max_err(got: Tensor, ref: Tensor) -> float:
    """max |got - ref| over entries where both are finite (0 when there are none)."""
    fin = torch.isfinite(ref) & torch.isfinite(got)
    if not fin.any():
        return 0.0
    return (got.double()[fin] - ref[fin]).abs().max().item()


def check_close(
    name: str,
    got: Tensor | None,
    ref: Tensor | None,
    dtype: torch.dtype,
    forward: bool,
    natural: float = 1.0,
    logit_err: float = 0.0,
    err_torch: float = 0.0,
) -> None:
    """Assert ``got`` matches the float64 ``ref`` as described in the module docstring."""
    assert (got is None) == (ref is None), f"{name}: got {'None' if got is None else 'a tensor'}, reference differs"
    if ref is None:
        return
    assert tuple(got.shape) == tuple(ref.shape), f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    g = got.detach().double()
    nan_ok = torch.equal(torch.isnan(g), torch.isnan(ref))
    assert nan_ok, (
        f"{name}: NaN at {_where(torch.isnan(g) != torch.isnan(ref))} (got NaN: {torch.isnan(g).sum()}, reference: {torch.isnan(ref).sum()})"
    )
    inf_ok = torch.equal(torch.isposinf(g), torch.isposinf(ref)) and torch.equal(torch.isneginf(g), torch.isneginf(ref))
    assert inf_ok, f"{name}: +-inf pattern differs at {_where(torch.isinf(g) != torch.isinf(ref))}"
    fin = torch.isfinite(ref)
    if not fin.any():
        return
    g, r = g[fin], ref[fin]
    tol = (FWD_TOL if forward else BWD_TOL)[dtype]
    bound = (
        tol["atol"] * max(1.0, r.abs().max().item()) + tol["rtol"] * r.abs() + 8 * logit_err * natural + 2 * err_torch
    )
    excess = (g - r).abs() - bound
    if (excess > 0).any():
        i = int(excess.argmax())
        raise AssertionError(
            f"{name}: max |got - ref| = {(g - r).abs().max().item():.3g} exceeds the bound "
            f"(worst element: got {g[i].item():.6g}, ref {r[i].item():.6g}, bound {bound[i].item() if bound.dim() else bound:.3g}; "
            f"table {tol}, logit_err {logit_err:.3g} x natural {natural:.3g}, err_torch {err_torch:.3g})"
        )


def _where(mask: Tensor) -> str:
    idx = mask.nonzero()
    return f"{idx[:3].tolist()}{' ...' if len(idx) > 3 else ''} ({len(idx)} entries)"
