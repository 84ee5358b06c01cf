"""nn.MultiheadAttention in SVD form: its q, k, v and output projections as four SVD layers.

nn.MultiheadAttention keeps q, k and v in one packed (3E x E) `in_proj_weight`. Here they
are three matrices, each with its own SVD and rank: queries, keys and values have different
spectra (a shared rank would keep the union of what each needs), and separate matrices
cover kdim/vdim different from embed_dim without a special case. The attention itself,
`attend`, is the part of nn.MultiheadAttention between its input and output projections,
written once and used both by the SVD-form layer and by the exported plain layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SVDLinear


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention's mask convention: bool True = not attended (-inf), float = added."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, batch_first: bool,
           key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
           attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
           is_causal: bool = False, dropout_p: float = 0.0):
    """Multi-head scaled dot-product attention of already projected q, k, v, in
    nn.MultiheadAttention's layouts ((L, N, E), batch_first (N, L, E), or unbatched (L, E)) and
    mask conventions; returns (output before the output projection, weights or None)."""
    if is_causal and attn_mask is None:
        raise RuntimeError("need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
    unbatched = q.dim() == 2
    if unbatched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    n, tgt, e = q.shape
    src, d = k.shape[1], e // num_heads
    q = q.reshape(n, tgt, num_heads, d).transpose(1, 2)
    k = k.reshape(n, src, num_heads, d).transpose(1, 2)
    v = v.reshape(n, src, num_heads, v.shape[-1] // num_heads).transpose(1, 2)
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, q.dtype)
        if mask.dim() == 3:  # (N * heads, L, S), batch-major as nn.MultiheadAttention has it
            mask = mask.reshape(n, num_heads, tgt, src)
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, q.dtype).reshape(n, 1, 1, src)
        mask = padding if mask is None else mask + padding
    weights = None
    if need_weights:
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        if mask is not None:
            scores = scores + mask
        w = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            w = F.dropout(w, dropout_p)
        out = w @ v
        weights = w.mean(1) if average_attn_weights else w
        if unbatched:
            weights = weights.squeeze(0)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    out = out.transpose(1, 2).reshape(n, tgt, -1)
    if unbatched:
        out = out.squeeze(0)
    elif not batch_first:
        out = out.transpose(0, 1)
    return out, weights


# torch.fx keeps `attend` as one call (its masks may be None or tensors, its flags vary by
# call): an exported attention layer traces to a GraphModule of ordinary layers + this call.
torch.fx.wrap("attend")


class SVDMultiheadAttention(nn.Module):
    """Drop-in for nn.MultiheadAttention (same forward signature and outputs) whose four
    projections, q_proj, k_proj, v_proj and out_proj, are SVDLinear layers.

    Attention bias_k/bias_v (add_bias_kv) and add_zero_attn are not supported (decompose
    leaves such layers dense, with a log line).
    """

    # nn.TransformerEncoderLayer reads these to decide on its fused fast path; with separate
    # projections it takes its ordinary path, which calls this forward.
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, out_proj: nn.Module,
                 num_heads: int, batch_first: bool = False, dropout: float = 0.0):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.embed_dim, self.kdim, self.vdim = q_proj.out_features, k_proj.in_features, v_proj.in_features
        self.num_heads, self.head_dim = num_heads, self.embed_dim // num_heads
        self.batch_first, self.dropout = batch_first, dropout

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, init: str = "svd") -> "SVDMultiheadAttention":
        """The SVD form of `mha` (exact at init="svd")."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("SVDMultiheadAttention does not support add_bias_kv or add_zero_attn")
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        projections = [_svd_linear(w, b, init) for w, b in zip(weights, biases)]
        out = _svd_linear(mha.out_proj.weight, mha.out_proj.bias, init)
        new = cls(*projections, out, mha.num_heads, mha.batch_first, mha.dropout)
        return new.train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        # The projections act on the last dim, so they apply before `attend` sorts out layouts.
        r = attend(self.q_proj(query), self.k_proj(key), self.v_proj(value), self.num_heads, self.batch_first,
                   key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal,
                   self.dropout if self.training else 0.0)
        return self.out_proj(r[0]), r[1]  # indexing, not unpacking: torch.fx traces it

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def _svd_linear(weight: torch.Tensor, bias: torch.Tensor | None, init: str) -> SVDLinear:
    layer = SVDLinear(weight.shape[1], weight.shape[0], bias is not None, weight=weight, init=init)
    if bias is not None:
        layer.bias.data.copy_(bias.detach())
    return layer.to(device=weight.device, dtype=weight.dtype)


# Attributes that code around nn.MultiheadAttention reads (TransformerEncoderLayer among them).
_READ_ATTRIBUTES = ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "batch_first", "dropout",
                    "_qkv_same_embed_dim", "in_proj_weight", "in_proj_bias")


def plain_attention(layer: SVDMultiheadAttention) -> nn.Module:
    """The exported form of an SVDMultiheadAttention whose projections are already ordinary
    layers: an nn.MultiheadAttention when every projection ships dense (same shapes, so the
    packed weight and PyTorch's fused kernels apply), else a torch.fx GraphModule of the
    projection layers and one `attend` call, holding the attributes nn.MultiheadAttention has."""
    projections = (layer.q_proj, layer.k_proj, layer.v_proj)
    biased = {p.bias is not None for p in (*projections, layer.out_proj) if isinstance(p, nn.Linear)}
    if all(type(p) is nn.Linear for p in (*projections, layer.out_proj)) and len(biased) == 1 \
            and layer.kdim == layer.vdim == layer.embed_dim:
        p = layer.out_proj.weight
        mha = nn.MultiheadAttention(layer.embed_dim, layer.num_heads, dropout=layer.dropout, bias=biased.pop(),
                                    batch_first=layer.batch_first, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([q.weight for q in projections]))
            mha.out_proj.weight.copy_(layer.out_proj.weight)
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(torch.cat([q.bias for q in projections]))
                mha.out_proj.bias.copy_(layer.out_proj.bias)
        return mha.train(layer.training)
    graph = torch.fx.symbolic_trace(layer)
    for name in _READ_ATTRIBUTES:
        setattr(graph, name, getattr(layer, name))
    return graph.train(layer.training)
