"""Triton InfoNCE / SigLIP kernels against the float64 reference (interpreter on CPU, or a GPU).

Without a GPU the kernels run through TRITON_INTERPRET=1 (set by conftest.py) on small, odd shapes;
the `gpu` test runs a realistic size in bf16.
"""

from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast import reference as ref
from tests.utils import BWD_TOL, FWD_TOL, contrastive_inputs

triton = pytest.importorskip("triton")
from mmfast.triton import contrastive as tc  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(fn, inputs: dict, grad_out: torch.Tensor, **kw) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and the gradients of (image, text, scale[, bias]) for a given upstream gradient."""
    leaves = [inputs["image_features"], inputs["text_features"], inputs["logit_scale"]]
    if fn in (mmfast.siglip_loss, ref.siglip_loss):
        leaves.append(inputs["logit_bias"])
    out = fn(*leaves, **kw)
    return out, list(torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))


def _float64(inputs: dict) -> dict:
    return {k: v.detach().double().requires_grad_() for k, v in inputs.items()}


def _check(op: str, inputs: dict, dtype: torch.dtype, tol_scale: float = 1.0, **kw) -> None:
    """Kernel (backend="triton") vs the reference in float64 on the same (rounded) inputs: the loss,
    and every gradient for a non-uniform upstream gradient."""
    fn, rfn = (mmfast.info_nce, ref.info_nce) if op == "info_nce" else (mmfast.siglip_loss, ref.siglip_loss)
    if kw.get("reduction") == "none":
        rows = inputs["text_features" if kw.get("direction") == "text" else "image_features"].shape[0]
        grad_out = torch.rand(rows, device=DEVICE, dtype=torch.float64) + 0.5
    else:
        grad_out = torch.tensor(0.7, device=DEVICE, dtype=torch.float64)
    expect, rgrads = _run(rfn, _float64(inputs), grad_out, **kw)
    got, grads = _run(fn, inputs, grad_out, backend="triton", **kw)
    assert got.dtype == torch.float32 and got.shape == expect.shape
    ftol = {k: v * tol_scale for k, v in FWD_TOL[dtype].items()}
    torch.testing.assert_close(got.double(), expect, **ftol)
    names = ["image_features", "text_features", "logit_scale", "logit_bias"]
    for name, g, r in zip(names, grads, rgrads):
        assert g.dtype == inputs[name].dtype and g.shape == r.shape, name
        # relative to the gradient's own magnitude: feature gradients are O(s / N)
        btol = BWD_TOL[dtype]
        atol = btol["atol"] * tol_scale * float(r.abs().max())
        torch.testing.assert_close(
            g.double(), r, atol=atol, rtol=btol["rtol"] * tol_scale, msg=lambda m, name=name: f"{name}: {m}"
        )


def _labels(n: int, classes: int, permutation: bool) -> torch.Tensor:
    if permutation:
        return torch.randperm(n, device=DEVICE)
    return torch.randint(0, classes, (n,), device=DEVICE)


# N, M, D, direction, labels, reduction: odd shapes, M > N for one direction, every reduction
INFO_NCE_CASES = [
    (1, 1, 1, "both", False, "mean"),
    (17, 17, 3, "both", True, "none"),
    (97, 97, 100, "both", True, "mean"),
    (97, 97, 64, "both", False, "sum"),
    (17, 97, 64, "image", False, "mean"),
    (97, 97, 1, "image", True, "none"),
    (97, 17, 100, "text", False, "sum"),
    (17, 97, 3, "text", True, "none"),
]


@pytest.mark.parametrize("N,M,D,direction,with_labels,reduction", INFO_NCE_CASES)
def test_info_nce_fp32(N, M, D, direction, with_labels, reduction):
    inputs = contrastive_inputs(N, M, D, device=DEVICE, requires_grad=True)
    labels = None
    if with_labels:
        rows, classes = (M, N) if direction == "text" else (N, M)
        labels = _labels(rows, classes, permutation=direction == "both")
    _check("info_nce", inputs, torch.float32, labels=labels, direction=direction, reduction=reduction)


@pytest.mark.parametrize(
    "N,D,reduction,scale,bias",  # open_clip's init (s = 10, b = -10) and a bias where both σ branches matter
    [
        (1, 1, "mean", 10.0, -10.0),
        (17, 64, "none", 10.0, -10.0),
        (97, 100, "sum", 14.3, -10.0),
        (97, 3, "mean", 4.0, 0.5),
    ],
)
def test_siglip_fp32(N, D, reduction, scale, bias):
    inputs = contrastive_inputs(N, N, D, device=DEVICE, requires_grad=True, scale=scale, bias=bias)
    _check("siglip_loss", inputs, torch.float32, reduction=reduction)


@pytest.mark.parametrize("op", ["info_nce", "siglip_loss"])
def test_fp16(op):
    inputs = contrastive_inputs(45, 45, 64, dtype=torch.float16, device=DEVICE, requires_grad=True)
    _check(op, inputs, torch.float16)


@pytest.mark.skipif(DEVICE == "cpu", reason="the Triton interpreter has no bf16 arithmetic")
@pytest.mark.parametrize("op", ["info_nce", "siglip_loss"])
def test_bf16(op):
    inputs = contrastive_inputs(45, 45, 64, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    _check(op, inputs, torch.bfloat16)


def test_large_logits_stay_finite():
    """s = 100 with features of norm 10: logits near 10^4 must not overflow the fp32 statistics."""
    inputs = contrastive_inputs(33, 33, 16, device=DEVICE, requires_grad=True, normalize=False, scale=100.0)
    with torch.no_grad():
        for k in ("image_features", "text_features"):
            inputs[k].mul_(10 / inputs[k].norm(dim=1, keepdim=True))
    for op in ("info_nce", "siglip_loss"):
        fn = mmfast.info_nce if op == "info_nce" else mmfast.siglip_loss
        out, grads = _run(fn, inputs, torch.tensor(1.0), backend="triton")
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads), op
        _check(op, inputs, torch.float32, tol_scale=10.0)


def test_noncontiguous_and_python_scale():
    inputs = contrastive_inputs(40, 40, 24, device=DEVICE, requires_grad=True, normalize=False, noncontiguous=True)
    x = inputs["image_features"].detach()
    inputs["image_features"] = x.t().contiguous().t().requires_grad_()  # column-major (strides (1, N))
    assert inputs["image_features"].stride() == (1, 40) and inputs["text_features"].stride() == (48, 2)
    _check("info_nce", inputs, torch.float32)
    x, y = inputs["image_features"], inputs["text_features"]
    got = mmfast.info_nce(x, y, 14.3, backend="triton")
    torch.testing.assert_close(got, ref.info_nce(x, y, 14.3), **FWD_TOL[torch.float32])
    got = mmfast.siglip_loss(x, y, 10.0, -5.0, backend="triton")
    torch.testing.assert_close(got, ref.siglip_loss(x, y, 10.0, -5.0), **FWD_TOL[torch.float32])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
def test_nan_input_gives_nan_loss():
    inputs = contrastive_inputs(20, 20, 8, device=DEVICE)
    inputs["image_features"][3, 2] = float("nan")
    x, y, s, b = inputs.values()
    assert torch.isnan(mmfast.info_nce(x, y, s, backend="triton"))
    assert torch.isnan(mmfast.info_nce(x, y, s, direction="text", backend="triton"))
    assert torch.isnan(mmfast.siglip_loss(x, y, s, b, backend="triton"))


def test_deterministic():
    inputs = contrastive_inputs(50, 50, 40, device=DEVICE, requires_grad=True)
    first = _run(mmfast.info_nce, inputs, torch.tensor(1.0), backend="triton")
    second = _run(mmfast.info_nce, inputs, torch.tensor(1.0), backend="triton")
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_reasons_and_dispatch():
    args = dict(N=8, M=8, D=4, direction="both", reduction="mean")
    assert tc.reasons(dtype=torch.float32, **args) == []
    assert any("float64" in r for r in tc.reasons(dtype=torch.float64, **args))
    x = torch.randn(8, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="float64"):
        mmfast.info_nce(x, x, 1.0, backend="triton")
    if tc.INTERPRET:  # the interpreter would read bf16 as garbage: the backend must refuse it
        with pytest.raises(RuntimeError, match="bf16"):
            mmfast.siglip_loss(x.bfloat16(), x.bfloat16(), 1.0, 0.0, backend="triton")


def test_opcheck_and_compile():
    inputs = contrastive_inputs(19, 19, 8, device=DEVICE, requires_grad=True)
    x, y, s, b = inputs.values()
    lab = torch.randperm(19, device=DEVICE)
    for codes in [(0, 0, 2), (0, 2, 0), (1, 0, 1)]:
        labels = lab if codes[:2] == (0, 0) else None
        torch.library.opcheck(tc.contrastive_forward, (x, y, s, b, labels, *codes))

    xt = x.detach().t().contiguous().t()  # column-major: the fake must match the kernel's strides
    _, row_stat, col_stat = tc.contrastive_forward(xt, y.detach(), s.detach(), b.detach(), None, 0, 0, 0)
    args = (torch.tensor(0.7, device=DEVICE), xt, y.detach(), s.detach(), b.detach(), None, row_stat, col_stat, 0, 0, 0)
    torch.library.opcheck(tc.contrastive_backward, args)

    def loss(x, y, s, b):  # no labels: their range check in mmfast.ops is data-dependent (a graph break)
        return mmfast.info_nce(x, y, s, backend="triton") + mmfast.siglip_loss(x, y, s, b, backend="triton")

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(x, y, s, b)
    torch.testing.assert_close(got, loss(x, y, s, b))
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(loss(x, y, s, b), x)[0])


def test_compile_specs_cover_every_argument():
    specs = tc.compile_specs()
    kernels = {fn for _, fn, _, _ in specs}
    assert len(kernels) == 4
    for name, fn, sig, const in specs:
        assert list(sig) == [a for a in fn.arg_names if a in sig] and set(sig) == set(fn.arg_names), name
        assert all(sig[k] == "constexpr" for k in const), name


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["info_nce", "siglip_loss"])
def test_realistic_bf16_gpu(op):
    """N = 4096, D = 512, bf16: forward and gradients vs the reference in float64."""
    inputs = contrastive_inputs(4096, 4096, 512, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    _check(op, inputs, torch.bfloat16)


@pytest.mark.gpu
def test_realistic_fp32_gpu_is_exact_without_tf32():
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        inputs = contrastive_inputs(4096, 4096, 512, device="cuda", requires_grad=True)
        _check("info_nce", inputs, torch.float32)
        _check("info_nce", inputs, torch.float32, direction="image", reduction="none")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
