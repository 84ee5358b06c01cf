"""The registry of layer kinds `decompose` puts in SVD form: adding a kind is one entry.

An entry names the exact type it replaces (subclasses may change forward), why an instance
stays dense (None: it is decomposed), and how to build its SVD form. The SVD form's class
holds the rest: an `SVDLayer` subclass views the weight as a matrix (`weight_to_matrix`),
costs one call (`call_cost`) and builds its ordinary layers (`factor_layers`,
`dense_layer`, chosen by its plan); a kind built of several SVD layers (attention) gives
`export`, which turns its SVD form into ordinary modules once its SVD layers are ordinary.

    svdtrain.kinds.register(LayerKind("my_linear", MyLinear, build=lambda m, mode, init: ...))
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .attention import SVDMultiheadAttention, plain_attention
from .conv import SVDConv2d
from .layers import SVDLinear


@dataclass(frozen=True)
class LayerKind:
    name: str
    source: type
    build: Callable[[nn.Module, str, str], nn.Module]  # (layer, mode, init) -> its SVD form
    why_dense: Callable[[nn.Module], str | None] = lambda module: None
    svd_type: type | None = None
    export: Callable[[nn.Module], nn.Module] | None = None


KINDS: dict[type, LayerKind] = {}


def register(kind: LayerKind) -> LayerKind:
    """Add (or replace) the entry for `kind.source`."""
    KINDS[kind.source] = kind
    return kind


def kind_of(module: nn.Module) -> LayerKind | None:
    """The entry for this exact type, if any (a transformers layer loads svdtrain.hf's entries)."""
    kind = KINDS.get(type(module))
    if kind is None and type(module).__module__.startswith("transformers.") and "svdtrain.hf" not in sys.modules:
        from . import hf  # noqa: F401  registers transformers' kinds; transformers is loaded already
        kind = KINDS.get(type(module))
    return kind


def exported_by(module: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    """The `export` of the kind whose SVD form `module` is, where that kind has one."""
    for kind in KINDS.values():
        if kind.export is not None and type(module) is kind.svd_type:
            return kind.export
    return None


def _conv_why_dense(conv: nn.Conv2d) -> str | None:
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups})"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    return None


register(LayerKind("linear", nn.Linear, lambda m, mode, init: SVDLinear.from_linear(m, init=init),
                   svd_type=SVDLinear))
register(LayerKind("conv2d", nn.Conv2d, lambda m, mode, init: SVDConv2d.from_conv(m, mode=mode, init=init),
                   why_dense=_conv_why_dense, svd_type=SVDConv2d))
register(LayerKind("multihead_attention", nn.MultiheadAttention,
                   lambda m, mode, init: SVDMultiheadAttention.from_mha(m, init=init),
                   why_dense=lambda m: "attention with add_bias_kv or add_zero_attn"
                   if m.bias_k is not None or m.add_zero_attn else None,
                   svd_type=SVDMultiheadAttention, export=plain_attention))
