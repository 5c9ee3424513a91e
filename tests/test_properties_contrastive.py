"""Property-based tests of mmfast.info_nce and mmfast.siglip_loss: every backend against float64.

Each test draws random cases (tests/strategies.py: N, M, D with 1 and odd sizes, every direction
and reduction, labels: default / permutation / random / int32 / strided, strided / transposed /
stride-0 feature layouts, normalised or not with norms up to 10, logit scales up to 1e3 (also 0 and
negative), as a float or a tensor, biases, upstream gradients up to 3 in size, weighted rows for
reduction "none") and checks the loss and every gradient (image and text features, logit_scale,
logit_bias) within the bounds of tests/prop_checks.py, with the reference's NaN / inf pattern.
Where the exact gradient is 0 by structure (one candidate per softmax row, scale 0), the kernel's
must be exactly 0 (docs/numerics.md).

Backends: cpu (its tile-product paths, forced through mmfast.cpu_options, and 1-3 threads, drawn
per example), reference, triton (interpreter), and the CUDA kernels under the SIMT emulation
("emulated", as the cuda backend calls them).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from prop_checks import check_close, logit_error, max_err
from strategies import (
    BACKENDS,
    CPU_PATHS,
    DTYPES,
    SLOW,
    ContrastiveCase,
    budget,
    contrastive_cases,
    contrastive_inputs,
    cpu_paths,
    f32,
    f64,
    tallied,
)
from utils import dense_info_nce

import mmfast
from mmfast import reference as ref

MAX_ROWS = {"cpu": 97, "reference": 97, "triton": 70, "emulated": 70}
# (ci, long) examples of test_loss; test_empty runs half. Long: >= 5,000 per loss and backend (the
# slow backends are bounded by time in the long run: MMFAST_HYPOTHESIS_TEST_SECONDS).
BUDGET = {"cpu": (100, 3400), "reference": (10, 3400), "triton": (10, 3400), "emulated": (6, 3400)}
LOSS_CODE = {"info_nce": 0, "siglip": 1}
DIRECTION_CODE = {"both": 0, "image": 1, "text": 2}
REDUCTION_CODE = {"mean": 0, "sum": 1, "none": 2}


@pytest.fixture(scope="module")
def emu():
    from tests import emu_build  # noqa: PLC0415 - builds a torch extension (cached under build/emu)

    return emu_build.load_module("contrastive_emu", "emu/contrastive_emu.cpp")


@contextlib.contextmanager
def cpu_setting(path: str, threads: int):
    """Run the block on cpu path ``path`` (a CPU_PATHS key) with ``threads`` threads."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with mmfast.cpu_options(**CPU_PATHS[path]):
            yield
    finally:
        torch.set_num_threads(saved_threads)


def _rows(case: ContrastiveCase) -> int:
    return case.M if case.loss == "info_nce" and case.direction == "text" else case.N


def upstream(case: ContrastiveCase) -> torch.Tensor:
    """The upstream gradient (float64, rounded to fp32 as the loss is fp32): a scalar, or per-row
    weights of both signs for reduction "none"."""
    g = torch.Generator().manual_seed(case.seed + 1)
    if case.reduction == "none":
        w = (torch.rand(_rows(case), generator=g) * 2 - 1) * case.upstream
    else:
        w = torch.tensor(case.upstream if case.seed % 2 else -case.upstream)
    return w.float().double()


def _call(fn, case: ContrastiveCase, x, y, s, b, labels, **kw):
    if case.loss == "siglip":
        return fn(x, y, s, b, reduction=case.reduction, **kw)
    return fn(x, y, s, labels=labels, direction=case.direction, reduction=case.reduction, **kw)


def _grads(loss, wrt: list) -> list:
    need = [t for t in wrt if isinstance(t, torch.Tensor) and t.requires_grad]
    got = iter(torch.autograd.grad(loss, need, allow_unused=True)) if need else iter(())
    return [next(got) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in wrt]


def _leaf(t, dtype=None):
    """A leaf requiring grad that keeps ``t``'s strides (float64 copies need not)."""
    if not isinstance(t, torch.Tensor):
        return t
    return (t.detach().to(dtype) if dtype is not None else t.detach()).requires_grad_()


def run_op(backend: str, case: ContrastiveCase, inp: dict, w: torch.Tensor, emu=None) -> dict:
    """loss and the gradients of <loss, w> w.r.t. the features, logit_scale and logit_bias."""
    x, y, s, b = (_leaf(inp[k]) for k in ("image_features", "text_features", "logit_scale", "logit_bias"))
    if backend == "emulated":
        return _run_emulated(emu, case, x.detach(), y.detach(), inp, w)
    loss = _call(
        mmfast.siglip_loss if case.loss == "siglip" else mmfast.info_nce,
        case,
        x,
        y,
        s,
        b,
        inp["labels"],
        backend=backend,
    )
    dx, dy, ds, db = _grads((loss.double() * w).sum(), [x, y, s, b])
    return dict(loss=loss, dx=dx, dy=dy, ds=ds, db=db if case.loss == "siglip" else None)


def _run_emulated(emu, case: ContrastiveCase, x, y, inp: dict, w: torch.Tensor) -> dict:
    """The CUDA kernels under emulation, given what the cuda backend passes its custom ops."""
    s = torch.as_tensor(inp["logit_scale"], dtype=f32).reshape(())
    b = torch.as_tensor(inp["logit_bias"] if case.loss == "siglip" else 0.0, dtype=f32).reshape(())
    lab = inp["labels"]
    lab = None if lab is None else lab.to(torch.int64)
    codes = (LOSS_CODE[case.loss], DIRECTION_CODE[case.direction], REDUCTION_CODE[case.reduction])
    out, row_stat, col_stat = emu.forward(x, y, s, b, lab, *codes, 2)
    dx, dy, ds, db = emu.backward(w.float().reshape(out.shape), x, y, s, b, lab, row_stat, col_stat, *codes)
    scalar = lambda t, v: t if isinstance(v, torch.Tensor) else None  # noqa: E731 - a float gets no gradient
    return dict(
        loss=out,
        dx=dx,
        dy=dy,
        ds=scalar(ds, inp["logit_scale"]),
        db=scalar(db, inp["logit_bias"]) if case.loss == "siglip" else None,
    )


def run_reference(case: ContrastiveCase, inp: dict, w: torch.Tensor, naive_dtype=None) -> dict:
    """The reference in float64 (or, with ``naive_dtype``, PyTorch's naive loss in that dtype)."""
    dt = f64 if naive_dtype is None else naive_dtype
    x, y = _leaf(inp["image_features"], dt), _leaf(inp["text_features"], dt)
    s, b = (_leaf(inp[k], f64 if naive_dtype is None else f32) for k in ("logit_scale", "logit_bias"))
    lab = inp["labels"]
    lab = None if lab is None else lab.long()
    if naive_dtype is None:
        loss = _call(ref.siglip_loss if case.loss == "siglip" else ref.info_nce, case, x, y, s, b, lab)
    else:
        loss = _naive(case, x, y, s, b, lab)
    dx, dy, ds, db = _grads((loss.double() * w).sum(), [x, y, s, b])
    return dict(loss=loss, dx=dx, dy=dy, ds=ds, db=db if case.loss == "siglip" else None)


def _naive(case: ContrastiveCase, x, y, s, b, labels):
    """The loss computed by PyTorch entirely in the features' dtype (logits included)."""
    logits = (s.to(x.dtype) if isinstance(s, torch.Tensor) else s) * (x @ y.t())
    if case.loss == "siglip":
        logits = logits + (b.to(x.dtype) if isinstance(b, torch.Tensor) else b)
        z = 2 * torch.eye(x.shape[0], dtype=x.dtype) - 1
        rows = -F.logsigmoid(z * logits).sum(1)
        return rows.sum() / x.shape[0] if case.reduction == "mean" else rows.sum() if case.reduction == "sum" else rows
    return _ce(case, logits, labels)


def _ce(case: ContrastiveCase, logits, labels):
    return dense_info_nce(logits, labels, case.direction, case.reduction)


def naturals(case: ContrastiveCase, inp: dict, w: torch.Tensor) -> dict:
    """Bounds on |result| / (relative logit error) from the inputs' magnitudes (tests/prop_checks.py)."""
    x, y = inp["image_features"].double(), inp["text_features"].double()
    s = abs(float(inp["logit_scale"]))
    amax = lambda t: t.abs().max().item() if t.numel() else 0.0  # noqa: E731
    rows = _rows(case)
    total_w = amax(w) * (1 if case.reduction == "mean" else rows) * (2 if case.direction == "both" else 1)
    terms = case.M if case.loss == "siglip" else 1  # a SigLIP row sums M log-sigmoids
    xy = amax(x @ y.t()) if x.numel() and y.numel() else 0.0
    per_row = {"mean": 1, "sum": rows, "none": 1}[case.reduction] * terms * 2
    return dict(
        loss=per_row, dx=s * amax(y) * total_w * terms, dy=s * amax(x) * total_w * terms,
        ds=2 * xy * total_w * terms, db=total_w * terms,
    )  # fmt: skip


def compare(backend: str, case: ContrastiveCase, inp: dict, got: dict, w: torch.Tensor) -> None:
    want = run_reference(case, inp, w)
    acc = f64 if case.dtype == f64 else f32
    assert got["loss"].dtype == acc, f"{backend}: loss dtype {got['loss'].dtype}, expected {acc}"
    for name in ("dx", "dy"):
        assert got[name] is None or got[name].dtype == case.dtype, f"{backend}: {name} dtype {got[name].dtype}"
    torch_err = {}
    if case.dtype != f64 and case.N and case.M:
        naive = run_reference(case, inp, w, naive_dtype=case.dtype)
        torch_err = {n: max_err(naive[n], want[n]) for n in want if want[n] is not None and naive[n] is not None}
    bias = abs(float(inp["logit_bias"])) if case.loss == "siglip" else 0.0
    x, y = inp["image_features"].double(), inp["text_features"].double()
    lerr = logit_error(x, y, float(inp["logit_scale"]), case.dtype, bias) if case.D else 0.0
    nat = naturals(case, inp, w)
    for name in ("loss", "dx", "dy", "ds", "db"):
        dtype = acc if name in ("loss", "ds", "db") else case.dtype
        check_close(
            f"{backend} {name}", got[name], want[name], dtype, forward=name == "loss", natural=nat[name],
            logit_err=lerr, err_torch=torch_err.get(name, 0.0), operands=case.dtype,
        )  # fmt: skip
    for name in structural_zeros(case, inp):
        if got[name] is not None and got[name].numel():
            worst = got[name].double().abs().max().item()
            assert worst == 0, (
                f"{backend} {name}: max |{name}| = {worst:.3g} where the exact gradient is 0 by structure"
            )


def structural_zeros(case: ContrastiveCase, inp: dict) -> set[str]:
    """Gradients that are exactly 0 by structure, so the kernels' must be exactly 0 too
    (docs/numerics.md): one candidate per softmax row (InfoNCE with M = 1 for "image", N = 1 for
    "text" or "both") zeroes all of them; logit_scale = 0 zeroes the features'. (A reference that
    is 0 by cancellation or underflow is not: there only the bound applies.)"""
    names = set()
    single = {"image": case.M == 1, "text": case.N == 1, "both": case.N == 1}[case.direction]
    if case.loss == "info_nce" and single:
        names |= {"dx", "dy", "ds"}
    if float(inp["logit_scale"]) == 0:
        names |= {"dx", "dy"}
    return names


def _settings(backend: str, data) -> tuple[str, int]:
    if backend != "cpu":
        return "auto", torch.get_num_threads()
    path = data.draw(st.sampled_from(cpu_paths()), label="cpu_path")
    return path, data.draw(st.sampled_from([1, 2, 3]), label="threads")


def _check_case(backend: str, case: ContrastiveCase, data, emu_fixture) -> None:
    inp = contrastive_inputs(case)
    w = upstream(case)
    path, threads = _settings(backend, data)
    with cpu_setting(path, threads):
        got = run_op(backend, case, inp, w, emu=emu_fixture)
    compare(backend, case, inp, got, w)


def _emu(backend: str, request):
    return request.getfixturevalue("emu") if backend == "emulated" else None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["info_nce", "siglip"])
def test_loss(loss, backend, request):
    """The loss and every gradient against float64, over directions, reductions, labels, layouts
    and scales."""
    emu_fixture = _emu(backend, request)
    strategy = contrastive_cases(loss=loss, dtypes=DTYPES[backend], max_rows=MAX_ROWS[backend])

    @budget(*BUDGET[backend], slow=backend in SLOW)
    @given(data=st.data())
    @tallied(f"test_loss[{loss}-{backend}]")
    def prop(data):
        _check_case(backend, data.draw(strategy, label="case"), data, emu_fixture)

    prop()


# The op answers empty batches itself (docs/numerics.md) and never calls a kernel with them: the
# emulated CUDA kernels are not run here (the cpu and triton kernels are, through the op).
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "emulated"])
@pytest.mark.parametrize("loss", ["info_nce", "siglip"])
def test_empty(loss, backend, request):
    """N = 0 (and M = 0 where both are rows) or D = 0: "none" gives (0,), "sum" 0, "mean" NaN;
    D = 0 makes every logit 0 (InfoNCE rows log M, SigLIP rows from the bias alone)."""
    emu_fixture = _emu(backend, request)
    strategy = contrastive_cases(loss=loss, dtypes=DTYPES[backend], empty=True, max_rows=17)

    @budget(*[max(n // 2, 3) for n in BUDGET[backend]], slow=backend in SLOW)
    @given(data=st.data())
    @tallied(f"test_empty[{loss}-{backend}]")
    def prop(data):
        _check_case(backend, data.draw(strategy, label="case"), data, emu_fixture)

    prop()
