"""mmfast.swap_modules on torch models built from nn.MultiheadAttention."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mmfast
from mmfast.nn import CrossAttention
from tests.nn_utils import assert_grads_close, train_together


class _Fusion(nn.Module):
    """A small model with self-attention (TransformerEncoderLayer), a cross-attention MHA, a
    shared MHA used twice and an unsupported one."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.cross = nn.MultiheadAttention(32, 4, kdim=12, vdim=12, batch_first=False)
        self.shared = nn.MultiheadAttention(32, 2, batch_first=True)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Identity()), nn.ModuleDict({"again": self.shared})])
        self.odd = nn.MultiheadAttention(32, 4, add_bias_kv=True, batch_first=True)

    def forward(self, text, image, text_pad, image_pad):
        x = self.enc(text, src_key_padding_mask=text_pad)
        c, _ = self.cross(x.transpose(0, 1), image.transpose(0, 1), image.transpose(0, 1), key_padding_mask=image_pad)
        x = x + c.transpose(0, 1)
        x = x + self.shared(x, x, x, key_padding_mask=text_pad, need_weights=False)[0]
        x = x + self.blocks[1]["again"](x, x, x, need_weights=False)[0]
        return x + self.odd(x, x, x, need_weights=False)[0]


def _data(B=3, Lt=9, Lv=13):
    text, image = torch.randn(B, Lt, 32), torch.randn(B, Lv, 12)
    text_pad = torch.zeros(B, Lt, dtype=torch.bool)
    text_pad[1, 6:] = True
    image_pad = torch.zeros(B, Lv, dtype=torch.bool)
    image_pad[0, 7:] = True
    return text, image, text_pad, image_pad


def test_swap_report_and_equivalence():
    ref = _Fusion()
    model = copy.deepcopy(ref)
    params_before = {n: id(p) for n, p in model.named_parameters()}
    report = mmfast.swap_modules(model)

    assert set(report.swapped) == {"enc.self_attn", "cross", "shared", "blocks.1.again"}
    assert report.left == {"odd": "add_bias_kv=True is not supported"}
    assert "enc.self_attn" in report.notes and "fast path" in report.notes["enc.self_attn"]
    assert isinstance(model.cross, CrossAttention) and isinstance(model.odd, nn.MultiheadAttention)
    assert model.shared is model.blocks[1]["again"]
    assert {n: id(p) for n, p in model.named_parameters()} == params_before  # same Parameter objects
    assert "swapped 4, left 1" in str(report)

    data = _data()
    out_ref, out = ref(*data), model(*data)
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=2e-5)
    w = torch.randn_like(out)
    (out_ref * w).sum().backward()
    (out * w).sum().backward()
    assert_grads_close(ref, model, atol=2e-5)


def test_training_tracks_unswapped_model():
    ref = _Fusion()
    model = copy.deepcopy(ref)
    mmfast.swap_modules(model)
    data = _data()
    target = torch.randn(3, 9, 32)
    train_together(ref, model, lambda m: (m(*data) - target).square().mean(), steps=3)


def test_keeps_dtype_device_mode_and_optimizer():
    mha = nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True).double().eval()
    model = nn.Sequential(mha)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = mmfast.swap_modules(model, backend="reference")
    new = model[0]
    assert list(report.swapped) == ["0"]
    assert isinstance(new, CrossAttention) and new.backend == "reference"
    assert not new.training and new.in_proj_weight.dtype == torch.float64 and new.dropout == 0.1
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    before = new.in_proj_weight.detach().clone()
    new(x, x, x)[0].sum().backward()
    opt.step()  # the optimizer built before the swap updates the swapped module's weights
    assert not torch.equal(new.in_proj_weight, before)


def test_left_with_reasons():
    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    hooked = nn.MultiheadAttention(8, 2)
    hooked.register_forward_hook(lambda *a: None)
    model = nn.ModuleDict(
        {"custom": Custom(8, 2), "hooked": hooked, "zero": nn.MultiheadAttention(8, 2, add_zero_attn=True)}
    )
    model["kept"] = nn.MultiheadAttention(8, 2)
    report = mmfast.swap_modules(model, filter=lambda name, m: name != "kept")
    assert not report.swapped
    assert "overrides" in report.left["custom"] and "hooks" in report.left["hooked"]
    assert "add_zero_attn" in report.left["zero"] and report.left["kept"] == "rejected by filter"
    root = mmfast.swap_modules(nn.MultiheadAttention(8, 2))
    assert "root module" in root.left[""]


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_decoder_with_causal_mask(norm_first):
    """nn.TransformerDecoder (causal self-attention + cross-attention), train mode, with padding."""
    ref = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, 0.0, batch_first=True, norm_first=norm_first), 2)
    model = copy.deepcopy(ref)
    assert len(mmfast.swap_modules(model).swapped) == 4
    tgt, mem = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    mem_pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    kw = dict(tgt_mask=mask, tgt_is_causal=True, memory_key_padding_mask=mem_pad)
    out_ref, out = ref(tgt, mem, **kw), model(tgt, mem, **kw)
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=2e-5)
    out_ref.sum().backward()
    out.sum().backward()
    assert_grads_close(ref, model, atol=2e-5)


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "dense"])
@pytest.mark.parametrize("masks", ["none", "padding", "padding+src_mask"])
def test_encoder_inference_fast_path_after_swap(nested, masks):
    """PyTorch's fused inference path of nn.TransformerEncoder(Layer) (eval, no grad) calls
    self_attn.merge_masks and reads the weights itself: the swapped model must give the same output
    as before the swap there, and with grad enabled (where mmfast's kernel runs)."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=nested
    ).eval()
    x = torch.randn(3, 7, 32)
    kw = {}
    if masks != "none":
        pad = torch.zeros(3, 7, dtype=torch.bool)
        pad[1, 4:] = True
        kw["src_key_padding_mask"] = pad
    if masks == "padding+src_mask":
        kw["mask"] = nn.Transformer.generate_square_subsequent_mask(7)
    with torch.no_grad():
        want_fast = enc(x, **kw)
    want = enc(x, **kw)
    report = mmfast.swap_modules(enc)
    assert len(report.swapped) == 2
    with torch.no_grad():
        torch.testing.assert_close(enc(x, **kw), want_fast)
    torch.testing.assert_close(enc(x, **kw), want, atol=1e-5, rtol=1e-5)


def test_shared_module_swapped_in_every_slot():
    """One module held several times (by one parent, and by two parents): every slot swapped, and all
    slots still hold one shared module (named_children() de-duplicates; the swap must not)."""
    a, b = nn.MultiheadAttention(16, 4, batch_first=True), nn.MultiheadAttention(16, 2, batch_first=True)
    model = nn.Sequential(nn.ModuleList([a, a, a]), nn.ModuleDict({"x": a, "y": b}), nn.ModuleList([b, a]))
    report = mmfast.swap_modules(model)
    slots = [*model[0], model[1]["x"], model[2][1]]
    assert all(isinstance(s, CrossAttention) for s in slots) and all(s is slots[0] for s in slots)
    assert isinstance(model[1]["y"], CrossAttention) and model[1]["y"] is model[2][0]
    assert len(report.swapped) == 7 and not report.left
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in (*a.parameters(), *b.parameters()))
