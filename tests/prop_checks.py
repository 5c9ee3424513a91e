"""Comparison with the float64 reference for the property tests: non-finite patterns, then values
within a bound derived from the dtype's tolerance table, the problem's conditioning, the rounding
of low-precision operands and PyTorch's own error at the same precision.

For a result T (an output or a gradient) with float64 reference R, the kernel's value G passes when,
elementwise on the entries where R is finite,

    |G - R| <= atol * max(1, max|R|) + rtol * |R|          (the dtype's table, tests/utils.py)
             + 8 * logit_err * natural(T)                   (conditioning: large logits)
             + 2 * u_in * natural(T)                        (operands rounded to the input dtype)
             + 2 * err_torch(T)                             (PyTorch's own error in that dtype)

* ``natural(T)`` bounds |T| term by term from the inputs' magnitudes (the caller derives it per
  result: e.g. |out| <= max|v|, |dx_i| <= |s| * max|y| * the row weights): the size of the sums a
  result is made of, which a cancelling reference (R ~ 0) does not show.
* ``logit_err`` bounds the rounding error of one logit computed with fp32 accumulation:
  (sqrt(D) + 2) * u * (|scale| * max_ij sum_d |a_id b_jd| + max|additive mask|), u the unit
  roundoff of the accumulation (2^-24; 2^-53 for float64). A softmax moves by at most twice the
  largest logit error (relative), so every result moves by at most ~2 * logit_err times its
  natural magnitude. At ordinary scales this term is far below the table's; at scale 1e3 it is
  what fp32 can honestly promise.
* ``u_in`` is the unit roundoff of the inputs' dtype when it is bf16 (2^-8) or fp16 (2^-11), else
  0: bf16 / fp16 kernels round the probabilities or gradient tiles to that dtype for the tensor
  products (as flash-attention does), which moves a sum by up to u_in times its terms' size.
* ``err_torch`` is max |naive PyTorch in the same dtype - R| (flash-attention's criterion): a kernel
  may be as inaccurate as twice PyTorch at that precision. 0 for float64.

Non-finite entries must match exactly: NaN where R is NaN, +inf / -inf where R is, except where
|R| exceeds the result dtype's largest finite value (an inf of R's sign is then IEEE overflow).
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


def operand_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of low-precision operands (bf16, fp16); 0 for fp32 and float64."""
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(dtype, 0.0)


def check_close(
    name: str,
    got: Tensor | None,
    ref: Tensor | None,
    dtype: torch.dtype,
    forward: bool,
    natural: float = 1.0,
    logit_err: float = 0.0,
    err_torch: float = 0.0,
    operands: torch.dtype | None = None,
) -> None:
    """Assert ``got`` (of dtype ``dtype``; inputs of dtype ``operands``, default ``dtype``) matches
    the float64 ``ref`` as described in the module docstring."""
    assert (got is None) == (ref is None), f"{name}: got {'None' if got is None else 'a tensor'}, reference differs"
    if ref is None:
        return
    assert tuple(got.shape) == tuple(ref.shape), f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    g = got.detach().double()
    nan_ok = torch.equal(torch.isnan(g), torch.isnan(ref))
    assert nan_ok, (
        f"{name}: NaN at {_where(torch.isnan(g) != torch.isnan(ref))} (got NaN: {torch.isnan(g).sum()}, reference: {torch.isnan(ref).sum()})"
    )
    overflow = ref.abs() >= torch.finfo(got.dtype).max  # IEEE overflow of the result's dtype
    g_inf, r_inf = torch.isinf(g) & ~overflow, torch.isinf(ref) & ~overflow
    inf_ok = torch.equal(g_inf, r_inf) and torch.equal(g[g_inf], ref[r_inf])
    assert inf_ok, f"{name}: +-inf pattern differs at {_where(g_inf != r_inf)}"
    assert not (overflow & (g.sign() != ref.sign())).any(), f"{name}: an overflowing entry has the wrong sign"
    fin = torch.isfinite(ref) & ~overflow
    if not fin.any():
        return
    g, r = g[fin], ref[fin]
    tol = (FWD_TOL if forward else BWD_TOL)[dtype]
    u_in = operand_roundoff(operands or dtype)
    bound = (
        tol["atol"] * max(1.0, r.abs().max().item())
        + tol["rtol"] * r.abs()
        + (8 * logit_err + 2 * u_in) * natural
        + 2 * err_torch
    )
    excess = (g - r).abs() - bound
    if (excess > 0).any():
        i = int(excess.argmax())
        raise AssertionError(
            f"{name}: max |got - ref| = {(g - r).abs().max().item():.3g} exceeds the bound "
            f"(worst element: got {g[i].item():.6g}, ref {r[i].item():.6g}, bound {bound[i].item():.3g}; "
            f"table {tol}, logit_err {logit_err:.3g}, u_in {u_in:.3g}, natural {natural:.3g}, err_torch {err_torch:.3g})"
        )


def _where(mask: Tensor) -> str:
    idx = mask.nonzero()
    return f"{idx[:3].tolist()}{' ...' if len(idx) > 3 else ''} ({len(idx)} entries)"
