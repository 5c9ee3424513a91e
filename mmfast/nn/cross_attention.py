"""``CrossAttention``: a drop-in ``nn.MultiheadAttention`` on mmfast's fused attention op.

Same constructor, parameters (names and shapes, so ``state_dict`` round-trips), forward signature
and mask conventions as ``torch.nn.MultiheadAttention``, plus ``num_kv_heads`` for grouped-query
attention. Per batch item n, head h (key/value head g = h // (H / Hkv)):

    q = query W_q^T + b_q,  k = key W_k^T + b_k,  v = value W_v^T + b_v       (split into heads)
    o[n, h] = softmax(q[n, h] k[n, g]^T / sqrt(head_dim) + mask) v[n, g]      (mmfast.cross_attention)
    out = concat_h(o[n, h]) W_o^T + b_o

Differences from ``nn.MultiheadAttention`` (documented, deliberate):

* ``need_weights`` defaults to False (returning the weights needs the whole (L, S) matrix, which
  the fused kernel never forms); ``need_weights=True`` runs the slow reference path.
* A query row whose keys are all masked gives 0, not NaN.
* ``is_causal=True`` without ``attn_mask`` applies a causal mask (nn.MultiheadAttention raises);
  when L != S it is bottom-right aligned, as mmfast's op.
* ``add_bias_kv`` / ``add_zero_attn`` are not supported (``swap_modules`` leaves such layers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast import reference
from mmfast.ops import cross_attention
from mmfast.ops._validate import check_backend
from mmfast.reference.dropout import draw_seed, keep_mask

__all__ = ["CrossAttention"]


class CrossAttention(nn.Module):
    """Multi-head (cross-)attention with the constructor and forward of ``nn.MultiheadAttention``.

    Args:
        embed_dim: E, the query (and output) width; must be divisible by ``num_heads``.
        num_heads: H, query heads; head_dim = E // H.
        dropout: attention-probability dropout, applied in training mode only.
        bias: whether the input and output projections have biases.
        add_bias_kv, add_zero_attn: must be False (kept so constructor calls stay valid).
        kdim, vdim: widths of key and value inputs (default E).
        batch_first: inputs and outputs are (N, L, E) instead of (L, N, E).
        num_kv_heads: Hkv key/value heads (GQA / MQA), H % Hkv == 0; default H.
        backend: mmfast backend for the attention op ("auto", "cpu", "triton", "cuda", "reference").

    Parameters are named as in ``nn.MultiheadAttention``: ``in_proj_weight`` (3E, E) when
    kdim == vdim == E and Hkv == H, otherwise ``q_proj_weight`` (E, E), ``k_proj_weight``
    (Hkv * head_dim, kdim), ``v_proj_weight`` (Hkv * head_dim, vdim); ``in_proj_bias``
    (E + 2 * Hkv * head_dim); ``out_proj`` (Linear E -> E).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_kv_heads: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be > 0, got {embed_dim} and {num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else int(num_kv_heads)
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if add_bias_kv or add_zero_attn:
            raise ValueError("CrossAttention does not support add_bias_kv or add_zero_attn")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        fk = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.backend = check_backend(backend)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        kv_width = num_kv_heads * self.head_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim and num_kv_heads == num_heads
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **fk))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **fk))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_width, self.kdim, **fk))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_width, self.vdim, **fk))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * kv_width, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation: Xavier-uniform projections, zero biases."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention, *, backend: str = "auto") -> CrossAttention:
        """A CrossAttention holding a copy of ``mha``'s weights, on its device and dtype, in its mode."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("cannot convert an nn.MultiheadAttention with add_bias_kv or add_zero_attn")
        weight = mha.out_proj.weight
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=weight.device,
            dtype=weight.dtype,
            backend=backend,
        )
        with torch.no_grad():
            new.load_state_dict(mha.state_dict())
        old = dict(mha.named_parameters())
        for name, p in new.named_parameters():
            p.requires_grad_(old[name].requires_grad)
        return new.train(mha.training)

    def __prepare_scriptable__(self) -> nn.MultiheadAttention:
        """What ``torch.jit.script`` compiles in place of this module: an ``nn.MultiheadAttention``
        holding the same parameter objects (TorchScript cannot compile mmfast's Python dispatch), so
        scripted code computes the same function with PyTorch's kernels and trains the same weights.
        Grouped-query modules (num_kv_heads < num_heads) have no such equivalent and are refused."""
        if self.num_kv_heads != self.num_heads:
            raise RuntimeError(
                "torch.jit.script: a grouped-query CrossAttention (num_kv_heads="
                f"{self.num_kv_heads} < num_heads={self.num_heads}) has no nn.MultiheadAttention equivalent"
            )
        mha = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=self.in_proj_bias is not None,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device="meta",
        )
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            setattr(mha, name, getattr(self, name))
        mha.out_proj = self.out_proj
        return mha.train(self.training)

    def merge_masks(
        self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, query: Tensor
    ) -> tuple[Tensor | None, int | None]:
        """nn.MultiheadAttention's ``merge_masks``: PyTorch's fused inference path of
        ``nn.TransformerEncoderLayer`` (eval mode, no grad) calls it on its ``self_attn`` and then
        runs its own kernel on this module's weights, so a swapped layer gives the same result."""
        return nn.MultiheadAttention.merge_masks(self, attn_mask, key_padding_mask, query)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"kdim={self.kdim}, vdim={self.vdim}, dropout={self.dropout}, batch_first={self.batch_first}, "
            f"backend={self.backend!r}"
        )

    # ---------------------------------------------------------------------------------------------

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections on (N, L, *) inputs; one GEMM for self-attention with packed weights."""
        E, kvw = self.embed_dim, self.num_kv_heads * self.head_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.split([E, kvw, kvw])
        if self._qkv_same_embed_dim:
            if query is key and key is value:
                return F.linear(query, self.in_proj_weight, b).split([E, E, E], dim=-1)
            wq, wk, wv = self.in_proj_weight.split([E, E, E])
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        """(N, L, heads * head_dim) -> (N, heads, L, head_dim), a view."""
        N, L, _ = x.shape
        return x.view(N, L, heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of ``query`` over ``key``/``value``, with nn.MultiheadAttention's conventions.

        Args:
            query: (L, N, E), or (N, L, E) with batch_first, or unbatched (L, E).
            key: (S, N, kdim) / (N, S, kdim) / (S, kdim).
            value: (S, N, vdim) / (N, S, vdim) / (S, vdim).
            key_padding_mask: (N, S) (or (S,) unbatched); bool True = ignore that key, or float
                added to the scores.
            need_weights: also return the attention weights (slow reference path).
            attn_mask: (L, S) or (N * H, L, S); bool True = NOT allowed (nn.MultiheadAttention's
                convention), or float added to the scores.
            average_attn_weights: average the returned weights over heads.
            is_causal: hint that ``attn_mask`` is the causal mask; without ``attn_mask``, apply one.

        Returns:
            (output of query's shape with width E, weights (N, L, S) / (N, H, L, S) or None).
        """
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"query, key and value must all be 3-D (batched) or 2-D (unbatched), got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if not batched:  # a batch of one, batch-first
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
            attn_mask = attn_mask.unsqueeze(0) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
        elif not self.batch_first:
            same_kv = key is value
            self_attn = query is key and same_kv
            query = query.transpose(0, 1)
            key = query if self_attn else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        self._check_inputs(query, key, value)
        N, L, _ = query.shape
        S = key.shape[1]
        q, k, v = self._project(query, key, value)
        q, k, v = self._heads(q, self.num_heads), self._heads(k, self.num_kv_heads), self._heads(v, self.num_kv_heads)
        kpm, mask, causal = self._op_masks(key_padding_mask, attn_mask, is_causal, need_weights, N, L, S, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            o, weights = _attention_with_weights(q, k, v, kpm, mask, causal, dropout_p)
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        else:
            o = cross_attention(
                q,
                k,
                v,
                key_padding_mask=kpm,
                attn_mask=mask,
                is_causal=causal,
                dropout_p=dropout_p,
                backend=self.backend,
            )
        if batched and not self.batch_first:  # (N, H, L, hd) -> (L, N, E)
            o = o.permute(2, 0, 1, 3).reshape(L, N, self.embed_dim)
        else:  # (N, H, L, hd) -> (N, L, E)
            o = o.transpose(1, 2).reshape(N, L, self.embed_dim)
        out = self.out_proj(o)
        return (out if batched else out.squeeze(0)), weights

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        """(N, L, E), (N, S, kdim), (N, S, vdim): check widths, batch and lengths, naming the argument."""
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must have width embed_dim={self.embed_dim}, got shape {tuple(query.shape)}")
        if key.shape[-1] != self.kdim:
            raise ValueError(f"key must have width kdim={self.kdim}, got shape {tuple(key.shape)}")
        if value.shape[-1] != self.vdim:
            raise ValueError(f"value must have width vdim={self.vdim}, got shape {tuple(value.shape)}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(
                f"query, key and value disagree on batch size or key/value length: "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)} (batch_first={self.batch_first})"
            )

    def _op_masks(
        self,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
        need_weights: bool,
        N: int,
        L: int,
        S: int,
        dtype: torch.dtype,
    ) -> tuple[Tensor | None, Tensor | None, bool]:
        """Translate nn.MultiheadAttention's masks into the op's: (key_padding_mask, attn_mask, is_causal).

        The op takes a bool (N, S) padding mask (True = ignore) and an attn_mask that is either
        bool with True = take part (the opposite of nn.MultiheadAttention's bool attn_mask) or
        additive float, broadcastable to (N, H, L, S).
        """
        H = self.num_heads
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and m.dtype != torch.bool and not m.is_floating_point():
                # nn.MultiheadAttention refuses these too: an integer mask is neither a bool mask nor
                # an additive one, and reading it as either silently changes what is masked.
                raise TypeError(f"{name} must be bool (True = masked) or floating (additive), got {m.dtype}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S):
            raise ValueError(f"key_padding_mask must have shape (N, S) = {(N, S)}, got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (L, S):
                pass
            elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (N * H, L, S):
                attn_mask = attn_mask.view(N, H, L, S)
            elif attn_mask.dim() == 4 and tuple(attn_mask.shape) == (N, H, L, S):  # unbatched (H, L, S), unsqueezed
                pass
            else:
                raise ValueError(
                    f"attn_mask must have shape (L, S) = {(L, S)} or (N * num_heads, L, S) = {(N * H, L, S)}, "
                    f"got {tuple(attn_mask.shape)}"
                )
        # nn.MultiheadAttention trusts the is_causal hint (drops attn_mask) exactly in this case.
        if is_causal and attn_mask is not None and key_padding_mask is None and not need_weights and L == S:
            return None, None, True
        causal = is_causal and attn_mask is None
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask
        kpm = key_padding_mask
        if kpm is not None and kpm.dtype != torch.bool:  # additive float padding mask: fold into attn_mask
            pad = kpm.to(dtype).view(N, 1, 1, S)
            if attn_mask is None:
                attn_mask = pad
            elif attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros((), dtype=dtype, device=pad.device).masked_fill(~attn_mask, -math.inf) + pad
            else:
                attn_mask = attn_mask.to(dtype) + pad
            kpm = None
        elif attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
        return kpm, attn_mask, causal


def _attention_with_weights(
    q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None, mask: Tensor | None, causal: bool, dropout_p: float
) -> tuple[Tensor, Tensor]:
    """The reference path when the weights are wanted: out (N, H, L, Dv), weights (N, H, L, S) after dropout."""
    p, _ = reference.attention_probs(q, k, key_padding_mask=kpm, attn_mask=mask, is_causal=causal)
    if dropout_p > 0.0:  # the kernels' keep mask: the same torch seed drops the same weights
        keep = keep_mask(draw_seed(), *p.shape, dropout_p, device=p.device)
        p = p * keep / (1.0 - dropout_p)
    rep = q.shape[1] // k.shape[1]
    v = v.repeat_interleave(rep, dim=1) if rep > 1 else v
    o = torch.matmul(p.to(v.dtype), v)
    return o, p.to(q.dtype)
