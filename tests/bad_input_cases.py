"""The bad-input table: every public op and module given wrong or edge input (run by
tests/test_bad_inputs.py in a worker subprocess, see tests/subproc.py).

Each case must raise an error naming the argument (``names``), or, where the input is legal
(``result_ok``), return the reference's result. Expected results of legal edge inputs are written
out here from docs/numerics.md (empty dimensions, NaN scales), not taken from the reference
backend, whose own handling of them is under test too.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():  # as tests/conftest.py: triton runs on CPU tensors in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from subproc import Case, registrar  # noqa: E402
from torch import nn  # noqa: E402

import mmfast  # noqa: E402

NAN = float("nan")
CPU_BACKENDS = ("cpu", "reference", "triton")


def qkv(B=2, Hq=4, Hkv=2, Lq=5, Lk=9, D=8, Dv=None, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def feats(N=6, M=None, D=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    M = N if M is None else M
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1).to(dtype)
    y = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=-1).to(dtype)
    return x, y


def attention_call(*args, **kw):
    """Call cross_attention; a result is returned as (out, lse)."""
    kw.setdefault("backend", "cpu")
    return mmfast.cross_attention(*args, **kw)


CASES: dict[str, Case] = {}


case = registrar(CASES)


# ---------------------------------------------------------------------------------------------
# cross_attention: wrong types, dims, dtypes, devices, shapes
# ---------------------------------------------------------------------------------------------
q, k, v = qkv()
kpm = torch.zeros(2, 9, dtype=torch.bool)
meta_k = torch.randn(2, 2, 9, 8, device="meta")
WRONG = {
    "query 3-D": ((q[0], k, v), {}, "query"),
    "key 5-D": ((q, k[None], v), {}, "key"),
    "value 2-D": ((q, k, v[0, 0]), {}, "value"),
    "query int64": ((q.long(), k, v), {}, "query"),
    "query bool": ((q > 0, k, v), {}, "query"),
    "query complex": ((q.to(torch.complex64), k, v), {}, "query"),
    "query list": ((q.tolist(), k, v), {}, "query"),
    "query numpy": ((q.numpy(), k, v), {}, "query"),
    "key None": ((q, None, v), {}, "key"),
    "key float64, query float32": ((q, k.double(), v), {}, "key"),
    "value bfloat16": ((q, k, v.bfloat16()), {}, "value"),
    "key on meta": ((q, meta_k, v), {}, "key"),
    "batch mismatch": ((q, k[:1], v[:1]), {}, ("batch", "key")),
    "head dim mismatch": ((q, k[..., :4], v), {}, ("head dim", "key")),
    "value length mismatch": ((q, k, v[:, :, :8]), {}, "value"),
    "value heads mismatch": ((q, k, v[:, :1]), {}, "value"),
    "GQA heads 4 over 3": ((q, torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)), {}, ("heads", "key")),
    "GQA more key heads than query heads": ((q, torch.randn(2, 8, 9, 8), torch.randn(2, 8, 9, 8)), {}, "heads"),
    "key_padding_mask float": ((q, k, v), dict(key_padding_mask=kpm.float()), "key_padding_mask"),
    "key_padding_mask int64": ((q, k, v), dict(key_padding_mask=kpm.long()), "key_padding_mask"),
    "key_padding_mask shape": ((q, k, v), dict(key_padding_mask=kpm[:, :8]), "key_padding_mask"),
    "key_padding_mask 3-D": ((q, k, v), dict(key_padding_mask=kpm[None]), "key_padding_mask"),
    "key_padding_mask list": ((q, k, v), dict(key_padding_mask=kpm.tolist()), "key_padding_mask"),
    "key_padding_mask on meta": ((q, k, v), dict(key_padding_mask=kpm.to("meta")), "key_padding_mask"),
    "attn_mask int32": ((q, k, v), dict(attn_mask=torch.ones(5, 9, dtype=torch.int32)), "attn_mask"),
    "attn_mask uint8": ((q, k, v), dict(attn_mask=torch.ones(5, 9, dtype=torch.uint8)), "attn_mask"),
    "attn_mask shape": ((q, k, v), dict(attn_mask=torch.ones(3, 5, 9)), "attn_mask"),
    "attn_mask 5-D": ((q, k, v), dict(attn_mask=torch.ones(1, 2, 4, 5, 9)), "attn_mask"),
    "attn_mask list": ((q, k, v), dict(attn_mask=[[True] * 9] * 5), "attn_mask"),
    "attn_mask complex": ((q, k, v), dict(attn_mask=torch.ones(5, 9, dtype=torch.complex64)), "attn_mask"),
    "dropout_p 1.0": ((q, k, v), dict(dropout_p=1.0), "dropout_p"),
    "dropout_p negative": ((q, k, v), dict(dropout_p=-0.1), "dropout_p"),
    "dropout_p NaN": ((q, k, v), dict(dropout_p=NAN), "dropout_p"),
    "dropout_p string": ((q, k, v), dict(dropout_p="0.1"), "dropout_p"),
    "dropout_p tensor": ((q, k, v), dict(dropout_p=torch.tensor([0.1, 0.2])), "dropout_p"),
    "scale bool": ((q, k, v), dict(scale=True), "scale"),
    "scale string": ((q, k, v), dict(scale="0.5"), "scale"),
    "scale tensor": ((q, k, v), dict(scale=torch.tensor(0.5)), "scale"),
    "scale complex": ((q, k, v), dict(scale=1j), "scale"),
    "out shape": ((q, k, v), dict(out=torch.empty(2, 4, 5, 7)), "out"),
    "out dtype": ((q, k, v), dict(out=torch.empty(2, 4, 5, 8, dtype=torch.float64)), "out"),
    "out int": ((q, k, v), dict(out=torch.empty(2, 4, 5, 8, dtype=torch.int32)), "out"),
    "out on meta": ((q, k, v), dict(out=torch.empty(2, 4, 5, 8, device="meta")), "out"),
    "out list": ((q, k, v), dict(out=[]), "out"),
    "out overlapping (expanded)": ((q, k, v), dict(out=torch.empty(8).expand(2, 4, 5, 8)), "out"),
    "out aliases query": ((q, k, v), dict(out=q), "out"),
    "out leaf requiring grad": ((q, k, v), dict(out=torch.zeros(2, 4, 5, 8, requires_grad=True)), "out"),
    "backend unknown": ((q, k, v), dict(backend="gpu"), "backend"),
    "backend None": ((q, k, v), dict(backend=None), "backend"),
    "backend cuda on CPU tensors": ((q, k, v), dict(backend="cuda"), ("cuda", "backend")),
    "head dim above the cpu limit": ((torch.randn(1, 1, 2, 300),) * 3, {}, ("head dim", "D=")),
}


def _wrong(args, kw):
    def fn():
        return attention_call(*args, **kw), None

    return fn


for _name, (_args, _kw, _names) in WRONG.items():
    case(
        f"cross_attention: {_name}", _names, defect="11" if "leaf" in _name else "17" if _name == "scale bool" else ""
    )(_wrong(_args, _kw))


@case("cross_attention: out aliases key storage", ("out",))
def _out_aliases_key():
    big = torch.randn(2, 4, 9, 8)
    return attention_call(q, big, big, out=big[:, :, :5]), None


# ---------------------------------------------------------------------------------------------
# info_nce / siglip_loss
# ---------------------------------------------------------------------------------------------
x, y = feats()
LOSS_WRONG = {
    "image_features 1-D": (lambda: mmfast.info_nce(x[0], y, 1.0), "image_features"),
    "text_features 3-D": (lambda: mmfast.info_nce(x, y[None], 1.0), "text_features"),
    "image_features int": (lambda: mmfast.info_nce(x.long(), y.long(), 1.0), "image_features"),
    "image_features bool": (lambda: mmfast.info_nce(x > 0, y > 0, 1.0), "image_features"),
    "image_features list": (lambda: mmfast.info_nce(x.tolist(), y, 1.0), "image_features"),
    "text_features float64": (lambda: mmfast.info_nce(x, y.double(), 1.0), "text_features"),
    "text_features on meta": (lambda: mmfast.info_nce(x, y.to("meta"), 1.0), "text_features"),
    "feature dims differ": (lambda: mmfast.info_nce(x, y[:, :7], 1.0), ("D=", "text_features")),
    "both with N != M": (lambda: mmfast.info_nce(x, y[:5], 1.0), ("direction", "N=")),
    "image with M < N, default labels": (
        lambda: mmfast.info_nce(x, y[:3], 1.0, direction="image"),
        ("M >= N", "labels"),
    ),
    "labels float": (lambda: mmfast.info_nce(x, y, 1.0, labels=torch.zeros(6)), "labels"),
    "labels bool": (lambda: mmfast.info_nce(x, y, 1.0, labels=torch.ones(6, dtype=torch.bool)), "labels"),
    "labels uint8": (lambda: mmfast.info_nce(x, y, 1.0, labels=torch.arange(6, dtype=torch.uint8)), "labels"),
    "labels int16": (lambda: mmfast.info_nce(x, y, 1.0, labels=torch.arange(6, dtype=torch.int16)), "labels"),
    "labels out of range": (lambda: mmfast.info_nce(x, y, 1.0, labels=torch.tensor([0, 1, 2, 3, 4, 6])), "labels"),
    "labels negative (image)": (
        lambda: mmfast.info_nce(x, y, 1.0, direction="image", labels=torch.tensor([0, 1, 2, 3, 4, -1])),
        "labels",
    ),
    "labels huge (text)": (
        lambda: mmfast.info_nce(x, y, 1.0, direction="text", labels=torch.tensor([0, 1, 2, 3, 4, 2**40])),
        "labels",
    ),
    "labels shape": (lambda: mmfast.info_nce(x, y, 1.0, labels=torch.arange(5)), "labels"),
    "labels 2-D": (lambda: mmfast.info_nce(x, y, 1.0, labels=torch.arange(6)[None]), "labels"),
    "labels not a permutation (both)": (
        lambda: mmfast.info_nce(x, y, 1.0, labels=torch.tensor([0, 0, 1, 2, 3, 4])),
        "labels",
    ),
    "labels list": (lambda: mmfast.info_nce(x, y, 1.0, labels=[0, 1, 2, 3, 4, 5]), "labels"),
    "labels on meta": (lambda: mmfast.info_nce(x, y, 1.0, labels=torch.arange(6, device="meta")), "labels"),
    "logit_scale bool": (lambda: mmfast.info_nce(x, y, True), "logit_scale"),
    "logit_scale string": (lambda: mmfast.info_nce(x, y, "1.0"), "logit_scale"),
    "logit_scale 2 values": (lambda: mmfast.info_nce(x, y, torch.ones(2)), "logit_scale"),
    "logit_scale int tensor": (lambda: mmfast.info_nce(x, y, torch.tensor(3)), "logit_scale"),
    "logit_scale bool tensor": (lambda: mmfast.info_nce(x, y, torch.tensor(True)), "logit_scale"),
    "logit_scale complex": (lambda: mmfast.info_nce(x, y, 1j), "logit_scale"),
    "logit_scale None": (lambda: mmfast.info_nce(x, y, None), "logit_scale"),
    "direction unknown": (lambda: mmfast.info_nce(x, y, 1.0, direction="rows"), "direction"),
    "reduction unknown": (lambda: mmfast.info_nce(x, y, 1.0, reduction="avg"), "reduction"),
    "reduction None": (lambda: mmfast.info_nce(x, y, 1.0, reduction=None), "reduction"),
    "backend unknown": (lambda: mmfast.info_nce(x, y, 1.0, backend="gpu"), "backend"),
    "backend cuda on CPU tensors": (lambda: mmfast.info_nce(x, y, 1.0, backend="cuda"), ("cuda", "backend")),
    "siglip N != M": (lambda: mmfast.siglip_loss(x, y[:5], 1.0, 0.0), ("N=", "as many")),
    "siglip logit_bias bool": (lambda: mmfast.siglip_loss(x, y, 1.0, False), "logit_bias"),
    "siglip logit_bias shape": (lambda: mmfast.siglip_loss(x, y, 1.0, torch.ones(3)), "logit_bias"),
    "siglip logit_bias string": (lambda: mmfast.siglip_loss(x, y, 1.0, "0"), "logit_bias"),
    "siglip logit_scale list": (lambda: mmfast.siglip_loss(x, y, [1.0], 0.0), "logit_scale"),
    "siglip reduction unknown": (lambda: mmfast.siglip_loss(x, y, 1.0, 0.0, reduction="mean "), "reduction"),
}
for _name, (_fn, _names) in LOSS_WRONG.items():
    case(f"contrastive: {_name}", _names)(lambda f=_fn: (f(), None))


def _attn64(q, k, v, scale=None, kpm=None):
    """Dense attention in float64 (no empty dims here), with the policy's fully masked rows."""
    Hq, Hkv = q.shape[1], k.shape[1]
    k, v = k.double().repeat_interleave(Hq // Hkv, 1), v.double().repeat_interleave(Hq // Hkv, 1)
    s = q.double() @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if kpm is not None:
        s = s.masked_fill(kpm[:, None, None, :], -math.inf)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def _big_head_dim_auto():
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Lq=3, Lk=5, D=300)
    return mmfast.cross_attention(q, k, v), _attn64(q, k, v)[0].float()


case("cross_attention[auto]: head dim 300 (reference takes it)", result_ok=True, defect="13")(_big_head_dim_auto)


def _info_nce64(x, y, s, direction="both", reduction="mean", labels=None):
    from mmfast import reference  # noqa: PLC0415

    return reference.info_nce(x.double(), y.double(), s, direction=direction, reduction=reduction, labels=labels)


def _strided_labels(backend):
    def fn():
        x, y = feats(N=6, M=9)
        lab = torch.tensor([3, 0, 8, 1, 5, 2, 7, 4, 6, 0, 1, 2])[::2]
        got = mmfast.info_nce(x, y, 10.0, labels=lab, direction="image", reduction="none", backend=backend)
        return got, _info_nce64(x, y, 10.0, direction="image", reduction="none", labels=lab.contiguous()).float()

    return fn


for _backend in CPU_BACKENDS:
    case(f"info_nce[{_backend}]: strided int64 labels", result_ok=True, defect="3")(_strided_labels(_backend))


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
MODULE_WRONG = {
    "CrossAttention embed_dim 0": (lambda: mmfast.nn.CrossAttention(0, 2), "embed_dim"),
    "CrossAttention heads do not divide": (lambda: mmfast.nn.CrossAttention(10, 3), ("embed_dim", "num_heads")),
    "CrossAttention num_kv_heads do not divide": (
        lambda: mmfast.nn.CrossAttention(12, 4, num_kv_heads=3),
        "num_kv_heads",
    ),
    "CrossAttention dropout 1.5": (lambda: mmfast.nn.CrossAttention(8, 2, dropout=1.5), "dropout"),
    "CrossAttention add_bias_kv": (lambda: mmfast.nn.CrossAttention(8, 2, add_bias_kv=True), "add_bias_kv"),
    "CrossAttention num_heads string": (lambda: mmfast.nn.CrossAttention(8, "2"), "num_heads"),
    "CrossAttention backend unknown": (
        lambda: mmfast.nn.CrossAttention(8, 2, batch_first=True, backend="gpu")(*[torch.randn(1, 3, 8)] * 3),
        "backend",
    ),
    "CrossAttention query 4-D": (
        lambda: mmfast.nn.CrossAttention(8, 2)(torch.randn(1, 2, 3, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)),
        "query",
    ),
    "CrossAttention key width": (
        lambda: mmfast.nn.CrossAttention(8, 2)(torch.randn(3, 1, 8), torch.randn(2, 1, 7), torch.randn(2, 1, 8)),
        "key",
    ),
    "CrossAttention batch mismatch": (
        lambda: mmfast.nn.CrossAttention(8, 2, batch_first=True)(
            torch.randn(2, 3, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8)
        ),
        "batch",
    ),
    "CrossAttention key_padding_mask shape": (
        lambda: mmfast.nn.CrossAttention(8, 2, batch_first=True)(
            *[torch.randn(2, 4, 8)] * 3, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool)
        ),
        "key_padding_mask",
    ),
    "CrossAttention attn_mask shape": (
        lambda: mmfast.nn.CrossAttention(8, 2, batch_first=True)(
            *[torch.randn(2, 4, 8)] * 3, attn_mask=torch.zeros(3, 4, dtype=torch.bool)
        ),
        "attn_mask",
    ),
    "CrossAttention query int": (
        lambda: mmfast.nn.CrossAttention(8, 2)(
            torch.ones(3, 1, 8, dtype=torch.long), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
        ),
        ("query", "dtype", "Long"),
    ),
    "AttentionFusion text 2-D": (
        lambda: mmfast.nn.AttentionFusion(8, 6, 2)(torch.randn(3, 8), torch.randn(1, 4, 6)),
        "text",
    ),
    "AttentionFusion image width": (
        lambda: mmfast.nn.AttentionFusion(8, 6, 2)(torch.randn(1, 3, 8), torch.randn(1, 4, 5)),
        "image",
    ),
    "AttentionFusion padding mask shape": (
        lambda: mmfast.nn.AttentionFusion(8, 6, 2)(
            torch.randn(1, 3, 8), torch.randn(1, 4, 6), torch.zeros(1, 5, dtype=torch.bool)
        ),
        ("key_padding_mask", "image_padding_mask"),
    ),
    "AttentionFusion heads do not divide": (lambda: mmfast.nn.AttentionFusion(10, 6, 3), ("text_dim", "num_heads")),
    "CoAttentionLayer widths differ": (
        lambda: mmfast.nn.CoAttentionLayer(8, 2)(torch.randn(1, 3, 8), torch.randn(1, 4, 6)),
        ("visual_feats", "width"),
    ),
    "CoAttentionLayer batch differs": (
        lambda: mmfast.nn.CoAttentionLayer(8, 2)(torch.randn(1, 3, 8), torch.randn(2, 4, 8)),
        ("visual_feats", "B"),
    ),
    "CoAttentionLayer heads do not divide": (lambda: mmfast.nn.CoAttentionLayer(10, 3), ("hidden_size", "num_heads")),
    "CoAttentionLayer padding mask shape": (
        lambda: mmfast.nn.CoAttentionLayer(8, 2).eval()(
            torch.randn(1, 3, 8), torch.randn(1, 4, 8), lang_padding_mask=torch.zeros(1, 5, dtype=torch.bool)
        ),
        ("lang_padding_mask", "key_padding_mask"),
    ),
    "ClipLoss world_size 0": (lambda: mmfast.nn.ClipLoss(world_size=0), "world_size"),
    "ClipLoss rank out of range": (lambda: mmfast.nn.ClipLoss(rank=2, world_size=2), "rank"),
    "ClipLoss horovod": (lambda: mmfast.nn.ClipLoss(use_horovod=True), "horovod"),
    "ClipLoss world_size 2 without torch.distributed": (
        lambda: mmfast.nn.ClipLoss(rank=0, world_size=2)(*feats(), 10.0),
        ("distributed", "world_size"),
    ),
    "ClipLoss features of different widths": (
        lambda: mmfast.nn.ClipLoss()(torch.randn(4, 8), torch.randn(4, 7), 10.0),
        ("D=", "text_features"),
    ),
    "SigLipLoss dist_impl unknown": (lambda: mmfast.nn.SigLipLoss(dist_impl="ring2"), "dist_impl"),
    "SigLipLoss world_size 2 without torch.distributed": (
        lambda: mmfast.nn.SigLipLoss(rank=0, world_size=2)(*feats(), 10.0, -10.0),
        ("distributed", "world_size"),
    ),
    "swap_modules on a tensor": (lambda: mmfast.swap_modules(torch.randn(3)), "model"),
    "swap_modules backend unknown": (
        lambda: mmfast.swap_modules(nn.Sequential(nn.MultiheadAttention(8, 2)), backend="gpu"),
        "backend",
    ),
    "swap_modules filter not callable": (
        lambda: mmfast.swap_modules(nn.Sequential(nn.MultiheadAttention(8, 2)), filter=3),
        "filter",
    ),
    "from_multihead_attention on a Linear": (
        lambda: mmfast.nn.CrossAttention.from_multihead_attention(nn.Linear(2, 2)),
        "mha",
    ),
}
for _name, (_fn, _names) in MODULE_WRONG.items():
    case(f"nn: {_name}", _names)(lambda f=_fn: (f(), None))


def _mha_pair(dtype=torch.float32):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True, dtype=dtype).eval()
    return mha, mmfast.nn.CrossAttention.from_multihead_attention(mha, backend="cpu").eval()


def _kpm_as(dtype: torch.dtype):
    """CrossAttention with the key padding mask as ``dtype`` against the same mask as bool."""
    mha, ca = _mha_pair()
    x, kv = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 2:] = True
    with torch.no_grad():
        return ca(x, kv, kv, key_padding_mask=pad.to(dtype))[0], ca(x, kv, kv, key_padding_mask=pad)[0]


@case(
    "nn: CrossAttention uint8 key_padding_mask (as bool, or rejected)",
    ("key_padding_mask",),
    result_ok=True,
    defect="8",
)
def _uint8_kpm():
    return _kpm_as(torch.uint8)


@case(
    "nn: CrossAttention int64 key_padding_mask (as bool, or rejected)",
    ("key_padding_mask",),
    result_ok=True,
    defect="8",
)
def _int_kpm():
    return _kpm_as(torch.int64)


@case("nn: CrossAttention empty query sequence", result_ok=True, defect="1")
def _module_empty_query():
    mha, ca = _mha_pair()
    x, kv = torch.randn(2, 0, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        return ca(x, kv, kv)[0], mha(x, kv, kv, need_weights=False)[0]


@case("nn: AttentionFusion empty text", result_ok=True, defect="1")
def _fusion_empty():
    fusion = mmfast.nn.AttentionFusion(8, 6, 2, backend="cpu")
    return fusion(torch.randn(2, 0, 8), torch.randn(2, 4, 6)), torch.zeros(2, 0, 16)


@case(
    "nn: ClipLoss bf16 image with fp32 text features",
    ("dtype", "text_features"),
    result_ok=True,
    defect="16",
    atol=2e-2,
    rtol=2e-2,
)
def _clip_mixed():
    x, y = feats()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mmfast.nn.ClipLoss()(x.bfloat16(), y, 10.0)
    return got, _info_nce64(x.bfloat16().float(), y, 10.0).float()


@case("nn: swap_modules on an nn.ModuleList sharing one module", result_ok=True, defect="9")
def _swap_shared():
    mha = nn.MultiheadAttention(8, 2)
    model = nn.ModuleList([mha, mha, mha])
    mmfast.swap_modules(model)
    kinds = [type(m).__name__ for m in model]
    return (kinds, model[0] is model[1] is model[2]), (["CrossAttention"] * 3, True)
