"""Hugging Face transformers integration: ``attn_implementation="mmfast"`` and model patches.

* ``register()`` adds "mmfast" to transformers' ``AttentionInterface`` (the attention function) and
  ``AttentionMaskInterface`` (the mask builder). Both are needed: a model asks the mask interface
  for its padding/causal mask under the name in ``config._attn_implementation``, and an unknown
  name there makes transformers build NO mask at all, silently dropping padding.
  The mask is SDPA's (4-D bool, True = take part, or None when ``is_causal`` can stand in for it),
  which mmfast's op takes as is; causal attention without a mask is routed to the op's
  ``is_causal`` exactly where SDPA would use its own.
* ``apply_mmfast_to_lxmert(model)``: LXMERT computes attention inline (no interface), so its
  attention modules and cross-modality layers are replaced (adopting their parameters).
* ``apply_mmfast_to_clip(model)``: CLIPModel / SiglipModel: attention through the interface, and
  ``return_loss=True`` computed by the fused contrastive kernels from the embeddings.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast import reference
from mmfast.nn.co_attention import CoAttentionLayer
from mmfast.ops import cross_attention, info_nce, siglip_loss

__all__ = [
    "MIN_TRANSFORMERS_VERSION",
    "apply_mmfast_to_clip",
    "apply_mmfast_to_lxmert",
    "attention_through_maps",
    "mmfast_attention_forward",
    "register",
]

# Tested with 5.24.0. 5.0 is the first release where CLIP/SigLIP/BERT route every attention
# through AttentionInterface and the mask through AttentionMaskInterface as used here.
MIN_TRANSFORMERS_VERSION = "5.0.0"
NAME = "mmfast"


def _require_transformers() -> Any:
    """Import transformers, or raise an error naming the version this integration needs."""
    try:
        import transformers  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            f"mmfast.integrations.transformers needs transformers>={MIN_TRANSFORMERS_VERSION} (pip install "
            f"'transformers>={MIN_TRANSFORMERS_VERSION}')"
        ) from e
    from packaging.version import Version  # noqa: PLC0415 - a transformers dependency

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS_VERSION):
        raise ImportError(
            f"mmfast.integrations.transformers needs transformers>={MIN_TRANSFORMERS_VERSION}, found "
            f"{transformers.__version__}; upgrade with pip install 'transformers>={MIN_TRANSFORMERS_VERSION}'"
        )
    return transformers


# -------------------------------------------------------------------------------------------------
# AttentionInterface / AttentionMaskInterface
# -------------------------------------------------------------------------------------------------


def _padding_only(mask: Tensor, batch: int) -> Tensor | None:
    """A (B, 1, Lq, Lk) bool mask that repeats one row over the queries (stride 0, as SDPA's
    padding-only masks are built) is a key padding mask: return it as (B, Lk) True = padding."""
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] == batch and mask.shape[1] == 1:
        if mask.shape[2] == 1 or mask.stride(2) == 0:
            return ~mask[:, 0, 0, :]
    return None


def attention_through_maps(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Attention whose output is computed FROM the attention maps it returns (the slow path).

    The maps P = dropout(softmax(Q K^T * scale + masks)) (B, Hq, Lq, Lk), in query's dtype, and
    out = P V (B, Hq, Lq, Dv): a gradient of the output reaches the maps, so a model's
    ``output_attentions`` can be inspected with ``retain_grad()`` as in eager attention. Arguments
    as ``mmfast.cross_attention`` (key_padding_mask True = padding; attn_mask bool True = take part
    or additive float; causal bottom-right); GQA: Hq % Hkv == 0.
    """
    p, _ = reference.attention_probs(
        query, key, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal, scale=scale
    )
    p = p.to(query.dtype)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    rep = query.shape[1] // key.shape[1]
    v = value.repeat_interleave(rep, dim=1) if rep > 1 else value
    return torch.matmul(p.to(v.dtype), v), p


def mmfast_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-function signature on ``mmfast.cross_attention``.

    Args:
        module: the calling attention module (read for ``is_causal`` when not passed).
        query: (B, Hq, Lq, D); key: (B, Hkv, Lk, D); value: (B, Hkv, Lk, Dv) (GQA handled by the op).
        attention_mask: None, a bool mask (True = take part) or an additive float mask,
            broadcastable to (B, Hq, Lq, Lk).
        dropout: attention dropout probability (the model passes 0 in eval mode).
        scaling: softmax scale (default 1/sqrt(D)).
        is_causal: overrides ``module.is_causal``.

    Returns:
        (output (B, Lq, Hq, Dv) contiguous, weights): weights (B, Hq, Lq, Lk) only when the model
        asks for ``output_attentions``, else None. The weights need the whole (Lq, Lk) matrix, so
        that call takes the slow path, ``attention_through_maps``: the output is computed from the
        returned weights (after dropout), which therefore carry its gradient, as in eager attention.
    """
    # (a sliding window needs nothing here: the mask builder already encodes it)
    for unsupported in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"attn_implementation='mmfast' does not support {unsupported}")
    Lq, Lk = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # Same routing as transformers' SDPA integration: the mask builder returns None for causal
    # attention exactly when a plain causal mask is right (no padding inside the keys).
    is_causal = bool(is_causal) and Lq > 1 and attention_mask is None
    if is_causal and Lk > Lq:
        # Prefill into an empty static cache: keys past Lq are unused slots. SDPA's causal mask is
        # top-left aligned, mmfast's bottom-right, so crop the slots (SDPA does the same).
        key, value = key[:, :, :Lq], value[:, :, :Lq]
    kpm, mask = None, attention_mask
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[2]]
        kpm = _padding_only(attention_mask, query.shape[0])
        mask = None if kpm is not None else attention_mask
        if mask is not None and mask.is_floating_point():
            mask = mask.to(query.dtype)
    if kwargs.get("output_attentions"):  # slow path: the weights need the full (Lq, Lk) matrix
        out, weights = attention_through_maps(query, key, value, kpm, mask, is_causal, scaling, dropout)
        return out.transpose(1, 2).contiguous(), weights
    out = cross_attention(
        query, key, value, key_padding_mask=kpm, attn_mask=mask, is_causal=is_causal, scale=scaling, dropout_p=dropout
    )
    return out.transpose(1, 2).contiguous(), None


def mmfast_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """The mask builder for "mmfast": SDPA's (4-D bool, True = take part; None where ``is_causal``
    or no mask at all is exact), which ``mmfast_attention_forward`` consumes as SDPA would.

    One shortcut: a plain bidirectional mask with padding (encoders, cross-attention) is returned
    as the (B, 1, 1, Lk) padding row expanded over the queries (no copy), which the attention
    function hands to the op as a key padding mask instead of a dense (B, 1, Lq, Lk) mask.
    """
    from transformers import masking_utils as mu  # noqa: PLC0415

    attention_mask = kwargs.get("attention_mask")
    plain_bidirectional = (
        not args
        and kwargs.get("mask_function") is mu.bidirectional_mask_function
        and kwargs.get("local_size") is None
        and attention_mask is not None
        and attention_mask.dim() == 2
        and hasattr(mu, "prepare_padding_mask")
    )
    if plain_bidirectional:
        keep = mu.prepare_padding_mask(attention_mask, kwargs["kv_length"], kwargs.get("kv_offset", 0))
        if not bool(keep.all()):  # all kept: let SDPA's builder decide between None and a full mask
            B, Lq, Lk = kwargs["batch_size"], kwargs["q_length"], kwargs["kv_length"]
            return keep.to(torch.bool)[:, None, None, :].expand(B, 1, Lq, Lk)
    return mu.sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register "mmfast" with transformers' AttentionInterface and AttentionMaskInterface (idempotent).

    Afterwards ``AutoModel.from_config(cfg, attn_implementation="mmfast")`` or
    ``model.set_attn_implementation("mmfast")`` route attention through mmfast.
    """
    _require_transformers()
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import AttentionMaskInterface  # noqa: PLC0415

    AttentionInterface.register(NAME, mmfast_attention_forward)
    AttentionMaskInterface.register(NAME, mmfast_mask)


# -------------------------------------------------------------------------------------------------
# LXMERT
# -------------------------------------------------------------------------------------------------


def _extended_to_padding(mask: Tensor | None) -> Tensor | None:
    """LXMERT's extended mask (B, 1, 1, L), (1 - m) * finfo.min, to (B, L) bool True = padding."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        raise ValueError(f"expected LXMERT's extended attention mask of shape (B, 1, 1, L), got {tuple(mask.shape)}")
    return mask[:, 0, 0, :] < 0


class _LxmertAttention(nn.Module):
    """Replaces ``LxmertAttention`` (same ``query``/``key``/``value``/``dropout`` submodules, adopted)."""

    def __init__(self, old: nn.Module, backend: str) -> None:
        super().__init__()
        self.num_attention_heads = old.num_attention_heads
        self.attention_head_size = old.attention_head_size
        self.head_size = old.head_size
        self.query, self.key, self.value, self.dropout = old.query, old.key, old.value, old.dropout
        self.backend = backend
        self.train(old.training)

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(
        self,
        hidden_states: Tensor,
        context: Tensor,
        attention_mask: Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, ...]:
        q, k, v = (
            self._heads(self.query(hidden_states)),
            self._heads(self.key(context)),
            self._heads(self.value(context)),
        )
        kpm = _extended_to_padding(attention_mask)
        p = self.dropout.p if self.training else 0.0
        if output_attentions:  # slow path: the output from the maps, which then carry its gradient
            o, probs = attention_through_maps(q, k, v, kpm, dropout_p=p)
            return o.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.head_size), probs
        o = cross_attention(q, k, v, key_padding_mask=kpm, dropout_p=p, backend=self.backend)
        return (o.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.head_size),)


class _LxmertXLayer(CoAttentionLayer):
    """``LxmertXLayer``'s forward signature on CoAttentionLayer (its submodules adopted)."""

    def forward(  # type: ignore[override]
        self,
        lang_feats: Tensor,
        lang_attention_mask: Tensor | None,
        visual_feats: Tensor,
        visual_attention_mask: Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, ...]:
        lang_pad, vis_pad = _extended_to_padding(lang_attention_mask), _extended_to_padding(visual_attention_mask)
        if not output_attentions:
            return super().forward(lang_feats, visual_feats, lang_pad, vis_pad)
        # Slow path: the lang -> visual cross-attention (LXMERT returns its maps) is computed from
        # its maps, so they carry the outputs' gradient; the other direction takes the op.
        att = self.visual_attention.att
        q, k, v = (
            self._heads(att.query(lang_feats)),
            self._heads(att.key(visual_feats)),
            self._heads(att.value(visual_feats)),
        )
        o_l, probs = attention_through_maps(q, k, v, vis_pad, dropout_p=att.dropout.p if self.training else 0.0)
        o_v = self._attend(att, visual_feats, lang_feats, lang_pad)
        x = self.visual_attention.output(o_l.transpose(1, 2).reshape(lang_feats.shape), lang_feats)
        y = self.visual_attention.output(o_v, visual_feats)
        # Steps 2 and 3 of CoAttentionLayer.forward: self-attention, then the feed-forward blocks.
        x = self.lang_self_att.output(self._attend(self.lang_self_att.self, x, x, lang_pad), x)
        y = self.visn_self_att.output(self._attend(self.visn_self_att.self, y, y, vis_pad), y)
        return self.lang_output(self.lang_inter(x), x), self.visn_output(self.visn_inter(y), y), probs


def apply_mmfast_to_lxmert(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Route every attention of an LXMERT model (LxmertModel, LxmertForPreTraining, ...) through mmfast.

    Each ``LxmertXLayer`` becomes a ``CoAttentionLayer`` (both cross directions in one op call) and
    every other ``LxmertAttention`` an mmfast attention; the new modules adopt the old submodules
    (same Parameter objects), so weights, device, dtype and optimizer state are kept. In place;
    returns ``model``. A batch item whose mask hides every key gets 0 attention output (LXMERT's
    additive mask gives a uniform average there).
    """
    _require_transformers()
    from transformers.models.lxmert.modeling_lxmert import LxmertAttention, LxmertXLayer  # noqa: PLC0415

    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LxmertXLayer):
                setattr(parent, name, _LxmertXLayer.from_lxmert(child, backend=backend))
                count += 1
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LxmertAttention) and not isinstance(parent, CoAttentionLayer):
                setattr(parent, name, _LxmertAttention(child, backend))
                count += 1
    if count == 0:
        raise ValueError(f"no LXMERT attention modules found in {type(model).__name__}")
    return model


# -------------------------------------------------------------------------------------------------
# CLIP / SigLIP
# -------------------------------------------------------------------------------------------------


def _fused_loss(model: nn.Module, out: Any) -> Tensor:
    """CLIP: InfoNCE over (image_embeds, text_embeds) with logit_scale.exp(); SigLIP: sigmoid loss
    with logit_scale.exp() and logit_bias. The embeddings are already L2-normalised by the model."""
    scale = model.logit_scale.exp()
    if getattr(model, "logit_bias", None) is not None:
        return siglip_loss(out.image_embeds, out.text_embeds, scale, model.logit_bias.reshape(()))
    return info_nce(out.image_embeds, out.text_embeds, scale)


def apply_mmfast_to_clip(model: nn.Module) -> nn.Module:
    """Make a transformers CLIPModel / SiglipModel use mmfast for attention and for its loss.

    Registers "mmfast" (``register()``) and sets it as the model's attention implementation (all
    sub-models), then wraps ``model.forward`` so that ``return_loss=True`` computes the contrastive
    loss with the fused kernel from the embeddings (outputs otherwise unchanged). In place;
    returns ``model``.
    """
    register()
    if not hasattr(model, "logit_scale") or not hasattr(model, "get_text_features"):
        raise TypeError(f"apply_mmfast_to_clip expects a CLIPModel or SiglipModel, got {type(model).__name__}")
    model.set_attn_implementation(NAME)
    if getattr(model.forward, "_mmfast_wrapped", False):
        return model
    original: Callable[..., Any] = model.forward
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        return_loss = bound.arguments.pop("return_loss", None)
        extra = bound.arguments.pop("kwargs", {})
        return_dict = extra.pop("return_dict", None)
        out = original(**bound.arguments, **extra, return_loss=False, return_dict=True)
        if return_loss:  # rebuilt so that loss comes first in to_tuple(), as the model returns it
            out = type(out)(loss=_fused_loss(model, out), **dict(out.items()))
        return out.to_tuple() if return_dict is False else out

    forward._mmfast_wrapped = True  # type: ignore[attr-defined]
    model.forward = forward
    return model
