"""docs/numerics.md on every backend: NaN / Inf placement, masked garbage, fully masked rows,
empty dimensions (cross_attention; the contrastive losses: test_numerics_contrastive.py).

NaN placement is checked against a dependency oracle: an output or gradient entry must be NaN
exactly when it depends on a poisoned input entry, which the float64 reference tells by a finite
perturbation of those entries (entries that change depend on them; the reference is only ever run
on finite inputs, so its own NaN handling is not assumed). Every other entry must equal the clean
reference's value. Masked key / value rows carry large finite garbage, which must not matter at all;
nothing is asserted for NaN / inf in masked K/V rows (unspecified by the policy: tile products
multiply them by p = 0).

Empty dimensions and NaN scales run in a worker subprocess (tests/numerics_cases.py): a backend
that dies on them (SIGFPE) fails those cases alone.
"""

from __future__ import annotations

import math

import pytest
import torch
from numerics_cases import CASES
from prop_checks import check_close, logit_error
from strategies import AttnCase, bf16, f16, f32, f64
from subproc import check, run_cases
from test_properties_cross_attention import _upstream, run_op, run_reference
from utils import BWD_TOL, FWD_TOL

BACKENDS = ["cpu", "reference", "triton", "emulated"]
DTYPES = {"cpu": (f32, bf16, f64), "reference": (f32, f64), "triton": (f32, f16), "emulated": (f32, bf16)}
NAN, INF = float("nan"), float("inf")
BIG = 1e300  # stands for a large finite garbage value of the input's dtype (_garbage)


@pytest.fixture(scope="module")
def emu():
    from tests import emu_build  # noqa: PLC0415

    return emu_build.load_module(
        "cross_attention_emu", "emu/cross_attention_emu.cpp", extra_cflags=("-O2", "-std=c++20")
    )


def _case(dtype, **kw) -> AttnCase:
    base = dict(B=2, Hq=4, Hkv=2, Lq=6, Lk=10, D=8, Dv=8, seed=3)
    base.update(kw)
    return AttnCase(dtype=dtype, **base)


def _inputs(case: AttnCase, kpm=None, mask=None) -> dict:
    g = torch.Generator().manual_seed(case.seed)
    q = torch.randn(case.B, case.Hq, case.Lq, case.D, generator=g).to(case.dtype)
    k = torch.randn(case.B, case.Hkv, case.Lk, case.D, generator=g).to(case.dtype)
    v = torch.randn(case.B, case.Hkv, case.Lk, case.Dv, generator=g).to(case.dtype)
    return dict(query=q, key=k, value=v, key_padding_mask=kpm, attn_mask=mask)


# Scenarios: (case keyword arguments, builder of (kpm, attn_mask), poisoned entries [(input, index, value)]).
def _kpm(case, item, start):
    kpm = torch.zeros(case.B, case.Lk, dtype=torch.bool)
    kpm[item, start:] = True
    return kpm


def _col_mask(case, item, col, kind):
    if kind == "bool":
        m = torch.ones(case.B, 1, 1, case.Lk, dtype=torch.bool)
        m[item, ..., col] = False
    else:
        m = torch.randn(case.B, 1, 1, case.Lk, generator=torch.Generator().manual_seed(5))
        m[item, ..., col] = -INF
    return m


def _rand_bool(case):
    return torch.rand(case.B, case.Hq, case.Lq, case.Lk, generator=torch.Generator().manual_seed(6)) < 0.6


def _row_neg_inf(case, b, h, i):
    m = _rand_float(case)
    m[b, h, i] = -INF
    return m


def _rand_float(case):
    return torch.randn(case.B, case.Hq, case.Lq, case.Lk, generator=torch.Generator().manual_seed(7))


SCENARIOS = {
    # A NaN in one query entry: that row's out and LSE (and what its gradient reaches), nothing else.
    "query entry NaN": (dict(), lambda c: (_kpm(c, 1, 7), None), [("query", (0, 1, 2, 3), NAN)]),
    # Padding holds finite garbage: large finite key and value rows behind a mask never matter
    # (NaN / inf there is unspecified by the policy, so not tested).
    "padded keys of garbage": (
        dict(),
        lambda c: (_kpm(c, 0, 6), None),
        [
            ("key", (0, slice(None), slice(6, None)), BIG),
            ("value", (0, 0, slice(6, None)), -BIG),
            ("value", (0, 1, 6), 7.5),
        ],
    ),
    "bool-masked key of garbage": (
        dict(),
        lambda c: (None, _col_mask(c, 1, 4, "bool")),
        [("key", (1, 0, 4), -BIG), ("value", (1, 1, 4), BIG)],
    ),
    "-inf-masked key of garbage": (
        dict(mask_grad=True),
        lambda c: (None, _col_mask(c, 1, 3, "float")),
        [("key", (1, 1, 3), BIG), ("value", (1, 1, 3), -BIG)],
    ),
    # A -inf additive entry is a mask, not an addend: a NaN query row whose keys are all -inf-masked
    # is fully masked (out 0, LSE -inf, zero gradients); the other rows see the NaN nowhere.
    "NaN query row, every key -inf-masked": (
        dict(mask_grad=True),
        lambda c: (None, _row_neg_inf(c, 0, 1, 2)),
        [("query", (0, 1, 2), NAN)],
    ),
    # A NaN in an unmasked key / value row: every query row that attends to it.
    "key entry NaN under a bool mask": (dict(), lambda c: (None, _rand_bool(c)), [("key", (0, 1, 5, 2), NAN)]),
    "value row NaN under causal": (dict(causal=True), lambda c: (None, None), [("value", (1, 0, 7), NAN)]),
    "float-mask entry NaN": (
        dict(mask_grad=True),
        lambda c: (None, _rand_float(c)),
        [("attn_mask", (0, 2, 1, 4), NAN)],
    ),
    # Fully masked rows with finite garbage behind them: out 0, LSE -inf, zero gradients.
    "fully padded item of garbage": (
        dict(),
        lambda c: (_kpm(c, 1, 0), None),
        [("key", (1,), BIG), ("value", (1,), -BIG)],
    ),
}


# Scenarios whose poison also meets p = 0 / dS = 0 in tile products: where the math does not connect
# it, its reach is unspecified (docs/numerics.md); the float64 reference's tile products bound it.
TILE_PRODUCTS = {
    "key entry NaN under a bool mask",
    "value row NaN under causal",
    "NaN query row, every key -inf-masked",
}


def _garbage(dtype: torch.dtype) -> float:
    """A large finite value of ``dtype`` whose products with the other inputs stay finite."""
    return min(1e30, torch.finfo(dtype).max / 64)


def _poison(inp: dict, entries, value_of) -> dict:
    out = dict(inp)
    for name, index, value in entries:
        t = out[name].clone()
        if value in (BIG, -BIG):
            value = math.copysign(_garbage(t.dtype), value)
        t[index] = value_of(t[index], value)
        out[name] = t
    return out


def _changed(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return None
    same = (a == b) | (a.isnan() & b.isnan())
    return ~same


def _check_against_oracle(backend: str, case: AttnCase, inp: dict, entries, got: dict, products: bool) -> None:
    """``products``: the poisoned entries also meet p = 0 / dS = 0 in tile products (a NaN key or
    value row masked for some rows, a NaN query row with masked keys). Entries that the float64
    reference run on the poisoned input makes NaN through those products, but the math does not
    connect to the poison, are unspecified by the policy: nothing is asserted there."""
    go, gl = _upstream(case)
    clean = run_reference(case, inp, go, gl, got["lse_grad"])
    moved = run_reference(case, _poison(inp, entries, lambda t, v: t + 0.731), go, gl, got["lse_grad"])
    free = run_reference(case, _poison(inp, entries, torch.full_like), go, gl, got["lse_grad"]) if products else None
    for name in ("out", "lse", "dq", "dk", "dv", "dmask"):
        g, want = got[name], clean[name]
        if want is None:
            continue
        expect_nan = _changed(want, moved[name])
        g = g.detach().double()
        if free is not None:  # unspecified entries: take the backend's value as the expected one
            loose = free[name].isnan() & ~expect_nan & g.isnan()
            want, expect_nan = torch.where(loose, g, want), expect_nan | loose
        bad = g.isnan() != expect_nan
        assert not bad.any(), (
            f"{backend} {name}: NaN placement differs at {bad.nonzero()[:4].tolist()} "
            f"({int(bad.sum())} entries; got {int(g.isnan().sum())} NaN, expected {int(expect_nan.sum())})"
        )
        keep = ~expect_nan
        dtype = (f64 if case.dtype == f64 else f32) if name == "lse" else case.dtype
        tol = (FWD_TOL if name in ("out", "lse") else BWD_TOL)[dtype]
        w = want[keep]
        fin = torch.isfinite(w)
        assert torch.equal(g[keep][~fin], w[~fin]), f"{backend} {name}: +-inf entries differ"
        scale = max(1.0, w[fin].abs().max().item()) if fin.any() else 1.0
        torch.testing.assert_close(
            g[keep][fin],
            w[fin],
            atol=tol["atol"] * scale,
            rtol=tol["rtol"],
            msg=lambda m, n=name: f"{backend} {n}: {m}",
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_nan_placement(scenario, backend, request):
    """NaN reaches exactly the outputs and gradients that depend on the poisoned entries; finite
    garbage in masked K/V rows reaches nothing; fully masked rows stay 0 / -inf with zero gradients."""
    emu = request.getfixturevalue("emu") if backend == "emulated" else None
    kw, masks, entries = SCENARIOS[scenario]
    products = scenario in TILE_PRODUCTS
    for dtype in DTYPES[backend]:
        case = _case(dtype, **kw)
        kpm, mask = masks(case)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(dtype)
        case = AttnCase(
            **{**case.__dict__, "mask": "none" if mask is None else "bool" if mask.dtype == torch.bool else "float"}
        )
        inp = _inputs(case, kpm, mask)
        poisoned = _poison(inp, entries, torch.full_like)
        go, gl = _upstream(case)
        got = run_op(backend, case, poisoned, go, gl, emu=emu)
        _check_against_oracle(backend, case, inp, entries, got, products)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_inf_scores(backend, request):
    """An unmasked score of +inf (a +inf additive-mask entry, or an inf key entry times a query entry
    of the same sign) makes that row's softmax inf - inf: out NaN, LSE NaN. A -inf score masks that
    key for that row. Other rows are untouched (forward)."""
    emu = request.getfixturevalue("emu") if backend == "emulated" else None
    case = _case(DTYPES[backend][0], mask="float")
    mask = _rand_float(case).to(case.dtype)
    mask[0, 1, 2, 5] = INF
    inp = _inputs(case, None, mask)
    inp["key"][1, 0, 3, 1] = INF  # item 1, key head 0 (query heads 0, 1), key 3, feature 1
    go, gl = _upstream(case)
    got = run_op(backend, case, inp, go, gl, emu=emu)
    q = inp["query"].double()
    k_clean = inp["key"].clone()
    k_clean[1, 0, 3, 1] = 0
    m_clean = mask.clone()
    m_clean[0, 1, 2, 5] = 0
    # Rows whose score against key 3 of item 1 is -inf: that key masked for them.
    sign = torch.sign(q[1, :2, :, 1] * case.effective_scale)  # (2 heads, Lq)
    m_clean[1, :2, :, 3] = torch.where(sign < 0, -INF, m_clean[1, :2, :, 3].double()).to(m_clean.dtype)
    want = run_reference(case, {**inp, "key": k_clean, "attn_mask": m_clean}, go, gl, False)
    want_out, want_lse = want["out"].clone(), want["lse"].clone()
    nan_rows = [(0, 1, 2)] + [(1, h, i) for h in range(2) for i in range(case.Lq) if sign[h, i] > 0]
    for b, h, i in nan_rows:
        want_out[b, h, i], want_lse[b, h, i] = NAN, NAN
    lse_dtype = f64 if case.dtype == f64 else f32
    for name, g, w, dtype in (("out", got["out"], want_out, case.dtype), ("lse", got["lse"], want_lse, lse_dtype)):
        g = g.detach().double()
        assert torch.equal(g.isnan(), w.isnan()), (
            f"{backend} {name}: NaN rows differ ({int(g.isnan().sum())} vs {int(w.isnan().sum())})"
        )
        assert torch.equal(torch.isposinf(g), torch.isposinf(w)), f"{backend} {name}: +inf entries differ"
        fin = torch.isfinite(w)
        torch.testing.assert_close(g[fin], w[fin], **FWD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitudes_stay_finite(backend, request):
    """Scores near +-1e4 (scale 1e3, float-mask entries of -1e4, a padded item): finite results
    that match the reference within fp32's conditioning at that size."""
    emu = request.getfixturevalue("emu") if backend == "emulated" else None
    case = _case(f32, scale=1000.0, mask="float", mask_grad=True)
    mask = -1e4 * (torch.rand(2, 1, 6, 10, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    inp = _inputs(case, _kpm(case, 1, 5), mask)
    go, gl = _upstream(case)
    got = run_op(backend, case, inp, go, gl, emu=emu)
    for name in ("out", "lse", "dq", "dk", "dv", "dmask"):
        assert torch.isfinite(got[name]).all(), f"{backend} {name} is not finite"
    want = run_reference(case, inp, go, gl, got["lse_grad"])
    q, k = inp["query"].double().reshape(-1, 8), inp["key"].double().reshape(-1, 8)
    lerr = logit_error(q, k, case.scale, f32, 1e4)
    check_close(
        f"{backend} out",
        got["out"],
        want["out"],
        f32,
        forward=True,
        natural=inp["value"].abs().max().item(),
        logit_err=lerr,
    )
    check_close(f"{backend} lse", got["lse"], want["lse"], f32, forward=True, logit_err=lerr)


# ---------------------------------------------------------------------------------------------
# Empty dimensions and NaN scales, in a subprocess (tests/numerics_cases.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outcomes():
    return run_cases("numerics_cases", list(CASES), timeout=120)


@pytest.mark.parametrize("name", list(CASES))
def test_policy_case(name, outcomes):
    """Empty dimensions (B, Hq, Lq, Lk, D, Dv; N, M, D) and NaN scales: the policy's result."""
    check(CASES[name], outcomes[name])
