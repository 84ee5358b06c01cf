"""Multiply-accumulate (MAC) and parameter counts, dense and factorized.

All figures are MACs (one multiply + one add = 1); many tools print the same number as
"FLOPs". Counted, per call: SVD layers, Linear (and subclasses), Conv1d/2d/3d (grouped too),
ConvTranspose1d/2d/3d, MultiheadAttention (the four projections and the two attention
products; in SVD form the projections count as SVD layers, the products on their own) and RNN/LSTM/GRU (every gate of every layer, direction and time step). Not counted:
normalisation, activations, pooling, embeddings (lookups, not MACs) and functional calls made
outside modules (e.g. F.scaled_dot_product_attention in a custom block).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import counts_products
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
        return factored if cost == "factored" or self.module.ships_factored(self.dense, factored) else self.dense


COUNTED = (SVDLayer, nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.RNNBase)


def _prod(xs) -> int:
    out = 1
    for v in xs:
        out *= v
    return out


def _attention_macs(m: nn.Module, q: torch.Tensor, k: torch.Tensor, projections: bool = True) -> int:
    if q.dim() == 2:  # unbatched (L, E)
        n, tgt, src = 1, q.shape[0], k.shape[0]
    else:
        n, tgt, src = (q.shape[0], q.shape[1], k.shape[1]) if m.batch_first else (q.shape[1], q.shape[0], k.shape[0])
    e = m.embed_dim
    proj = tgt * e * e + src * m.kdim * e + src * m.vdim * e + tgt * e * e if projections else 0  # q, k, v, out
    return n * (proj + 2 * tgt * src * e)  # + scores (q k^T) and weights @ v


def _rnn_macs(m: nn.RNNBase, x: torch.Tensor) -> int:
    steps = x.shape[0] * (x.shape[1] if x.dim() == 3 else 1)  # time x batch, either layout
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    dirs = 2 if m.bidirectional else 1
    out = m.proj_size or m.hidden_size
    total = 0
    for layer in range(m.num_layers):
        inp = m.input_size if layer == 0 else out * dirs
        per_step = gates * m.hidden_size * (inp + out) + (m.hidden_size * m.proj_size if m.proj_size else 0)
        total += dirs * per_step
    return steps * total


def _cost(name: str, module: nn.Module, inputs: tuple, output) -> LayerCost | None:
    x = inputs[0] if inputs else None
    if not torch.is_tensor(x):
        return None  # e.g. a PackedSequence: not counted
    shape = tuple(x.shape)
    if isinstance(module, SVDLayer):
        if isinstance(module, SVDLinear):  # applies to every position of the last dim
            in_hw, batch = None, x.numel() // x.shape[-1]
        else:
            in_hw, batch = tuple(x.shape[-2:]), (x.shape[0] if x.dim() == 4 else 1)
        dense, factored_r1 = module.macs(in_hw, rank=1)
        return LayerCost(name, module, batch * dense, batch * factored_r1, input_shape=shape)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # each input element meets (out/groups) x kernel weights
        per_in = (module.out_channels // module.groups) * _prod(module.kernel_size)
        return LayerCost(name, module, x.numel() * per_in, input_shape=shape)
    if isinstance(module, nn.modules.conv._ConvNd):
        per_out = (module.in_channels // module.groups) * _prod(module.kernel_size)
        return LayerCost(name, module, output.numel() * per_out, input_shape=shape)
    if isinstance(module, nn.Linear):
        return LayerCost(name, module, output.numel() * module.in_features, input_shape=shape)
    if isinstance(module, nn.MultiheadAttention) or counts_products(module):  # separate projections: products only
        full = isinstance(module, nn.MultiheadAttention)
        return LayerCost(name, module, _attention_macs(module, x, inputs[1], projections=full), input_shape=shape)
    if isinstance(module, nn.RNNBase):
        return LayerCost(name, module, _rnn_macs(module, x), input_shape=shape)
    return None


def as_inputs(model: nn.Module, input_shape=None, example_inputs=None) -> tuple:
    """The positional inputs of one forward pass: `example_inputs` as given (a tensor or a
    tuple of tensors: token ids, several inputs, any dtype), else zeros of `input_shape` in
    the model's dtype and device."""
    if example_inputs is not None:
        return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if input_shape is None:
        raise ValueError("give input_shape (e.g. (1, 3, 32, 32)) or example_inputs (a tensor or tuple)")
    p = next(model.parameters(), None)
    device = p.device if p is not None else "cpu"
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return (torch.zeros(tuple(input_shape), device=device, dtype=dtype),)


def profile(model: nn.Module, input_shape=None, example_inputs=None) -> list[LayerCost]:
    """Run one forward pass (eval mode, no grad) and record the cost of every counted layer
    call, in call order (a layer called twice appears twice)."""
    model = unwrap(model)
    records: list[LayerCost] = []
    inputs = as_inputs(model, input_shape, example_inputs)

    def hook(name):
        def fn(module, args, output):
            rec = _cost(name, module, args, output)
            if rec is not None:
                records.append(rec)
        return fn

    # A layer inside an SVD layer or an attention/RNN module is not called on its own (or is
    # counted by its parent): only the outermost counted modules get hooks.
    handles, inside = [], []
    for n, m in model.named_modules():
        if any(n.startswith(p + ".") for p in inside):
            continue
        if counts_products(m):  # its projections count on their own
            handles.append(m.register_forward_hook(hook(n)))
        elif isinstance(m, COUNTED):
            handles.append(m.register_forward_hook(hook(n)))
            inside.append(n)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return records


def count_macs(model: nn.Module, input_shape=None, cost: str = "deploy", *, example_inputs=None) -> int:
    """MACs of one forward pass of the whole model on an input of `input_shape` (batch
    included), or on `example_inputs` (a tensor or tuple passed to the model as is).

    SVD layers count at their current rank: cost="deploy" takes the cheaper of the factor
    pair and the dense layer (what `export` builds), "factored" always the factor pair,
    "dense" the original dense layer (so it gives the undecomposed model's MACs).
    """
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    return sum(rec.macs(cost) for rec in profile(model, input_shape, example_inputs))


def layer_params(layer: SVDLayer, cost: str = "deploy") -> int:
    """Parameters of an SVD layer as deployed: factor pair at its rank or dense weight."""
    bias = 0 if layer.bias is None else layer.bias.numel()
    dense = layer.rows * layer.cols
    factored = layer.rank * (layer.rows + layer.cols)
    if cost == "dense":
        return dense + bias
    if cost == "factored":
        return factored + bias
    return (factored if layer.ships_factored(*layer.macs()) else dense) + bias


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
