"""``CoAttentionLayer``: LXMERT's cross-modality layer (https://arxiv.org/abs/1908.07490, Fig. 1).

With language features X (B, Ll, h), visual features Y (B, Lv, h), one cross-attention block C
shared by both directions (as in LXMERT), per-stream self-attention S_x, S_y and FFNs F_x, F_y:

    1. cross:  X1 = LN(X + W_o Attn(X W_q, Y W_k, Y W_v)),  Y1 = LN(Y + W_o Attn(Y W_q, X W_k, X W_v))
    2. self:   X2 = LN(X1 + S_x(X1)),                       Y2 = LN(Y1 + S_y(Y1))
    3. ffn:    X3 = LN(X2 + W2 act(W1 X2)),                 Y3 = LN(Y2 + W2' act(W1' Y2))

Step 1's two directions run as ONE attention op call: the queries [X; Y] and keys/values [Y; X]
are stacked as 2B batch items. That needs one length for both streams, so when Ll != Lv both are
padded to L = max(Ll, Lv) (padded keys masked out, padded query rows dropped). Padding costs
(2B L^2) / (2B Ll Lv) times the attention work, so by default the layer stacks only while that
ratio is <= ``STACK_MAX_WASTE`` and otherwise makes two calls (``stack_directions`` forces either).

Submodule names follow transformers' ``LxmertXLayer`` (so its ``state_dict`` loads as is and
``from_lxmert`` can adopt its submodules): ``visual_attention.{att.{query,key,value},output}``,
``lang_self_att``/``visn_self_att``, ``lang_inter``/``lang_output``, ``visn_inter``/``visn_output``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.ops import cross_attention
from mmfast.ops._validate import check_backend

__all__ = ["CoAttentionLayer"]

STACK_MAX_WASTE = 1.25


class _Projections(nn.Module):
    """query / key / value projections (h -> h) and the attention-probability dropout."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.query, self.key, self.value = (
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, hidden),
        )
        self.dropout = nn.Dropout(dropout)


class _ResidualNorm(nn.Module):
    """LN(x + dropout(dense(h))): LXMERT's AttentionOutput / Output."""

    def __init__(self, d_in: int, hidden: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)  # noqa: N815 - LxmertXLayer's name, for state_dict
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)
        self.intermediate_act_fn = act

    def forward(self, x: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(x))


class _AttentionBlock(nn.Module):
    """Holds ``<att_name>`` (_Projections) and ``output`` (_ResidualNorm), named as LXMERT's."""

    def __init__(self, att_name: str, hidden: int, attn_dropout: float, dropout: float, eps: float) -> None:
        super().__init__()
        self.add_module(att_name, _Projections(hidden, attn_dropout))
        self.output = _ResidualNorm(hidden, hidden, dropout, eps)


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class CoAttentionLayer(nn.Module):
    """LXMERT cross-modality layer; equals ``transformers.LxmertXLayer`` given the same weights.

    Args:
        hidden_size: h, width of both streams; num_heads must divide it.
        num_heads: attention heads (head_dim = h / num_heads) of all three attentions.
        intermediate_size: FFN width.
        hidden_dropout: dropout after each dense layer (training only).
        attention_dropout: attention-probability dropout (training only).
        layer_norm_eps: LayerNorm epsilon (LXMERT: 1e-12).
        activation: "gelu" | "relu" | "gelu_tanh" or a callable.
        backend: mmfast backend for the attention op.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int | None = None,
        *,
        hidden_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        activation: str | Callable[[Tensor], Tensor] = "gelu",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        act = _ACTIVATIONS[activation] if isinstance(activation, str) else activation
        inter = 4 * hidden_size if intermediate_size is None else intermediate_size
        h, pa, pd, eps = hidden_size, attention_dropout, hidden_dropout, layer_norm_eps
        self.num_heads, self.backend = num_heads, check_backend(backend)
        self.visual_attention = _AttentionBlock("att", h, pa, pd, eps)
        self.lang_self_att = _AttentionBlock("self", h, pa, pd, eps)
        self.visn_self_att = _AttentionBlock("self", h, pa, pd, eps)
        self.lang_inter, self.visn_inter = _Intermediate(h, inter, act), _Intermediate(h, inter, act)
        self.lang_output, self.visn_output = _ResidualNorm(inter, h, pd, eps), _ResidualNorm(inter, h, pd, eps)

    @classmethod
    def from_lxmert(cls, xlayer: nn.Module, *, backend: str = "auto") -> CoAttentionLayer:
        """A layer that ADOPTS ``xlayer``'s submodules (same Parameter objects: optimizers, device,
        dtype and tying are kept). ``copy.deepcopy(xlayer)`` first for an independent copy."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads = xlayer.visual_attention.att.num_attention_heads
        new.backend = backend
        for name in ("visual_attention", "lang_self_att", "visn_self_att", "lang_inter", "visn_inter"):
            setattr(new, name, getattr(xlayer, name))
        new.lang_output, new.visn_output = xlayer.lang_output, xlayer.visn_output
        return new.train(xlayer.training)

    # ---------------------------------------------------------------------------------------------

    def _heads(self, x: Tensor) -> Tensor:
        """(B, L, h) -> (B, heads, L, hd), a view."""
        B, L, h = x.shape
        return x.view(B, L, self.num_heads, h // self.num_heads).transpose(1, 2)

    def _attend(self, proj: nn.Module, x_q: Tensor, x_kv: Tensor, kv_padding: Tensor | None) -> Tensor:
        """Multi-head attention of x_q (B, Lq, h) over x_kv (B, Lk, h); returns (B, Lq, h) before W_o."""
        q, k, v = self._heads(proj.query(x_q)), self._heads(proj.key(x_kv)), self._heads(proj.value(x_kv))
        p = proj.dropout.p if self.training else 0.0
        o = cross_attention(q, k, v, key_padding_mask=kv_padding, dropout_p=p, backend=self.backend)
        return o.transpose(1, 2).reshape(x_q.shape)

    def _cross_stacked(self, x: Tensor, y: Tensor, x_pad: Tensor | None, y_pad: Tensor | None) -> tuple[Tensor, Tensor]:
        """Both directions in one op call: queries [X; Y], keys/values [Y; X], padded to one length."""
        proj = self.visual_attention.att
        B, Lx, h = x.shape
        Ly = y.shape[1]
        L = max(Lx, Ly)

        def pad(t: Tensor, n: int) -> Tensor:
            return F.pad(t, (0, 0, 0, n - t.shape[1])) if t.shape[1] < n else t

        def pad_mask(m: Tensor | None, n_real: int) -> Tensor:
            m = torch.zeros(B, n_real, dtype=torch.bool, device=x.device) if m is None else m
            return F.pad(m, (0, L - n_real), value=True)

        xy = torch.cat([pad(x, L), pad(y, L)])  # (2B, L, h): query side
        yx = torch.cat([xy[B:], xy[:B]])  # (2B, L, h): key/value side
        kpm = None
        if Lx != Ly or x_pad is not None or y_pad is not None:
            kpm = torch.cat([pad_mask(y_pad, Ly), pad_mask(x_pad, Lx)])
        o = self._attend(proj, xy, yx, kpm)
        return o[:B, :Lx], o[B:, :Ly]

    def cross_att(
        self,
        lang: Tensor,
        visual: Tensor,
        lang_padding_mask: Tensor | None = None,
        visual_padding_mask: Tensor | None = None,
        stack_directions: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Step 1 (both cross-attention directions, residual + LayerNorm)."""
        Ll, Lv = lang.shape[1], visual.shape[1]
        if stack_directions is None:
            stack_directions = max(Ll, Lv) ** 2 <= STACK_MAX_WASTE * Ll * Lv
        if stack_directions:
            o_l, o_v = self._cross_stacked(lang, visual, lang_padding_mask, visual_padding_mask)
        else:
            proj = self.visual_attention.att
            o_l = self._attend(proj, lang, visual, visual_padding_mask)
            o_v = self._attend(proj, visual, lang, lang_padding_mask)
        out = self.visual_attention.output
        return out(o_l, lang), out(o_v, visual)

    def forward(
        self,
        lang_feats: Tensor,
        visual_feats: Tensor,
        lang_padding_mask: Tensor | None = None,
        visual_padding_mask: Tensor | None = None,
        stack_directions: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the layer.

        Args:
            lang_feats: (B, Ll, h).
            visual_feats: (B, Lv, h).
            lang_padding_mask: (B, Ll) bool, True = padding token.
            visual_padding_mask: (B, Lv) bool, True = padding region.
            stack_directions: True: both cross directions in one op call (padding to one length);
                False: two calls; None: stack while the padding waste is <= STACK_MAX_WASTE.

        Returns:
            (lang (B, Ll, h), visual (B, Lv, h)). Padded positions get values too, as in LXMERT.
        """
        if lang_feats.dim() != 3 or visual_feats.dim() != 3 or lang_feats.shape[0] != visual_feats.shape[0]:
            raise ValueError(
                f"lang_feats (B, Ll, h) and visual_feats (B, Lv, h) must share B, got shapes "
                f"{tuple(lang_feats.shape)} and {tuple(visual_feats.shape)}"
            )
        if lang_feats.shape[-1] != visual_feats.shape[-1]:
            raise ValueError(
                f"lang_feats and visual_feats must have one width h, got {lang_feats.shape[-1]} and "
                f"{visual_feats.shape[-1]}"
            )
        x, y = self.cross_att(lang_feats, visual_feats, lang_padding_mask, visual_padding_mask, stack_directions)
        x = self.lang_self_att.output(self._attend(self.lang_self_att.self, x, x, lang_padding_mask), x)
        y = self.visn_self_att.output(self._attend(self.visn_self_att.self, y, y, visual_padding_mask), y)
        x = self.lang_output(self.lang_inter(x), x)
        y = self.visn_output(self.visn_inter(y), y)
        return x, y
