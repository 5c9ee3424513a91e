"""Property-based tests of mmfast.cross_attention: every backend against the float64 reference.

Each test draws random cases (tests/strategies.py: shapes with 1 and odd sizes, dtypes, GQA,
strided / expanded layouts, padding / bool / float masks with fully masked rows, causal, scales
up to 1e3, dropout) and checks out, LSE and every gradient (dq, dk, dv, and the float mask's)
within the bounds of tests/prop_checks.py, with the NaN / +-inf pattern of the reference. The
upstream loss is <out, dO> + <LSE, dLSE>, so the LSE's gradient path is checked wherever the LSE
is differentiable (and its absence is a failure of its own).

Backends: cpu (each of its code paths, drawn per example), reference, triton (the interpreter on
CPU tensors), and the CUDA kernels under the SIMT emulation ("emulated", tiny shapes: every CUDA
thread is an OS thread). Dropout is checked through the shared seed contract: the op draws its
seed from torch's generator, so the reference rebuilds the exact keep-mask (mmfast.reference.dropout).

Categories (one test each, per backend): dense, masks, dropout, empty dims, out=.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from prop_checks import check_close, logit_error, max_err
from strategies import (
    BACKENDS,
    CPU_PATHS,
    DTYPES,
    SLOW,
    AttnCase,
    attention_cases,
    attention_inputs,
    budget,
    cpu_paths,
    f32,
    f64,
    tallied,
)

import mmfast
from mmfast.ops.cross_attention import OP as CROSS_ATTENTION_OP
from mmfast.reference import attention_probs
from mmfast.reference import cross_attention as ref_attention
from mmfast.reference.dropout import draw_seed, keep_mask

MAX_HEAD_DIM = {"cpu": 256, "reference": 256, "triton": 256, "emulated": 128}  # the kernels' limits
# The emulation runs a thread per CUDA thread: keep its cases small.
MAX_LEN = {"cpu": 97, "reference": 97, "triton": 33, "emulated": 33}
# Examples per backend and category (5 categories): (ci, long). ci: 240 for the op, long: 5,250.
# (ci, long) examples per property: long gives >= 5,000 per backend over the five properties (the
# slow backends are bounded by time in the long run: MMFAST_HYPOTHESIS_TEST_SECONDS).
BUDGET = {
    "cpu": (25, 1020),
    "reference": (10, 1020),
    "triton": (8, 1020),
    "emulated": (5, 1020),
}


@pytest.fixture(scope="module")
def emu():
    from tests import emu_build  # noqa: PLC0415 - builds a torch extension (cached under build/emu)

    return emu_build.load_module(
        "cross_attention_emu", "emu/cross_attention_emu.cpp", extra_cflags=("-O2", "-std=c++20")
    )


# ---------------------------------------------------------------------------------------------
# Running a backend and the reference
# ---------------------------------------------------------------------------------------------


def _leaves(inp: dict, case: AttnCase) -> list:
    """Leaf copies that keep the layouts (detach shares storage and strides) and require grad."""
    q, k, v = (inp[n].detach().requires_grad_() for n in ("query", "key", "value"))
    m = inp["attn_mask"]
    if m is not None and case.mask_grad:
        m = m.detach().requires_grad_()
    return [q, k, v, m]


def _upstream(case: AttnCase) -> tuple[torch.Tensor, torch.Tensor]:
    """dO (rounded to the output dtype) and dLSE (rounded to fp32), as float64."""
    g = torch.Generator().manual_seed(case.seed + 1)
    go = torch.randn(case.B, case.Hq, case.Lq, case.Dv, generator=g).to(case.dtype).double()
    gl = torch.randn(case.B, case.Hq, case.Lq, generator=g).float().double()
    return go, gl


def _loss(out, lse, go, gl, with_lse: bool):
    loss = (out.double() * go).sum()
    if with_lse:
        loss = loss + (torch.where(torch.isfinite(lse), lse.double(), 0.0) * gl).sum()
    return loss


def _grads(loss, wrt: list) -> list:
    need = [t for t in wrt if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(loss, need, allow_unused=True)) if need else iter(())
    return [next(got) if t is not None and t.requires_grad else None for t in wrt]


def run_op(backend: str, case: AttnCase, inp: dict, go, gl, emu=None, splits: int = 0) -> dict:
    """out, lse and gradients of one backend; ``lse_grad``: whether the LSE carried a gradient."""
    q, k, v, m = _leaves(inp, case)
    kpm = inp["key_padding_mask"]
    if backend == "emulated":
        return _run_emulated(emu, case, q, k, v, m, kpm, go, gl, splits)
    torch.manual_seed(case.seed)  # the dropout seed the op draws
    out, lse = mmfast.cross_attention(
        q, k, v, key_padding_mask=kpm, attn_mask=m, is_causal=case.causal, scale=case.scale,
        dropout_p=case.dropout_p, return_lse=True, backend=backend,
    )  # fmt: skip
    with_lse = lse.requires_grad
    dq, dk, dv, dm = _grads(_loss(out, lse, go, gl, with_lse), [q, k, v, m])
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, dmask=dm, lse_grad=with_lse)


def _run_emulated(emu, case, q, k, v, m, kpm, go, gl, splits) -> dict:
    """The CUDA kernels under emulation, called as the cuda backend calls its custom ops."""
    torch.manual_seed(case.seed)
    seed = draw_seed() if case.dropout_p > 0 else 0
    args = (kpm, m, case.causal, case.effective_scale, case.dropout_p, seed)
    q, k, v = q.detach(), k.detach(), v.detach()
    out, lse = emu.forward(q, k, v, *args, out=None, splits=splits)
    mask_grad = m is not None and m.requires_grad
    dlse = torch.where(torch.isfinite(lse), gl.float(), 0.0)  # the upstream loss's: <LSE, dLSE> on finite rows
    dq, dk, dv, dm = emu.backward(go.to(case.dtype), q, k, v, out, lse, kpm, m, *args[2:], mask_grad, grad_lse=dlse)
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, dmask=dm if mask_grad else None, lse_grad=True)


def _keep(case: AttnCase) -> torch.Tensor | None:
    if case.dropout_p == 0:
        return None
    torch.manual_seed(case.seed)
    return keep_mask(draw_seed(), case.B, case.Hq, case.Lq, case.Lk, case.dropout_p)


def run_reference(case: AttnCase, inp: dict, go, gl, with_lse: bool, dtype=f64) -> dict:
    """The reference on the same (rounded) values in ``dtype`` (float64: the ground truth)."""
    conv = (lambda t: t.detach().to(dtype)) if dtype == f64 else (lambda t: t.detach().clone())
    q, k, v = (conv(inp[n]).requires_grad_() for n in ("query", "key", "value"))
    m = inp["attn_mask"]
    if m is not None and m.is_floating_point():
        m = (m.detach().double() if dtype == f64 else m.detach().clone()).requires_grad_(case.mask_grad)
    fn = ref_attention if dtype == f64 else naive_attention
    out, lse = fn(
        q, k, v, key_padding_mask=inp["key_padding_mask"], attn_mask=m, is_causal=case.causal,
        scale=case.scale, return_lse=True, dropout_p=case.dropout_p, dropout_mask=_keep(case),
    )  # fmt: skip
    dq, dk, dv, dm = _grads(_loss(out, lse, go, gl, with_lse), [q, k, v, m])
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, dmask=dm)


def naive_attention(q, k, v, *, key_padding_mask, attn_mask, is_causal, scale, return_lse, dropout_p, dropout_mask):
    """PyTorch attention computed entirely in the inputs' dtype: its own error at that precision."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
    allowed = torch.ones(B, Hq, Lq, Lk, dtype=torch.bool)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.view(B, 1, 1, Lk)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:
        allowed = allowed & (attn_mask != float("-inf"))
        s = s + torch.where(attn_mask == float("-inf"), 0.0, attn_mask).to(s.dtype)
    if is_causal:
        allowed = allowed & (torch.arange(Lk).view(1, Lk) <= torch.arange(Lq).view(Lq, 1) + Lk - Lq)
    s = torch.where(allowed, s, float("-inf"))
    some = allowed.any(-1, keepdim=True)
    s = torch.where(some, s, 0.0)
    p = torch.softmax(s, dim=-1) * some
    lse = torch.where(some.squeeze(-1), torch.logsumexp(s, dim=-1), float("-inf")).float()
    if dropout_mask is not None:
        p = p * dropout_mask / (1 - dropout_p)
    return p @ v, lse


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def naturals(case: AttnCase, inp: dict, go, gl, ref_probs: torch.Tensor) -> dict:
    """Bounds on |result| from the inputs' magnitudes (see tests/prop_checks.py)."""
    q, k, v = (inp[n].detach().double() for n in ("query", "key", "value"))
    rep = case.Hq // max(case.Hkv, 1)
    vr = v.repeat_interleave(rep, dim=1) if case.Hkv else v
    f = 1 / (1 - case.dropout_p)
    amax = lambda t: t.abs().max().item() if t.numel() else 0.0  # noqa: E731
    dov = 2 * f * amax(go @ vr.transpose(-1, -2)) + amax(gl)  # bound on |dS| / P
    colsum = amax(ref_probs.sum(dim=2)) * rep if ref_probs.numel() else 0.0
    s = abs(case.effective_scale)
    n_b = (
        (case.B * case.Hq * case.Lq * case.Lk) // max(inp["attn_mask"].numel(), 1)
        if inp["attn_mask"] is not None
        else 1
    )
    return dict(
        out=f * amax(v), lse=1.0, dq=s * amax(k) * dov, dk=s * amax(q) * dov * colsum,
        dv=f * amax(go) * colsum, dmask=dov * n_b,
    )  # fmt: skip


def expected(case: AttnCase, inp: dict, with_lse: bool) -> tuple[dict, dict]:
    """The float64 reference's results, and per result the keyword arguments of check_close
    (its bound: the dtype's table, the conditioning of these logits, PyTorch's own error)."""
    go, gl = _upstream(case)
    want = run_reference(case, inp, go, gl, with_lse)
    low = case.dtype != f64
    torch_err = {}
    if low:
        naive = run_reference(case, inp, go, gl, with_lse, dtype=case.dtype)
        torch_err = {n: max_err(naive[n], want[n]) for n in want if want[n] is not None}
    mask = inp["attn_mask"]
    extra = (
        mask[torch.isfinite(mask)].abs().max().item()
        if mask is not None and mask.is_floating_point() and torch.isfinite(mask).any()
        else 0.0
    )
    q, k = inp["query"].detach().double(), inp["key"].detach().double()
    lerr = logit_error(q.reshape(-1, case.D), k.reshape(-1, case.D), case.effective_scale, case.dtype, extra)
    p, _ = attention_probs(
        q, k, key_padding_mask=inp["key_padding_mask"], attn_mask=None if mask is None else (mask if mask.dtype == torch.bool else mask.double()),
        is_causal=case.causal, scale=case.scale,
    )  # fmt: skip
    nat = naturals(case, inp, go, gl, p)
    bounds = {
        name: dict(
            dtype=case.dtype if name != "lse" else f32 if low else f64,
            forward=name in ("out", "lse"),
            natural=nat[name],
            logit_err=lerr,
            err_torch=torch_err.get(name, 0.0),
            operands=case.dtype,
        )
        for name in ("out", "lse", "dq", "dk", "dv", "dmask")
    }
    return want, bounds


def compare(backend: str, case: AttnCase, inp: dict, got: dict) -> None:
    """Assert a backend's results match the float64 reference within the derived bounds."""
    want, bounds = expected(case, inp, got["lse_grad"])
    assert got["out"].dtype == case.dtype, f"out dtype {got['out'].dtype}, expected {case.dtype}"
    assert got["lse"].dtype == (f64 if case.dtype == f64 else f32), f"lse dtype {got['lse'].dtype}"
    for name, kw in bounds.items():
        check_close(f"{backend} {name}", got[name], want[name], **kw)
    assert got["lse_grad"], f"{backend}: the LSE returned with return_lse=True does not carry a gradient"


def _cpu_path(backend: str, data):
    """A ``with`` block running the drawn cpu path (nothing for other backends)."""
    if backend != "cpu":
        return contextlib.nullcontext()
    return mmfast.cpu_options(**CPU_PATHS[data.draw(st.sampled_from(cpu_paths()), label="cpu_path")])


def _run_and_compare(backend: str, case: AttnCase, data, emu_fixture) -> None:
    inp = attention_inputs(case)
    go, gl = _upstream(case)
    splits = data.draw(st.sampled_from([0, 1, 2, 3]), label="splits") if backend == "emulated" else 0
    with _cpu_path(backend, data):
        got = run_op(backend, case, inp, go, gl, emu=emu_fixture, splits=splits)
    compare(backend, case, inp, got)


def declared_reasons(backend: str, case: AttnCase) -> list[str]:
    """Why ``backend`` declares it cannot take this case (the dispatcher's contract: an explicit
    backend then raises saying why, and auto picks another); emulated: the cuda backend's."""
    name = "cuda" if backend == "emulated" else backend
    fn = CROSS_ATTENTION_OP.backends[name].load()[1]
    return fn(dtype=case.dtype, B=case.B, Hq=case.Hq, Hkv=case.Hkv, Lq=case.Lq, Lk=case.Lk, D=case.D, Dv=case.Dv)


def _emu(backend: str, request):
    return request.getfixturevalue("emu") if backend == "emulated" else None


# ---------------------------------------------------------------------------------------------
# Categories
# ---------------------------------------------------------------------------------------------


def _dense(backend: str):
    return attention_cases(
        dtypes=DTYPES[backend], masks=False, max_head_dim=MAX_HEAD_DIM[backend], max_len=MAX_LEN[backend]
    )


def _masked(backend: str, dropout: bool = False):
    return attention_cases(
        dtypes=DTYPES[backend],
        masks=True,
        dropout=dropout,
        max_head_dim=MAX_HEAD_DIM[backend],
        max_len=MAX_LEN[backend],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense(backend, request):
    """No masks: shapes, dtypes, GQA, layouts, scales up to 1e3."""
    emu_fixture = _emu(backend, request)

    @budget(*BUDGET[backend], slow=backend in SLOW)
    @given(data=st.data())
    @tallied(f"test_dense[{backend}]")
    def prop(data):
        _run_and_compare(backend, data.draw(_dense(backend), label="case"), data, emu_fixture)

    prop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks(backend, request):
    """Padding, bool and float masks (broadcast shapes, -inf entries, their gradient), causal,
    fully masked rows and batch items."""
    emu_fixture = _emu(backend, request)

    @budget(*BUDGET[backend], slow=backend in SLOW)
    @given(data=st.data())
    @tallied(f"test_masks[{backend}]")
    def prop(data):
        _run_and_compare(backend, data.draw(_masked(backend), label="case"), data, emu_fixture)

    prop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout(backend, request):
    """Dropout with masks: the backend drops exactly the shared counter-hash keep-mask for the seed
    it draws from torch's generator, in the forward and in the backward."""
    emu_fixture = _emu(backend, request)

    @budget(*BUDGET[backend], slow=backend in SLOW)
    @given(data=st.data())
    @tallied(f"test_dropout[{backend}]")
    def prop(data):
        _run_and_compare(backend, data.draw(_masked(backend, dropout=True), label="case"), data, emu_fixture)

    prop()


# ---------------------------------------------------------------------------------------------
# Empty dimensions (docs/numerics.md): the result of the equivalent non-empty problem
# ---------------------------------------------------------------------------------------------

# Run in a subprocess before the in-process examples: a backend that dies on an empty dimension
# (SIGFPE, abort) fails this test with the shapes that kill it, instead of killing the test run.
_PROBE = """
import sys
from tests.test_properties_cross_attention import PROBE_SHAPES, _probe_one
for shape in PROBE_SHAPES:
    print(shape, flush=True)  # the last shape printed is the one a dying process died on
    _probe_one(sys.argv[1], *shape)
"""
PROBE_SHAPES = [  # B, Hq, Hkv, Lq, Lk, D, Dv
    (0, 2, 1, 3, 5, 8, 8),
    (1, 0, 0, 3, 5, 8, 8),
    (1, 0, 1, 3, 5, 8, 8),
    (1, 2, 1, 0, 5, 8, 8),
    (1, 2, 1, 3, 0, 8, 8),
    (1, 2, 1, 3, 5, 0, 8),
    (1, 2, 1, 3, 5, 8, 0),
]


def _probe_one(backend: str, B: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, Dv: int) -> None:
    """Forward and backward of one empty case (errors are fine here: only a dying process is reported)."""
    q = torch.randn(B, Hq, Lq, D, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, Dv, requires_grad=True)
    try:
        if backend == "emulated":
            from tests import emu_build

            emu = emu_build.load_module(
                "cross_attention_emu", "emu/cross_attention_emu.cpp", extra_cflags=("-O2", "-std=c++20")
            )
            q, k, v = q.detach(), k.detach(), v.detach()
            o, lse = emu.forward(q, k, v, None, None, False, 0.5, 0.0, 0)
            emu.backward(torch.ones_like(o), q, k, v, o, lse, None, None, False, 0.5, 0.0, 0, False)
        else:
            mmfast.cross_attention(q, k, v, backend=backend).sum().backward()
    except Exception:  # noqa: BLE001
        pass


def _crash_probe(backend: str) -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(
        [sys.executable, "-c", _PROBE, backend], cwd=root, capture_output=True, text=True,
        timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "tests")])},
    )  # fmt: skip
    if p.returncode != 0:
        shape = (p.stdout.strip().splitlines() or ["before the first shape"])[-1]
        pytest.fail(
            f"{backend}: the process dies on empty dimensions (B, Hq, Hkv, Lq, Lk, D, Dv) = {shape}: "
            f"exit code {p.returncode} {p.stderr[-300:]!r}",
            pytrace=False,
        )


def _embedded(case: AttnCase, inp: dict) -> tuple[AttnCase, dict]:
    """The same problem without empty Lk, D or Hkv (one padded key, one zero feature, one key head),
    whose results, cut back to the case's shapes, are the empty case's expected results."""
    q, k, v = (inp[n].detach().double() for n in ("query", "key", "value"))
    kpm, mask = inp["key_padding_mask"], inp["attn_mask"]
    B, Hq, Hkv, Lq, Lk, D, Dv = case.B, case.Hq, case.Hkv, case.Lq, case.Lk, case.D, case.Dv
    scale = case.scale
    if Hkv == 0:
        Hkv = 1
        k, v = k.new_zeros(B, 1, Lk, D), v.new_zeros(B, 1, Lk, Dv)
    if D == 0:  # every score is an empty dot product, 0
        q, k, D, scale = q.new_zeros(B, Hq, Lq, 1), k.new_zeros(B, Hkv, Lk, 1), 1, 1.0
    if Lk == 0:  # one key, padding: every row is fully masked
        k, v = k.new_zeros(B, Hkv, 1, D), v.new_zeros(B, Hkv, 1, Dv)
        kpm = torch.ones(B, 1, dtype=torch.bool)
        if mask is not None and mask.shape[-1] == 0:
            mask = mask.new_zeros(*mask.shape[:-1], 1)  # bool False / float 0: masked by kpm anyway
        Lk = 1
    case2 = AttnCase(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, dtype=case.dtype, kpm="x", mask=case.mask,
                     mask_grad=case.mask_grad, causal=case.causal, scale=scale, seed=case.seed)  # fmt: skip
    return case2, dict(query=q, key=k, value=v, key_padding_mask=kpm, attn_mask=mask)


def _cut(t: torch.Tensor | None, shape: tuple) -> torch.Tensor | None:
    return None if t is None else t[tuple(slice(0, n) for n in shape)]


def compare_empty(backend: str, case: AttnCase, inp: dict, got: dict) -> None:
    """Every result against the embedded problem's, cut back to the case's shapes."""
    case2, inp2 = _embedded(case, inp)
    want, bounds = expected(case2, inp2, got["lse_grad"])
    shapes = dict(
        out=(case.B, case.Hq, case.Lq, case.Dv), lse=(case.B, case.Hq, case.Lq), dq=inp["query"].shape,
        dk=inp["key"].shape, dv=inp["value"].shape, dmask=None if inp["attn_mask"] is None else inp["attn_mask"].shape,
    )  # fmt: skip
    for name, shape in shapes.items():
        g, w = got[name], _cut(want[name], shape) if shape is not None else None
        if g is None and w is not None and not w.any():
            g = torch.zeros(shape, dtype=case.dtype)  # autograd's None: a zero gradient
        check_close(f"{backend} {name}", g, w, **bounds[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_dims(backend, request):
    """B, Hq (with Hkv 0 or 1), Lq, Lk, D or Dv = 0: empty results of the right shapes, a fully
    masked result for Lk = 0 (out 0, LSE -inf, zero gradients), the mean of the unmasked values for
    D = 0 (every score 0), on every backend, with masks; a backend that declares it does not take
    a case (triton and cuda: D or Dv = 0) is not run on it (numerics_cases checks it says so)."""
    if backend in ("cpu", "emulated"):
        _crash_probe(backend)
    emu_fixture = _emu(backend, request)
    strategy = attention_cases(dtypes=DTYPES[backend], empty=True, max_head_dim=MAX_HEAD_DIM[backend], max_len=17)

    @budget(*BUDGET[backend], slow=backend in SLOW)
    @given(case=strategy)
    @tallied(f"test_empty_dims[{backend}]")
    def prop(case):
        assume(not declared_reasons(backend, case))  # e.g. D = 0 on triton and cuda: declined by name
        inp = attention_inputs(case)
        go, gl = _upstream(case)
        got = run_op(backend, case, inp, go, gl, emu=emu_fixture)
        compare_empty(backend, case, inp, got)

    prop()


# ---------------------------------------------------------------------------------------------
# out=: the result written into a caller's buffer
# ---------------------------------------------------------------------------------------------

OUT_LAYOUTS = ("contiguous", "fusion_slice", "strided_last")


def _out_buffer(case: AttnCase, layout: str, history: bool):
    """(buffer, target view, leaf w or None): the target is where the op writes; the rest of the
    buffer is NaN and must stay so. With ``history`` the buffer is w * 2 for a leaf w requiring
    grad (its old contents are overwritten, so w's gradient is 0)."""
    B, Hq, Lq, Dv = case.B, case.Hq, case.Lq, case.Dv
    shape = {"contiguous": (B, Hq, Lq, Dv), "fusion_slice": (B, Lq, Hq, 3 * Dv), "strided_last": (B, Hq, Lq, 2 * Dv)}[
        layout
    ]
    w = torch.full(shape, float("nan"), dtype=case.dtype).requires_grad_() if history else None
    buf = w * 2 if history else torch.full(shape, float("nan"), dtype=case.dtype)
    if layout == "fusion_slice":
        target = buf[..., Dv : 2 * Dv].transpose(1, 2)
    elif layout == "strided_last":
        target = buf[..., ::2]
    else:
        target = buf
    return buf, target, w


def _outside(buf: torch.Tensor, layout: str, Dv: int) -> torch.Tensor:
    if layout == "fusion_slice":
        return torch.cat([buf[..., :Dv], buf[..., 2 * Dv :]], dim=-1)
    if layout == "strided_last":
        return buf[..., 1::2]
    return buf.new_zeros(0).fill_(float("nan"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out(backend, request):
    """out= into a contiguous, a fusion-buffer slice or a strided buffer: the op returns the target,
    writes the reference's result there and nothing elsewhere; gradients reach q, k, v (and the
    float mask); a buffer with autograd history gets a zero gradient for its overwritten part."""
    emu_fixture = _emu(backend, request)

    @budget(*BUDGET[backend], slow=backend in SLOW)
    @given(data=st.data())
    @tallied(f"test_out[{backend}]")
    def prop(data):
        case = data.draw(_masked(backend), label="case")
        layout = data.draw(st.sampled_from(OUT_LAYOUTS), label="out_layout")
        grad = data.draw(st.booleans(), label="requires_grad")
        history = data.draw(st.booleans(), label="buffer_history") and backend != "emulated"
        inp = attention_inputs(case)
        go, gl = _upstream(case)
        buf, target, w = _out_buffer(case, layout, history)
        q, k, v, m = _leaves(inp, case) if grad else [inp[n] for n in ("query", "key", "value", "attn_mask")]
        if not grad and m is not None:
            m = m.detach()
        if backend == "emulated":
            args = (inp["key_padding_mask"], m, case.causal, case.effective_scale, 0.0, 0)
            out, lse = emu_fixture.forward(q.detach(), k.detach(), v.detach(), *args, out=target)
        else:
            out, lse = mmfast.cross_attention(
                q, k, v, key_padding_mask=inp["key_padding_mask"], attn_mask=m, is_causal=case.causal,
                scale=case.scale, return_lse=True, out=target, backend=backend,
            )  # fmt: skip
        assert out.data_ptr() == target.data_ptr() and out.shape == target.shape, f"{backend}: out is not the target"
        outside = _outside(buf.detach(), layout, case.Dv)
        assert outside.isnan().all(), f"{backend}: wrote outside the out= target"
        want, bounds = expected(case, inp, False)
        check_close(f"{backend} out", target.detach(), want["out"], **bounds["out"])
        if backend == "emulated" or not (grad or history):
            return
        wrt = [q, k, v, m, w] if grad else [w]
        grads = _grads((out.double() * go).sum(), wrt)
        if history:
            dw = grads[-1]
            assert dw is None or (dw == 0).all(), f"{backend}: the overwritten buffer got gradient {dw.abs().max()}"
        if grad:
            for name, g in zip(("dq", "dk", "dv", "dmask"), grads):
                check_close(f"{backend} {name}", g, want[name], **bounds[name])

    prop()
