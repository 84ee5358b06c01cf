"""Multiply-accumulate (MAC) and parameter counts, dense and factorized.

All figures are MACs (one multiply + one add = 1); many tools print the same number as
"FLOPs". Counted, per call: SVD layers (from their plans), Linear (and subclasses),
Conv1d/2d/3d (grouped too), ConvTranspose1d/2d/3d, MultiheadAttention (the four projections
and the two attention products, however it is called) and RNN/LSTM/GRU (every gate of every
layer, direction and time step), each by its formula; and every matrix product, convolution
or attention call made outside those modules (functional calls such as
F.scaled_dot_product_attention in a custom block, the products of an SVD attention layer,
a Hugging Face Conv1D), at the dispatch level with PyTorch's own FLOP formulas. Not counted:
normalisation, activations, pooling, embeddings (lookups, not MACs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from .layers import SVDLayer, svd_layers, unwrap
from .plan import Call, Recording

COSTS = ("deploy", "factored", "dense")


@dataclass
class LayerCost:
    """One counted call of a forward pass (batch included). `module` is None for a product
    counted at the dispatch level (its `name` then says which op)."""
    name: str
    module: nn.Module | None
    dense: int            # MACs of the dense layer (of the op, for anything but an SVD layer)
    per_rank: int = 0     # factored MACs per unit of rank (SVD layers only; linear in rank)
    input_shape: tuple = ()  # the shape of the layer's input in this pass

    def macs(self, cost: str = "deploy", rank: int | None = None) -> int:
        if not isinstance(self.module, SVDLayer):
            return self.dense
        return self.module.plan.call_macs(Call(self.input_shape, self.dense, self.per_rank), rank, cost)


COUNTED = (SVDLayer, nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.RNNBase)


def _prod(xs) -> int:
    out = 1
    for v in xs:
        out *= v
    return out


def _attention_macs(m: nn.Module, q: torch.Tensor, k: torch.Tensor) -> int:
    if q.dim() == 2:  # unbatched (L, E)
        n, tgt, src = 1, q.shape[0], k.shape[0]
    else:
        n, tgt, src = (q.shape[0], q.shape[1], k.shape[1]) if m.batch_first else (q.shape[1], q.shape[0], k.shape[0])
    e = m.embed_dim
    proj = tgt * e * e + src * m.kdim * e + src * m.vdim * e + tgt * e * e  # q, k, v, out
    keys = src + (m.bias_k is not None) + m.add_zero_attn  # those appended after projection
    return n * (proj + 2 * tgt * keys * e)  # + scores (q k^T) and weights @ v


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


def _cost(name: str, module: nn.Module, args: tuple, kwargs: dict, output) -> LayerCost | None:
    x = args[0] if args else kwargs.get("query" if isinstance(module, nn.MultiheadAttention) else "input")
    if not torch.is_tensor(x):
        return None  # e.g. a PackedSequence: not counted
    shape = tuple(x.shape)
    if isinstance(module, SVDLayer):
        call = module.call_cost(shape)
        module.plan.calls.append(call)
        return LayerCost(name, module, call.dense, call.per_rank, input_shape=shape)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # each input element meets (out/groups) x kernel weights
        per_in = (module.out_channels // module.groups) * _prod(module.kernel_size)
        return LayerCost(name, module, x.numel() * per_in, input_shape=shape)
    if isinstance(module, nn.modules.conv._ConvNd):
        per_out = (module.in_channels // module.groups) * _prod(module.kernel_size)
        return LayerCost(name, module, output.numel() * per_out, input_shape=shape)
    if isinstance(module, nn.Linear):
        return LayerCost(name, module, output.numel() * module.in_features, input_shape=shape)
    if isinstance(module, nn.MultiheadAttention):
        key = args[1] if len(args) > 1 else kwargs["key"]
        return LayerCost(name, module, _attention_macs(module, x, key), input_shape=shape)
    if isinstance(module, nn.RNNBase):
        return LayerCost(name, module, _rnn_macs(module, x), input_shape=shape)
    return None


def _cpu_sdpa(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _grouped_mm(a, b, *args, out_val=None, **kwargs) -> int:
    """FLOPs of a grouped matmul (mixture-of-experts layers): each output element sums over
    its group's share of the inner dimension; with a 2-D x 2-D call (groups split the inner
    dimension) every output row sums over all of it once."""
    if a.dim() == 2 and b.dim() == 2:
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return 2 * out_val.numel() * a.shape[-1]


# PyTorch's FLOP formulas, plus the CPU kernel of scaled_dot_product_attention and grouped
# matmuls, which torch.utils.flop_counter does not count.
_FORMULAS = {**flop_registry, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa}
if hasattr(torch.ops.aten, "_grouped_mm"):  # torch >= 2.8
    _FORMULAS[torch.ops.aten._grouped_mm] = _grouped_mm


class _Products(TorchDispatchMode):
    """Counts, as MACs, the products the dispatcher runs while no counted module is running
    (`depth` 0): PyTorch's FLOP formulas, halved. Ops without a formula are decomposed first
    (as torch.utils.flop_counter does), so a composite op counts by what it runs."""

    def __init__(self, records: list):
        super().__init__()
        self.records, self.depth = records, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if self.depth == 0 and packet not in _FORMULAS and func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
        out = func(*args, **kwargs)
        if self.depth == 0 and packet in _FORMULAS:
            flops = _FORMULAS[packet](*args, **kwargs, out_val=out)
            self.records.append(LayerCost(str(packet), None, int(flops) // 2))
        return out


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
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape must be a sequence of ints, e.g. (1, 3, 32, 32), got {input_shape!r}") from None
    return (torch.zeros(shape, device=device, dtype=dtype),)


def profile(model: nn.Module, input_shape=None, example_inputs=None) -> list[LayerCost]:
    """Run one forward pass (eval mode, no grad) and record the cost of every counted call,
    in call order (a layer called twice appears twice). Each SVD layer's plan records the
    calls of this pass (and whether other code read its `.weight`): the input sizes that
    counts, budgets and export use afterwards. Every module's train/eval mode is restored."""
    model = unwrap(model)
    records: list[LayerCost] = []
    inputs = as_inputs(model, input_shape, example_inputs)
    products = _Products(records)

    def enter(module, args):
        products.depth += 1

    def leave(name):
        def fn(module, args, kwargs, output):
            products.depth -= 1
            rec = _cost(name, module, args, kwargs, output)
            if rec is not None:
                records.append(rec)
        return fn

    # A layer inside a counted module is not called on its own (or is counted by its parent):
    # only the outermost counted modules get hooks; inside them nothing else is counted.
    handles, inside = [], []
    for n, m in model.named_modules():
        if any(n.startswith(p + ".") for p in inside) or not isinstance(m, COUNTED):
            continue
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave(n), with_kwargs=True))
        inside.append(n)
    modes = {m: m.training for m in model.modules()}
    for _, layer in svd_layers(model):
        layer.plan.calls, layer.plan.reads_weight = [], False
    Recording.active, Recording.products = True, products
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        # attention's fused inference path would hand the hooks nested tensors (and skip them)
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), products:
            model(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        Recording.active, Recording.products = False, None
        for m, training in modes.items():
            m.training = training
        for h in handles:
            h.remove()
    return records


def count_macs(model: nn.Module, input_shape=None, cost: str = "deploy", *, example_inputs=None) -> int:
    """MACs of one forward pass of the whole model on an input of `input_shape` (batch
    included), or on `example_inputs` (a tensor or tuple passed to the model as is).

    SVD layers count at their current rank: cost="deploy" as the plan ships them (what
    `export` builds): a pinned form (`set_form`) as pinned, a layer whose `.weight` other code
    reads dense, else the cheaper of the factor pair and the dense layer; "factored" always the factor pair,
    "dense" the original dense layer (so it gives the undecomposed model's MACs).
    """
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    return sum(rec.macs(cost) for rec in profile(model, input_shape, example_inputs))


def layer_params(layer: SVDLayer, cost: str = "deploy") -> int:
    """Parameters of an SVD layer as deployed (its plan's rule), bias included."""
    return layer.plan.params(cost=cost) + (0 if layer.bias is None else layer.bias.numel())


def count_params(model: nn.Module, cost: str = "deploy") -> int:
    """Parameters of the model, SVD layers counted as in `count_macs` (buffers excluded)."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    total, seen = 0, set()
    for module in unwrap(model).modules():
        if isinstance(module, SVDLayer):
            total += layer_params(module, cost)
            continue
        for p in module.parameters(recurse=False):  # a tied head and its embedding: one tensor
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total
