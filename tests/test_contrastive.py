"""InfoNCE / SigLIP: the cpu kernel (torch.ops.mmfast.contrastive_*) against the float64 reference.

Every case checks the loss and every gradient (image and text features, logit_scale, logit_bias) on
fresh random inputs. fp32 uses the tolerance tables; bf16/fp16 compare the kernel's error with
PyTorch's own error when the naive loss runs at that precision (``err <= 2 * err_torch``).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import mmfast
from mmfast import _dispatch
from mmfast import reference as ref
from tests import emu_build
from tests.utils import BWD_TOL, FWD_TOL, contrastive_inputs, dense_info_nce, has_avx512_bf16, has_avx512f

pytestmark = pytest.mark.skipif(_dispatch.availability("cpu") is not None, reason="mmfast._C not built")

LOW = (torch.bfloat16, torch.float16)


def _loss_and_grads(fn, x: Tensor, y: Tensor, s: Tensor, b: Tensor | None, g: Tensor | None, **kw) -> list[Tensor]:
    """[loss, dx, dy, ds(, db)] of fn on leaf copies of the inputs; ``g`` weights a per-row loss."""
    leaves = [t.detach().clone().requires_grad_() for t in ((x, y, s) if b is None else (x, y, s, b))]
    out = fn(*leaves, **kw)
    (out if g is None else (out * g.to(out.dtype)).sum()).backward()
    return [out.detach()] + [t.grad for t in leaves]


def _as64(inp: dict) -> dict:
    return {k: v.detach().double() for k, v in inp.items()}


def _naive_low(x, y, s, b=None, *, siglip=False, **kw):
    """The loss computed by PyTorch entirely in x's dtype (logits included): its own error at that precision."""
    logits = s.to(x.dtype) * (x @ y.t())
    if siglip:
        logits = logits + b.to(x.dtype)
        z = 2 * torch.eye(x.shape[0], dtype=x.dtype) - 1
        rows = -F.logsigmoid(z * logits).sum(1)
        return rows.sum() / x.shape[0] if kw["reduction"] == "mean" else rows
    return dense_info_nce(logits, kw.get("labels"), kw["direction"], kw["reduction"])


def _check(dtype: torch.dtype, got: list[Tensor], want: list[Tensor], torch_low: list[Tensor] | None = None) -> None:
    names = ["loss", "d_image", "d_text", "d_scale", "d_bias"]
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    for i, (name, a, e) in enumerate(zip(names, got, want)):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        if dtype in LOW:  # the kernel's error against PyTorch's own at this precision
            err = (a.double() - e).abs().max().item()
            err_torch = (torch_low[i].double() - e).abs().max().item()
            scale = e.abs().max().item()
            assert err <= 2 * err_torch + 1e-3 * scale + 1e-6, f"{name}: err {err:.3g} vs torch {err_torch:.3g}"
        else:
            tol = FWD_TOL[dtype] if i == 0 else BWD_TOL[dtype]
            torch.testing.assert_close(a.double(), e, **tol, msg=lambda m, name=name: f"{name}: {m}")


def _run_info_nce(dtype, N, M, D, direction, reduction="mean", labels=None, noncontiguous=False, **inp_kw):
    inp = contrastive_inputs(N=N, M=M, D=D, dtype=dtype, noncontiguous=noncontiguous, **inp_kw)
    x, y, s = inp["image_features"], inp["text_features"], inp["logit_scale"]
    rows = M if direction == "text" else N
    g = torch.rand(rows, dtype=torch.float64) + 0.5 if reduction == "none" else None
    kw = dict(labels=labels, direction=direction, reduction=reduction)
    got = _loss_and_grads(mmfast.info_nce, x, y, s, None, g, backend="cpu", **kw)
    e = _as64(inp)
    kw64 = dict(kw, labels=None if labels is None else labels.long())
    want = _loss_and_grads(ref.info_nce, e["image_features"], e["text_features"], e["logit_scale"], None, g, **kw64)
    low = _loss_and_grads(_naive_low, x, y, s, None, g, **kw64) if dtype in LOW else None
    _check(dtype, got, want, low)
    return got


# (N, M, D, direction): realistic and odd sizes, partial tiles, M > N for the image direction.
INFO_NCE_SHAPES = [
    (1, 1, 1, "both"),
    (2, 2, 3, "both"),
    (17, 17, 64, "both"),
    (97, 97, 100, "both"),
    (256, 256, 512, "both"),
    (1000, 1000, 64, "both"),
    (2, 17, 1152, "image"),
    (97, 1000, 3, "image"),
    (17, 256, 512, "image"),
    (256, 97, 100, "text"),
    (1000, 17, 1, "text"),
]


@pytest.mark.parametrize("N,M,D,direction", INFO_NCE_SHAPES)
def test_info_nce_fp32(N, M, D, direction):
    _run_info_nce(torch.float32, N, M, D, direction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("direction", ["both", "image", "text"])
def test_info_nce_reductions(direction, reduction):
    _run_info_nce(torch.float32, 97, 97, 64, direction, reduction)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("N,M,D,direction", [(17, 17, 64, "both"), (256, 256, 512, "both"), (97, 300, 100, "image")])
def test_info_nce_low_precision(dtype, N, M, D, direction):
    _run_info_nce(dtype, N, M, D, direction)


def _run_siglip(dtype, N, D):
    inp = contrastive_inputs(N=N, D=D, dtype=dtype)
    args = [inp[k] for k in ("image_features", "text_features", "logit_scale", "logit_bias")]
    got = _loss_and_grads(mmfast.siglip_loss, *args, None, backend="cpu", reduction="mean")
    want = _loss_and_grads(ref.siglip_loss, *[a.double() for a in args], None, reduction="mean")
    low = _loss_and_grads(_naive_low, *args, None, siglip=True, reduction="mean") if dtype in LOW else None
    _check(dtype, got, want, low)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,D", [(1, 1), (17, 3), (97, 100), (256, 512), (1000, 64)])
def test_siglip(dtype, N, D):
    _run_siglip(dtype, N, D)


# bf16 runs on the vdpbf16ps kernel (packed operands, Gᵀ buffer) where the CPU has AVX512_BF16 and
# on MKL otherwise; mmfast.cpu_options(gemm="blas") forces MKL. Both paths over several tiles in each
# direction (BN = BM = 256), partial last tiles, odd D (odd-K tails), odd M (padded pairs), labels.
@pytest.mark.parametrize("vnni", ["1", "0"])
@pytest.mark.parametrize(
    "N,M,D,direction,labels",
    [
        (300, 300, 33, "both", None),
        (513, 513, 64, "both", "perm"),
        (17, 513, 65, "image", None),
        (97, 300, 601, "image", None),
        (513, 40, 7, "text", None),
        (300, 300, 65, "siglip", None),
    ],
)
def test_bf16_gemm_paths(vnni, N, M, D, direction, labels):
    if vnni == "1" and not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512_BF16: the vdpbf16ps kernel cannot run")
    with mmfast.cpu_options(gemm="avx512_bf16" if vnni == "1" else "blas"):
        if direction == "siglip":
            _run_siglip(torch.bfloat16, N, D)
            return
        _run_info_nce(torch.bfloat16, N, M, D, direction, labels=torch.randperm(N) if labels else None)


# fp32 runs on the AVX-512 FMA kernel where the CPU has AVX-512F (yᵀ packed, y / x / Gᵀ read in
# place, InfoNCE's LSE and gradient tile computed in the logits GEMM's epilogue) and on MKL SGEMM
# otherwise; mmfast.cpu_options(gemm="blas") forces MKL. Both paths: register-tile row tails (N % 8),
# masked column tails (M % 32, M < 16), several 256-wide tiles, D above the 256-deep K chunk, odd D,
# labels, every direction, SigLIP.
@pytest.mark.parametrize("avx512", ["1", "0"])
@pytest.mark.parametrize(
    "N,M,D,direction,labels",
    [
        (300, 300, 33, "both", None),
        (517, 517, 64, "both", "perm"),
        (13, 13, 1152, "both", None),
        (9, 300, 100, "image", "random"),
        (600, 7, 65, "text", None),
        (300, 300, 65, "siglip", None),
    ],
)
def test_fp32_gemm_paths(avx512, N, M, D, direction, labels):
    if avx512 == "1" and not has_avx512f():
        pytest.skip("this CPU has no AVX-512F: the fp32 FMA kernel cannot run")
    with mmfast.cpu_options(gemm="avx512" if avx512 == "1" else "blas"):
        if direction == "siglip":
            _run_siglip(torch.float32, N, D)
            return
        rows = M if direction == "text" else N
        lab = {"perm": torch.randperm(rows), "random": torch.randint(0, M, (rows,)), None: None}[labels]
        _run_info_nce(torch.float32, N, M, D, direction, labels=lab)


@pytest.mark.parametrize("avx512", ["1", "0"])
def test_fp32_nan_reaches_gradients(avx512):
    """A NaN feature: NaN loss and NaN gradients on both paths, no clamped numbers."""
    if avx512 == "1" and not has_avx512f():
        pytest.skip("this CPU has no AVX-512F")
    inp = contrastive_inputs(N=97, D=64)
    x = inp["image_features"].detach().clone()
    x[5, 3] = float("nan")
    x.requires_grad_()
    y = inp["text_features"].detach().clone().requires_grad_()
    with mmfast.cpu_options(gemm="avx512" if avx512 == "1" else "blas"):
        loss = mmfast.info_nce(x, y, 10.0, backend="cpu")
        loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(x.grad).any() and torch.isnan(y.grad).any()


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_siglip_reductions(reduction):
    inp = contrastive_inputs(N=97, D=64)
    args = [inp[k] for k in ("image_features", "text_features", "logit_scale", "logit_bias")]
    g = torch.rand(97, dtype=torch.float64) + 0.5 if reduction == "none" else None
    got = _loss_and_grads(mmfast.siglip_loss, *args, g, backend="cpu", reduction=reduction)
    want = _loss_and_grads(ref.siglip_loss, *[a.double() for a in args], g, reduction=reduction)
    _check(torch.float32, got, want)


def test_labels():
    _run_info_nce(torch.float32, 97, 97, 64, "both", labels=torch.randperm(97))
    _run_info_nce(torch.float32, 17, 300, 64, "image", labels=torch.randint(0, 300, (17,)))
    _run_info_nce(torch.float32, 300, 17, 64, "text", labels=torch.randint(0, 300, (17,)), reduction="none")
    _run_info_nce(torch.float32, 300, 17, 64, "image", labels=torch.randint(0, 17, (300,)).int())


def test_noncontiguous():
    _run_info_nce(torch.float32, 97, 97, 100, "both", noncontiguous=True)
    _run_info_nce(torch.bfloat16, 97, 200, 64, "image", noncontiguous=True)


@pytest.mark.parametrize("direction", ["both", "image"])
def test_large_scale_unnormalised(direction):
    """s = 100 and feature norms up to 10: logits near 1e4, still finite and accurate."""
    inp = contrastive_inputs(N=97, M=97 if direction == "both" else 150, D=64, scale=100.0)
    for k in ("image_features", "text_features"):
        inp[k] = inp[k] * torch.empty(inp[k].shape[0], 1).uniform_(1, 10)
    x, y, s = inp["image_features"], inp["text_features"], inp["logit_scale"]
    got = _loss_and_grads(mmfast.info_nce, x, y, s, None, None, backend="cpu", direction=direction)
    e = _as64(inp)
    want = _loss_and_grads(
        ref.info_nce, e["image_features"], e["text_features"], e["logit_scale"], None, None, direction=direction
    )
    fp32 = _loss_and_grads(ref.info_nce, x, y, s, None, None, direction=direction)  # PyTorch in fp32
    # Gradients are ill-conditioned here: an fp32 logit near 1e4 carries an absolute rounding error
    # ~1e-3 (eps * |S|), which moves P = softmax by P (1 - P) times that. Any fp32 GEMM order gives
    # errors of this size, so gradients get a tolerance relative to their largest entry.
    for i, (a, w, t) in enumerate(zip(got, want, fp32)):
        assert torch.isfinite(a).all()
        err, err_torch = (a.double() - w).abs().max().item(), (t.double() - w).abs().max().item()
        if i == 0:
            assert err <= 2 * err_torch + 1e-6 * w.abs().max().item()
        else:
            assert err <= 2 * err_torch + 2e-4 * w.abs().max().item()
    inp = contrastive_inputs(N=97, D=64, scale=100.0, bias=-10.0)
    args = [inp[k] * (10 if "features" in k else 1) for k in ("image_features", "text_features")]
    args += [inp["logit_scale"], inp["logit_bias"]]
    got = _loss_and_grads(mmfast.siglip_loss, *args, None, backend="cpu")
    want = _loss_and_grads(ref.siglip_loss, *[a.double() for a in args], None)
    for a, w in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


@pytest.mark.parametrize("case", ["both", "image", "text", "siglip"])
def test_gradcheck_float64(case):
    inp = contrastive_inputs(N=7, M={"image": 9, "text": 5}.get(case, 7), D=5, dtype=torch.float64)
    x, y = inp["image_features"].requires_grad_(), inp["text_features"].requires_grad_()
    s = inp["logit_scale"].double().requires_grad_()
    if case == "siglip":
        b = inp["logit_bias"].double().requires_grad_()
        assert torch.autograd.gradcheck(lambda *a: mmfast.siglip_loss(*a, backend="cpu"), (x, y, s, b))
        return
    n = y.shape[0] if case == "text" else x.shape[0]
    labels = torch.randperm(n) if case == "both" else None
    kw = dict(labels=labels, direction=case, reduction="none", backend="cpu")
    assert torch.autograd.gradcheck(lambda *a: mmfast.info_nce(*a, **kw), (x, y, s))


def test_float_scale_and_dtypes_out():
    inp = contrastive_inputs(N=17, D=64, dtype=torch.bfloat16, requires_grad=True)
    x, y = inp["image_features"], inp["text_features"]
    loss = mmfast.info_nce(x, y, 14.3, backend="cpu")
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and y.grad.dtype == torch.bfloat16
    want = ref.info_nce(x.detach().double(), y.detach().double(), 14.3)
    torch.testing.assert_close(loss.double(), want, **FWD_TOL[torch.bfloat16])
    out = mmfast.siglip_loss(x.detach().double(), y.detach().double(), 10.0, -5.0, reduction="none", backend="cpu")
    assert out.dtype == torch.float64 and out.shape == (17,)


def test_nan_input_gives_nan():
    inp = contrastive_inputs(N=97, D=64, requires_grad=False)
    x = inp["image_features"].clone()
    x[5, 3] = float("nan")
    assert torch.isnan(mmfast.info_nce(x, inp["text_features"], 10.0, backend="cpu"))
    assert torch.isnan(mmfast.siglip_loss(x, inp["text_features"], 10.0, -10.0, backend="cpu"))


def test_deterministic():
    inp = contrastive_inputs(N=300, M=300, D=64)
    x, y, s = inp["image_features"], inp["text_features"], inp["logit_scale"]
    a = _loss_and_grads(mmfast.info_nce, x, y, s, None, None, backend="cpu")
    b = _loss_and_grads(mmfast.info_nce, x, y, s, None, None, backend="cpu")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_one_thread_matches():
    """The per-thread partials (column LSE, dy) merge to the same answer with one thread."""
    inp = contrastive_inputs(N=300, M=300, D=64)
    x, y, s = inp["image_features"], inp["text_features"], inp["logit_scale"]
    a = _loss_and_grads(mmfast.info_nce, x, y, s, None, None, backend="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = _loss_and_grads(mmfast.info_nce, x, y, s, None, None, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("threads", [3, 4])
def test_thread_chunks(threads):
    """The backward runs in phases: in phase p, row chunk c takes column chunk (c + p) mod T, and dx
    and dy are written in place, not zeroed first. 1100 rows = 5 row blocks of 256: 3 threads get
    2 + 2 + 1 blocks, 4 threads 2 + 2 + 1 + 0 (a chunk without rows). 40 texts: column blocks of 32,
    so some column chunks are empty. 300 x 300 on 4 threads: column blocks narrowed to 96 (three of
    96 and one of 12), one per thread. Each block's first product must overwrite it, in whichever
    phase it comes."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _run_info_nce(torch.float32, 1100, 1100, 16, "both")
        _run_info_nce(torch.float32, 1100, 40, 16, "image", labels=torch.randint(0, 40, (1100,)))
        _run_info_nce(torch.float32, 300, 300, 64, "both", labels=torch.randperm(300))
        _run_info_nce(torch.bfloat16, 300, 300, 64, "both")
        _run_siglip(torch.float32, 300, 64)
    finally:
        torch.set_num_threads(saved)


def test_gradient_blocks_reused():
    """dx and dy (8 MB each here) come from the huge-page block cache and are not zeroed:
    a second step with other inputs gets the first step's blocks back and must still be exact."""
    for _ in range(2):
        _run_info_nce(torch.float32, 4096, 4096, 512, "both")


def test_auto_picks_cpu_and_cuda_reasons():
    args = dict(dtype=torch.float32, N=4, M=4, D=8, direction="both", reduction="mean")
    from mmfast.ops import contrastive  # noqa: PLC0415

    assert _dispatch.select(contrastive.INFO_NCE, "auto", torch.device("cpu"), args).name == "cpu"
    assert _dispatch.select(contrastive.SIGLIP_LOSS, "auto", torch.device("cpu"), args).name == "cpu"
    reasons = contrastive.INFO_NCE.backends["cuda"].load()[1](**{**args, "dtype": torch.float64})
    assert reasons and "float64" in reasons[0]
    assert "not yet verified on hardware" in mmfast.backends()["info_nce"]["cuda"]["note"]


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.
# ---------------------------------------------------------------------------------------------
def _bad_cases():
    x, y, x32 = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    return [
        ("mismatched D", lambda: mmfast.info_nce(x, torch.randn(4, 7), 1.0), ValueError, "D="),
        ("N != M both", lambda: mmfast.info_nce(x, torch.randn(5, 8), 1.0), ValueError, "direction='both'"),
        ("siglip N != M", lambda: mmfast.siglip_loss(x, torch.randn(5, 8), 1.0, 0.0), ValueError, "as many"),
        ("labels range", lambda: mmfast.info_nce(x, y, 1.0, labels=torch.tensor([0, 1, 2, 4])), ValueError, "labels"),
        (
            "labels negative",
            lambda: mmfast.info_nce(x, y, 1.0, direction="image", labels=torch.tensor([0, 1, 2, -1])),
            ValueError,
            "labels",
        ),
        ("labels dtype", lambda: mmfast.info_nce(x, y, 1.0, labels=torch.zeros(4)), TypeError, "labels"),
        ("labels shape", lambda: mmfast.info_nce(x, y, 1.0, labels=torch.arange(3)), ValueError, "labels"),
        (
            "labels not perm",
            lambda: mmfast.info_nce(x, y, 1.0, labels=torch.tensor([0, 0, 1, 2])),
            ValueError,
            "permutation",
        ),
        ("mixed dtypes", lambda: mmfast.info_nce(x, y.double(), 1.0), TypeError, "text_features"),
        ("int features", lambda: mmfast.info_nce(x.long(), y.long(), 1.0), TypeError, "image_features"),
        ("not 2-D", lambda: mmfast.info_nce(x[None], y, 1.0), ValueError, "image_features"),
        ("scale shape", lambda: mmfast.info_nce(x, y, torch.ones(2)), ValueError, "logit_scale"),
        ("scale type", lambda: mmfast.info_nce(x, y, "1.0"), TypeError, "logit_scale"),
        ("bias shape", lambda: mmfast.siglip_loss(x, y, 1.0, torch.ones(3)), ValueError, "logit_bias"),
        ("direction", lambda: mmfast.info_nce(x, y, 1.0, direction="rows"), ValueError, "direction"),
        ("reduction", lambda: mmfast.info_nce(x32, y, 1.0, reduction="avg"), ValueError, "reduction"),
        ("image M < N", lambda: mmfast.info_nce(x, y[:2], 1.0, direction="image"), ValueError, "M >= N"),
        ("meta device", lambda: mmfast.info_nce(x, y.to("meta"), 1.0), ValueError, "text_features"),
        ("cpu on meta", lambda: mmfast.info_nce(x.to("meta"), y.to("meta"), 1.0, backend="cpu"), RuntimeError, "cpu"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(case):
    _, fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()


def test_op_checks_labels_and_shapes():
    """The C++ op checks what the Python layer normally validates (it can be called directly)."""
    x, y, s, b = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(1.0), torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="labels must lie"):
        torch.ops.mmfast.contrastive_forward(x, y, s, b, torch.tensor([0, 1, 2, 4]), 0, 0, 0)
    with pytest.raises(RuntimeError, match="D="):
        torch.ops.mmfast.contrastive_forward(x, torch.randn(4, 7), s, b, None, 0, 0, 0)
    with pytest.raises(RuntimeError, match="default labels"):
        torch.ops.mmfast.contrastive_forward(x, y[:2], s, b, None, 0, 1, 0)


# ---------------------------------------------------------------------------------------------
# Custom-op registrations: opcheck and torch.compile.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loss,direction,M,labels",
    [(0, 0, 9, None), (0, 0, 9, torch.randperm(9)), (0, 1, 12, None), (0, 2, 7, None), (1, 0, 9, None)],
)
@pytest.mark.parametrize("reduction", [0, 2])
def test_opcheck(loss, direction, M, labels, reduction):
    x = torch.randn(9, 5, requires_grad=True)
    y = torch.randn(M, 5, requires_grad=True)
    s, b = torch.tensor(3.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    args = (x, y, s, b, labels, loss, direction, reduction)
    torch.library.opcheck(torch.ops.mmfast.contrastive_forward.default, args)


def test_compile_fullgraph(tmp_path, monkeypatch):
    # a private Inductor cache: one shared with an older checkout may hold graphs compiled against
    # that checkout's fake functions of the same custom ops (the cache key does not cover them)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    inp = contrastive_inputs(N=33, D=16, requires_grad=True)
    x, y, s = inp["image_features"], inp["text_features"], inp["logit_scale"]
    fn = torch.compile(lambda a, b, c: mmfast.info_nce(a, b, c, backend="cpu"), fullgraph=True)
    got = _loss_and_grads(fn, x, y, s, None, None)
    want = _loss_and_grads(mmfast.info_nce, x, y, s, None, None, backend="cpu")
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)


@pytest.mark.skipif(not has_avx512f(), reason="the fp32 tile kernel needs AVX-512F")
def test_tiles_tool(tmp_path):
    """benchmarks/contrastive_tiles.cpp, the per-product timing replay of the loss's tile loop
    (benchmarks/PERFORMANCE.md), builds; its fp32 products (both x layouts and page sizes) and, where
    the CPU has AVX512_BF16, its bf16 products match a float64 reference on odd shapes; its timing
    modes run and it rejects bad arguments."""
    exe = tmp_path / "tiles"
    srcs = [emu_build.ROOT / "benchmarks" / "contrastive_tiles.cpp"]
    srcs += [emu_build.CSRC / "common" / f for f in ("cpu_gemm_f32.cpp", "cpu_gemm_bf16.cpp")]
    cmd = [emu_build.cxx(), "-O2", "-mavx2", "-mfma", "-fopenmp", f"-I{emu_build.CSRC}", *map(str, srcs)]
    rc, log = emu_build.run([*cmd, "-o", str(exe)])
    assert rc == 0, log
    rc, out = emu_build.run([str(exe), "--check"], env={**os.environ, "OMP_NUM_THREADS": "3"})
    checks = 12 + (3 if has_avx512_bf16() else 0)
    assert rc == 0 and out.count(" ok") == checks and "MISMATCH" not in out, out
    rc, out = emu_build.run([str(exe), "--n", "512", "--d", "64", "--reps", "1", "--rowmajor-x"])
    assert rc == 0 and "grad_y" in out and "row-major" in out, out
    if has_avx512_bf16():
        rc, out = emu_build.run([str(exe), "--n", "512", "--d", "64", "--reps", "1", "--bf16"])
        assert rc == 0 and "grad_y" in out and "bf16" in out, out
    rc, out = emu_build.run([str(exe), "--n", "0"])
    assert rc == 2 and "usage" in out, out
