"""Hugging Face transformers' layer kinds: GPT-2's Conv1D (weight stored in x out) and Falcon's
FalconLinear (an nn.Linear subclass computing x W^T + b) in SVD form.
Imported by svdtrain only where `transformers` already is: `kinds.kind_of` loads it when a
model holds a transformers layer."""
from __future__ import annotations

import dataclasses

from torch import nn
from transformers.pytorch_utils import Conv1D

from .kinds import KINDS, LayerKind, register
from .layers import SVDLinear


def _conv1d_to_svd(layer: Conv1D, mode: str, init: str) -> SVDLinear:
    """Conv1D computes x @ W + b with W stored in x out: the SVD form of W^T, a Linear's view."""
    weight = layer.weight.detach().T
    new = SVDLinear(layer.nx, layer.nf, bias=True, weight=weight, init=init)
    new.bias.data.copy_(layer.bias.detach())
    return new.to(device=weight.device, dtype=weight.dtype)


register(LayerKind("hf_conv1d", Conv1D, _conv1d_to_svd, svd_type=SVDLinear))


try:  # a Linear subclass whose forward is a Linear's: its SVD form is an SVDLinear
    from transformers.models.falcon.modeling_falcon import FalconLinear
except ImportError:  # a transformers without Falcon
    FalconLinear = None
if FalconLinear is not None:
    register(dataclasses.replace(KINDS[nn.Linear], name="hf_falcon_linear", source=FalconLinear))
