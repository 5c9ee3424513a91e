"""CLIP models for training: two separate towers and the logit scale / bias.

``ClipModel`` holds an image tower, a text tower (each its own ``nn.Module``, so each can be wrapped
by DDP or FSDP2 and run chunk by chunk by GradCache) and the learnable ``logit_scale`` (log of the
multiplier, as CLIP) and optional ``logit_bias`` (SigLIP). Towers return L2-normalised embeddings.

Where models come from (``build_model(name)``); nothing is ever downloaded:

* ``tiny`` (default): a small ``transformers.CLIPConfig`` model, random init, attention through
  mmfast (``attn_implementation="mmfast"``).
* ``hf:PATH``: ``from_pretrained`` of a local folder holding a CLIPModel or SiglipModel.
* ``open_clip:ARCH[:CHECKPOINT_FILE]``: an open_clip architecture (a built-in name, or a path to
  a model-config JSON file), random init or the weights of a local checkpoint file.

A model describes itself with ``spec`` (architecture and configuration, no weights), so a training
checkpoint rebuilds it with ``model_from_spec(spec)`` and loads the state dict.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClipModel", "ImageTower", "TextTower", "build_model", "model_from_spec", "tiny_clip_config"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = 100.0


class ImageTower(nn.Module):
    """(B, 3, H, W) uint8 pixels (or floats already normalised) -> (B, D) L2-normalised embeddings.

    uint8 input is converted and normalised here, one chunk at a time, so that a whole global batch
    can stay in uint8 (a quarter of float32's memory) until GradCache hands the tower a chunk.
    """

    def __init__(self, backbone: nn.Module, kind: str, projection: nn.Module | None, mean, std) -> None:
        super().__init__()
        self.backbone, self.kind = backbone, kind
        self.projection = projection if projection is not None else nn.Identity()
        self.tokens_need_norm = kind == "hf" and getattr(backbone.config, "model_type", "") == "clip_vision_model"
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: Tensor, return_tokens: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, D) embeddings; with ``return_tokens`` also the last layer's tokens (B, Lv, W), the
        [CLS] token first, after the tower's final LayerNorm (what ITM's fusion encoder reads)."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must have shape (B, 3, H, W), got {tuple(pixels.shape)}")
        if pixels.dtype == torch.uint8:
            pixels = (pixels.float() / 255.0 - self.mean) / self.std
        if self.kind == "hf":
            out = self.backbone(pixel_values=pixels)
            emb = F.normalize(self.projection(out.pooler_output), dim=-1)
            if not return_tokens:
                return emb
            tokens = out.last_hidden_state  # CLIP normalises only the pooled token; SigLIP all of them
            return emb, self.backbone.post_layernorm(tokens) if self.tokens_need_norm else tokens
        if return_tokens:
            raise ValueError("image tokens (for --objective itc+itm) need a transformers model (tiny or hf:PATH)")
        return F.normalize(self.projection(self.backbone(pixels)), dim=-1)


class TextTower(nn.Module):
    """input_ids (B, L) int64 [, attention_mask (B, L), 1 = token] -> (B, D) L2-normalised embeddings."""

    def __init__(self, backbone: nn.Module, kind: str, projection: nn.Module | None) -> None:
        super().__init__()
        self.backbone, self.kind = backbone, kind
        self.projection = projection if projection is not None else nn.Identity()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, return_tokens: bool = False
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """(B, D) embeddings; with ``return_tokens`` also the last hidden states (B, L, W) and the
        padding (B, L) bool, True where ``attention_mask`` is 0 (what ITM's fusion encoder reads)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
        if self.kind == "hf":
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            emb = F.normalize(self.projection(out.pooler_output), dim=-1)
            if not return_tokens:
                return emb
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            return emb, out.last_hidden_state, mask == 0
        if return_tokens:
            raise ValueError("text tokens (for --objective itc+itm) need a transformers model (tiny or hf:PATH)")
        # open_clip's text towers find the end of text in the ids themselves
        return F.normalize(self.projection(self.backbone(input_ids)), dim=-1)


class ClipModel(nn.Module):
    """Image tower, text tower, ``logit_scale`` (log multiplier) and optional ``logit_bias``.

    Attributes:
        spec: how to rebuild the architecture (``model_from_spec``).
        image_size: the towers' input side in pixels.
        text_vocab_size, eos_token_id: what a tokenizer must fit (the text tower pools at the first
            ``eos_token_id``; None where the tower finds the end of text itself).
    """

    def __init__(
        self,
        image_tower: ImageTower,
        text_tower: TextTower,
        logit_scale: nn.Parameter,
        logit_bias: nn.Parameter | None,
        *,
        spec: dict[str, Any],
        image_size: int,
        text_vocab_size: int,
        eos_token_id: int | None,
    ) -> None:
        super().__init__()
        self.image_tower, self.text_tower = image_tower, text_tower
        self.logit_scale, self.logit_bias = logit_scale, logit_bias
        self.spec, self.image_size = spec, int(image_size)
        self.text_vocab_size, self.eos_token_id = int(text_vocab_size), eos_token_id
        self.fusion: nn.Module | None = None  # the ITM fusion encoder (add_fusion)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """A clear error when a tokenizer's ids do not fit the text tower (a silent mismatch would
        index out of the embedding or pool at the wrong position)."""
        if tokenizer.vocab_size > self.text_vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the text tower embeds {self.text_vocab_size}; "
                "pass the model's own tokenizer (--tokenizer hf:PATH)"
            )
        if self.eos_token_id is not None and tokenizer.eos_token_id != self.eos_token_id:
            raise ValueError(
                f"the tokenizer ends captions with id {tokenizer.eos_token_id} but the text tower pools at "
                f"eos_token_id {self.eos_token_id}; pass the model's own tokenizer (--tokenizer hf:PATH)"
            )

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.image_tower(pixels)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.text_tower(input_ids, attention_mask)

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters outside the towers (the loss's): logit_scale [, logit_bias]."""
        return [p for p in (self.logit_scale, self.logit_bias) if p is not None]

    def scale(self) -> Tensor:
        """The logit multiplier exp(logit_scale) as a 0-dim tensor (differentiable)."""
        return self.logit_scale.reshape(()).exp()

    def bias(self) -> Tensor | None:
        return None if self.logit_bias is None else self.logit_bias.reshape(())

    def add_logit_bias(self, init_scale: float = 10.0, init_bias: float = -10.0) -> None:
        """Give a model without one SigLIP's learnable bias, with SigLIP's initialisation
        (exp(logit_scale) = 10, logit_bias = -10); recorded in ``spec``. No-op if it has one."""
        if self.logit_bias is not None:
            return
        self.logit_bias = nn.Parameter(torch.full_like(self.logit_scale, init_bias))
        with torch.no_grad():
            self.logit_scale.fill_(math.log(init_scale))
        self.spec["logit_bias"] = True

    def add_fusion(
        self, *, layers: int = 2, heads: int = 4, mlp_ratio: int = 4, attn: str = "mmfast", pool: str = "eos"
    ) -> None:
        """Give the model an ITM fusion encoder (``fusion.FusionEncoder``) over its towers' token
        widths, recorded in ``spec``; ``attn`` ("mmfast" | "sdpa") is a runtime choice, not recorded."""
        from mmfast.train.fusion import FusionEncoder  # noqa: PLC0415

        if self.image_tower.kind != "hf" or self.text_tower.kind != "hf":
            raise ValueError("--objective itc+itm needs a transformers model (tiny or hf:PATH): the fusion encoder "
                             "reads the towers' tokens")  # fmt: skip
        text_dim = self.text_tower.backbone.config.hidden_size
        image_dim = self.image_tower.backbone.config.hidden_size
        self.fusion = FusionEncoder(
            text_dim, image_dim, layers=layers, heads=heads, mlp_ratio=mlp_ratio, attn=attn, pool=pool
        )
        self.spec["fusion"] = dict(self.fusion.config)

    def fusion_parameters(self) -> list[nn.Parameter]:
        """The fusion encoder's parameters (none without one)."""
        return [] if self.fusion is None else list(self.fusion.parameters())

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """exp(logit_scale) <= 100, as CLIP (applied after every optimizer step)."""
        self.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))


# -------------------------------------------------------------------------------------------------
# transformers
# -------------------------------------------------------------------------------------------------


def tiny_clip_config(
    vocab_size: int,
    context_length: int,
    *,
    image_size: int = 48,
    patch_size: int = 8,
    width: int = 96,
    layers: int = 2,
    heads: int = 4,
    embed_dim: int = 64,
    eos_token_id: int = 3,
    pad_token_id: int = 0,
) -> Any:
    """The default tiny CLIP's ``transformers.CLIPConfig`` (two towers of ``layers`` blocks)."""
    from transformers import CLIPConfig  # noqa: PLC0415

    tower = dict(hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads, num_hidden_layers=layers)
    return CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=vocab_size,
            max_position_embeddings=context_length,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            bos_token_id=2,
        ),
        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
        projection_dim=embed_dim,
    )


def _from_hf_model(model: nn.Module, spec: dict[str, Any], mean, std, attn: str) -> ClipModel:
    from mmfast.integrations.transformers import apply_mmfast_to_clip  # noqa: PLC0415

    if not hasattr(model, "vision_model") or not hasattr(model, "text_model") or not hasattr(model, "logit_scale"):
        raise TypeError(f"expected a transformers CLIPModel or SiglipModel, got {type(model).__name__}")
    if attn == "mmfast":
        apply_mmfast_to_clip(model)
    else:
        model.set_attn_implementation(attn)
    image = ImageTower(model.vision_model, "hf", getattr(model, "visual_projection", None), mean, std)
    text = TextTower(model.text_model, "hf", getattr(model, "text_projection", None))
    bias = getattr(model, "logit_bias", None)
    image_size = model.config.vision_config.image_size
    text_cfg = model.config.text_config
    # CLIP pools at the first eos_token_id (2 means transformers' legacy argmax pooling); SigLIP at the end
    eos = getattr(text_cfg, "eos_token_id", None) if model.config.model_type == "clip" else None
    return ClipModel(
        image, text, model.logit_scale, bias, spec=spec, image_size=image_size,
        text_vocab_size=text_cfg.vocab_size, eos_token_id=eos if eos != 2 else None,
    )  # fmt: skip


def _hf_from_config(model_type: str, config: dict[str, Any], attn: str, mean, std) -> ClipModel:
    import transformers  # noqa: PLC0415

    classes = {"clip": (transformers.CLIPConfig, transformers.CLIPModel)}
    classes["siglip"] = (transformers.SiglipConfig, transformers.SiglipModel)
    if model_type not in classes:
        raise ValueError(f"model_type must be 'clip' or 'siglip', got {model_type!r}")
    config_cls, model_cls = classes[model_type]
    model = model_cls(config_cls.from_dict(config))
    spec = {"kind": "hf", "model_type": model_type, "config": config, "mean": list(mean), "std": list(std)}
    return _from_hf_model(model, spec, mean, std, attn)


def _hf_preprocess(path: str) -> tuple[tuple, tuple]:
    """Pixel mean/std from a folder's preprocessor_config.json (CLIP's when absent)."""
    cfg_path = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        return tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


def _hf_pretrained(path: str, attn: str) -> ClipModel:
    import transformers  # noqa: PLC0415

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model hf:{path}: no such folder (a from_pretrained checkpoint folder)")
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    model_type = getattr(model.config, "model_type", "")
    if model_type not in ("clip", "siglip"):
        raise TypeError(f"--model hf:{path} holds a {type(model).__name__}; expected a CLIPModel or SiglipModel")
    mean, std = _hf_preprocess(path)
    spec = {"kind": "hf", "model_type": model_type, "config": model.config.to_dict(), "mean": list(mean)}
    spec["std"], spec["source"] = list(std), path
    return _from_hf_model(model, spec, mean, std, attn)


# -------------------------------------------------------------------------------------------------
# open_clip
# -------------------------------------------------------------------------------------------------


def _open_clip_arch(arch: str, model_cfg: dict[str, Any] | None) -> str:
    """Register a model-config JSON file (or a config from a checkpoint's spec) with open_clip; the
    name to pass to ``create_model``."""
    import open_clip  # noqa: PLC0415

    if arch.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"open_clip:{arch}: schemas are not supported (no downloads); use ARCH or a JSON config path")
    if arch.endswith(".json"):
        if not os.path.isfile(arch):
            raise FileNotFoundError(f"open_clip model config {arch!r} does not exist")
        open_clip.add_model_config(arch)
        return os.path.splitext(os.path.basename(arch))[0]
    if open_clip.get_model_config(arch) is None:
        if model_cfg is None:
            raise ValueError(
                f"open_clip has no architecture {arch!r} (open_clip.list_models() lists them; or pass a "
                "model-config .json file)"
            )
        folder = tempfile.mkdtemp(prefix="mmfast-open_clip-")
        with open(os.path.join(folder, f"{arch}.json"), "w") as f:
            json.dump(model_cfg, f)
        open_clip.add_model_config(folder)
    return arch


def _open_clip(arch: str, checkpoint: str | None, attn: str, model_cfg: dict[str, Any] | None = None) -> ClipModel:
    import open_clip  # noqa: PLC0415

    from mmfast.integrations.open_clip import apply_mmfast_to_open_clip  # noqa: PLC0415

    name = _open_clip_arch(arch, model_cfg)
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"open_clip checkpoint {checkpoint!r} does not exist (only local files are loaded)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an HF text tower's config must be local too
    model = open_clip.create_model(name, pretrained=None, force_custom_text=True, pretrained_text=False)
    if checkpoint is not None:
        open_clip.load_checkpoint(model, checkpoint)
    if attn == "mmfast":
        apply_mmfast_to_open_clip(model)
    pre = model.visual.preprocess_cfg
    mean, std = tuple(pre.get("mean", CLIP_MEAN)), tuple(pre.get("std", CLIP_STD))
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    spec = {"kind": "open_clip", "arch": name, "model_cfg": open_clip.get_model_config(name)}
    image = ImageTower(model.visual, "open_clip", None, mean, std)
    text = TextTower(model.text, "open_clip", None)
    vocab = int(getattr(model, "vocab_size", 0) or spec["model_cfg"]["text_cfg"].get("vocab_size", 49408))
    return ClipModel(
        image, text, model.logit_scale, model.logit_bias, spec=spec, image_size=size, text_vocab_size=vocab,
        eos_token_id=None,
    )  # fmt: skip


# -------------------------------------------------------------------------------------------------
# entry points
# -------------------------------------------------------------------------------------------------


def build_model(name: str, *, vocab_size: int, context_length: int, attn: str = "mmfast", **tiny: Any) -> ClipModel:
    """A model from ``--model``: "tiny", "hf:PATH" or "open_clip:ARCH[:CHECKPOINT_FILE]".

    Args:
        vocab_size, context_length: the tokenizer's, for the tiny model's text tower.
        attn: the towers' attention: "mmfast" (default) or "sdpa" (for comparisons).
        tiny: overrides of ``tiny_clip_config`` (image_size, width, layers, ...).
    """
    if attn not in ("mmfast", "sdpa"):
        raise ValueError(f"attn must be 'mmfast' or 'sdpa', got {attn!r}")
    if name == "tiny":
        config = tiny_clip_config(vocab_size, context_length, **tiny)
        return _hf_from_config("clip", config.to_dict(), attn, CLIP_MEAN, CLIP_STD)
    if name.startswith("hf:"):
        return _hf_pretrained(name[3:], attn)
    if name.startswith("open_clip:"):
        rest = name[len("open_clip:") :]
        if rest.startswith(("hf-hub:", "local-dir:")):
            raise ValueError(f"--model {name}: open_clip schemas are not supported (no downloads); use ARCH or a .json")
        arch, _, checkpoint = rest.partition(":")
        if not arch:
            raise ValueError("--model open_clip:ARCH[:CHECKPOINT_FILE] needs an ARCH")
        return _open_clip(arch, checkpoint or None, attn)
    raise ValueError(f"--model must be 'tiny', 'hf:PATH' or 'open_clip:ARCH[:CHECKPOINT_FILE]', got {name!r}")


def model_from_spec(spec: dict[str, Any], attn: str = "mmfast", fusion_attn: str = "mmfast") -> ClipModel:
    """The architecture a ``ClipModel.spec`` describes, randomly initialised (load a state dict next);
    ``fusion_attn``: the attention of its ITM fusion encoder, if it has one."""
    if spec.get("kind") == "hf":
        model = _hf_from_config(spec["model_type"], spec["config"], attn, tuple(spec["mean"]), tuple(spec["std"]))
    elif spec.get("kind") == "open_clip":
        model = _open_clip(spec["arch"], None, attn, spec.get("model_cfg"))
    else:
        raise ValueError(f"unknown model spec kind {spec.get('kind')!r}")
    if spec.get("logit_bias"):
        model.add_logit_bias()
    if spec.get("fusion"):
        model.add_fusion(**{"pool": "bos", **spec["fusion"]}, attn=fusion_attn)  # before "pool": the first token
    return model
