"""Quantized multi-head attention: ``QMultiheadAttention``.

``nn.MultiheadAttention`` keeps its input projection as one packed parameter
(``in_proj_weight``) and reads ``out_proj.weight`` directly inside
``F.multi_head_attention_forward``, so replacing ``out_proj`` by a ``QLinear`` changes nothing
and the input projection has no layer to replace. ``QMultiheadAttention`` computes the same
function with its four projections as modules, ``q_proj``, ``k_proj``, ``v_proj`` (each
``(E, E_in)``) and ``out_proj`` (``(E, E)``), called on the query / key / value and on the
attention output. Each projection is an ``nn.Linear`` or a :class:`~gdnsq.layers.QLinear`
(weights per output channel, one per-tensor quantizer on its input), so calibration, the
penalty, the statistics and ``gdnsq.deploy.freeze`` (which replaces each ``QLinear`` by a
``DeployedLinear``) handle them as any other layer.

The attention itself (``softmax(q k^T / sqrt(d)) v``, masks, dropout) stays in floating point,
in the same operations and order as ``F.multi_head_attention_forward``: with FP projections
the outputs equal ``nn.MultiheadAttention``'s up to float rounding of the (unpacked) projection
GEMMs.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .layers import QLinear

#: the projections of an attention module (module names in QMultiheadAttention)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _additive_mask(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = not allowed) as a float mask with -inf there; a float mask as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask


class QMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate, quantizable q / k / v / out projections.

    Constructor arguments, ``forward`` arguments, shapes and results are those of
    ``nn.MultiheadAttention`` (``batch_first`` both ways, unbatched inputs, ``key_padding_mask``,
    ``attn_mask``, ``need_weights``, ``average_attn_weights``, ``is_causal``, ``kdim`` /
    ``vdim``, ``bias``, ``add_bias_kv``, ``add_zero_attn``, dropout on the attention weights in
    training mode). Built by :meth:`from_float` (what ``gdnsq.quantize_model`` uses), its
    projections are ``nn.Linear`` or ``QLinear``.

    Parameters: ``q_proj`` (E <- E), ``k_proj`` (E <- kdim), ``v_proj`` (E <- vdim),
    ``out_proj`` (E <- E) and, with ``add_bias_kv``, ``bias_k`` / ``bias_v`` (1, 1, E), which
    stay FP (they are appended to the projected keys and values).
    """

    # There is no packed input projection. torch's nn.TransformerEncoderLayer /
    # TransformerDecoderLayer test these attributes before taking their fused inference path
    # (torch._transformer_encoder_layer_fwd), which reads in_proj_weight directly and would skip
    # the projection modules; with them it calls this module's forward.
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        for value, name in ((embed_dim, "embed_dim"), (num_heads, "num_heads")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout <= 1.0):
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        factory = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, 1, embed_dim, **factory)))
            self.bias_v = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, 1, embed_dim, **factory)))
        else:
            self.bias_k = self.bias_v = None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, "
                f"vdim={self.vdim}, dropout={self.dropout}, batch_first={self.batch_first}")

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention,
                   quantize: Mapping[str, Mapping] | None = None) -> "QMultiheadAttention":
        """The same attention as ``mha``, with the projections named in ``quantize`` as QLinear.

        Args:
            mha: the float module. Its ``out_proj`` weight and bias, separate
                ``q/k/v_proj_weight`` (``kdim``/``vdim`` != ``embed_dim``) and ``bias_k`` /
                ``bias_v`` Parameter objects are shared; a packed ``in_proj_weight`` /
                ``in_proj_bias`` is split into three new Parameters (copies).
            quantize: ``{projection name: QLinear keyword arguments}`` (``weight_bits``,
                ``act_bits``, ...) for the projections to quantize; the others stay nn.Linear.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        quantize = dict(quantize or {})
        unknown = sorted(set(quantize) - set(PROJECTIONS))
        if unknown:
            raise ValueError(f"quantize: {unknown} are not projections (expected some of {PROJECTIONS})")
        has_bias = mha.in_proj_bias is not None
        q = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=has_bias,
                add_bias_kv=False, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
                batch_first=mha.batch_first, device="meta")
        q.bias_k, q.bias_v = mha.bias_k, mha.bias_v

        def split(packed: torch.Tensor) -> list[nn.Parameter]:
            return [nn.Parameter(part.detach().clone(), requires_grad=packed.requires_grad)
                    for part in packed.chunk(3)]

        weights = (split(mha.in_proj_weight) if mha._qkv_same_embed_dim
                   else [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight])
        biases = split(mha.in_proj_bias) if has_bias else [None] * 3
        sources = list(zip(weights, biases)) + [(mha.out_proj.weight, mha.out_proj.bias)]
        for name, (weight, bias) in zip(PROJECTIONS, sources):
            linear = getattr(q, name)
            linear.weight, linear.bias = weight, bias
            if name in quantize:
                setattr(q, name, QLinear.from_float(linear, **quantize[name]))
        q.train(mha.training)
        return q

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``, ``(L, E)``
        unbatched) and the attention weights ``(N, L, S)`` (per head ``(N, H, L, S)`` with
        ``average_attn_weights=False``) or None when ``need_weights`` is False.

        ``query`` (L, N, E), ``key`` (S, N, kdim), ``value`` (S, N, vdim) (batch first: N
        leads; unbatched: no N). ``key_padding_mask`` (N, S); ``attn_mask`` (L, S) or
        (N*H, L, S); both bool (True = not allowed) or float (added to the scores).
        """
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must all be 3-D (batched) or 2-D (unbatched), "
                             f"got {query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
        batched = query.dim() == 3
        key_padding_mask = _additive_mask(key_padding_mask, "key_padding_mask", query.dtype)
        # The projections act on the last dimension, so they run on the caller's layout; only
        # their outputs are brought to (length, batch, features).
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if not batched:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        out, weights = self._attend(q, k, v, key_padding_mask, attn_mask, need_weights,
                                    average_attn_weights, is_causal)
        if not batched:
            return out.squeeze(1), (None if weights is None else weights.squeeze(0))
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def _attend(self, q, k, v, key_padding_mask, attn_mask, need_weights, average_attn_weights,
                is_causal):
        """``F.multi_head_attention_forward`` after its input projection, then ``out_proj``.

        q (L, N, E), k and v (S, N, E) projected; the mask is additive (or None).
        """
        tgt_len, bsz, embed_dim = q.shape
        heads, head_dim = self.num_heads, self.head_dim
        if k.shape[:2] != v.shape[:2]:
            raise ValueError(f"key and value must have the same length and batch size, got "
                             f"{tuple(k.shape[:2])} and {tuple(v.shape[:2])}")
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True needs attn_mask (the causal mask); is_causal is only a hint")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention builds the causal mask itself
        else:
            attn_mask = _additive_mask(attn_mask, "attn_mask", q.dtype)
            if key_padding_mask is not None:
                is_causal = False  # the merged mask is no longer causal
        src_len = k.shape[0]
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (bsz, src_len):
            raise ValueError(f"key_padding_mask must be ({bsz}, {src_len}) (batch, key length), "
                             f"got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (tgt_len, src_len):
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() != 3 or tuple(attn_mask.shape) != (bsz * heads, tgt_len, src_len):
                raise ValueError(f"attn_mask must be ({tgt_len}, {src_len}) or "
                                 f"({bsz * heads}, {tgt_len}, {src_len}), got {tuple(attn_mask.shape)}")
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros.to(v.dtype)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
                                .reshape(bsz * heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, heads, -1, src_len)
            q = q.view(bsz, heads, tgt_len, head_dim)
            k = k.view(bsz, heads, src_len, head_dim)
            v = v.view(bsz, heads, src_len, head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
            weights = None
        out = self.out_proj(out)
        return out.view(tgt_len, bsz, out.shape[-1]), weights


def disable_fused_transformer_paths(model: nn.Module) -> None:
    """Keep ``nn.TransformerEncoder``s that hold a QMultiheadAttention off their nested-tensor
    inference path: it reads ``self_attn.in_proj_weight`` directly and would bypass the
    projection modules (the per-layer fused path is already refused by the attributes of
    QMultiheadAttention)."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(m, QMultiheadAttention) for m in module.modules()):
            module.use_nested_tensor = False
