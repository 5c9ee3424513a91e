"""Providers: every implementation a case is timed with, mmfast's backends and the peers.

A provider's ``build(case, inputs)`` returns a zero-argument forward function (loss or attention
output) over the given inputs, or raises ``Unsupported``. The harness adds the backward pass, checks
the result against the reference and times it. mmfast's backends are discovered through
``mmfast.backends()``, never listed here; peers are found by import.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import mmfast
from mmfast import _dispatch
from mmfast.bench.cases import CONTRASTIVE_OPS, OPS, Case, reference_forward

# The PyTorch baseline each op's speed-up is quoted against.
BASELINE = {"info_nce": "torch-naive", "siglip_loss": "torch-naive", "cross_attention": "torch-sdpa"}


class Unsupported(Exception):
    """The provider cannot take this case (the row says why; not an error)."""


@dataclass
class Provider:
    name: str
    ops: tuple[str, ...]
    build: Callable[[Case, dict[str, Any]], Callable[[], Tensor]]
    devices: tuple[str, ...] = ("cpu", "cuda")
    module: str | None = None  # importable module the provider needs (None: always present)
    default: bool = True  # in the default set (mmfast-reference and torch-compile are opt-in)
    warmup: bool = False  # one untimed call before the check (compilation), outside the time budget
    note: str = ""
    unavailable: str | None = None  # set when known not to run on this machine

    def why_not(self, device: torch.device) -> str | None:
        if self.unavailable:
            return self.unavailable
        if device.type not in self.devices:
            return f"runs on {', '.join(self.devices)} only"
        if self.module and importlib.util.find_spec(self.module) is None:
            return f"{self.module} not installed"
        return None


# --------------------------------------------------------------------------------------------
# mmfast backends.
# --------------------------------------------------------------------------------------------


def _mmfast_build(backend: str) -> Callable[[Case, dict[str, Any]], Callable[[], Tensor]]:
    def build(case: Case, inputs: dict[str, Any]) -> Callable[[], Tensor]:
        op = getattr(mmfast, case.op)
        return lambda: op(**inputs, backend=backend)

    return build


def mmfast_providers(device: torch.device) -> list[Provider]:
    """One provider per mmfast backend (from ``mmfast.backends()``), whether it runs here or not.

    A backend that is unavailable on this machine (the extension not built, no GPU, ...) or that
    cannot take tensors on ``device`` (the dispatcher's device rule) is listed with that reason, so
    the table's "Not run here" says why mmfast-cpu (say) is missing.
    """
    table = mmfast.backends()
    out = []
    for name in _dispatch.BACKENDS:
        ops = tuple(op for op in table if table[op][name]["available"])
        reasons = [table[op][name]["reason"] for op in table if not table[op][name]["available"]]
        why = None if ops else reasons[0]
        why = why or "; ".join(_dispatch.device_reasons(name, device)) or None
        if name == "triton" and device.type == "cpu" and not why:
            why = "on CPU tensors Triton runs its interpreter: a test tool, not a kernel"
        note = f"mmfast backend={name!r}" + (" (the ground truth itself)" if name == "reference" else "")
        build = _mmfast_build(name)
        out.append(
            Provider(
                f"mmfast-{name}", ops or tuple(table), build, default=name != "reference", note=note, unavailable=why
            )
        )
    return out


def _cpu_path_build(path: str) -> Callable[[Case, dict[str, Any]], Callable[[], Tensor]]:
    def build(case: Case, inputs: dict[str, Any]) -> Callable[[], Tensor]:
        op = getattr(mmfast, case.op)

        def call() -> Tensor:
            with mmfast.cpu_options(gemm=path):
                return op(**inputs, backend="cpu")

        return call

    return build


def cpu_path_providers() -> list[Provider]:
    """``mmfast-cpu:<path>``: the cpu backend with its tile products forced onto one path
    (``mmfast.cpu_options(gemm=path)``), to compare the paths of one CPU in one run. Opt-in
    (``--providers mmfast-cpu:blas,...``); a path this CPU lacks is listed with the missing feature."""
    from mmfast import cpu

    ext, why = _dispatch.extension()
    out = []
    for path in cpu.GEMMS[1:]:
        missing = ext.cpu_gemm_missing(path) if ext is not None else why
        note = f"backend='cpu' under mmfast.cpu_options(gemm={path!r})"
        unavailable = f"needs {missing}" if ext is not None and missing else missing or None
        out.append(
            Provider(
                f"mmfast-cpu:{path}",
                OPS,
                _cpu_path_build(path),
                ("cpu",),
                default=False,
                note=note,
                unavailable=unavailable,
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Contrastive peers.
# --------------------------------------------------------------------------------------------


def _naive_contrastive(case: Case, inputs: dict[str, Any]) -> Callable[[], Tensor]:
    """The loss as users write it (open_clip's ClipLoss / SigLipLoss): logits in the inputs' dtype."""
    x, y, s = inputs["image_features"], inputs["text_features"], inputs["logit_scale"]
    N = x.shape[0]
    labels = torch.arange(N, device=x.device)
    if case.op == "info_nce":

        def clip() -> Tensor:
            logits = s * x @ y.t()
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))

        return clip
    b = inputs["logit_bias"]

    def siglip() -> Tensor:  # the +-1 label matrix is built per call, as open_clip does
        z = 2 * torch.eye(N, device=x.device, dtype=x.dtype) - 1
        return -F.logsigmoid(z * (s * x @ y.t() + b)).sum() / N

    return siglip


def _open_clip(case: Case, inputs: dict[str, Any]) -> Callable[[], Tensor]:
    loss = importlib.import_module("open_clip.loss")
    x, y, s = inputs["image_features"], inputs["text_features"], inputs["logit_scale"]
    if case.op == "info_nce":
        clip = loss.ClipLoss()
        return lambda: clip(x, y, s)
    sig = loss.SigLipLoss()
    return lambda: sig(x, y, s, inputs["logit_bias"])


def _linear_cross_entropy(case: Case, inputs: dict[str, Any]) -> Callable[[], Tensor]:
    """CLIP loss from two chunked ``F.linear_cross_entropy`` calls (one per direction)."""
    if not hasattr(F, "linear_cross_entropy"):
        raise Unsupported("F.linear_cross_entropy is not in this torch")
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    kw = {"options": options_cls()} if options_cls is not None else {}
    x, y, s = inputs["image_features"], inputs["text_features"], inputs["logit_scale"]
    labels = torch.arange(x.shape[0], device=x.device)

    def lce() -> Tensor:
        sc = s.to(x.dtype)
        i2t = F.linear_cross_entropy(sc * x, y, labels, **kw)
        t2i = F.linear_cross_entropy(sc * y, x, labels, **kw)
        return 0.5 * (i2t.float() + t2i.float())

    return lce


def _inf_cl(case: Case, inputs: dict[str, Any]) -> Callable[[], Tensor]:
    """Inf-CL (https://arxiv.org/abs/2410.17243): one direction per call, so two calls for CLIP."""
    if case.dtype != torch.float32:
        raise Unsupported("inf-cl takes float32 features only")
    cal_inf_loss = importlib.import_module("inf_cl").cal_inf_loss
    x, y, s = inputs["image_features"], inputs["text_features"], inputs["logit_scale"]
    labels = torch.arange(x.shape[0], device=x.device)
    return lambda: 0.5 * (cal_inf_loss(x, y, labels, scale=s) + cal_inf_loss(y, x, labels, scale=s))


# --------------------------------------------------------------------------------------------
# Cross-attention peers.
# --------------------------------------------------------------------------------------------


def _sdpa(case: Case, inputs: dict[str, Any]) -> Callable[[], Tensor]:
    q, k, v, kpm = inputs["query"], inputs["key"], inputs["value"], inputs["key_padding_mask"]
    # SDPA's bool mask is True = take part; the padding mask is True = ignore.
    mask = None if kpm is None else ~kpm[:, None, None, :]
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)


def _flash_attn(case: Case, inputs: dict[str, Any]) -> Callable[[], Tensor]:
    """FlashAttention-2: (B, L, H, D) views; with padding, the unpadded (varlen) call users must make."""
    if case.dtype not in (torch.float16, torch.bfloat16):
        raise Unsupported("flash-attn takes fp16/bf16 only")
    fa = importlib.import_module("flash_attn")
    q, k, v, kpm = inputs["query"], inputs["key"], inputs["value"], inputs["key_padding_mask"]
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if kpm is None:
        return lambda: fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    lengths = (~kpm).sum(1, dtype=torch.int32)
    cu_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=q.device)
    keep = (~kpm).flatten()
    max_k = int(lengths.max())

    def varlen() -> Tensor:  # the gather (unpadding) is part of the cost of using FA with padding
        qf = q.transpose(1, 2).reshape(B * Lq, H, D)
        kf = k.transpose(1, 2).reshape(B * Lk, Hkv, D)[keep]
        vf = v.transpose(1, 2).reshape(B * Lk, Hkv, v.shape[-1])[keep]
        o = fa.flash_attn_varlen_func(qf, kf, vf, cu_q, cu_k, Lq, max_k)
        return o.view(B, Lq, H, -1).transpose(1, 2)

    return varlen


# --------------------------------------------------------------------------------------------
# torch.compile of the reference (opt-in: compiling takes long on CPU).
# --------------------------------------------------------------------------------------------


@functools.cache
def _compiled(op: str) -> Callable[..., Tensor]:
    import torch._dynamo

    # Every shape, dtype and grad mode is its own graph; let them all compile rather than fall back.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    probe = Case(op, (), torch.float32, "fwd")
    return torch.compile(lambda inputs: reference_forward(probe, inputs))


def _torch_compile(case: Case, inputs: dict[str, Any]) -> Callable[[], Tensor]:
    fn = _compiled(case.op)
    return lambda: fn(inputs)


def peer_providers() -> list[Provider]:
    contrastive, attention = CONTRASTIVE_OPS, ("cross_attention",)
    return [
        Provider("torch-naive", contrastive, _naive_contrastive, note="logits materialized in the inputs' dtype"),
        Provider("open_clip", contrastive, _open_clip, module="open_clip", note="open_clip ClipLoss / SigLipLoss"),
        Provider(
            "torch-lce",
            ("info_nce",),
            _linear_cross_entropy,
            note="F.linear_cross_entropy with LinearCrossEntropyOptions(), one call per direction",
        ),
        Provider(
            "inf-cl", ("info_nce",), _inf_cl, ("cuda",), "inf_cl", note="Inf-CL cal_inf_loss, one call per direction"
        ),
        Provider("torch-sdpa", attention, _sdpa, note="F.scaled_dot_product_attention, padding as a bool attn_mask"),
        Provider(
            "flash-attn",
            attention,
            _flash_attn,
            ("cuda",),
            "flash_attn",
            note="flash_attn_func; with padding, unpad + flash_attn_varlen_func (the unpadding is timed)",
        ),
        Provider(
            "torch-compile",
            (*contrastive, *attention),
            _torch_compile,
            default=False,
            warmup=True,
            note="torch.compile of mmfast's reference (compile time not counted)",
        ),
    ]


def all_providers(device: torch.device) -> list[Provider]:
    return mmfast_providers(device) + cpu_path_providers() + peer_providers()


def select_providers(device: torch.device, names: list[str] | None, compile_ref: bool) -> list[Provider]:
    """The providers to run: ``names`` when given (unknown names are an error), else the default set."""
    every = all_providers(device)
    known = {p.name: p for p in every}
    if names:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"unknown provider(s) {', '.join(unknown)}; known here: {', '.join(known)}")
        return [known[n] for n in names]
    return [p for p in every if p.default or (compile_ref and p.name == "torch-compile")]
