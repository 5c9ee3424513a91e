"""docs/numerics.md for info_nce / siglip_loss on every backend: NaN and Inf rows, padding lanes
that must not leak, exact zero gradients, large logits (empty batches and NaN logit scales:
tests/numerics_cases.py, run by test_numerics.py in a subprocess).

NaN placement uses the same dependency oracle as test_numerics.py: an entry of the loss rows or of
a gradient is NaN exactly when it depends on the poisoned input (the float64 reference, run on
finite inputs, shows which entries move under a finite perturbation of it); every other entry
equals the clean reference. Inf rows follow the float64 reference evaluated with IEEE semantics.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from strategies import ContrastiveCase, bf16, f16, f32, f64
from test_properties_contrastive import cpu_setting, run_op, run_reference
from utils import BWD_TOL, FWD_TOL

BACKENDS = ["cpu", "cpu-mkl", "reference", "triton", "emulated"]
DTYPES = {
    "cpu": (f32, bf16, f64),
    "cpu-mkl": (f32, bf16),
    "reference": (f32, f64),
    "triton": (f32, f16),
    "emulated": (f32, bf16, f16),
}
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def emu():
    from tests import emu_build  # noqa: PLC0415

    return emu_build.load_module("contrastive_emu", "emu/contrastive_emu.cpp")


def _run(backend: str, case: ContrastiveCase, inp: dict, w: torch.Tensor, emu) -> dict:
    with cpu_setting("blas" if backend == "cpu-mkl" else "auto", torch.get_num_threads()):
        return run_op("cpu" if backend.startswith("cpu") else backend, case, inp, w, emu=emu)


def _emu(backend, request):
    return request.getfixturevalue("emu") if backend == "emulated" else None


def _features(N: int, M: int, D: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(N, D, generator=g), dim=-1).to(dtype)
    y = F.normalize(torch.randn(M, D, generator=g), dim=-1).to(dtype)
    return x, y


def _inputs(x, y, scale=14.3, bias=-3.0, labels=None) -> dict:
    return dict(
        image_features=x, text_features=y, logit_scale=torch.tensor(scale), logit_bias=torch.tensor(bias), labels=labels
    )


def _weights(rows: int, reduction: str) -> torch.Tensor:
    if reduction != "none":
        return torch.tensor(1.5)
    return torch.linspace(-2.0, 3.0, rows).double()


# ---------------------------------------------------------------------------------------------
# NaN and Inf rows
# ---------------------------------------------------------------------------------------------

NAN_CASES = [  # loss, direction, reduction, N, M
    ("info_nce", "both", "none", 9, 9),
    ("info_nce", "image", "none", 7, 33),
    ("info_nce", "text", "none", 33, 7),
    ("info_nce", "image", "mean", 7, 33),
    ("siglip", "both", "none", 9, 9),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,direction,reduction,N,M", NAN_CASES)
def test_nan_feature_reaches_only_its_rows(loss, direction, reduction, N, M, backend, request):
    """A NaN in image i's features: NaN in exactly the loss rows and gradient entries that depend
    on it (for "image" that is row i only; "both" and "text" reach every text row through column
    softmaxes), nothing else; other entries equal the clean reference."""
    emu = _emu(backend, request)
    for dtype in DTYPES[backend]:
        case = ContrastiveCase(loss=loss, N=N, M=M, D=16, dtype=dtype, direction=direction, reduction=reduction)
        x, y = _features(N, M, 16, dtype)
        inp = _inputs(x, y)
        w = _weights(M if direction == "text" else N, reduction)
        poisoned = dict(
            inp,
            image_features=x.clone().index_put_((torch.tensor([2]), torch.tensor([5])), torch.tensor(NAN, dtype=dtype)),
        )
        got = _run(backend, case, poisoned, w, emu)
        clean = run_reference(case, inp, w)
        x2 = x.double().clone()
        x2[2, 5] += 0.731
        moved = run_reference(case, dict(inp, image_features=x2), w)
        for name in ("loss", "dx", "dy", "ds", "db"):
            if clean[name] is None:
                continue
            expect_nan = ~((clean[name] == moved[name]) | (clean[name].isnan() & moved[name].isnan()))
            g = got[name].detach().double()
            bad = g.isnan() != expect_nan
            assert not bad.any(), (
                f"{backend} {dtype} {name}: NaN placement differs ({int(g.isnan().sum())} NaN, expected {int(expect_nan.sum())}) "
                f"at {bad.nonzero()[:4].tolist()}"
            )
            keep = ~expect_nan
            tol = (FWD_TOL if name == "loss" else BWD_TOL)[
                dtype if name in ("dx", "dy") else f64 if dtype == f64 else f32
            ]
            if dtype in (bf16, f16):  # the low-precision GEMMs: the property tests bound these; here NaN placement
                tol = dict(atol=0.1, rtol=0.1)
            ref = clean[name][keep]
            scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
            torch.testing.assert_close(
                g[keep], ref, atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m, n=name: f"{backend} {n}: {m}"
            )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["both", "image", "text"])
def test_inf_feature_rows_follow_ieee(direction, backend, request):
    """One +inf entry in image i's features: the loss rows are NaN / +inf exactly where the float64
    reference (IEEE arithmetic) has them, and the other rows equal it (no running max or padding
    lane spreads the inf)."""
    emu = _emu(backend, request)
    dtype = DTYPES[backend][0]
    N, M = (9, 9) if direction == "both" else (7, 33) if direction == "image" else (33, 7)
    case = ContrastiveCase(loss="info_nce", N=N, M=M, D=16, dtype=dtype, direction=direction, reduction="none")
    x, y = _features(N, M, 16, dtype)
    x[2, 5] = INF
    inp = _inputs(x, y)
    got = _run(backend, case, inp, _weights(M if direction == "text" else N, "none"), emu)["loss"].detach().double()
    from mmfast import reference  # noqa: PLC0415

    want = reference.info_nce(x.double(), y.double(), 14.3, direction=direction, reduction="none")
    assert torch.equal(got.isnan(), want.isnan()), (
        f"{backend}: NaN rows {got.isnan().nonzero().flatten().tolist()}, expected {want.isnan().nonzero().flatten().tolist()}"
    )
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), (
        f"{backend}: +inf rows {torch.isposinf(got).nonzero().flatten().tolist()}, expected {torch.isposinf(want).nonzero().flatten().tolist()}"
    )
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], **FWD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["info_nce", "siglip"])
def test_nan_logit_scale(loss, backend, request):
    """logit_scale = NaN: every loss row and every gradient entry NaN."""
    emu = _emu(backend, request)
    case = ContrastiveCase(loss=loss, N=9, M=9, D=16, dtype=DTYPES[backend][0], reduction="none")
    x, y = _features(9, 9, 16, case.dtype)
    got = _run(backend, case, _inputs(x, y, scale=NAN), _weights(9, "none"), emu)
    for name in ("loss", "dx", "dy", "ds"):
        assert got[name].isnan().all(), f"{backend} {name}: {int((~got[name].isnan()).sum())} entries are not NaN"


# ---------------------------------------------------------------------------------------------
# Padding lanes, exact zeros, large logits
# ---------------------------------------------------------------------------------------------


def _far_row(N: int, M: int, D: int, dtype: torch.dtype):
    """Features whose image 0 has cosine ~ -0.98 with every text: at scale 100 its logits are ~ -98,
    so exp(-lse) ~ 1e42 overflows fp32 (the trap of padded lanes: w * exp(-lse) = inf, times 0)."""
    g = torch.Generator().manual_seed(4)
    u = F.normalize(torch.randn(D, generator=g), dim=0)
    y = F.normalize(u + 0.1 * torch.randn(M, D, generator=g), dim=-1)
    x = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    x[0] = -u
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [1, 17, 31, 33, 65])
def test_padding_lanes_never_leak(M, backend, request):
    """A row whose logits are all far below its LSE's scale, M not a multiple of the tile widths,
    upstream weights above 1.55 (sum times 2, weighted "none"): every gradient finite and equal to
    the reference (the logit_scale gradient included)."""
    emu = _emu(backend, request)
    dtype = DTYPES[backend][0]
    for direction, reduction, N in (("image", "sum", 5), ("image", "none", 5), ("text", "none", 40)):
        case = ContrastiveCase(loss="info_nce", N=N, M=M, D=16, dtype=dtype, direction=direction, reduction=reduction)
        x, y = _far_row(N, M, 16, dtype)
        labels = torch.zeros(N if direction == "image" else M, dtype=torch.long)
        inp = _inputs(x, y, scale=100.0, labels=labels)
        w = torch.tensor(2.0) if reduction == "sum" else torch.full((N if direction == "image" else M,), 3.0).double()
        got = _run(backend, case, inp, w, emu)
        want = run_reference(case, inp, w)
        for name in ("loss", "dx", "dy", "ds"):
            g = got[name].detach().double()
            assert torch.isfinite(g).all(), (
                f"{backend} {direction}/{reduction} M={M} {name}: {int((~torch.isfinite(g)).sum())} non-finite entries"
            )
            scale = max(1.0, want[name].abs().max().item())
            tol = (FWD_TOL if name == "loss" else BWD_TOL)[
                dtype if name in ("dx", "dy") else f32 if dtype != f64 else f64
            ]
            torch.testing.assert_close(
                g, want[name], atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m, n=name: f"{backend} {n}: {m}"
            )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 100.0, 1000.0])
def test_exact_zero_gradients(scale, backend, request):
    """One candidate per softmax row (N = M = 1 both ways; M = 1 for the image direction; N = 1 for
    the text direction): the exact gradients of the features and the scale are 0, and so must the
    kernels' be in every dtype (a bf16/fp16 backward that recomputes s * <x, y> with other rounding
    than its forward gives noise instead)."""
    emu = _emu(backend, request)
    for dtype in DTYPES[backend]:
        for direction, N, M in (("both", 1, 1), ("image", 6, 1), ("text", 1, 6)):
            case = ContrastiveCase(loss="info_nce", N=N, M=M, D=33, dtype=dtype, direction=direction, reduction="mean")
            g = torch.Generator().manual_seed(9)
            x, y = (torch.randn(n, 33, generator=g).to(dtype) for n in (N, M))
            labels = torch.zeros(max(N, M), dtype=torch.long) if direction != "both" else None
            got = _run(backend, case, _inputs(x, y, scale=scale, labels=labels), torch.tensor(1.0), emu)
            for name in ("dx", "dy", "ds"):
                worst = got[name].detach().double().abs().max().item()
                assert worst == 0, f"{backend} {dtype} {direction} scale {scale}: max |{name}| = {worst:.3g}, exact 0"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["info_nce", "siglip"])
def test_large_logits_stay_finite(loss, backend, request):
    """Feature norms 10 at scale 1e3 (logits ~ 1e5), bias -1e4: finite loss and gradients."""
    emu = _emu(backend, request)
    dtype = DTYPES[backend][0]
    case = ContrastiveCase(loss=loss, N=33, M=33, D=16, dtype=dtype, reduction="none")
    x, y = _features(33, 33, 16, f32)
    inp = _inputs((10 * x).to(dtype), (10 * y).to(dtype), scale=1000.0, bias=-1e4)
    got = _run(backend, case, inp, _weights(33, "none"), emu)
    for name in ("loss", "dx", "dy", "ds"):
        assert torch.isfinite(got[name]).all(), f"{backend} {name}: non-finite entries"
