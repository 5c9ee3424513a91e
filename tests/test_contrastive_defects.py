"""Regression tests of the contrastive defects of issue 17, each over its class (shapes, dtypes,
directions, reductions) on every backend that runs here (cpu and its code paths, triton under the
interpreter, the CUDA kernels under emulation, reference):

  #3   labels of any stride (the triton kernel read strided int64 labels as contiguous);
  #4   no NaN from padding lanes (w * exp(-lse) = inf times a zero u in d(logit_scale));
  #6   second-order gradients: a clear error, not silent zeros;
  #12  info_nce(labels=...) under torch.compile(fullgraph=True), the labels still checked;
  #14  gradient exactly 0 where the exact gradient is 0 (one candidate per row: the backward must
       recompute s * u with the forward's rounding, bit for bit).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast import reference as ref
from tests import contrastive_backends as cb
from tests.utils import BWD_TOL, FWD_TOL

# cpu code paths: (name, mmfast.cpu_options). The bf16 vdpbf16ps kernel and the fp32 AVX-512 kernel
# (with its fused epilogues) where the CPU has them ("auto"), MKL when forced ("blas").
CPU_PATHS = [("cpu", {}), ("cpu-mkl", {"gemm": "blas"})]
ALL = [p[0] for p in CPU_PATHS] + ["triton", "emu", "reference"]


@pytest.fixture
def backend(request):
    """The backend name for tests/contrastive_backends.py, with the cpu path's options applied."""
    name = request.param
    with mmfast.cpu_options(**dict(CPU_PATHS).get(name, {})):
        yield "cpu" if name.startswith("cpu") else name


def _close64(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, name: str, fwd: bool = False) -> None:
    tol = (FWD_TOL if fwd else BWD_TOL)[dtype]
    atol = tol["atol"] * max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")


def _reference64(x, y, s, **kw):
    return cb.info_nce("reference", x.double(), y.double(), s, **kw)


# ---------------------------------------------------------------------------------------------
# #14: one candidate per row (or column): the exact gradient is 0, and so must the kernels' be.
# ---------------------------------------------------------------------------------------------
ONE_CANDIDATE = [  # (N, M, D, direction): a single text (image) for every image (text)
    (1, 1, 32, "both"),
    (64, 1, 33, "image"),
    (300, 1, 64, "image"),
    (1, 97, 32, "text"),
]


@pytest.mark.parametrize("backend", ALL, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,M,D,direction", ONE_CANDIDATE)
@pytest.mark.parametrize("scale", [100.0, 1000.0])
def test_one_candidate_gradient_is_exactly_zero(backend, dtype, N, M, D, direction, scale):
    cb.skip_unless(backend, dtype)
    x, y = torch.randn(N, D).to(dtype), torch.randn(M, D).to(dtype)  # unnormalised: logits in the 1e4s
    labels = None if direction == "both" else torch.zeros(N if direction == "image" else M, dtype=torch.long)
    grad = torch.rand(N if direction != "text" else M) + 1.0
    out, dx, dy, ds = cb.info_nce(backend, x, y, scale, labels=labels, direction=direction, reduction="none", grad=grad)
    assert out.abs().max() <= 1e-3 * scale, out  # lse - t of one term: 0 up to the rounding of t
    assert torch.count_nonzero(dx) == 0, f"d image: max {dx.abs().max():.3g}"
    assert torch.count_nonzero(dy) == 0, f"d text: max {dy.abs().max():.3g}"
    assert float(ds) == 0.0, f"d scale {float(ds):.3g}"


# ---------------------------------------------------------------------------------------------
# #4: a row whose logits are all very negative (lse near -88 at scale 100) must not turn the
# padding lanes of the last column tile into inf * 0 = NaN in d(logit_scale).
# ---------------------------------------------------------------------------------------------
def _far_row_inputs(N: int, M: int, D: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y normalised; every cosine of image 0 with the texts below -0.88."""
    x = F.normalize(torch.randn(N, D), dim=-1)
    y = F.normalize(-x[:1] + 0.25 * F.normalize(torch.randn(M, D), dim=-1), dim=-1)
    assert float((x[:1] @ y.t()).max()) < -0.88
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("backend", ALL, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,M,direction", [(5, 7, "image"), (33, 37, "image"), (19, 45, "image"), (45, 45, "both")])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_padding_lanes_never_make_nan(backend, dtype, N, M, direction, reduction):
    cb.skip_unless(backend, dtype)
    x, y = _far_row_inputs(N, M, 24, dtype)
    rows = N
    grad = torch.tensor(2.0) if reduction == "sum" else torch.rand(rows) * 2 + 1.6  # weights above ~1.55
    kw = dict(direction=direction, reduction=reduction, grad=grad)
    got = cb.info_nce(backend, x, y, 100.0, **kw)
    want = _reference64(x, y, 100.0, **kw)
    for name, g, w in zip(("loss", "d image", "d text", "d scale"), got, want):
        assert torch.isfinite(g).all(), f"{name} is not finite"
        _close64(g, w, dtype, name, fwd=name == "loss")


# ---------------------------------------------------------------------------------------------
# #3: labels of any stride and int32 give the same loss and gradients as contiguous int64 labels.
# ---------------------------------------------------------------------------------------------
def _strided(labels: torch.Tensor, kind: str) -> torch.Tensor:
    n = labels.shape[0]
    if kind == "every-other":
        buf = torch.full((2 * n,), 10**6, dtype=labels.dtype)
        buf[::2] = labels
        return buf[::2]
    if kind == "column":  # the second column of an (n, 3) tensor: stride 3
        buf = torch.full((n, 3), 10**6, dtype=labels.dtype)
        buf[:, 1] = labels
        return buf[:, 1]
    return labels.to(torch.int32)[None].expand(2, n)[1]  # int32, a row of an expanded view


@pytest.mark.parametrize("backend", ALL, indirect=True)
@pytest.mark.parametrize("kind", ["every-other", "column", "int32-view"])
@pytest.mark.parametrize("N,M,direction", [(17, 17, "both"), (23, 40, "image"), (40, 23, "text")])
def test_strided_labels(backend, kind, N, M, direction):
    cb.skip_unless(backend, torch.float32)
    x = F.normalize(torch.randn(N, 16), dim=-1)
    y = F.normalize(torch.randn(M, 16), dim=-1)
    rows, classes = (M, N) if direction == "text" else (N, M)
    labels = torch.randperm(N) if direction == "both" else torch.randint(0, classes, (rows,))
    strided = _strided(labels, kind)
    assert not strided.is_contiguous() or strided.dtype == torch.int32
    grad = torch.rand(rows) + 0.5
    kw = dict(direction=direction, reduction="none", grad=grad)
    got = cb.info_nce(backend, x, y, 9.0, labels=strided, **kw)
    want = _reference64(x, y, 9.0, labels=labels, **kw)
    for name, g, w in zip(("loss", "d image", "d text", "d scale"), got, want):
        _close64(g, w, torch.float32, name, fwd=name == "loss")


# ---------------------------------------------------------------------------------------------
# #6: second-order gradients are not implemented by the kernels: a clear error, never zeros.
# ---------------------------------------------------------------------------------------------
def _first_order(op: str, backend: str, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(9, 6, requires_grad=True)
    y = torch.randn(9, 6, requires_grad=True)
    s = torch.tensor(3.0, requires_grad=True)
    if op == "siglip":
        loss = mmfast.siglip_loss(x, y, s, torch.tensor(-2.0, requires_grad=True), backend=backend)
    else:
        loss = mmfast.info_nce(x, y, s, direction=direction, backend=backend)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    return gx, x


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op,direction", [("info_nce", "both"), ("info_nce", "image"), ("info_nce", "text"),
                                          ("siglip", "both")])  # fmt: skip
def test_double_backward_is_a_clear_error(backend, op, direction):
    cb.skip_unless(backend, torch.float32)
    gx, _ = _first_order(op, backend, direction)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.square().sum().backward()


def test_double_backward_of_the_reference_works():
    gx, x = _first_order("info_nce", "reference", "both")
    gx.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# #12: labels under torch.compile(fullgraph=True): no graph break; bad labels still rejected.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_compile(tmp_path, monkeypatch):
    """A private Inductor cache: a cache shared with another checkout of the repository may hold
    graphs compiled against other fake functions of the same custom ops."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("direction,dtype", [("both", torch.int64), ("image", torch.int32), ("text", torch.int64)])
def test_labels_compile_fullgraph(fresh_compile, backend, direction, dtype):
    cb.skip_unless(backend, torch.float32)
    N, M = (13, 13) if direction == "both" else ((13, 21) if direction == "image" else (21, 13))
    x = torch.randn(N, 8, requires_grad=True)
    y = torch.randn(M, 8, requires_grad=True)
    rows, classes = (M, N) if direction == "text" else (N, M)
    labels = (torch.randperm(N) if direction == "both" else torch.randint(0, classes, (rows,))).to(dtype)

    def loss(a, b, lab):
        return mmfast.info_nce(a, b, 5.0, labels=lab, direction=direction, backend=backend)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, y, labels), loss(x, y, labels)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    bad = labels.clone()
    bad[3] = classes  # out of range: the kernel's own check fires in the compiled call
    with pytest.raises((RuntimeError, ValueError), match="labels"):
        compiled(x, y, bad)


def test_labels_compile_fullgraph_inductor(fresh_compile):
    x = torch.randn(33, 16, requires_grad=True)
    y = torch.randn(33, 16, requires_grad=True)
    labels = torch.randperm(33)
    fn = torch.compile(lambda a, b, lab: mmfast.info_nce(a, b, 7.0, labels=lab, backend="cpu"), fullgraph=True)
    got = fn(x, y, labels)
    want = ref.info_nce(x.double(), y.double(), 7.0, labels=labels)
    torch.testing.assert_close(got.double(), want, **FWD_TOL[torch.float32])
    got.backward()
    assert torch.isfinite(x.grad).all()
