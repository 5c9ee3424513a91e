"""Hypothesis strategies and settings profiles shared by the property tests.

Profiles (``MMFAST_HYPOTHESIS_PROFILE``, default ``ci``):

* ``ci``: ``derandomize=True`` and no example database, so CI runs the same examples every time
  (no flaky CI: a failure reproduces by rerunning the test) within its time budget; each test's
  example count is its ``ci`` budget (see ``budget``).
* ``long``: random examples (hypothesis prints the seed of a failing run and a
  ``@reproduce_failure`` blob; rerun with ``--hypothesis-seed=N``), each test's ``long`` budget
  (>= 5,000 examples per op in total).
* ``sanitize``: the ``ci`` examples, a third of each budget (tools/sanitize.sh: the ASan + UBSan
  pass runs the cpu backend's properties as a smoke test of the instrumented kernels).

A case is a small frozen dataclass of plain values (shapes, dtypes, layouts, mask kinds, a seed);
``*_inputs`` turn it into tensors drawn from ``torch.Generator(seed)``, so a failing example
prints as a readable case and shrinks towards small shapes and seed 0.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import time
import warnings
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.errors import StopTest, UnsatisfiedAssumption

import mmfast

PROFILE = os.environ.get("MMFAST_HYPOTHESIS_PROFILE", "ci")
# No "explain" phase: it reruns a failing example many times to list the lines it covers.
_PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=list(HealthCheck), database=None, phases=_PHASES)
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("sanitize", derandomize=True, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
if PROFILE not in ("ci", "sanitize", "long"):
    raise ValueError(f"MMFAST_HYPOTHESIS_PROFILE must be 'ci', 'sanitize' or 'long', got {PROFILE!r}")
settings.load_profile(PROFILE)


def budget(ci: int, long: int, slow: bool = False) -> settings:
    """Settings with this test's example count under the active profile. ``slow`` (the Triton
    interpreter, the CUDA emulation: ~1 s an example): no shrinking under ``ci``, so a failure
    costs CI no more than its examples (the failing example is printed as found, and reproduces:
    the ci profile is derandomized)."""
    if PROFILE == "long":
        return _long_chunks(long)
    if PROFILE == "sanitize":
        ci = max(ci // 3, 2)
    return settings(max_examples=ci, phases=_PHASES[:-1] if slow else _PHASES)


# Examples tried / passed per test, written as JSON into the folder MMFAST_HYPOTHESIS_TALLY (one
# file per process) at exit, for the long run's report (tools/hypothesis_tally.py sums them).
_TALLY: dict[str, list[int]] = {}
# Long run only, to bound it by time: MMFAST_HYPOTHESIS_STOP_AT (Unix time) for the whole run and
# MMFAST_HYPOTHESIS_TEST_SECONDS per property. The long budget runs as hypothesis runs of _CHUNK
# examples each, until it is spent or the time is up (a run is never cut short: stopping a property
# from inside makes hypothesis report its data generation as flaky); the tally has the exact counts.
_STOP_AT = float(os.environ.get("MMFAST_HYPOTHESIS_STOP_AT", "inf"))
_TEST_SECONDS = float(os.environ.get("MMFAST_HYPOTHESIS_TEST_SECONDS", "inf"))
_CHUNK = 50


def _long_chunks(long: int):
    def deco(prop):
        chunk = settings(max_examples=min(_CHUNK, long))(prop)

        @functools.wraps(prop)
        def run(*args, **kwargs):
            stop, done = min(_STOP_AT, time.time() + _TEST_SECONDS), 0
            while done < long and time.time() < stop:
                chunk(*args, **kwargs)
                done += _CHUNK
            if done < long:
                warnings.warn(f"long profile: time bound reached after about {done} of {long} examples", stacklevel=2)

        return run

    return deco


def tallied(key: str):
    """Count the examples a property runs and passes under ``key`` (shrinking runs included)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            counts = _TALLY.setdefault(key, [0, 0])
            counts[0] += 1
            try:
                fn(*args, **kwargs)
            except (UnsatisfiedAssumption, StopTest):  # invalid (a draw rejected or out of data): not tried
                counts[0] -= 1
                raise
            counts[1] += 1

        return wrapper

    return deco


@atexit.register
def _dump_tally() -> None:
    folder = os.environ.get("MMFAST_HYPOTHESIS_TALLY")
    if folder and _TALLY:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"tally-{os.getpid()}.json"), "w") as f:
            json.dump(_TALLY, f)


f64, f32, bf16, f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

# cpu code paths, forced through mmfast.cpu_options (those this CPU has): the tile-product path of
# each dtype ("auto" is what the backend picks), and the output allocator without huge pages.
# The backends the property tests run (the CUDA kernels under emulation), the dtypes each takes, and
# the slow ones (interpreter, emulation: smaller budgets, no shrinking under the ci profile).
BACKENDS = ["cpu", "reference", "triton", "emulated"]
DTYPES = {
    "cpu": (f32, bf16, f16, f64),
    "reference": (f32, bf16, f16, f64),
    "triton": (f32, f16),
    "emulated": (f32, bf16, f16),
}
SLOW = ("triton", "emulated")

CPU_PATHS = {
    "auto": dict(gemm="auto"),
    "avx512": dict(gemm="avx512"),
    "avx2": dict(gemm="avx2"),
    "blas": dict(gemm="blas"),
    "avx512_bf16": dict(gemm="avx512_bf16"),
    "no_hugepages": dict(gemm="auto", hugepages=False),
}


def cpu_paths() -> list[str]:
    """The CPU_PATHS this CPU can run."""
    isa = mmfast.cpu.cpu_isa()
    need = {"avx512": "avx512", "avx2": "avx2", "avx512_bf16": "avx512_bf16"}
    return [name for name, opts in CPU_PATHS.items() if opts["gemm"] not in need or isa[need[opts["gemm"]]]]


# Lengths and head dims: 1, tiny, odd, around the kernels' tile edges (16, 32, 64), and a few larger.
LENGTHS = st.one_of(st.integers(1, 9), st.sampled_from([15, 16, 17, 31, 32, 33, 63, 64, 65, 70, 97]))
HEAD_DIMS = st.one_of(
    st.integers(1, 9), st.sampled_from([16, 31, 32, 33, 63, 64, 65, 80, 96, 100, 128, 129, 160, 200, 256])
)
# Softmax / logit scales from tiny to 1e3 (None: the op's default 1/sqrt(D)), both signs.
SCALES = st.one_of(
    st.none(),
    st.sampled_from([0.0, 1.0, 10.0, 100.0, 1000.0, -1.0]),
    st.floats(1e-3, 1e3).map(lambda x: float(f"{x:.3g}")),
)


# ---------------------------------------------------------------------------------------------
# Cross-attention
# ---------------------------------------------------------------------------------------------

# Layouts of q / k / v: contiguous (B, H, L, D); (B, L, H, D) storage viewed as (B, H, L, D);
# every other column of a wider tensor; column-major last two dims; one batch item expanded
# over B (stride 0).
LAYOUTS = ("bhld", "blhd", "sliced", "colmajor", "expand")


@dataclass(frozen=True)
class AttnCase:
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    dtype: torch.dtype
    layouts: tuple[str, str, str] = ("bhld", "bhld", "bhld")
    kpm: str = "none"  # none | random | one_item_padded | all_padded
    mask: str = "none"  # none | bool | float
    mask_shape: tuple[int, ...] = ()
    mask_dtype: torch.dtype | None = None
    mask_grad: bool = False
    empty_row: bool = False  # force a fully masked query row through the attn_mask
    causal: bool = False
    scale: float | None = None
    dropout_p: float = 0.0
    magnitude: float = 1.0  # q and k are randn * magnitude
    seed: int = 0

    @property
    def effective_scale(self) -> float:
        return self.D**-0.5 if self.scale is None else self.scale


def _mask_shape(draw, B: int, Hq: int, Lq: int, Lk: int) -> tuple[int, ...]:
    """A shape broadcastable to (B, Hq, Lq, Lk): 1 to 4 trailing dims, each full size or 1."""
    full = (B, Hq, Lq, Lk)
    ndim = draw(st.integers(1, 4))
    return tuple(n if draw(st.booleans()) else 1 for n in full[4 - ndim :])


@st.composite
def attention_cases(
    draw,
    *,
    dtypes: tuple[torch.dtype, ...],
    max_head_dim: int = 128,
    masks: bool = True,
    dropout: bool = False,
    empty: bool = False,
    max_len: int = 97,
    max_heads: int = 3,
) -> AttnCase:
    """Random cross-attention inputs. ``empty``: one or more of B, Hq, Lq, Lk, D, Dv is 0."""
    Hkv = draw(st.integers(1, max_heads))
    group = draw(st.integers(1, 3))
    dims = dict(
        B=draw(st.integers(1, 3)),
        Hq=Hkv * group,
        Hkv=Hkv,
        Lq=draw(LENGTHS.filter(lambda n: n <= max_len)),
        Lk=draw(LENGTHS.filter(lambda n: n <= max_len)),
        D=draw(HEAD_DIMS.filter(lambda n: n <= max_head_dim)),
    )
    dims["Dv"] = dims["D"] if draw(st.booleans()) else draw(HEAD_DIMS.filter(lambda n: n <= max_head_dim))
    if empty:
        for name in draw(st.sets(st.sampled_from(["B", "Hq", "Lq", "Lk", "D", "Dv"]), min_size=1, max_size=2)):
            dims[name] = 0
            if name == "Hq":
                dims["Hkv"] = draw(st.sampled_from([0, 1]))  # Hq = 0 with Hkv 0 or any
    B, Hq, Lq, Lk = dims["B"], dims["Hq"], dims["Lq"], dims["Lk"]
    dtype = draw(st.sampled_from(dtypes))
    layouts = tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3))
    kw: dict = {}
    if masks:
        kw["kpm"] = draw(st.sampled_from(["none", "random", "one_item_padded", "all_padded"]))
        kw["mask"] = draw(st.sampled_from(["none", "bool", "float"]))
        if kw["mask"] != "none":
            kw["mask_shape"] = _mask_shape(draw, B, Hq, Lq, Lk)
            kw["empty_row"] = draw(st.booleans())
        if kw["mask"] == "float":
            kw["mask_dtype"] = draw(st.sampled_from(sorted({dtype, f32}, key=str)))
            kw["mask_grad"] = draw(st.booleans())
        kw["causal"] = draw(st.booleans())
    if dropout:
        kw["dropout_p"] = draw(st.sampled_from([0.1, 0.5, 0.9]))
    return AttnCase(
        **dims,
        dtype=dtype,
        layouts=layouts,
        scale=draw(SCALES),
        magnitude=draw(st.sampled_from([1.0, 0.1, 4.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
        **kw,
    )


def _view(t: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, H, L, D) values in the given storage layout (same values, other strides)."""
    if layout == "blhd":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3] + 1, dtype=t.dtype)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    if layout == "colmajor":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "expand" and t.shape[0] > 0:
        return t[:1].expand_as(t)
    return t.contiguous()


def attention_inputs(case: AttnCase) -> dict:
    """query, key, value (in case.dtype, in their layouts), key_padding_mask, attn_mask.

    With layout "expand" every batch item holds item 0's values (the tensor is a stride-0 view).
    A float attn_mask is in case.mask_dtype and has -inf entries (masked keys).
    """
    g = torch.Generator().manual_seed(case.seed)

    def randn(*shape: int, mag: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * mag).to(case.dtype)

    q = randn(case.B, case.Hq, case.Lq, case.D, mag=case.magnitude)
    k = randn(case.B, case.Hkv, case.Lk, case.D, mag=case.magnitude)
    v = randn(case.B, case.Hkv, case.Lk, case.Dv)
    q, k, v = (_view(t, lay) for t, lay in zip((q, k, v), case.layouts))
    kpm = None
    if case.kpm != "none":
        kpm = torch.rand(case.B, case.Lk, generator=g) < 0.3
        if case.kpm == "one_item_padded" and case.B > 0:
            kpm[-1] = True
        elif case.kpm == "all_padded":
            kpm[:] = True
    mask = None
    if case.mask == "bool":
        mask = torch.rand(case.mask_shape, generator=g) < 0.7
        if case.empty_row and mask.dim() >= 2 and mask.numel():
            mask[..., 0, :] = False
    elif case.mask == "float":
        mask = torch.randn(case.mask_shape, generator=g) * 2
        mask = mask.masked_fill(torch.rand(case.mask_shape, generator=g) < 0.2, -math.inf)
        if case.empty_row and mask.dim() >= 2 and mask.numel():
            mask[..., 0, :] = -math.inf
        mask = mask.to(case.mask_dtype)
    return dict(query=q, key=k, value=v, key_padding_mask=kpm, attn_mask=mask)


# ---------------------------------------------------------------------------------------------
# Contrastive losses
# ---------------------------------------------------------------------------------------------

FEATURE_LAYOUTS = ("contiguous", "sliced", "transposed", "expand_rows")
# Labels: default arange, a permutation / random classes, int32, and a strided view (every other
# element of a longer tensor) or a reversed copy.
LABELS = ("default", "random", "int32", "strided", "permutation")


@dataclass(frozen=True)
class ContrastiveCase:
    loss: str  # info_nce | siglip
    N: int
    M: int
    D: int
    dtype: torch.dtype
    direction: str = "both"
    reduction: str = "mean"
    labels: str = "default"
    layouts: tuple[str, str] = ("contiguous", "contiguous")
    normalize: bool = True
    magnitude: float = 1.0  # feature norms (after normalising) up to this
    scale: float = 14.3
    scale_is_tensor: bool = True
    bias: float = -10.0
    upstream: float = 1.0  # the upstream gradient's magnitude (weights of rows for "none")
    seed: int = 0


@st.composite
def contrastive_cases(
    draw,
    *,
    loss: str,
    dtypes: tuple[torch.dtype, ...],
    empty: bool = False,
    max_rows: int = 97,
    max_dim: int = 513,
) -> ContrastiveCase:
    """Random InfoNCE / SigLIP inputs. ``empty``: N, M or D is 0."""
    N = draw(LENGTHS.filter(lambda n: n <= max_rows))
    direction = "both" if loss == "siglip" else draw(st.sampled_from(["both", "image", "text"]))
    M = N
    if direction != "both":
        M = draw(LENGTHS.filter(lambda n: n <= max_rows))
    D = draw(st.one_of(HEAD_DIMS, st.sampled_from([300, 513])).filter(lambda n: n <= max_dim))
    labels = "default"
    if loss == "info_nce":
        labels = draw(st.sampled_from(LABELS))
        if direction == "both" and labels == "random":
            labels = "permutation"
    if direction == "image" and labels == "default":
        M = max(M, N)  # default labels arange(N) need M >= N classes
    elif direction == "text" and labels == "default":
        N = max(N, M)
    if empty:
        # Zero rows of the side the loss rows come from (and so of the other side for "both"),
        # and / or D = 0: every case stays valid input.
        rows = {"both": "NM", "image": "N", "text": "M"}[direction]
        which = draw(st.sampled_from([rows, "D", rows + "D", "NMD"]))
        N, M, D = (0 if "N" in which else N), (0 if "M" in which else M), (0 if "D" in which else D)
    return ContrastiveCase(
        loss=loss,
        N=N,
        M=M,
        D=D,
        dtype=draw(st.sampled_from(dtypes)),
        direction=direction,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        labels=labels,
        layouts=(draw(st.sampled_from(FEATURE_LAYOUTS)), draw(st.sampled_from(FEATURE_LAYOUTS))),
        normalize=draw(st.booleans()),
        magnitude=draw(st.sampled_from([1.0, 1.0, 0.5, 3.0, 10.0])),
        scale=draw(st.sampled_from([14.3, 100.0, 1000.0, 1.0, 0.0, -5.0]) | st.floats(1e-2, 1e3)),
        scale_is_tensor=draw(st.booleans()),
        bias=draw(st.sampled_from([-10.0, 0.0, 3.0]) | st.floats(-20, 20)),
        upstream=draw(st.sampled_from([1.0, 2.0, 0.5, 3.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _feature_view(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "sliced":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1] + 1, dtype=t.dtype)
        wide[:, 1::2] = t
        return wide[:, 1::2]
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "expand_rows" and t.shape[0] > 0:
        return t[:1].expand_as(t)
    return t.contiguous()


def _labels(case: ContrastiveCase, g: torch.Generator) -> torch.Tensor | None:
    rows, classes = (case.M, case.N) if case.direction == "text" else (case.N, case.M)
    if case.labels == "default":
        return None
    if case.direction == "both" or case.labels == "permutation" and rows == classes:
        lab = torch.randperm(rows, generator=g)
    else:
        lab = torch.randint(0, max(classes, 1), (rows,), generator=g)
    if case.labels == "int32":
        return lab.int()
    if case.labels == "strided":
        wide = torch.full((2 * rows,), -7, dtype=torch.int64)
        wide[::2] = lab
        return wide[::2]
    return lab


def contrastive_inputs(case: ContrastiveCase) -> dict:
    """image_features (N, D), text_features (M, D) in case.dtype and layout, logit_scale, logit_bias
    (0-dim float32 tensors, or floats when not case.scale_is_tensor), labels (or None)."""
    g = torch.Generator().manual_seed(case.seed)

    def make(n: int, layout: str) -> torch.Tensor:
        t = torch.randn(n, case.D, generator=g)
        if case.normalize and case.D:
            t = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        t = t * torch.empty(n, 1).uniform_(case.magnitude / 2, case.magnitude, generator=g)
        return _feature_view(t.to(case.dtype), layout)

    x, y = make(case.N, case.layouts[0]), make(case.M, case.layouts[1])
    s, b = case.scale, case.bias
    if case.scale_is_tensor:
        s, b = torch.tensor(s), torch.tensor(b)
    return dict(image_features=x, text_features=y, logit_scale=s, logit_bias=b, labels=_labels(case, g))
