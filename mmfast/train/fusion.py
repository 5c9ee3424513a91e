"""The image-text matching (ITM) fusion encoder: text queries attend to image patches, a binary head.

ALBEF's multimodal encoder (Li et al. 2021, https://arxiv.org/abs/2107.07651), small. Its input is
the text tower's last hidden states T (B, Lt, Wt) with the caption's padding, and the image tower's
patch tokens V (B, Lv, Wv). Each of ``layers`` pre-norm blocks runs

    T = T + SelfAttn(LN1(T))              keys: the caption's real tokens (key padding mask)
    T = T + CrossAttn(LN2(T), V, V)       text -> image: queries from text, keys/values from patches
    T = T + MLP(LN3(T))                   W2 gelu(W1 x), width mlp_ratio * Wt

Trailing padding columns are dropped before the first block (``text_extent``): no real token attends
to them, so the logits are unchanged and the cost follows the longest caption of the call, not the
context length (callers sort pairs by caption length so that a chunk's captions are alike).

The head reads one text token, logits = Linear(LN(T[:, k])) -> (B, 2), class 1 = "the caption
matches the image": by default (``pool="eos"``) each caption's last real token, the tokenizer's
<eos>, which the causal text tower has already made a summary of the caption (the token its ITC
embedding comes from), so the first block's cross-attention queries are informative from the
start; ``pool="bos"`` reads the first token, identical for every caption in a causal tower until
the blocks' self-attention fills it in. On the embedded scenes with the tiny towers, the head on
<bos> stayed at the class prior through 30 steps of random negatives where the one on <eos> left it
(batch 128, see the README's ITC + ITM section).

The attention modules are mmfast's ``CrossAttention`` (fused kernels, ``attn="mmfast"``) or
PyTorch's ``nn.MultiheadAttention`` (its training path calls ``F.scaled_dot_product_attention``,
``attn="sdpa"``). The two have the same parameters and state-dict keys, so one checkpoint loads
into either; ``--fusion-attn`` is the switch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.nn import CrossAttention

__all__ = ["FUSION_ATTNS", "FusionEncoder", "FusionLayer", "by_caption_length", "text_extent"]

FUSION_ATTNS = ("mmfast", "sdpa")
FUSION_POOLS = ("eos", "bos")


def text_extent(text_padding: Tensor) -> Tensor:
    """(B,) int64: 1 + the position of each caption's last real token (0 for an all-padding row),
    from text_padding (B, Lt) bool (True = padding); the columns from there on are padding."""
    real = ~text_padding
    last = text_padding.shape[1] - real.flip(1).to(torch.uint8).argmax(1)
    return torch.where(real.any(1), last, 0)


def by_caption_length(text_padding: Tensor, text_rows: Tensor) -> Tensor:
    """(P,) the order of the pairs whose captions are ``text_rows`` (P,) by caption extent (stable):
    chunks of consecutive pairs in it run at their own longest caption's length."""
    return text_extent(text_padding)[text_rows.to(text_padding.device)].argsort(stable=True).to(text_rows.device)


def _attention(attn: str, width: int, heads: int, kv_dim: int | None = None) -> nn.Module:
    if attn not in FUSION_ATTNS:
        raise ValueError(f"--fusion-attn must be one of {FUSION_ATTNS}, got {attn!r}")
    cls = CrossAttention if attn == "mmfast" else nn.MultiheadAttention
    return cls(width, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True)


class FusionLayer(nn.Module):
    """One pre-norm block: text self-attention, text -> image cross-attention, MLP.

    Args:
        width: Wt, the text hidden width (queries and output); ``heads`` must divide it.
        image_dim: Wv, the width of the image tokens (cross-attention keys and values).
        heads: attention heads of both attentions.
        mlp_ratio: MLP hidden width / Wt.
        attn: "mmfast" or "sdpa" (see the module docstring).
    """

    def __init__(self, width: int, image_dim: int, heads: int, *, mlp_ratio: int = 4, attn: str = "mmfast") -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = _attention(attn, width, heads)
        self.cross_attn = _attention(attn, width, heads, kv_dim=image_dim)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, text: Tensor, text_padding: Tensor, image: Tensor) -> Tensor:
        """text (B, Lt, Wt), text_padding (B, Lt) bool (True = padding), image (B, Lv, Wv) -> (B, Lt, Wt)."""
        h = self.norm1(text)
        text = text + self.self_attn(h, h, h, key_padding_mask=text_padding, need_weights=False)[0]
        h = self.norm2(text)
        text = text + self.cross_attn(h, image, image, need_weights=False)[0]
        return text + self.mlp(self.norm3(text))


class FusionEncoder(nn.Module):
    """``layers`` FusionLayers and the binary matching head on one text token (``pool``).

    Args:
        text_dim: Wt, the text tower's hidden width.
        image_dim: Wv, the image tower's token width.
        layers, heads, mlp_ratio: the blocks' shape.
        attn: "mmfast" or "sdpa".
        pool: the token the head reads, "eos" (the last real one) or "bos" (the first).
    """

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        *,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        attn: str = "mmfast",
        pool: str = "eos",
    ) -> None:
        super().__init__()
        if pool not in FUSION_POOLS:
            raise ValueError(f"--fusion-pool must be one of {FUSION_POOLS}, got {pool!r}")
        if layers < 1:
            raise ValueError(f"--fusion-layers must be >= 1, got {layers}")
        if text_dim % heads:
            raise ValueError(f"--fusion-heads {heads} must divide the text width {text_dim}")
        self.text_dim, self.image_dim, self.attn, self.pool = text_dim, image_dim, attn, pool
        self.layers = nn.ModuleList(
            FusionLayer(text_dim, image_dim, heads, mlp_ratio=mlp_ratio, attn=attn) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(text_dim)
        self.head = nn.Linear(text_dim, 2)
        self.config: dict[str, Any] = {"layers": layers, "heads": heads, "mlp_ratio": mlp_ratio, "pool": pool}

    def forward(self, text: Tensor, text_padding: Tensor, image: Tensor) -> Tensor:
        """Matching logits (B, 2) of caption b against image b.

        Args:
            text: (B, Lt, Wt) the text tower's last hidden states.
            text_padding: (B, Lt) bool, True = padding (from the tokenizer's attention mask).
            image: (B, Lv, Wv) the image tower's tokens.
        """
        if text.dim() != 3 or text.shape[-1] != self.text_dim:
            raise ValueError(f"text must be (B, Lt, {self.text_dim}), got {tuple(text.shape)}")
        if image.dim() != 3 or image.shape[-1] != self.image_dim or image.shape[0] != text.shape[0]:
            raise ValueError(f"image must be ({text.shape[0]}, Lv, {self.image_dim}), got {tuple(image.shape)}")
        if text_padding.shape != text.shape[:2] or text_padding.dtype != torch.bool:
            raise ValueError(f"text_padding must be bool {tuple(text.shape[:2])}, got {text_padding.dtype} "
                             f"{tuple(text_padding.shape)}")  # fmt: skip
        if text.shape[0]:
            extent = max(1, int(text_extent(text_padding).max()))  # the columns after are padding
            text, text_padding = text[:, :extent], text_padding[:, :extent]
        for layer in self.layers:
            text = layer(text, text_padding, image)
        if self.pool == "eos":
            last = (text_extent(text_padding) - 1).clamp(min=0)
            return self.head(self.norm(text[torch.arange(text.shape[0], device=text.device), last]))
        return self.head(self.norm(text[:, 0]))

    @staticmethod
    def match_score(logits: Tensor) -> Tensor:
        """(B, 2) logits -> (B,) log-odds that the pair matches (the re-ranking score)."""
        return logits[:, 1].float() - logits[:, 0].float()

    @staticmethod
    def loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy of (B, 2) logits against (B,) labels (1 = match), in float32."""
        return F.cross_entropy(logits.float(), labels, reduction=reduction)
