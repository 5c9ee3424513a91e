"""Benchmark cases: the shapes of each suite, their inputs, their FLOP counts and their ground truth.

A ``Case`` is one op at one shape, dtype and mode ("fwd" or "fwd+bwd"). Rows of the results table
are (case, provider) pairs; every provider of a case sees the same input tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import mmfast

CONTRASTIVE_OPS = ("info_nce", "siglip_loss")
OPS = (*CONTRASTIVE_OPS, "cross_attention")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Initial values of the learned scalars in CLIP (1/0.07) and SigLIP (t' = log 10, b = -10).
CLIP_SCALE = 1.0 / 0.07
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0


@dataclass(frozen=True)
class Case:
    """One op at one shape, dtype and mode.

    ``dims`` holds (name, value) pairs: contrastive ops ``N, D``; cross_attention
    ``B, Hq, Hkv, Lq, Lk, D, pad`` (pad = 1: random key padding, at least half the keys valid).
    """

    op: str
    dims: tuple[tuple[str, int], ...]
    dtype: torch.dtype
    mode: str
    kind: str = ""  # a short name for the shape family ("text->image", "square", ...)

    def __getitem__(self, name: str) -> int:
        return dict(self.dims)[name]

    @property
    def data_key(self) -> tuple:
        """Cases that share input tensors and ground truth (fwd and fwd+bwd of one shape)."""
        return (self.op, self.dims, self.dtype)

    @property
    def shape_label(self) -> str:
        d = dict(self.dims)
        if self.op in CONTRASTIVE_OPS:
            return f"N={d['N']} D={d['D']}"
        heads = f"H={d['Hq']}" if d["Hq"] == d["Hkv"] else f"Hq={d['Hq']} Hkv={d['Hkv']}"
        lens = f"L={d['Lq']}" if d["Lq"] == d["Lk"] else f"Lq={d['Lq']} Lk={d['Lk']}"
        pad = " pad" if d["pad"] else ""
        return f"{self.kind + ' ' if self.kind else ''}B={d['B']} {heads} {lens} D={d['D']}{pad}"

    @property
    def label(self) -> str:
        return f"{self.op} {self.shape_label} {DTYPE_NAMES.get(self.dtype, str(self.dtype))} {self.mode}"


def contrastive_case(op: str, N: int, D: int, dtype: torch.dtype, mode: str) -> Case:
    return Case(op, (("N", N), ("D", D)), dtype, mode)


def attention_case(
    kind: str, B: int, H: int, Lq: int, Lk: int, D: int, pad: bool, dtype: torch.dtype, mode: str, Hkv: int = 0
) -> Case:
    dims = (("B", B), ("Hq", H), ("Hkv", Hkv or H), ("Lq", Lq), ("Lk", Lk), ("D", D), ("pad", int(pad)))
    return Case("cross_attention", dims, dtype, mode, kind)


# --------------------------------------------------------------------------------------------
# Suites.
# --------------------------------------------------------------------------------------------

# (kind, B, H, Lq, Lk, D, pad): text tokens attending to ViT-B/16 patches (576 + CLS), and a square
# self-attention-sized problem (the shapes of the cross-attention issue).
ATTENTION_SHAPES = {
    "default": [
        ("text->image", 32, 12, 32, 577, 64, False),
        ("text->image", 32, 12, 32, 577, 64, True),
        ("square", 4, 8, 1024, 1024, 64, False),
    ],
    "quick": [("text->image", 32, 12, 32, 577, 64, True)],
    "smoke": [("text->image", 2, 2, 5, 37, 16, True)],
}
# Batch sizes per preset and mode: the large batch is a training case (fwd+bwd); its forward alone
# would cost the default run's budget without adding a claim.
CONTRASTIVE_N = {
    "default": {"fwd": [4096], "fwd+bwd": [4096, 16384]},
    "quick": {"fwd": [4096], "fwd+bwd": [4096]},
    "smoke": {"fwd": [64], "fwd+bwd": [64]},
}
CONTRASTIVE_D = {"default": 512, "quick": 512, "smoke": 32}
DEFAULT_DTYPES = {"default": ["fp32", "bf16"], "quick": ["fp32"], "smoke": ["fp32"]}


def suite(preset: str, ops: list[str], dtypes: list[torch.dtype], modes: list[str]) -> list[Case]:
    """The cases of ``preset`` ("default" | "quick" | "smoke"), filtered by op, dtype and mode."""
    cases = []
    for op in ops:
        for dtype in dtypes:
            for mode in modes:
                if op in CONTRASTIVE_OPS:
                    D = CONTRASTIVE_D[preset]
                    cases += [contrastive_case(op, N, D, dtype, mode) for N in CONTRASTIVE_N[preset][mode]]
                else:
                    cases += [attention_case(*s, dtype=dtype, mode=mode) for s in ATTENTION_SHAPES[preset]]
    return cases


def sweep_sizes(start: int = 1024, stop: int = 262144) -> list[int]:
    sizes, n = [], start
    while n <= stop:
        sizes.append(n)
        n *= 2
    return sizes


# --------------------------------------------------------------------------------------------
# FLOPs: one function for every op, two named conventions.
#   "model":     what the math needs (forward, plus the backward's products of the chain rule);
#                the rates in the table, the same count for every provider.
#   "algorithm": what a fused kernel that keeps no N x N / Lq x Lk matrix runs: its backward
#                recomputes the logits / scores. Shown beside the model rate where the two differ.
# --------------------------------------------------------------------------------------------

FLOP_CONVENTIONS = ("model", "algorithm")


def flops(case: Case, valid_keys: int | None = None, convention: str = "model") -> float:
    """Floating-point operations of ``case`` (multiply-add = 2), matmuls only.

    ====================  ============================  ===========================================
    op (per b, h)         forward                       fwd+bwd: model / algorithm
    ====================  ============================  ===========================================
    contrastive (N, M=N)  2·N·M·D (the logits GEMM)     6·N·M·D (+ dX = G·Y, dY = Gᵀ·X) / 8·N·M·D
    cross_attention       2·Lq·Lk'·(D + Dv) (S, O)      3 x forward (+ dV, dP, dQ, dK) / 3.5 x
    ====================  ============================  ===========================================

    Lk' counts only the keys that are not padding (``valid_keys`` = total valid keys over the batch),
    so a kernel cannot score FLOPs it may legitimately skip.
    """
    if convention not in FLOP_CONVENTIONS:
        raise ValueError(f"convention must be one of {FLOP_CONVENTIONS}, got {convention!r}")
    algorithm = convention == "algorithm"
    if case.op in CONTRASTIVE_OPS:
        fwd = 2.0 * case["N"] * case["N"] * case["D"]
        backward = 3.0 if algorithm else 2.0  # the algorithm recomputes the logits GEMM
    else:
        keys = valid_keys if valid_keys is not None else case["B"] * case["Lk"]
        fwd = 2.0 * case["Hq"] * case["Lq"] * keys * (2 * case["D"])
        backward = 2.5 if algorithm else 2.0  # the algorithm recomputes S = QKᵀ (half the forward)
    return fwd * (1.0 + backward if case.mode == "fwd+bwd" else 1.0)


# --------------------------------------------------------------------------------------------
# Inputs and ground truth.
# --------------------------------------------------------------------------------------------


@dataclass
class Data:
    """The tensors every provider of one (op, dims, dtype) receives, and the reference results."""

    inputs: dict[str, Any]
    grad_names: tuple[str, ...]  # inputs that receive a gradient in fwd+bwd mode
    grad_output: Tensor | None = None  # dL/d(out) for cross_attention; None for scalar losses
    valid_keys: int | None = None
    ref_out: Tensor | None = None
    ref_grads: dict[str, Tensor] = field(default_factory=dict)
    note: str = ""  # goes into every row of the case (e.g. what could not be checked)


def make_data(case: Case, device: torch.device, seed: int = 0) -> Data:
    """Fresh random inputs (seeded) for ``case`` on ``device``."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=case.dtype)

    def scalar(v: float) -> Tensor:
        return torch.tensor(v, device=device, dtype=torch.float32)

    if case.op in CONTRASTIVE_OPS:
        N, D = case["N"], case["D"]
        x = F.normalize(torch.randn(N, D, generator=g), dim=-1).to(device=device, dtype=case.dtype)
        y = F.normalize(torch.randn(N, D, generator=g), dim=-1).to(device=device, dtype=case.dtype)
        if case.op == "info_nce":
            inputs = dict(image_features=x, text_features=y, logit_scale=scalar(CLIP_SCALE))
            return Data(inputs, ("image_features", "text_features", "logit_scale"))
        inputs = dict(
            image_features=x, text_features=y, logit_scale=scalar(SIGLIP_SCALE), logit_bias=scalar(SIGLIP_BIAS)
        )
        return Data(inputs, ("image_features", "text_features", "logit_scale", "logit_bias"))
    B, Hq, Hkv, Lq, Lk, D = (case[k] for k in ("B", "Hq", "Hkv", "Lq", "Lk", "D"))
    inputs = dict(query=randn(B, Hq, Lq, D), key=randn(B, Hkv, Lk, D), value=randn(B, Hkv, Lk, D))
    kpm, valid = None, B * Lk
    if case["pad"]:
        # Each item keeps between half and all of its keys (never none: that is a test-suite matter).
        lengths = torch.randint(Lk // 2 + 1, Lk + 1, (B,), generator=g)
        kpm = (torch.arange(Lk).view(1, Lk) >= lengths.view(B, 1)).to(device)
        valid = int(lengths.sum())
    inputs["key_padding_mask"] = kpm
    return Data(inputs, ("query", "key", "value"), grad_output=randn(B, Hq, Lq, D), valid_keys=valid)


def leaves(data: Data, case: Case) -> dict[str, Any]:
    """The inputs for one call: fwd+bwd makes fresh leaves (sharing storage) that require grad."""
    if case.mode == "fwd":
        return dict(data.inputs)
    out = dict(data.inputs)
    for name in data.grad_names:
        out[name] = data.inputs[name].detach().requires_grad_(True)
    return out


def reference_forward(case: Case, inputs: dict[str, Any]) -> Tensor:
    """mmfast's reference backend on ``inputs`` (the ground truth)."""
    if case.op == "info_nce":
        return mmfast.info_nce(**inputs, backend="reference")
    if case.op == "siglip_loss":
        return mmfast.siglip_loss(**inputs, backend="reference")
    return mmfast.cross_attention(**inputs, backend="reference")


def compute_reference(case: Case, data: Data) -> None:
    """Fill ``data.ref_out`` and ``data.ref_grads``: the reference run on float32 copies of the inputs.

    Low-precision inputs are upcast exactly, so the truth carries no rounding of its own beyond fp32.
    """
    inputs = {
        k: v.detach().float() if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in data.inputs.items()
    }
    for name in data.grad_names:
        inputs[name].requires_grad_(True)
    out = reference_forward(case, inputs)
    go = None if data.grad_output is None else data.grad_output.float()
    grads = torch.autograd.grad(out, [inputs[n] for n in data.grad_names], grad_outputs=go)
    data.ref_out = out.detach()
    data.ref_grads = dict(zip(data.grad_names, grads))


def chunked_loss(op: str, x: Tensor, y: Tensor, scale: float, bias: float = 0.0, chunk: int = 2048) -> float:
    """The loss (mean reduction) in O(chunk·N) memory, accumulated in float64: the sweep's ground truth.

    info_nce: rows i give lse_r[i] = logsumexp_j s<x_i, y_j>; columns accumulate lse_c[j] over row
    chunks with an online logaddexp; loss = mean_i (lse_r[i] + lse_c[i]) / 2 - s<x_i, y_i>.
    siglip:   sum over chunks of -log sigmoid(z_ij (s<x_i, y_j> + b)), divided by N.
    """
    N = x.shape[0]
    xf, yf = x.float(), y.float()
    diag = scale * (xf * yf).sum(-1).double()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    col_lse = torch.full((N,), float("-inf"), dtype=torch.float64, device=x.device)
    for i in range(0, N, chunk):
        logits = scale * (xf[i : i + chunk] @ yf.t())
        if op == "info_nce":
            total += torch.logsumexp(logits, dim=1).double().sum()
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0).double())
        else:
            z = -torch.ones_like(logits)
            z[:, i : i + chunk].diagonal().fill_(1.0)
            total += -F.logsigmoid(z * (logits + bias)).double().sum()
    if op == "info_nce":
        return float((0.5 * (total + col_lse.sum()) - diag.sum()) / N)
    return float(total / N)
