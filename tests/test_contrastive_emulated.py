"""The CUDA contrastive kernels (csrc/contrastive/kernel.cuh + glue.h), run on the CPU under the SIMT
emulation, against the float64 reference: forward and every gradient, small and odd shapes (tiles
are 64 x 64 with 32-wide feature chunks, so 1, 17, 33 exercise the edges, and 70 / 130 rows
exercise several tiles and several row stripes), all dtypes, both losses, every direction and
reduction, labels, the cp.async path (aligned rows) and the element path (unaligned rows).
"""

from __future__ import annotations

import os

import pytest
import torch

from mmfast import reference
from mmfast.ops.contrastive import stat_shapes
from tests import emu_build
from tests.utils import BWD_TOL, FWD_TOL, contrastive_inputs

LOSS = {"info_nce": 0, "siglip": 1}
DIRECTION = {"both": 0, "image": 1, "text": 2}
REDUCTION = {"mean": 0, "sum": 1, "none": 2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def emu():
    return emu_build.load_module("contrastive_emu", "emu/contrastive_emu.cpp")


def _labels(direction: str, N: int, M: int, kind: str) -> torch.Tensor | None:
    if kind == "default":
        return None
    if direction == "both":
        return torch.randperm(N)
    n, classes = (M, N) if direction == "text" else (N, M)
    return torch.randint(0, classes, (n,))


def _reference(loss, x, y, s, b, labels, direction, reduction):
    if loss == "siglip":
        return reference.siglip_loss(x, y, s, b, reduction=reduction)
    return reference.info_nce(x, y, s, labels=labels, direction=direction, reduction=reduction)


def _check(emu, loss, N, M, D, dtype, direction="both", reduction="mean", labels="default", stripes=2, **kw):
    """Forward and backward of the emulated kernels vs the float64 reference on the same inputs."""
    inp = contrastive_inputs(N=N, M=M, D=D, dtype=dtype, **kw)
    x, y, s, b = inp["image_features"], inp["text_features"], inp["logit_scale"], inp["logit_bias"]
    lab = _labels(direction, N, M, labels)
    args = (LOSS[loss], DIRECTION[direction], REDUCTION[reduction])
    out, row_stat, col_stat = emu.forward(x, y, s, b, lab, *args, stripes)

    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    s64, b64 = (t.detach().double().requires_grad_() for t in (s, b))
    want = _reference(loss, x64, y64, s64, b64, lab, direction, reduction)
    assert out.dtype == torch.float32 and out.shape == want.shape
    torch.testing.assert_close(out.double(), want.detach(), **FWD_TOL[dtype])
    # the saved statistics: the exact row / column log-sum-exp where the direction reads them (one
    # layout on every backend)
    r, c = stat_shapes(N, M, LOSS[loss], DIRECTION[direction])
    assert row_stat.shape == (r,) and col_stat.shape == (c,)
    logits = s64.detach() * x64.detach() @ y64.detach().t()
    if r:
        torch.testing.assert_close(row_stat.double(), logits.logsumexp(1), **FWD_TOL[dtype])
    if c:
        torch.testing.assert_close(col_stat.double(), logits.logsumexp(0), **FWD_TOL[dtype])

    grad = torch.randn(want.shape, dtype=torch.float32)
    want.backward(grad.double())
    dx, dy, ds, db = emu.backward(grad, x, y, s, b, lab, row_stat, col_stat, *args)
    assert dx.dtype == dtype and dy.dtype == dtype and dx.shape == x.shape and dy.shape == y.shape
    tol = BWD_TOL[dtype]
    torch.testing.assert_close(dx.double(), x64.grad, **tol)
    torch.testing.assert_close(dy.double(), y64.grad, **tol)
    # d(scale) sums N * M terms: its tolerance grows with the magnitude of the sum.
    torch.testing.assert_close(
        ds.double(), s64.grad, atol=tol["atol"] * max(1.0, abs(float(s64.grad))), rtol=tol["rtol"]
    )
    if loss == "siglip":
        torch.testing.assert_close(
            db.double(), b64.grad, atol=tol["atol"] * max(1.0, abs(float(b64.grad))), rtol=tol["rtol"]
        )
    else:
        assert float(db) == 0.0


# (N, D) x dtype for the CLIP loss, reductions rotating so each meets each dtype.
BOTH_CASES = [
    (N, D, dtype, red)
    for i, (N, D, dtype) in enumerate((N, D, dt) for N in (1, 17, 33) for D in (3, 64) for dt in DTYPES)
    for red in [("mean", "sum", "none")[i % 3]]
]


@pytest.mark.parametrize("N,D,dtype,reduction", BOTH_CASES)
def test_info_nce_both(emu, N, D, dtype, reduction):
    _check(emu, "info_nce", N, N, D, dtype, "both", reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "direction,N,M,D,labels,reduction",
    [
        ("image", 17, 33, 64, "random", "mean"),  # extra texts are extra negatives
        ("image", 33, 33, 3, "default", "none"),
        ("text", 33, 17, 64, "random", "none"),
        ("text", 17, 1, 3, "default", "sum"),
        ("both", 33, 33, 64, "random", "none"),  # a permutation: text j's target is inv[j]
    ],
)
def test_info_nce_directions(emu, direction, N, M, D, labels, reduction, dtype):
    _check(emu, "info_nce", N, M, D, dtype, direction, reduction, labels)


@pytest.mark.parametrize(
    "N,D,dtype,reduction",
    [
        (1, 3, torch.float32, "mean"),
        (17, 64, torch.float32, "none"),
        (33, 3, torch.float32, "sum"),
        (17, 3, torch.bfloat16, "mean"),
        (33, 64, torch.bfloat16, "none"),
        (1, 64, torch.float16, "sum"),
        (33, 64, torch.float16, "mean"),
    ],
)
def test_siglip(emu, N, D, dtype, reduction):
    _check(emu, "siglip", N, N, D, dtype, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
def test_several_tiles_and_stripes(emu, dtype):
    """3 row tiles over 2 stripes (one stripe merges two tiles), 2 column tiles, D = 72: two feature
    chunks of the logits GEMM plus a partial one, two of the gradient GEMM."""
    _check(emu, "info_nce", 130, 70, 72, dtype, "image", "none", "random", stripes=2)


def test_siglip_several_tiles(emu):
    _check(emu, "siglip", 70, 70, 40, torch.bfloat16, reduction="mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_rows(emu, dtype):
    """Non-contiguous rows (stride 2 D, columns strided): the glue makes them contiguous; D = 20 gives
    rows of 40 / 80 bytes, so bf16 rows are not 16-byte aligned and the element-load path runs."""
    _check(emu, "info_nce", 33, 33, 20, dtype, "both", "mean", noncontiguous=True)


@pytest.mark.parametrize("loss", ["info_nce", "siglip"])
def test_large_logits(emu, loss):
    """s = 100 with unnormalised features (norms near 8): logits of several thousand. Everything stays
    finite and within 1e-3 of float64 relative to the largest value. (The kernels lose a little to
    PyTorch's fp32 loss here: the saved log-sum-exp of a row near 6000 is rounded by up to 2.4e-4,
    which scales that row's softmax; d(scale) came out 5e-5 off in relative terms, fp32 PyTorch 3e-6.)"""
    inp = contrastive_inputs(N=33, D=64, normalize=False, scale=100.0)
    x, y, s, b = inp["image_features"], inp["text_features"], inp["logit_scale"], inp["logit_bias"]
    args = (LOSS[loss], 0, REDUCTION["none"])
    out, row_stat, col_stat = emu.forward(x, y, s, b, None, *args, 2)
    grad = torch.randn(out.shape)
    dx, dy, ds, _ = emu.backward(grad, x, y, s, b, None, row_stat, col_stat, *args)
    leaves = [t.detach().double().requires_grad_() for t in (x, y, s, b)]
    want = _reference(loss, *leaves, None, "both", "none")
    want.backward(grad.double())
    for name, got, ref in zip(
        ("loss", "dx", "dy", "dscale"), (out, dx, dy, ds), [want.detach()] + [t.grad for t in leaves[:3]]
    ):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), ref, atol=1e-3 * float(ref.abs().max()), rtol=1e-3, msg=name)


def test_deterministic(emu):
    inp = contrastive_inputs(N=70, M=70, D=40, dtype=torch.bfloat16)
    args = (inp["image_features"], inp["text_features"], inp["logit_scale"], inp["logit_bias"], None, 0, 0, 0)
    out1, r1, c1 = emu.forward(*args, 2)
    out2, _, _ = emu.forward(*args, 2)
    assert torch.equal(out1, out2)
    g = torch.tensor(1.0)
    b1 = emu.backward(g, *args[:5], r1, c1, 0, 0, 0)
    b2 = emu.backward(g, *args[:5], r1, c1, 0, 0, 0)
    for u, v in zip(b1, b2):
        assert torch.equal(u, v)


def test_nan_input_gives_nan(emu):
    inp = contrastive_inputs(N=17, D=8)
    x = inp["image_features"].clone()
    x[3, 2] = float("nan")
    out, _, _ = emu.forward(x, inp["text_features"], inp["logit_scale"], inp["logit_bias"], None, 0, 0, 0, 2)
    assert torch.isnan(out)
    out, _, _ = emu.forward(x, inp["text_features"], inp["logit_scale"], inp["logit_bias"], None, 1, 0, 0, 2)
    assert torch.isnan(out)


def test_bad_input_errors(emu):
    inp = contrastive_inputs(N=5, D=8)
    x, y, s, b = inp["image_features"], inp["text_features"], inp["logit_scale"], inp["logit_bias"]
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        emu.forward(x.double(), y.double(), s, b, None, 0, 0, 0, 2)
    with pytest.raises(RuntimeError, match="D="):
        emu.forward(x, y[:, :4], s, b, None, 0, 0, 0, 2)
    with pytest.raises(RuntimeError, match="N == M"):
        emu.forward(x, y[:3], s, b, None, 0, 0, 0, 2)
    with pytest.raises(RuntimeError, match="labels must have shape"):
        emu.forward(x, y, s, b, torch.arange(4), 0, 0, 0, 2)
    with pytest.raises(RuntimeError, match="grad_loss must hold"):
        emu.backward(torch.ones(3), x, y, s, b, None, torch.zeros(5), torch.zeros(5), 0, 0, 2)


@pytest.mark.slow
def test_thread_sanitizer():
    """csrc/emu/tsan_contrastive.cpp under -fsanitize=thread: the emulated forward and backward (a real
    thread per CUDA thread) must match a naive float64 loop with no data race reported. Removing the
    block_sync() before the column reduction in fwd_tiles_kernel makes this fail with two races."""
    exe = emu_build.build_executable("tsan_contrastive", "emu/tsan_contrastive.cpp", ("-fsanitize=thread", "-O1", "-g"))
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=66")
    rc, out = emu_build.run([str(exe)], timeout=900, env=env)
    assert "ThreadSanitizer" not in out, out[-6000:]
    assert rc == 0 and out.count("ok ") == 3, out[-6000:]
