"""swap_modules leaves an nn.MultiheadAttention whose parameters have mixed dtypes (PyTorch runs it;
CrossAttention computes in one dtype), and still swaps one whose parameters share a dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmfast
from mmfast.nn import CrossAttention


def _mixed(kind: str) -> nn.MultiheadAttention:
    if kind == "qkv_separate":  # kdim != embed_dim: q/k/v_proj_weight instead of in_proj_weight
        mha = nn.MultiheadAttention(16, 4, kdim=8, vdim=8, batch_first=True).double()
        mha.k_proj_weight.data = mha.k_proj_weight.data.float()
        return mha
    mha = nn.MultiheadAttention(16, 4, batch_first=True).double()
    param, dtype = {
        "half_in_bias": ("in_proj_bias", torch.half),
        "float_in_weight": ("in_proj_weight", torch.float32),
        "bf16_out_bias": ("out_proj.bias", torch.bfloat16),
    }[kind]
    owner, name = (mha.out_proj, "bias") if param.startswith("out_proj.") else (mha, param)
    getattr(owner, name).data = getattr(owner, name).data.to(dtype)
    return mha


@pytest.mark.parametrize("kind", ["half_in_bias", "float_in_weight", "bf16_out_bias", "qkv_separate"])
def test_mixed_dtype_parameters_are_left_with_the_reason(kind):
    mha = _mixed(kind)
    model = nn.ModuleDict({"attn": mha, "uniform": nn.MultiheadAttention(16, 4, batch_first=True).double()})
    report = mmfast.swap_modules(model)
    assert model["attn"] is mha and "attn" in report.left
    assert "mixed dtypes" in report.left["attn"] and "float64" in report.left["attn"]
    assert list(report.swapped) == ["uniform"] and isinstance(model["uniform"], CrossAttention)


def test_uniform_dtype_module_is_swapped_and_equal():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).double()
    x = torch.randn(2, 5, 16, dtype=torch.double)
    want = mha(x, x, x, need_weights=False)[0]
    model = nn.Sequential(mha)
    assert list(mmfast.swap_modules(model).swapped) == ["0"]
    torch.testing.assert_close(model[0](x, x, x)[0], want)
