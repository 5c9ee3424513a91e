"""The ground the kernels stand on: build info, backend report, dispatch rules, the references."""

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast import _dispatch
from mmfast import reference as ref
from mmfast.reference.dropout import keep_mask

OPS = ("cross_attention", "info_nce", "siglip_loss")


def test_build_info_reports_cuda_and_archs():
    info = mmfast.build_info()
    assert info["version"] == mmfast.__version__
    assert isinstance(info["with_cuda"], bool)
    if info["with_cuda"]:
        assert "8.0" in info["cuda_archs"] or "9.0" in info["cuda_archs"] or info["cuda_archs"]


def test_backends_report_every_op_and_backend():
    report = mmfast.backends()
    for op in OPS:
        assert set(report[op]) == set(_dispatch.BACKENDS)
        for row in report[op].values():
            assert row["available"] == (row["reason"] is None)
        assert report[op]["reference"]["available"]
    if not torch.cuda.is_available():
        assert not report["cross_attention"]["cuda"]["available"]
        assert report["cross_attention"]["cuda"]["reason"]


def test_explicit_backend_that_cannot_take_inputs_raises_with_reason():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="cuda backend takes CUDA tensors|no GPU|without CUDA|not implemented"):
        mmfast.info_nce(x, x.clone(), 2.0, backend="cuda")
    with pytest.raises(ValueError, match="backend="):
        mmfast.info_nce(x, x.clone(), 2.0, backend="fastest")


def test_auto_lists_every_backend_when_none_fits():
    probe = _dispatch.Op(
        "_probe",
        {
            "reference": _dispatch.Backend("reference", print, lambda **kw: ["never fits"]),
            "cpu": _dispatch.Backend("cpu", print, lambda **kw: ["too large"]),
        },
    )
    with pytest.raises(RuntimeError) as e:
        _dispatch.select(probe, "auto", torch.device("cpu"), {})
    msg = str(e.value)
    assert "reference: never fits" in msg and "cpu:" in msg


def test_backend_tables_are_explicit_and_triton_loads_lazily():
    """Every op lists its four backends; importing mmfast imports no triton module (the triton
    entries are "module:function" strings, imported when first selected)."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from mmfast.ops import OPS  # noqa: PLC0415

    assert {op.name for op in OPS} == set(mmfast.backends())
    for op in OPS:
        assert set(op.backends) == set(_dispatch.BACKENDS), op.name
        assert isinstance(op.backends["triton"].fn, str), op.name
    if torch.cuda.is_available():
        return  # with a GPU the triton entry points are preloaded (compiled code must not import)
    code = "import sys, mmfast; print(sorted(m for m in sys.modules if m.startswith('mmfast.triton') or m == 'triton'))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]"


def test_env_sets_default_backend(monkeypatch):
    from mmfast.ops import contrastive  # noqa: PLC0415

    x = torch.randn(5, 8)
    monkeypatch.setenv("MMFAST_BACKEND", "reference")
    assert _dispatch.select(contrastive.INFO_NCE, "auto", x.device, {}).name == "reference"
    monkeypatch.setenv("MMFAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MMFAST_BACKEND"):
        mmfast.info_nce(x, x.clone(), 1.0)


# ---- references -----------------------------------------------------------------------------


def _attn_case(B=2, Hq=4, Hkv=2, Lq=5, Lk=7, D=3, Dv=4):
    q = torch.randn(B, Hq, Lq, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Lk, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Lk, Dv, dtype=torch.float64, requires_grad=True)
    kpm = torch.rand(B, Lk) < 0.3
    kpm[-1] = True  # an all-masked batch item
    return q, k, v, kpm


def test_reference_attention_gradcheck_with_masks_and_empty_rows():
    q, k, v, kpm = _attn_case()
    bias = torch.randn(1, 4, 5, 7, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, bias):
        return ref.cross_attention(q, k, v, key_padding_mask=kpm, attn_mask=bias, is_causal=True)

    assert torch.autograd.gradcheck(f, (q, k, v, bias))
    out, lse = ref.cross_attention(q, k, v, key_padding_mask=kpm, return_lse=True)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    assert torch.isneginf(lse[-1]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[-1], torch.zeros_like(q.grad[-1]))


@pytest.mark.parametrize("Lq,Lk", [(5, 7), (7, 5)])
def test_reference_attention_matches_sdpa(Lq, Lk):
    q, k, v, kpm = _attn_case(Hkv=4, Lq=Lq, Lk=Lk, Dv=3)
    kpm[-1, 0] = False  # keep every row non-empty so SDPA is defined
    allowed = ~kpm.view(2, 1, 1, Lk)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(ref.cross_attention(q, k, v, key_padding_mask=kpm), expected)
    # Causal, bottom-right aligned, as an explicit bool mask.
    i, j = torch.arange(Lq).view(-1, 1), torch.arange(Lk).view(1, -1)
    causal = (j <= i + (Lk - Lq)) | torch.zeros(Lq, Lk, dtype=torch.bool)
    rows_ok = causal.any(-1)
    got = ref.cross_attention(q, k, v, is_causal=True)[:, :, rows_ok]
    exp = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)[:, :, rows_ok]
    torch.testing.assert_close(got, exp)


def test_reference_dropout_mask_is_the_hash_and_scales_survivors():
    q, k, v, _ = _attn_case(Hkv=4)
    seed, p = 1234567, 0.25
    keep = keep_mask(seed, 2, 4, 5, 7, p)
    out = ref.cross_attention(q, k, v, dropout_p=p, dropout_mask=keep)
    probs, _ = ref.attention_probs(q, k)
    torch.testing.assert_close(out, (probs * keep / (1 - p)) @ v)
    big = keep_mask(99, 4, 8, 64, 512, p)
    assert abs(big.float().mean().item() - (1 - p)) < 0.01
    assert torch.equal(big, keep_mask(99, 4, 8, 64, 512, p)) and not torch.equal(big, keep_mask(98, 4, 8, 64, 512, p))


def test_reference_info_nce_matches_cross_entropy_and_gradcheck():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    logits = s * x @ y.t()
    t = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.t(), t))
    torch.testing.assert_close(ref.info_nce(x, y, s), expected)
    perm = torch.randperm(6)
    inv = torch.argsort(perm)
    expected = 0.5 * (F.cross_entropy(logits, perm) + F.cross_entropy(logits.t(), inv))
    torch.testing.assert_close(ref.info_nce(x, y, s, labels=perm), expected)
    assert torch.autograd.gradcheck(lambda x, y, s: ref.info_nce(x, y, s, reduction="none"), (x, y, s))


def test_reference_siglip_matches_formula_and_gradcheck():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    z = 2 * torch.eye(5, dtype=torch.float64) - 1
    expected = -torch.log(torch.sigmoid(z * (s * x @ y.t() + b))).sum() / 5
    torch.testing.assert_close(ref.siglip_loss(x, y, s, b), expected)
    assert torch.autograd.gradcheck(ref.siglip_loss, (x, y, s, b))
