"""The numerical policy of the contrastive ops (NUMERICS.md) on every backend that runs here:

* non-finite features: NaN and inf reach exactly the loss rows where the float64 reference has
  them (one +inf entry in image i: image row i NaN or inf, text rows whose column holds a +inf
  logit inf; a NaN in image i: row i only, and every text row that reads it), never every row
  through a shared running max or a padding lane; gradients finite exactly where the reference's
  are, and equal to them there;
* empty inputs: N = 0 or M = 0 gives an empty "none", a sum of 0 and a mean of NaN, with empty or
  zero gradients; D = 0 makes every logit 0 (InfoNCE rows log M, SigLIP rows from the bias).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mmfast
from tests import contrastive_backends as cb
from tests.utils import BWD_TOL, FWD_TOL

CPU_PATHS = {"cpu": {}, "cpu-mkl": {"gemm": "blas"}}  # mmfast.cpu_options of each cpu path


@pytest.fixture
def backend(request):
    name = request.param
    with mmfast.cpu_options(**CPU_PATHS.get(name, {})):
        yield "cpu" if name.startswith("cpu") else name


def _same_pattern(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str, fwd: bool) -> None:
    """NaN, +inf and -inf in the same places; the finite values close."""
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN at {got} vs {want}"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{name}: +inf at {got} vs {want}"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{name}: -inf at {got} vs {want}"
    ok = torch.isfinite(want)
    if ok.any():
        tol = (FWD_TOL if fwd else BWD_TOL)[dtype]
        atol = tol["atol"] * max(1.0, float(want[ok].abs().max()))
        torch.testing.assert_close(got[ok], want[ok], atol=atol, rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")


def _finite_where(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Finite exactly where the reference gradient is, and close to it there."""
    got, want = got.double(), want.double()
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"{name}: finite pattern differs"
    ok = torch.isfinite(want)
    if ok.any():
        tol = BWD_TOL[dtype]
        atol = tol["atol"] * max(1.0, float(want[ok].abs().max()))
        torch.testing.assert_close(got[ok], want[ok], atol=atol, rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["cpu", "cpu-mkl", "triton", "emu", "reference"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction,N,M", [("both", 9, 9), ("image", 9, 37), ("text", 37, 9)])
@pytest.mark.parametrize("poison", ["+inf image", "-inf image", "+inf text", "nan image"])
def test_non_finite_feature_reaches_only_its_rows(backend, dtype, direction, N, M, poison):
    cb.skip_unless(backend, dtype)
    x = F.normalize(torch.randn(N, 8), dim=-1)
    y = F.normalize(torch.randn(M, 8), dim=-1)
    value = {"+": float("inf"), "-": float("-inf"), "n": float("nan")}[poison[0]]
    (x if poison.endswith("image") else y)[2, 3] = value
    x, y = x.to(dtype), y.to(dtype)
    rows = M if direction == "text" else N
    grad = torch.rand(rows) + 0.5
    kw = dict(direction=direction, reduction="none", grad=grad)
    got = cb.info_nce(backend, x, y, 7.0, **kw)
    want = cb.info_nce("reference", x.double(), y.double(), 7.0, **kw)
    assert not torch.isfinite(want[0]).all()  # the class under test
    _same_pattern(got[0], want[0], dtype, "loss rows", fwd=True)
    for name, g, w in zip(("d image", "d text", "d scale"), got[1:], want[1:]):
        _finite_where(g, w, dtype, name)


@pytest.mark.parametrize("backend", ["cpu", "triton", "emu", "reference"], indirect=True)
def test_nan_scale_makes_every_row_nan(backend):
    cb.skip_unless(backend, torch.float32)
    x, y = F.normalize(torch.randn(9, 8), dim=-1), F.normalize(torch.randn(9, 8), dim=-1)
    out = cb.info_nce(backend, x, y, float("nan"), reduction="none")[0]
    assert torch.isnan(out).all()


# ---------------------------------------------------------------------------------------------
# Empty inputs.
# ---------------------------------------------------------------------------------------------
EMPTY = [  # (N, M, D, direction)
    (0, 0, 8, "both"),
    (0, 5, 8, "image"),
    (5, 0, 8, "text"),
    (4, 4, 0, "both"),
    (3, 5, 0, "image"),
    (5, 3, 0, "text"),
]


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"], indirect=True)
@pytest.mark.parametrize("N,M,D,direction", EMPTY)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_info_nce_empty(backend, N, M, D, direction, reduction):
    cb.skip_unless(backend, torch.float32)
    x, y = torch.randn(N, D), torch.randn(M, D)
    rows = M if direction == "text" else N
    out, dx, dy, ds = cb.info_nce(backend, x, y, 3.0, direction=direction, reduction=reduction)
    # D = 0: every logit 0, so an image row is log M (a text row log N); "both" averages the two
    per_row = {"both": math.log(max(N, 1)), "image": math.log(max(M, 1)), "text": math.log(max(N, 1))}[direction]
    want = torch.full((rows,), per_row)
    expect = {"none": want, "sum": want.sum(), "mean": want.mean()}[reduction]
    assert out.dtype == torch.float32 and out.shape == expect.shape
    torch.testing.assert_close(out, expect, equal_nan=True)
    assert dx.shape == x.shape and dy.shape == y.shape
    assert not dx.any() and not dy.any()  # empty, or the gradient of a loss with nothing in it
    assert float(ds) == 0.0


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"], indirect=True)
@pytest.mark.parametrize("N,D", [(0, 8), (0, 0), (4, 0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_siglip_empty(backend, N, D, reduction):
    cb.skip_unless(backend, torch.float32)
    x, y = torch.randn(N, D), torch.randn(N, D)
    b = -2.0
    out, dx, dy, ds, db = cb.siglip_loss(backend, x, y, 3.0, b, reduction=reduction)
    row = F.softplus(torch.tensor(-b)) + (N - 1) * F.softplus(torch.tensor(b))  # logits = b everywhere
    want = row.expand(N)
    expect = {"none": want, "sum": want.sum(), "mean": want.sum() / N if N else torch.tensor(float("nan"))}
    torch.testing.assert_close(out, expect[reduction].float(), equal_nan=True)
    assert dx.shape == x.shape and dy.shape == y.shape and float(ds) == 0.0
    if N:  # d bias = Σ dL/dl over the N^2 logits
        g = {"none": 1.0, "sum": 1.0, "mean": 1.0 / N}[reduction]
        want_db = g * N * (-torch.sigmoid(torch.tensor(-b)) + (N - 1) * torch.sigmoid(torch.tensor(b)))
        torch.testing.assert_close(db, want_db.float())


def test_empty_through_the_modules():
    """nn.ClipLoss / SigLipLoss on an empty batch follow the ops: a mean of NaN, no error."""
    x = torch.randn(0, 8, requires_grad=True)
    assert torch.isnan(mmfast.nn.ClipLoss()(x, torch.randn(0, 8), 2.0))
    assert torch.isnan(mmfast.nn.SigLipLoss()(x, torch.randn(0, 8), 2.0, -1.0))
