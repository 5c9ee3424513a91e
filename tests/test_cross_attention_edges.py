"""Edge cases of mmfast.cross_attention on every backend that runs here (docs/numerics.md):
empty dimensions, NaN / Inf placement, the LSE's gradient through ``out=``, stale gradients through
``out=``, argument types, torch.compile, and outputs that can be resized.

Backends: cpu (each of its code paths, forced), reference, and triton under the interpreter
(fp32/fp16 only, head dims >= 1). Each case compares with the float64 reference on the same inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from utils import attention_inputs, has_avx512_bf16, has_avx512f

import mmfast
from mmfast.reference import cross_attention as ref_attention

NAN, INF = float("nan"), float("inf")

# cpu code paths, forced through mmfast.cpu_options.
CPU_PATHS = {
    "cpu-fast": dict(gemm="avx512"),
    "cpu-fast-avx2": dict(gemm="avx2"),
    "cpu-generic": dict(gemm="blas"),
}
# (backend, cpu_options, dtype): every place a row's softmax is computed.
PATHS = [
    *[("cpu", opts, torch.float32, name) for name, opts in CPU_PATHS.items()],
    ("cpu", dict(gemm="avx512_bf16"), torch.bfloat16, "cpu-bf16"),  # the vdpbf16ps path
    ("cpu", dict(gemm="blas"), torch.bfloat16, "cpu-bf16-generic"),
    ("cpu", {}, torch.float16, "cpu-fp16"),
    ("cpu", {}, torch.float64, "cpu-fp64"),
    ("reference", {}, torch.float32, "reference"),
    ("triton", {}, torch.float32, "triton"),
]
PATH_IDS = [p[3] for p in PATHS]


@pytest.fixture
def cpu_opts():
    """``cpu_opts(options)``: mmfast.cpu_options for the rest of the test (skips a path the CPU lacks)."""
    stack = []

    def apply(opts: dict) -> None:
        gemm = opts.get("gemm")
        if gemm in ("avx512", "avx512_bf16") and not (has_avx512f() if gemm == "avx512" else has_avx512_bf16()):
            pytest.skip(f"this CPU cannot run gemm={gemm!r}")
        stack.append(mmfast.cpu_options(**opts))

    yield apply
    for o in reversed(stack):
        o.__exit__(None, None, None)


def _grads(q, k, v, **kw):
    """out, lse and (dq, dk, dv) for a fixed random upstream gradient on out and on the finite LSE."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = mmfast.cross_attention(q, k, v, return_lse=True, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype)
    gl = torch.randn(lse.shape, generator=torch.Generator().manual_seed(1))
    loss = (out * g).sum() + (torch.where(torch.isfinite(lse), lse, 0) * gl).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    return out, lse, dq, dk, dv


# ---- empty dimensions ---------------------------------------------------------------------------

# (B, Hq, Hkv, Lq, Lk, D, Dv)
EMPTY = [
    (0, 2, 1, 3, 5, 8, 8),  # no batch
    (2, 0, 0, 3, 5, 8, 8),  # no head
    (2, 2, 1, 0, 5, 8, 8),  # no query (the generic kernel once divided by a block size of 0)
    (2, 2, 1, 3, 0, 8, 8),  # no key: every row fully masked
    (2, 2, 2, 3, 5, 0, 8),  # D = 0: every score is 0, each row the mean of its values
    (2, 2, 1, 3, 5, 8, 0),  # Dv = 0: empty output, the LSE still counts
    (1, 1, 1, 0, 0, 0, 0),
]


@pytest.mark.parametrize("shape", EMPTY, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "padding+causal"])
def test_empty_dims_match_reference(shape, path, masked, cpu_opts):
    backend, env, dtype, _ = path
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    if backend == "triton" and min(D, Dv) == 0:
        pytest.skip("the triton backend declares head dims >= 1 (auto takes another backend)")
    cpu_opts(env)
    q, k, v = torch.randn(B, Hq, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, Dv)
    kw = dict(key_padding_mask=torch.rand(B, Lk) < 0.3, is_causal=True) if masked else {}
    got = _grads(q.to(dtype), k.to(dtype), v.to(dtype), backend=backend, **kw)
    want = _grads(q.double(), k.double(), v.double(), backend="reference", **kw)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w.double(), atol=2e-2, rtol=2e-2, msg=name)


def test_empty_query_through_module():
    attn = mmfast.nn.CrossAttention(16, 4, batch_first=True)
    out, _ = attn(torch.randn(2, 0, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    assert out.shape == (2, 0, 16)


# ---- NaN and Inf ----------------------------------------------------------------------------------


def _nan_rows(path, cpu_opts, poison) -> None:
    """``poison(q, k, v)`` puts non-finite values in; rows the reference keeps finite must equal it,
    and the non-finite rows of out and lse must be exactly the reference's."""
    backend, env, dtype, _ = path
    cpu_opts(env)
    x = attention_inputs(B=2, Hq=4, Hkv=2, Lq=37, Lk=61, D=32, pad_frac=0.2)
    q, k, v = (t.to(dtype) for t in poison(x["query"], x["key"], x["value"]))
    kpm = x["key_padding_mask"]
    out, lse = mmfast.cross_attention(q, k, v, key_padding_mask=kpm, return_lse=True, backend=backend)
    # The reference on the same (rounded) inputs: the rounding of q, k, v is not the kernel's error.
    ref_out, ref_lse = ref_attention(q.double(), k.double(), v.double(), key_padding_mask=kpm, return_lse=True)
    bad = ~torch.isfinite(ref_out).all(-1)
    assert bad.any(), "the case must poison something"
    assert torch.equal(~torch.isfinite(out.double()).all(-1), bad), "rows with a non-finite output differ"
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse)), "NaN LSE rows differ"
    ok = ~bad
    torch.testing.assert_close(out.double()[ok], ref_out[ok], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse.double()[ok], ref_lse[ok], atol=1e-3, rtol=1e-3)


def _nan_query_row(q, k, v):
    q = q.clone()
    q[0, 1, 5, 3] = NAN  # one query row
    q[1, 2, 36, :] = NAN  # the last row of a block
    return q, k, v


def _inf_key(q, k, v):
    k = k.clone()
    k[0, 0, 2, :] = INF  # rows of heads 0, 1 see a +inf or NaN score at key 2
    return q, k, v


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("poison", [_nan_query_row, _inf_key], ids=["nan-query-row", "inf-key"])
def test_non_finite_rows_match_reference(path, poison, cpu_opts):
    _nan_rows(path, cpu_opts, poison)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_nan_scale_poisons_every_row_but_fully_masked_ones(path, cpu_opts):
    backend, env, dtype, _ = path
    cpu_opts(env)
    x = attention_inputs(B=3, Hq=2, Lq=9, Lk=20, D=16, pad_frac=0.3, dtype=dtype)  # item 2 fully padded
    out, lse = mmfast.cross_attention(
        x["query"], x["key"], x["value"], key_padding_mask=x["key_padding_mask"], scale=NAN, return_lse=True,
        backend=backend,
    )  # fmt: skip
    assert torch.isnan(out[:2]).all() and torch.isnan(lse[:2]).all()
    assert (out[2] == 0).all() and (lse[2] == -INF).all()


@pytest.mark.parametrize("path", [p for p in PATHS if p[0] != "cpu" or "generic" in p[3] or p[2] == torch.float64])
def test_minus_inf_mask_entry_is_a_mask_even_over_a_nan_score(path, cpu_opts):
    """A -inf additive entry excludes the key (replaced, not added: NaN + -inf would be NaN);
    a +inf entry makes the row NaN."""
    backend, env, dtype, _ = path
    cpu_opts(env)
    x = attention_inputs(B=1, Hq=2, Lq=6, Lk=10, D=8, dtype=dtype)
    k = x["key"].clone()
    k[0, :, 4] = NAN  # every row's score at key 4 is NaN
    mask = torch.zeros(1, 2, 6, 10, dtype=torch.float32 if dtype != torch.float64 else dtype)
    mask[..., 4] = -INF
    mask[0, 1, 3, 7] = INF
    out, lse = mmfast.cross_attention(x["query"], k, x["value"], attn_mask=mask, return_lse=True, backend=backend)
    bad = torch.zeros(1, 2, 6, dtype=torch.bool)
    bad[0, 1, 3] = True
    assert torch.equal(torch.isnan(out).any(-1), bad) and torch.equal(torch.isnan(lse), bad)
    m = mask.clone()
    m[0, 1, 3, 7] = 0
    want = ref_attention(x["query"].double(), k.double(), x["value"].double(), attn_mask=m.double())
    torch.testing.assert_close(out.double()[~bad], want[~bad], atol=3e-2, rtol=3e-2)


# ---- the LSE's gradient -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("use_out", [False, True], ids=["functional", "out="])
def test_lse_gradient_merges_key_chunks(backend, use_out):
    """Attention over keys [0, n) from two chunks merged by their LSEs (what split-KV or ring attention
    does): dq through the LSEs must be the full attention's dq."""
    x = attention_inputs(B=2, Hq=4, Hkv=2, Lq=9, Lk=50, D=16, dtype=torch.float64 if backend != "triton" else None)
    q = x["query"].detach().requires_grad_()
    k, v = x["key"], x["value"]
    parts = []
    for sl in (slice(0, 23), slice(23, 50)):
        out = torch.zeros(2, 9, 4, 16, dtype=q.dtype).transpose(1, 2) if use_out else None
        parts.append(mmfast.cross_attention(q, k[:, :, sl], v[:, :, sl], return_lse=True, out=out, backend=backend))
    (o1, l1), (o2, l2) = parts
    lse = torch.logaddexp(l1, l2)
    merged = o1 * (l1 - lse).exp()[..., None] + o2 * (l2 - lse).exp()[..., None]
    g = torch.randn_like(merged)
    (dq,) = torch.autograd.grad((merged * g).sum(), q)
    q2 = q.detach().requires_grad_()
    (want,) = torch.autograd.grad((ref_attention(q2, k, v) * g).sum(), q2)
    torch.testing.assert_close(dq, want, atol=2e-5, rtol=2e-5)


# ---- out= and autograd history --------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("inputs_need_grad", [False, True])
def test_out_overwrites_gradient_history(backend, inputs_need_grad):
    """The old contents of ``out`` are overwritten: what they came from gets no gradient through them."""
    x = attention_inputs(B=1, Hq=2, Lq=5, Lk=7, D=8, requires_grad=inputs_need_grad)
    w = torch.randn(1, 2, 5, 8, requires_grad=True)
    out = w * 2
    mmfast.cross_attention(x["query"], x["key"], x["value"], out=out, backend=backend)
    out.sum().backward()
    assert w.grad is not None and (w.grad == 0).all()
    if inputs_need_grad:
        assert x["query"].grad is not None and x["query"].grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_out_leaf_requiring_grad_is_refused(backend):
    x = attention_inputs(B=1, Hq=2, Lq=5, Lk=7, D=8)
    out = torch.zeros(1, 2, 5, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        mmfast.cross_attention(x["query"], x["key"], x["value"], out=out, backend=backend)
    with torch.no_grad():  # allowed without grad mode, as for any in-place write
        mmfast.cross_attention(x["query"], x["key"], x["value"], out=out, backend=backend)
    assert out.abs().sum() > 0


# ---- argument types -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize(
    "kw", [dict(scale=True), dict(scale=False), dict(scale="1"), dict(dropout_p=True), dict(dropout_p=None)]
)
def test_bool_and_non_numbers_are_not_scalars(backend, kw):
    x = attention_inputs(B=1, Hq=2, Lq=3, Lk=4, D=8)
    with pytest.raises(TypeError, match="scale|dropout_p"):
        mmfast.cross_attention(x["query"], x["key"], x["value"], backend=backend, **kw)


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    x = attention_inputs(B=1, Hq=2, Lq=3, Lk=4, D=8)
    a = mmfast.cross_attention(x["query"], x["key"], x["value"], scale=np.float32(0.3), backend="cpu")
    b = mmfast.cross_attention(x["query"], x["key"], x["value"], scale=0.3, backend="cpu")
    torch.testing.assert_close(a, b)


# ---- bf16 with dropout: D_i free of the output's rounding -------------------------------------------


@pytest.mark.parametrize("Lk", [1, 2, 5])
def test_bf16_dropout_short_rows_gradient_error(Lk):
    """With one key the exact dq, dk are 0; with few keys they are small: the backward's D_i must not
    carry the bf16 rounding of the output (it once gave |dq| ~ 0.1 where the gradient is 0)."""
    from mmfast.reference.dropout import draw_seed, keep_mask  # noqa: PLC0415

    x = attention_inputs(B=2, Hq=4, Lq=33, Lk=Lk, D=64)
    q, k, v = (t.to(torch.bfloat16) for t in (x["query"], x["key"], x["value"]))
    p, g = 0.3, torch.randn(2, 4, 33, 64)
    torch.manual_seed(5)
    keep = keep_mask(draw_seed(), 2, 4, 33, Lk, p)
    torch.manual_seed(5)
    got = _grads_out(q, k, v, g, dropout_p=p, backend="cpu")
    want = _grads_out(q.double(), k.double(), v.double(), g, dropout_p=p, dropout_mask=keep, ref=True)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double() / scale, b / scale, atol=2e-2, rtol=2e-2, msg=name)


def _grads_out(q, k, v, g, ref=False, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    fn = ref_attention if ref else mmfast.cross_attention
    out = fn(q, k, v, **kw)
    return torch.autograd.grad((out * g.to(out.dtype)).sum(), (q, k, v))


# ---- torch.compile ---------------------------------------------------------------------------------


def test_compile_fullgraph_fusion_and_dropout():
    """The out= path of AttentionFusion and dropout (the seed is a traced tensor) compile with
    fullgraph=True; compiled and eager gradients agree (dropout: the same seed is drawn)."""
    fusion = mmfast.nn.AttentionFusion(text_dim=16, image_dim=8, num_heads=4)
    T, V = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 7, 8, requires_grad=True)
    compiled = torch.compile(fusion, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(T, V).square().sum(), (T, V))
    want = torch.autograd.grad(fusion(T, V).square().sum(), (T, V))
    torch.testing.assert_close(got, want)

    attn = mmfast.nn.CrossAttention(16, 4, dropout=0.3, batch_first=True).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    torch.manual_seed(3)
    got = torch.compile(attn, fullgraph=True, backend="aot_eager")(x, x, x)[0]
    torch.manual_seed(3)
    want = attn(x, x, x)[0]
    torch.testing.assert_close(got, want)


# ---- outputs on huge pages behave like any tensor -----------------------------------------------------


def test_large_outputs_can_be_resized():
    """Outputs and gradients of 8 MB or more live on the huge-page allocator: resize_ must grow them,
    keeping their contents (they were once non-resizable from_blob tensors)."""
    q = torch.randn(4, 8, 1024, 64, requires_grad=True)  # 8 MB
    kv = torch.randn(4, 8, 16, 64)
    out = mmfast.cross_attention(q, kv, kv, backend="cpu")
    out.sum().backward()
    for t in (out.detach(), q.grad):
        assert t.nbytes >= 8 << 20
        before = t.clone()
        t.resize_(t.shape[0] + 3, *t.shape[1:])
        assert torch.equal(t[: before.shape[0]], before)
        t.resize_(1, 2, 3)
        t.fill_(1.0)
    assert math.isfinite(float(out.detach().sum()))


# ---- dropout: the same torch seed, the same weights dropped on every backend ---------------------------


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_reference_draws_the_kernels_dropout_mask(backend):
    x = attention_inputs(B=2, Hq=4, Hkv=2, Lq=9, Lk=33, D=16, pad_frac=0.2)
    kw = dict(key_padding_mask=x["key_padding_mask"], dropout_p=0.3, return_lse=True)
    torch.manual_seed(11)
    want = ref_attention(x["query"].double(), x["key"].double(), x["value"].double(), **kw)
    torch.manual_seed(11)
    got = mmfast.cross_attention(x["query"], x["key"], x["value"], backend=backend, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


def test_need_weights_path_drops_the_kernels_weights():
    attn = mmfast.nn.CrossAttention(16, 4, dropout=0.4, batch_first=True).train()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    torch.manual_seed(2)
    fast, _ = attn(q, kv, kv)
    torch.manual_seed(2)
    slow, weights = attn(q, kv, kv, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert (weights == 0).any()


# ---- modules: arguments checked where they are given ------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: mmfast.nn.CrossAttention(16, "4"),
        lambda: mmfast.nn.CrossAttention(16.0, 4),
        lambda: mmfast.nn.CrossAttention(16, True),
        lambda: mmfast.nn.CrossAttention(16, 4, backend="gpu"),
        lambda: mmfast.nn.AttentionFusion(text_dim=8, image_dim=6, num_heads=2, backend="fast"),
        lambda: mmfast.nn.CoAttentionLayer(hidden_size=16, num_heads=4, intermediate_size=32, backend=None),
        lambda: mmfast.swap_modules(torch.randn(3)),
        lambda: mmfast.swap_modules(torch.nn.Linear(2, 2), backend="gpu"),
        lambda: mmfast.swap_modules(torch.nn.Linear(2, 2), filter=3),
    ],
)
def test_module_arguments_checked_up_front(make):
    with pytest.raises((TypeError, ValueError), match="num_heads|embed_dim|backend|model|filter"):
        make()


def test_fusion_with_empty_text():
    """An empty text (B, 0, Dt): empty output (empty storages share pointer 0, not memory)."""
    fusion = mmfast.nn.AttentionFusion(text_dim=8, image_dim=6, num_heads=2)
    T = torch.randn(2, 0, 8, requires_grad=True)
    out = fusion(T, torch.randn(2, 4, 6))
    assert out.shape == (2, 0, 16)
    out.sum().backward()
