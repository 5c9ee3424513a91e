"""mmfast.train's model builders: the tiny default, hf:PATH and open_clip:ARCH[:CHECKPOINT] loaded
back from models saved to a temporary folder (same embeddings as the saved model), rebuilt from a
checkpoint spec, and clear errors for missing paths. Nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmfast.train.models import build_model, model_from_spec, tiny_clip_config

CTX = 16


def inputs(n=3, size=32, vocab=40, ctx=CTX):
    pixels = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    ids = torch.randint(4, vocab, (n, ctx))
    mask = torch.ones(n, ctx, dtype=torch.long)
    mask[0, 9:] = 0
    ids[0, 8], ids[1:, -1] = 3, 3  # <eos> ends each caption
    return pixels, ids, mask


def embed(model, pixels, ids, mask):
    model.eval()
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(ids, mask)


def test_tiny_default_uses_mmfast_attention():
    model = build_model("tiny", vocab_size=40, context_length=CTX, image_size=32)
    assert model.image_tower.backbone.config._attn_implementation == "mmfast"
    assert model.text_tower.backbone.config._attn_implementation == "mmfast"
    x = inputs()
    img, txt = embed(model, *x)
    assert img.shape == txt.shape == (3, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    assert float(model.scale().detach()) == pytest.approx(1 / 0.07, rel=1e-4) and model.logit_bias is None
    same = build_model("tiny", vocab_size=40, context_length=CTX, image_size=32, attn="sdpa")
    same.load_state_dict(model.state_dict())
    for a, b in zip((img, txt), embed(same, *x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # mmfast attention == SDPA


def test_hf_pretrained_folder_round_trip(tmp_path):
    import transformers  # noqa: PLC0415

    config = tiny_clip_config(40, CTX, image_size=32, width=32, layers=1)
    ref = transformers.CLIPModel(config).eval()
    ref.save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3})
    )
    model = build_model(f"hf:{tmp_path / 'clip'}", vocab_size=0, context_length=0)
    pixels, ids, mask = inputs()
    img, txt = embed(model, pixels, ids, mask)
    with torch.no_grad():
        want_img = F.normalize(
            ref.get_image_features(pixel_values=(pixels.float() / 255 - 0.5) / 0.25).pooler_output, dim=-1
        )
        want_txt = F.normalize(ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
    torch.testing.assert_close(img, want_img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(txt, want_txt, rtol=1e-4, atol=1e-5)
    # the checkpoint spec rebuilds the architecture without the folder
    again = model_from_spec(model.spec)
    again.load_state_dict(model.state_dict())
    for a, b in zip(embed(again, pixels, ids, mask), (img, txt)):
        torch.testing.assert_close(a, b)


def test_hf_siglip_folder_has_a_bias(tmp_path):
    import transformers  # noqa: PLC0415

    tower = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)
    config = transformers.SiglipConfig(
        text_config=dict(tower, vocab_size=40, max_position_embeddings=CTX),
        vision_config=dict(tower, image_size=32, patch_size=8),
    )
    transformers.SiglipModel(config).save_pretrained(tmp_path / "siglip")
    model = build_model(f"hf:{tmp_path / 'siglip'}", vocab_size=0, context_length=0)
    assert model.logit_bias is not None and model.bias().dim() == 0
    img, txt = embed(model, *inputs())
    assert img.shape == txt.shape == (3, 32)


def test_open_clip_config_and_checkpoint_round_trip(tmp_path):
    import open_clip  # noqa: PLC0415

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": CTX, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    cfg_path = tmp_path / "mmfast-test-tiny.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(cfg_path))
    ref = open_clip.create_model("mmfast-test-tiny", pretrained=None).eval()
    with torch.no_grad():
        ref.logit_scale.fill_(1.234)
    ckpt = tmp_path / "weights.pt"
    torch.save({"state_dict": ref.state_dict()}, ckpt)
    model = build_model(f"open_clip:{cfg_path}:{ckpt}", vocab_size=0, context_length=0)
    assert float(model.logit_scale.detach()) == pytest.approx(1.234)
    pixels, ids, mask = inputs(vocab=49408)
    img, txt = embed(model, pixels, ids, mask)
    with torch.no_grad():
        norm = (pixels.float() / 255 - torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
            open_clip.OPENAI_DATASET_STD
        ).view(1, 3, 1, 1)
        torch.testing.assert_close(img, ref.encode_image(norm, normalize=True), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(txt, ref.encode_text(ids, normalize=True), rtol=1e-4, atol=1e-5)
    again = model_from_spec(model.spec)
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(embed(again, pixels, ids, mask)[1], txt)


@pytest.mark.parametrize(
    "name, error, match",
    [
        ("hf:/nonexistent/folder", FileNotFoundError, "no such folder"),
        ("open_clip:no-such-arch", ValueError, "no architecture"),
        ("open_clip:ViT-B-32:/nonexistent/weights.pt", FileNotFoundError, "only local files"),
        ("open_clip:hf-hub:org/repo", ValueError, "no downloads"),
        ("open_clip:/nonexistent/cfg.json", FileNotFoundError, "does not exist"),
        ("resnet", ValueError, "--model must be"),
    ],
)
def test_bad_model_names(name, error, match):
    with pytest.raises(error, match=match):
        build_model(name, vocab_size=40, context_length=CTX)


def test_siglip_bias_added_and_rebuilt():
    model = build_model("tiny", vocab_size=40, context_length=CTX, image_size=32)
    model.add_logit_bias()
    assert float(model.bias().detach()) == -10.0 and float(model.scale().detach()) == pytest.approx(10.0)
    again = model_from_spec(model.spec)
    again.load_state_dict(model.state_dict())
    assert again.logit_bias is not None
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert float(model.scale().detach()) == pytest.approx(100.0)


def test_tokenizer_must_fit_the_text_tower():
    from mmfast.train.synthetic import vocabulary  # noqa: PLC0415
    from mmfast.train.tokenizers import ByteTokenizer, WordTokenizer  # noqa: PLC0415

    words = WordTokenizer(vocabulary(), CTX)
    build_model("tiny", vocab_size=words.vocab_size, context_length=CTX, image_size=32).check_tokenizer(words)
    with pytest.raises(ValueError, match="260 ids but the text tower embeds 41"):
        build_model("tiny", vocab_size=41, context_length=CTX, image_size=32).check_tokenizer(ByteTokenizer(CTX))
    other_eos = build_model("tiny", vocab_size=300, context_length=CTX, image_size=32, eos_token_id=7)
    with pytest.raises(ValueError, match="pools at eos_token_id 7"):
        other_eos.check_tokenizer(words)
