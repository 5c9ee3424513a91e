"""``AttentionFusion``: text attends to image, and the result is concatenated to the text.

    fused[b, i] = concat(T[b, i], A[b, i])                        (B, Lt, Dt + E)
    A[b, i, h*hd:(h+1)*hd] = sum_j softmax_j(q[b,h,i] . k[b,g,j] / sqrt(hd)) v[b,g,j]
    q = T W_q^T + b_q  (H heads),  k = V W_k^T + b_k,  v = V W_v^T + b_v  (Hkv heads, g = h // (H/Hkv))

The attention kernel writes A straight into the columns Dt: of the output buffer, through the op's
``out=`` argument (a (B, H, Lt, hd) strided view of the buffer), so the attention half is never
copied; only T is copied into its half. There is no output projection after the attention: a
projection W_o of A composes with whatever layer consumes the fused features, so it belongs there.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfast.ops import cross_attention
from mmfast.ops._validate import check_backend

__all__ = ["AttentionFusion"]


class AttentionFusion(nn.Module):
    """Concat(T, MultiHeadAttention(Q=T, K=V, V=V)) in one output buffer.

    Args:
        text_dim: Dt, width of the text features T.
        image_dim: Dv, width of the image features V.
        num_heads: H query heads.
        head_dim: hd per head (default Dt // H); E = H * hd is the width of the attention half.
        num_kv_heads: Hkv key/value heads (GQA), H % Hkv == 0; default H.
        bias: biases on the q/k/v projections.
        dropout: attention-probability dropout in training mode.
        backend: mmfast backend for the attention op.
    """

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        num_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if head_dim is None:
            if text_dim % num_heads:
                raise ValueError(
                    f"text_dim ({text_dim}) must be divisible by num_heads ({num_heads}), or pass head_dim"
                )
            head_dim = text_dim // num_heads
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        fk = {"device": device, "dtype": dtype}
        self.text_dim, self.image_dim = text_dim, image_dim
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.embed_dim = num_heads * head_dim
        self.out_dim = text_dim + self.embed_dim
        self.dropout = float(dropout)
        self.backend = check_backend(backend)
        self.q_proj = nn.Linear(text_dim, self.embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(image_dim, num_kv_heads * head_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(image_dim, num_kv_heads * head_dim, bias=bias, **fk)

    def extra_repr(self) -> str:
        return (
            f"text_dim={self.text_dim}, image_dim={self.image_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, out_dim={self.out_dim}"
        )

    def forward(self, text: Tensor, image: Tensor, image_padding_mask: Tensor | None = None) -> Tensor:
        """Fuse image information into every text token.

        Args:
            text: T (B, Lt, Dt).
            image: V (B, Lv, Dv).
            image_padding_mask: (B, Lv) bool, True = padding patch/region to ignore.

        Returns:
            (B, Lt, Dt + E): columns [:Dt] are T, columns [Dt:] the attention output (heads
            concatenated). A text row whose image is all padding gets zeros in the attention half.
        """
        if text.dim() != 3 or text.shape[-1] != self.text_dim:
            raise ValueError(f"text must be (B, Lt, {self.text_dim}), got shape {tuple(text.shape)}")
        if image.dim() != 3 or image.shape[-1] != self.image_dim or image.shape[0] != text.shape[0]:
            raise ValueError(f"image must be ({text.shape[0]}, Lv, {self.image_dim}), got shape {tuple(image.shape)}")
        B, Lt, Dt = text.shape
        Lv = image.shape[1]
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(text).view(B, Lt, H, hd).transpose(1, 2)
        k = self.k_proj(image).view(B, Lv, Hkv, hd).transpose(1, 2)
        v = self.v_proj(image).view(B, Lv, Hkv, hd).transpose(1, 2)
        fused = torch.empty(B, Lt, self.out_dim, dtype=q.dtype, device=q.device)
        # T goes in first: the attention backward keeps its output (a view of this buffer), and a
        # later write into the same buffer would invalidate it.
        fused[..., :Dt] = text
        # (B, Lt, E) columns of the buffer, seen as (B, H, Lt, hd): the kernel's output layout.
        attn_half = fused[..., Dt:].view(B, Lt, H, hd).transpose(1, 2)
        cross_attention(
            q,
            k,
            v,
            key_padding_mask=image_padding_mask,
            dropout_p=self.dropout if self.training else 0.0,
            out=attn_half,
            backend=self.backend,
        )
        return fused
