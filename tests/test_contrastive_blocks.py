"""The block primitives (mmfast.ops.contrastive.block_forward / merge_lse / block_backward) and the
one statistics layout, on every backend that runs here: reference, cpu, triton (interpreter) and
the CUDA kernels under the SIMT emulation.

A random N x M problem is cut into a grid of blocks with odd edges; each block's statistics come
from its backend, are merged with merge_lse, and must equal the float64 statistics of the whole
logits; each block's backward, given the merged statistics and per-row / per-column loss weights,
must add up to the float64 gradient of the whole weighted loss (features, and d(scale) split into
its row and column terms; SigLIP also d(bias)).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast import _dispatch
from mmfast.ops import contrastive as C
from tests import emu_build
from tests.utils import contrastive_inputs

pytestmark = pytest.mark.skipif(_dispatch.availability("cpu") is not None, reason="mmfast._C not built")

BACKENDS = ["reference", "cpu", "triton", "emu"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LOSS = {"info_nce": 0, "siglip": 1}
# relative to the largest value of the quantity (gradients: sums of many terms)
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
ROWS, COLS = (0, 20, 37), (0, 17, 32, 50)  # row blocks [0, 20), [20, 37); three column blocks


@pytest.fixture(scope="module")
def emu():
    return emu_build.load_module("contrastive_emu", "emu/contrastive_emu.cpp")


def _runnable(backend: str, dtype: torch.dtype) -> str | None:
    if backend == "triton" and dtype == torch.bfloat16:
        return "the Triton interpreter has no bf16 arithmetic"
    if backend in ("triton", "emu") and dtype == torch.float64:
        return "the GPU kernels take fp32 / fp16 / bf16"
    if backend == "triton" and _dispatch.availability("triton") is not None:
        return "triton not importable"
    return None


class Blocks:
    """block_forward / block_backward of one backend (the emulated CUDA module called directly)."""

    def __init__(self, backend: str, emu_module=None):
        self.backend, self.emu = backend, emu_module

    def forward(self, x, y, s, b, labels, loss):
        if self.backend == "emu":
            return self.emu.block_forward(x, y, torch.tensor(s), torch.tensor(b), labels, LOSS[loss], 2)
        return C.block_forward(x, y, s, b, labels=labels, loss=loss, backend=self.backend)

    def backward(self, x, y, s, b, labels, row_lse, col_lse, row_w, col_w, loss):
        if self.backend == "emu":
            e = torch.empty(0)
            args = (row_lse if row_lse is not None else e, col_lse if col_lse is not None else e)
            cw = col_w if col_w is not None else e
            return self.emu.block_backward(x, y, torch.tensor(s), torch.tensor(b), labels, *args, row_w, cw, LOSS[loss])
        return C.block_backward(
            x, y, s, b, labels=labels, row_lse=row_lse, col_lse=col_lse, row_weight=row_w, col_weight=col_w,
            loss=loss, backend=self.backend,
        )  # fmt: skip


@pytest.fixture(params=BACKENDS)
def blocks(request):
    if request.param == "emu":
        return Blocks("emu", request.getfixturevalue("emu"))
    return Blocks(request.param)


def _problem(dtype: torch.dtype, targets: str, scale: float = 9.0):
    """x (37, D), y (50, D) and each row's global target column (-1: none), injective."""
    inp = contrastive_inputs(N=ROWS[-1], M=COLS[-1], D=24, dtype=dtype, scale=scale)
    t = torch.randperm(COLS[-1])[: ROWS[-1]]
    if targets == "some":  # about a third without a target, and one block with none (labels None)
        t[torch.rand(ROWS[-1]) < 0.3] = -1
        t[ROWS[1] :][t[ROWS[1] :] >= COLS[2]] = -1
    return inp["image_features"], inp["text_features"], t


def _block_labels(t: Tensor, r0: int, r1: int, c0: int, c1: int) -> Tensor | None:
    lab = t[r0:r1].clone()
    inside = (lab >= c0) & (lab < c1)
    lab = torch.where(inside, lab - c0, torch.full_like(lab, -1))
    return lab if bool(inside.any()) else None


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    scale = max(float(want.abs().max()), 1.0)
    tol = TOL[dtype] * scale
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=TOL[dtype], msg=lambda m: f"{name}: {m}")


def _merged_stats(blocks: Blocks, x, y, t, s, dtype):
    """Each block's statistics merged over the grid: (row_lse (N,), col_lse (M,), targets (N,))."""
    N = x.shape[0]
    row = [None] * (len(ROWS) - 1)
    col = [None] * (len(COLS) - 1)
    tgt = torch.zeros(N, dtype=torch.float64)
    for a, (r0, r1) in enumerate(zip(ROWS, ROWS[1:])):
        for c, (c0, c1) in enumerate(zip(COLS, COLS[1:])):
            r, cl, tg = blocks.forward(x[r0:r1], y[c0:c1], s, 0.0, _block_labels(t, r0, r1, c0, c1), "info_nce")
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            assert r.dtype == acc and cl.dtype == acc and r.shape == (r1 - r0,) and cl.shape == (c1 - c0,)
            row[a] = r if row[a] is None else C.merge_lse(row[a], r)
            col[c] = cl if col[c] is None else C.merge_lse(col[c], cl)
            tgt[r0:r1] += tg.double()
    return torch.cat(row), torch.cat(col), tgt


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("targets", ["all", "some"])
def test_block_statistics_merge_to_the_whole(blocks, dtype, targets):
    if why := _runnable(blocks.backend, dtype):
        pytest.skip(why)
    x, y, t = _problem(dtype, targets)
    s = 9.0
    row, col, tgt = _merged_stats(blocks, x, y, t, s, dtype)
    S = s * x.double() @ y.double().t()
    _close(row, S.logsumexp(1), dtype, "row_lse")
    _close(col, S.logsumexp(0), dtype, "col_lse")
    want_t = torch.where(t >= 0, S.gather(1, t.clamp(min=0)[:, None]).squeeze(1), 0.0)
    _close(tgt, want_t, dtype, "target")


def _weighted_loss64(x, y, s, t, a, e, loss: str, bias: float = 0.0):
    """The whole weighted loss in float64: InfoNCE Σ_i a_i (lse_i - S_{i,t_i}) + Σ_j e_j (lse_j -
    Σ_i T_ij S_ij); SigLIP Σ_i a_i Σ_j softplus(-z_ij (S_ij + b))."""
    S = s * x @ y.t()
    T = torch.zeros_like(S)
    rows = torch.arange(x.shape[0])[t >= 0]
    T[rows, t[t >= 0]] = 1
    if loss == "siglip":
        return (a[:, None] * F.softplus(-(2 * T - 1) * (S + bias))).sum()
    out = (a * (S.logsumexp(1) - (S * T).sum(1))).sum()
    if e is not None:
        out = out + (e * (S.logsumexp(0) - (S * T).sum(0))).sum()
    return out


def _grid_backward(blocks: Blocks, x, y, s, b, t, row_lse, col_lse, a, e, loss: str):
    """Σ over the grid of each block's backward: (dx, dy, dscale (2,), dbias)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx, dy = torch.zeros(x.shape, dtype=acc), torch.zeros(y.shape, dtype=acc)
    ds, db = torch.zeros(2, dtype=acc), torch.zeros((), dtype=acc)
    for r0, r1 in zip(ROWS, ROWS[1:]):
        for c0, c1 in zip(COLS, COLS[1:]):
            lab = _block_labels(t, r0, r1, c0, c1)
            rl = None if row_lse is None else row_lse[r0:r1]
            cl = None if col_lse is None or e is None else col_lse[c0:c1]
            ew = None if e is None else e[c0:c1]
            gx, gy, gs, gb = blocks.backward(x[r0:r1], y[c0:c1], s, b, lab, rl, cl, a[r0:r1], ew, loss)
            assert gx.dtype == acc and gy.dtype == acc and gs.shape == (2,) and gb.shape == ()
            dx[r0:r1] += gx
            dy[c0:c1] += gy
            ds += gs
            db += gb
    return dx, dy, ds, db


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("columns", [True, False], ids=["both-terms", "row-terms"])
def test_block_backward_adds_up_to_the_whole(blocks, dtype, columns, targets="some"):
    if why := _runnable(blocks.backend, dtype):
        pytest.skip(why)
    x, y, t = _problem(dtype, targets)
    s = 9.0
    a = torch.rand(x.shape[0]) + 0.5
    e = torch.rand(y.shape[0]) + 0.5 if columns else None
    row_lse, col_lse, _ = _merged_stats(blocks, x, y, t, s, dtype)
    dx, dy, ds, db = _grid_backward(blocks, x, y, s, 0.0, t, row_lse, col_lse, a, e, "info_nce")
    leaves = [x.detach().double().requires_grad_(), y.detach().double().requires_grad_()]
    s64 = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    a64, e64 = a.double(), None if e is None else e.double()
    torch.autograd.backward(_weighted_loss64(*leaves, s64, t, a64, e64, "info_nce"))
    _close(dx, leaves[0].grad, dtype, "dx")
    _close(dy, leaves[1].grad, dtype, "dy")
    # d(scale), its row terms and column terms apart
    for k, (wa, we) in enumerate([(a64, None), (torch.zeros_like(a64), e64)]):
        if we is None and k == 1:
            assert float(ds[1]) == 0.0
            continue
        s_k = torch.tensor(s, dtype=torch.float64, requires_grad=True)
        want = torch.autograd.grad(_weighted_loss64(x.double(), y.double(), s_k, t, wa, we, "info_nce"), s_k)[0]
        _close(ds[k], want, dtype, f"dscale[{k}]")
    assert float(db) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("targets", ["all", "some"])
def test_siglip_blocks(blocks, dtype, targets):
    """SigLIP blocks: row losses with positives at the labels (none: a block of negatives only), and
    their backward from row weights, against the whole weighted loss in float64."""
    if why := _runnable(blocks.backend, dtype):
        pytest.skip(why)
    x, y, t = _problem(dtype, targets, scale=4.0)
    s, b = 4.0, -3.0
    a = torch.rand(x.shape[0]) + 0.5
    rows = torch.zeros(x.shape[0], dtype=torch.float64)
    for r0, r1 in zip(ROWS, ROWS[1:]):
        for c0, c1 in zip(COLS, COLS[1:]):
            r, c, tg = blocks.forward(x[r0:r1], y[c0:c1], s, b, _block_labels(t, r0, r1, c0, c1), "siglip")
            assert r.shape == (r1 - r0,) and c.numel() == 0 and tg.numel() == 0
            rows[r0:r1] += r.double()
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    s64 = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    b64 = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    ones = torch.ones(x.shape[0], dtype=torch.float64)
    want_rows = torch.stack([_weighted_loss64(x64[i : i + 1], y64, s64, t[i : i + 1], ones[:1], None, "siglip", b64)
                             for i in range(x.shape[0])])  # fmt: skip
    _close(rows, want_rows.detach(), dtype, "rows")
    dx, dy, ds, db = _grid_backward(blocks, x, y, s, b, t, None, None, a, None, "siglip")
    torch.autograd.backward(_weighted_loss64(x64, y64, s64, t, a.double(), None, "siglip", b64))
    for name, got, want in (("dx", dx, x64.grad), ("dy", dy, y64.grad), ("dscale", ds[0], s64.grad),
                            ("dbias", db, b64.grad)):  # fmt: skip
        _close(got, want, dtype, name)
    assert float(ds[1]) == 0.0


# ---------------------------------------------------------------------------------------------
# One statistics layout: the loss ops' saved statistics on every backend.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "triton", "emu"])
@pytest.mark.parametrize("direction", ["both", "image", "text"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loss_statistics_layout(backend, direction, dtype, request):
    """row_stat (N,) / col_stat (M,) fp32 log-sum-exp where the direction reads them, else (0,): the
    same on every backend, and what the fake (torch.compile's shape function) says."""
    if why := _runnable(backend, dtype):
        pytest.skip(why)
    N, M = (23, 23) if direction == "both" else ((23, 40) if direction == "image" else (40, 23))
    inp = contrastive_inputs(N=N, M=M, D=16, dtype=dtype)
    x, y = inp["image_features"], inp["text_features"]
    s, b = torch.tensor(7.0), torch.tensor(0.0)
    code = C.CODES[direction]
    if backend == "emu":
        _, row, col = request.getfixturevalue("emu").forward(x, y, s, b, None, 0, code, 0, 2)
    elif backend == "triton":
        from mmfast.triton import contrastive as tc  # noqa: PLC0415

        _, row, col = tc.contrastive_forward(x, y, s, b, None, 0, code, 0)
    else:
        _, row, col = torch.ops.mmfast.contrastive_forward(x, y, s, b, None, 0, code, 0)
    r, c = C.stat_shapes(N, M, 0, code)
    assert row.shape == (r,) and col.shape == (c,) and row.dtype == col.dtype == torch.float32
    fake = C._forward_fake(x, y, s, b, None, 0, code, 0)
    assert fake[1].shape == row.shape and fake[2].shape == col.shape
    S = 7.0 * x.double() @ y.double().t()
    if r:
        _close(row, S.logsumexp(1), dtype, "row_stat")
    if c:
        _close(col, S.logsumexp(0), dtype, "col_stat")


def test_merge_lse_semantics():
    a = torch.tensor([0.0, float("-inf"), 5.0, float("inf"), float("nan"), float("-inf")])
    b = torch.tensor([0.0, 3.0, float("-inf"), 2.0, 1.0, float("-inf")])
    got = C.merge_lse(a, b)
    want = torch.tensor([2.0]).log().tolist() + [3.0, 5.0, float("inf"), float("nan"), float("-inf")]
    torch.testing.assert_close(got, torch.tensor(want), equal_nan=True)
    torch.testing.assert_close(C.merge_lse(a[:3], b[:3], a[:3]), torch.stack([a[:3], b[:3], a[:3]]).logsumexp(0))


def _bad_block_cases():
    x, y, w = torch.randn(4, 8), torch.randn(6, 8), torch.ones(4)
    lse = torch.zeros(4)
    return [
        ("labels range", lambda: C.block_forward(x, y, 1.0, labels=torch.tensor([0, 6, 1, 2])), ValueError, "labels"),
        ("labels below -1", lambda: C.block_forward(x, y, 1.0, labels=torch.tensor([0, -2, 1, 2])), ValueError,
         "labels"),
        ("labels dtype", lambda: C.block_forward(x, y, 1.0, labels=torch.zeros(4)), TypeError, "labels"),
        ("D", lambda: C.block_forward(x, y[:, :3], 1.0), ValueError, "D="),
        ("loss", lambda: C.block_forward(x, y, 1.0, loss="clip"), ValueError, "loss"),
        ("dtypes", lambda: C.block_forward(x, y.double(), 1.0), TypeError, "y"),
        ("row_lse missing", lambda: C.block_backward(x, y, 1.0, row_weight=w), ValueError, "row_lse"),
        ("row_weight shape", lambda: C.block_backward(x, y, 1.0, row_lse=lse, row_weight=torch.ones(5)), ValueError,
         "row_weight"),
        ("col_lse missing", lambda: C.block_backward(x, y, 1.0, row_lse=lse, row_weight=w, col_weight=torch.ones(6)),
         ValueError, "col_lse"),
        ("columns share a target",
         lambda: C.block_backward(x, y, 1.0, labels=torch.tensor([1, 1, -1, 2]), row_lse=lse, col_lse=torch.zeros(6),
                                  row_weight=w, col_weight=torch.ones(6)), ValueError, "at most one"),
        ("siglip column weights",
         lambda: C.block_backward(x, y, 1.0, row_weight=w, col_weight=torch.ones(6), loss="siglip"), ValueError,
         "row weights only"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _bad_block_cases(), ids=lambda c: c[0])
def test_block_bad_input(case):
    _, fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()


def test_block_ops_check_labels_in_the_kernel():
    """The C++ ops check what the Python layer checks (torch.compile skips the Python value checks)."""
    x, y, s, b = torch.randn(4, 8), torch.randn(6, 8), torch.tensor(1.0), torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="labels must lie"):
        torch.ops.mmfast.contrastive_block_forward(x, y, s, b, torch.tensor([0, 6, 1, 2]), 0)
    with pytest.raises(RuntimeError, match="row_lse"):
        torch.ops.mmfast.contrastive_block_backward(x, y, s, b, None, torch.zeros(3), torch.zeros(0), torch.ones(4),
                                                    torch.zeros(0), 0)  # fmt: skip


@pytest.mark.parametrize("loss", [0, 1])
def test_block_opcheck(loss):
    x, y = torch.randn(9, 5), torch.randn(7, 5)
    s, b = torch.tensor(3.0), torch.tensor(-1.0)
    labels = torch.tensor([0, -1, 2, 3, -1, 6, 1, -1, 4])
    torch.library.opcheck(torch.ops.mmfast.contrastive_block_forward.default, (x, y, s, b, labels, loss))
    r, c, _ = torch.ops.mmfast.contrastive_block_forward(x, y, s, b, labels, loss)
    cw = torch.rand(7) if loss == 0 else torch.zeros(0)
    args = (x, y, s, b, labels, r if loss == 0 else torch.zeros(0), c, torch.rand(9), cw, loss)
    torch.library.opcheck(torch.ops.mmfast.contrastive_block_backward.default, args)
