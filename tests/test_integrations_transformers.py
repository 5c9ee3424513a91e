"""mmfast in transformers models: tiny random CLIP, SigLIP, BERT with cross-attention and LXMERT.

Each test builds a model from a config (no downloads), patches a deep copy, and checks outputs and
every gradient against the unpatched model (eager attention), padded batches included; a spy on
the op proves the mmfast path ran and shows how masks and causality were routed.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmfast.integrations.transformers as mt  # noqa: E402
import mmfast.nn.co_attention as co_mod  # noqa: E402
from tests.nn_utils import assert_grads_close, train_together  # noqa: E402

TOL = dict(atol=3e-5, rtol=3e-5)
SMALL = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)


@pytest.fixture
def op_calls(monkeypatch):
    """Records (is_causal, key_padding_mask given, attn_mask given) of every op call from the integration."""
    calls = []
    real = mt.cross_attention

    def spy(q, k, v, **kw):
        calls.append(
            (kw.get("is_causal", False), kw.get("key_padding_mask") is not None, kw.get("attn_mask") is not None)
        )
        return real(q, k, v, **kw)

    monkeypatch.setattr(mt, "cross_attention", spy)
    monkeypatch.setattr(co_mod, "cross_attention", spy)  # CoAttentionLayer, used for LXMERT's x-layers
    return calls


def _padded_ids(B=3, L=9, vocab=99):
    ids = torch.randint(3, vocab, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[:, -1] = 2  # the CLIP text tower pools at the highest id (legacy eos_token_id=2 path)
    return ids, mask


def _compare(ref, new, run, out_names):
    a, b = run(ref), run(new)
    total_a, total_b = 0.0, 0.0
    for name in out_names:
        x, y = a[name], b[name]
        torch.testing.assert_close(y, x, **TOL, msg=lambda m, n=name: f"{n}: {m}")
        w = torch.randn_like(x)
        total_a, total_b = total_a + (x * w).sum(), total_b + (y * w).sum()
    total_a.backward()
    total_b.backward()
    assert_grads_close(ref, new, atol=3e-5, rtol=3e-4)


# ------------------------------------------------------------------------------------------------


def _clip_like(kind):
    torch.manual_seed(0)
    text = dict(vocab_size=99, max_position_embeddings=16, bos_token_id=0, pad_token_id=1, eos_token_id=2, **SMALL)
    vision = dict(image_size=16, patch_size=4, **SMALL)
    if kind == "clip":
        cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
        return transformers.CLIPModel._from_config(cfg, attn_implementation="eager")
    cfg = transformers.SiglipConfig(text_config=text, vision_config=vision)
    return transformers.SiglipModel._from_config(cfg, attn_implementation="eager")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_and_siglip_match(kind, op_calls, monkeypatch):
    ref = _clip_like(kind).train()
    model = mt.apply_mmfast_to_clip(copy.deepcopy(ref))
    assert model.text_model.config._attn_implementation == "mmfast"
    fused, real_info_nce, real_siglip = [], mt.info_nce, mt.siglip_loss
    monkeypatch.setattr(mt, "info_nce", lambda *a, **k: fused.append("info_nce") or real_info_nce(*a, **k))
    monkeypatch.setattr(mt, "siglip_loss", lambda *a, **k: fused.append("siglip") or real_siglip(*a, **k))
    ids, mask = _padded_ids()
    pixels = torch.randn(3, 3, 16, 16)

    def run(m):
        out = m(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True)
        return {
            "loss": out.loss,
            "logits": out.logits_per_image,
            "text": out.text_model_output.last_hidden_state,
            "image": out.vision_model_output.last_hidden_state,
        }

    _compare(ref, model, run, ["loss", "logits", "text", "image"])
    assert fused == ["info_nce" if kind == "clip" else "siglip"]
    # vision: 2 layers without masks; text: 2 layers with the padding mask (CLIP: causal + padding)
    assert len(op_calls) == 4 and sum(1 for c in op_calls if c[1] or c[2]) == 2
    tup = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True, return_dict=False)
    torch.testing.assert_close(tup[0], run(ref)["loss"], **TOL)


def test_clip_causal_routing_without_padding(op_calls):
    """No padding: CLIP's causal text self-attention goes to the op's is_causal, with no mask."""
    ref = _clip_like("clip").eval()
    model = mt.apply_mmfast_to_clip(copy.deepcopy(ref))
    ids = _padded_ids()[0]
    a = ref.get_text_features(input_ids=ids).pooler_output
    b = model.get_text_features(input_ids=ids).pooler_output
    torch.testing.assert_close(b, a, **TOL)
    assert op_calls == [(True, False, False)] * 2


def test_clip_trains_like_unpatched():
    ref = _clip_like("clip").train()
    model = mt.apply_mmfast_to_clip(copy.deepcopy(ref))
    ids, mask = _padded_ids()
    pixels = torch.randn(3, 3, 16, 16)
    train_together(
        ref, model, lambda m: m(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss
    )


# ------------------------------------------------------------------------------------------------


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, is_decoder=True, add_cross_attention=True, **SMALL)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    return transformers.BertLMHeadModel._from_config(cfg, attn_implementation="eager").train()


def test_bert_cross_attention_matches(op_calls):
    ref = _bert()
    model = copy.deepcopy(ref)
    mt.register()
    model.set_attn_implementation("mmfast")
    ids, mask = _padded_ids()
    enc = torch.randn(3, 11, 32)
    enc_mask = torch.ones(3, 11, dtype=torch.long)
    enc_mask[0, 5:] = 0
    encs = {}

    def run(m):
        e = enc.clone().requires_grad_()
        encs[id(m)] = e
        out = m(input_ids=ids, attention_mask=mask, encoder_hidden_states=e, encoder_attention_mask=enc_mask)
        return {"logits": out.logits}

    _compare(ref, model, run, ["logits"])
    torch.testing.assert_close(encs[id(model)].grad, encs[id(ref)].grad, **TOL)
    # 2 layers x (causal self-attention with padding: explicit mask; cross-attention with padded
    # encoder: the padding-only mask goes to the op as key_padding_mask)
    assert op_calls == [(False, False, True), (False, True, False)] * 2
    op_calls.clear()
    model(input_ids=ids, encoder_hidden_states=enc)
    assert op_calls == [(True, False, False), (False, False, False)] * 2  # no padding: op's is_causal


def test_bert_output_attentions(op_calls, monkeypatch):
    maps_calls = []
    real = mt.attention_through_maps
    monkeypatch.setattr(mt, "attention_through_maps", lambda *a, **k: maps_calls.append(1) or real(*a, **k))
    ref = _bert().eval()
    model = copy.deepcopy(ref)
    mt.register()
    model.set_attn_implementation("mmfast")
    ids, mask = _padded_ids()
    enc = torch.randn(3, 11, 32)
    enc_mask = torch.ones(3, 11, dtype=torch.long)
    enc_mask[2, 4:] = 0
    kw = dict(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    a, b = ref(**kw, output_attentions=True), model(**kw, output_attentions=True)
    # the maps' slow path, through mmfast's attention function, instead of the op
    assert len(maps_calls) == 4 and not op_calls and len(b.attentions) == 2 and len(b.cross_attentions) == 2
    torch.testing.assert_close(b.logits, a.logits, **TOL)
    for x, y in zip(a.attentions + a.cross_attentions, b.attentions + b.cross_attentions):
        torch.testing.assert_close(y, x, **TOL)


def test_bert_trains_like_unpatched():
    ref = _bert()
    model = copy.deepcopy(ref)
    mt.register()
    model.set_attn_implementation("mmfast")
    ids, mask = _padded_ids()
    enc = torch.randn(3, 11, 32)
    train_together(
        ref, model, lambda m: m(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc, labels=ids).loss
    )


# ------------------------------------------------------------------------------------------------


def _lxmert(Lv=7):
    torch.manual_seed(0)
    cfg = transformers.LxmertConfig(
        vocab_size=99,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=37,
        l_layers=2,
        x_layers=2,
        r_layers=1,
        visual_feat_dim=12,
        visual_pos_dim=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.LxmertModel(cfg).train()


def _lxmert_inputs(Lv=7):
    ids, mask = _padded_ids()
    vis_mask = torch.ones(3, Lv)
    vis_mask[1, 4:] = 0
    return dict(
        input_ids=ids,
        attention_mask=mask,
        visual_feats=torch.randn(3, Lv, 12),
        visual_pos=torch.rand(3, Lv, 4),
        visual_attention_mask=vis_mask,
    )


@pytest.mark.parametrize("Lv", [7, 9])
def test_lxmert_matches(Lv, op_calls):
    ref = _lxmert()
    model = mt.apply_mmfast_to_lxmert(copy.deepcopy(ref))
    inputs = _lxmert_inputs(Lv)

    def run(m):
        out = m(**inputs)
        return {"lang": out.language_output, "vision": out.vision_output, "pooled": out.pooled_output}

    _compare(ref, model, run, ["lang", "vision", "pooled"])
    # 2 language + 1 relational self-attentions, then per x-layer: 1 stacked cross call + 2 self
    expected_calls = 3 + 2 * (3 if Lv == 9 else 4)  # Ll=9, Lv=7 pads 81/63 > 1.25 -> two cross calls
    assert len(op_calls) == expected_calls
    with torch.no_grad():
        a = ref(**inputs, output_attentions=True)
        b = model(**inputs, output_attentions=True)
    for x, y in zip(
        a.cross_encoder_attentions + a.language_attentions, b.cross_encoder_attentions + b.language_attentions
    ):
        torch.testing.assert_close(y, x, **TOL)


def _maps_and_grads(model, run, pick):
    """Run ``model``, retain the gradients of the tensors ``pick(out)`` returns (attention maps,
    hidden states), back-propagate a random weighting of the outputs; the retained gradients."""
    out = run(model)
    tensors = pick(out)
    for t in tensors:
        t.retain_grad()
    torch.manual_seed(1)
    outputs = [
        o for o in (getattr(out, n, None) for n in ("language_output", "vision_output", "logits")) if o is not None
    ]
    sum((o * torch.randn_like(o)).sum() for o in outputs).backward()
    return tensors, [t.grad for t in tensors]


def test_lxmert_attention_maps_carry_gradients():
    """transformers' test_retain_grad_hidden_states_attentions, stronger: every returned map (language,
    vision, cross) gets a gradient, equal to the unpatched model's."""
    ref = _lxmert()
    model = mt.apply_mmfast_to_lxmert(copy.deepcopy(ref))
    inputs = _lxmert_inputs()

    def run(m):
        return m(**inputs, output_attentions=True, output_hidden_states=True)

    def pick(out):
        maps = [*out.language_attentions, *out.vision_attentions, *out.cross_encoder_attentions]
        return [out.language_hidden_states[0], out.vision_hidden_states[0], *maps]

    want_t, want = _maps_and_grads(ref, run, pick)
    got_t, got = _maps_and_grads(model, run, pick)
    assert len(got) == 2 + 2 + 1 + 2
    for name, a, b, ta, tb in zip(range(len(got)), want, got, want_t, got_t):
        torch.testing.assert_close(tb, ta, **TOL, msg=lambda m, n=name: f"tensor {n}: {m}")
        assert b is not None, f"tensor {name} got no gradient"
        assert b.abs().sum() > 0
        torch.testing.assert_close(b, a, **TOL, msg=lambda m, n=name: f"gradient of tensor {n}: {m}")


def test_interface_attention_maps_carry_gradients():
    """The same through attn_implementation="mmfast" (BERT self- and cross-attention maps)."""
    ref = _bert()
    model = copy.deepcopy(ref)
    mt.register()
    model.set_attn_implementation("mmfast")
    ids, mask = _padded_ids()
    enc = torch.randn(3, 11, 32)
    enc_mask = torch.ones(3, 11, dtype=torch.long)
    enc_mask[2, 4:] = 0

    def run(m):
        return m(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=enc,
            encoder_attention_mask=enc_mask,
            output_attentions=True,
            output_hidden_states=True,
        )

    def pick(out):
        return [out.hidden_states[0], *out.attentions, *out.cross_attentions]

    _, want = _maps_and_grads(ref, run, pick)
    _, got = _maps_and_grads(model, run, pick)
    assert len(got) == 5
    for a, b in zip(want, got):
        assert b is not None and b.abs().sum() > 0
        torch.testing.assert_close(b, a, **TOL)


def test_lxmert_trains_like_unpatched():
    ref = _lxmert()
    model = mt.apply_mmfast_to_lxmert(copy.deepcopy(ref))
    inputs = _lxmert_inputs()
    train_together(ref, model, lambda m: m(**inputs).pooled_output.square().mean())


def test_lxmert_rejects_other_models():
    with pytest.raises(ValueError, match="no LXMERT attention"):
        mt.apply_mmfast_to_lxmert(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["padding_row", "dense_bool", "float", "causal", "decode", "static_prefill", "gqa"])
def test_attention_function_matches_sdpa(case):
    """mmfast_attention_forward against transformers' own SDPA function on the same arguments."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415

    B, H, Lq, Lk, D = 2, 4, 6, 6, 8
    Hkv = 2 if case == "gqa" else H
    Lq = 1 if case == "decode" else Lq
    Lk = 10 if case in ("decode", "static_prefill") else Lk
    module = torch.nn.Module()
    module.is_causal = case in ("causal", "decode", "static_prefill", "gqa")
    module.num_key_value_groups = H // Hkv
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D)
    mask = None
    if case == "padding_row":
        keep = torch.ones(B, Lk, dtype=torch.bool)
        keep[1, 4:] = False
        mask = keep[:, None, None, :].expand(B, 1, Lq, Lk)
    elif case == "dense_bool":
        mask = torch.rand(B, 1, Lq, Lk) < 0.7
        mask[..., 0] = True
    elif case == "float":
        mask = torch.randn(B, 1, Lq, Lk)
    a, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    b, weights = mt.mmfast_attention_forward(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(b, a, **TOL)
    assert weights is None
    # With the maps asked for: the same output and query gradient, computed from the maps it returns.
    w = torch.randn_like(a)
    qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
    (sdpa_attention_forward(module, qa, k, v, mask, scaling=0.3)[0] * w).sum().backward()
    b, maps = mt.mmfast_attention_forward(module, qb, k, v, mask, scaling=0.3, output_attentions=True)
    torch.testing.assert_close(b, a, **TOL)
    assert maps.shape == (B, H, Lq, Lq if case == "static_prefill" else Lk)
    maps.retain_grad()
    (b * w).sum().backward()
    torch.testing.assert_close(qb.grad, qa.grad, **TOL)
    assert maps.grad is not None and maps.grad.abs().sum() > 0


def test_registered_in_both_interfaces():
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import AttentionMaskInterface  # noqa: PLC0415

    mt.register()
    assert AttentionInterface._global_mapping["mmfast"] is mt.mmfast_attention_forward
    assert AttentionMaskInterface._global_mapping["mmfast"] is mt.mmfast_mask


def test_old_transformers_version_is_named(monkeypatch):
    # transformers swaps its lazy module object in sys.modules once models are built: patch the live one
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.40.0")
    with pytest.raises(ImportError, match=r"transformers>=5\.0\.0, found 4\.40\.0"):
        mt.register()
    with pytest.raises(ImportError, match=r"transformers>=5\.0\.0"):
        mt.apply_mmfast_to_lxmert(torch.nn.Linear(2, 2))


def test_unsupported_features_raise():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match="softcap"):
        mt.mmfast_attention_forward(torch.nn.Module(), q, q, q, None, softcap=30.0)
