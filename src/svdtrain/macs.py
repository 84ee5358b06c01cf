"""Multiply-accumulate (MAC) and parameter counts, dense and factorized.

All figures are MACs (one multiply + one add = 1); many tools print the same number as
"FLOPs". Only Conv2d, Linear and SVD layers are counted: they dominate every CNN and MLP,
and normalisation/activation costs are not MACs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import SVDLayer, SVDLinear, unwrap

COSTS = ("deploy", "factored", "dense")


@dataclass
class LayerCost:
    """One counted layer of a forward pass (batch included)."""
    name: str
    module: nn.Module
    dense: int            # MACs of the dense layer
    per_rank: int = 0     # factored MACs per unit of rank (SVD layers only; linear in rank)
    input_shape: tuple = ()  # the shape of the layer's input in this pass

    def macs(self, cost: str = "deploy", rank: int | None = None) -> int:
        if not isinstance(self.module, SVDLayer) or cost == "dense":
            return self.dense
        factored = self.per_rank * (self.module.rank if rank is None else rank)
        return factored if cost == "factored" else min(self.dense, factored)


def profile(model: nn.Module, input_shape) -> list[LayerCost]:
    """Run one forward pass on zeros of `input_shape` and record each layer's cost."""
    model = unwrap(model)
    records: list[LayerCost] = []

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0]
            if isinstance(module, SVDLayer):
                if isinstance(module, SVDLinear):  # applies to every position of the last dim
                    in_hw, batch = None, x.numel() // x.shape[-1]
                else:
                    in_hw, batch = tuple(x.shape[-2:]), (x.shape[0] if x.dim() == 4 else 1)
                dense, factored_r1 = module.macs(in_hw, rank=1)
                records.append(LayerCost(name, module, batch * dense, batch * factored_r1,
                                         input_shape=tuple(x.shape)))
            elif isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                per_out = (module.in_channels // module.groups) * kh * kw
                records.append(LayerCost(name, module, output.numel() * per_out,
                                         input_shape=tuple(x.shape)))
            elif isinstance(module, nn.Linear):
                records.append(LayerCost(name, module, output.numel() * module.in_features,
                                         input_shape=tuple(x.shape)))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (SVDLayer, nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        model.eval()
        with torch.no_grad():
            model(torch.zeros(tuple(input_shape), device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return records


def count_macs(model: nn.Module, input_shape, cost: str = "deploy") -> int:
    """MACs of one forward pass of the whole model on an input of `input_shape` (batch
    included).

    SVD layers count at their current rank: cost="deploy" takes the cheaper of the factor
    pair and the dense layer (what `export` builds), "factored" always the factor pair,
    "dense" the original dense layer (so it gives the undecomposed model's MACs).
    """
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    return sum(rec.macs(cost) for rec in profile(model, input_shape))


def layer_params(layer: SVDLayer, cost: str = "deploy") -> int:
    """Parameters of an SVD layer as deployed: factor pair at its rank or dense weight."""
    bias = 0 if layer.bias is None else layer.bias.numel()
    dense = layer.rows * layer.cols
    factored = layer.rank * (layer.rows + layer.cols)
    if cost == "dense":
        return dense + bias
    if cost == "factored":
        return factored + bias
    dense_macs, factored_macs = layer.macs()
    return (factored if factored_macs < dense_macs else dense) + bias


def count_params(model: nn.Module, cost: str = "deploy") -> int:
    """Parameters of the model, SVD layers counted as in `count_macs` (buffers excluded)."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    total = 0
    for module in unwrap(model).modules():
        if isinstance(module, SVDLayer):
            total += layer_params(module, cost)
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total
