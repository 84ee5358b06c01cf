"""Export a trained SVD-form model as a compact model made of ordinary torch.nn layers."""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from .layers import SVDLayer, unwrap
from .macs import profile

log = logging.getLogger("svdtrain")


def export(model: nn.Module, input_shape=None, trace: bool = True) -> nn.Module:
    """A new model with the same outputs in which every SVD layer is ordinary layers.

    Each SVD layer becomes its two factor layers at its rank (an nn.Sequential of two
    Conv2d/Linear), or one dense Conv2d/Linear where that costs fewer MACs. With
    `input_shape` the choice uses the real feature-map sizes (it matters only for spatial
    mode); without, it assumes each layer's input is its output times its stride.

    trace=True returns a torch.fx GraphModule, so the result holds no svdtrain class at all
    and unpickles without svdtrain; models that torch.fx cannot trace fall back (logged) to
    a copy of the model's own structure. The original model is not changed.
    """
    compact = copy.deepcopy(unwrap(model))
    use_factored = {}
    if input_shape is not None:
        for rec in profile(compact, input_shape):
            if isinstance(rec.module, SVDLayer):
                use_factored[id(rec.module)] = rec.macs("factored") < rec.dense
    replacements = []
    for name, module in compact.named_modules():
        if isinstance(module, SVDLayer):
            if id(module) in use_factored:
                factored = use_factored[id(module)]
            else:
                dense, fac = module.macs()
                factored = fac < dense
            new = module.factor_layers() if factored else module.dense_layer()
            new.train(module.training)
            replacements.append((name, new.to(module.U.device, module.U.dtype)))
    for name, new in replacements:
        if not name:
            return new  # the model was a single SVD layer
        parent_name, _, child = name.rpartition(".")
        setattr(compact.get_submodule(parent_name) if parent_name else compact, child, new)
    if not trace:
        return compact
    try:
        return torch.fx.symbolic_trace(compact)
    except Exception as err:  # data-dependent control flow etc.: keep the module structure
        log.info("svdtrain: torch.fx could not trace the model (%s); export keeps its "
                 "module structure", str(err).splitlines()[0] if str(err) else type(err).__name__)
        return compact


def export_program(compact: nn.Module, example_input: torch.Tensor, path=None, dynamic_batch: bool = True):
    """torch.export the compact model (eval mode), batch size dynamic unless told otherwise;
    optionally save it as a .pt2 file that loads with `torch.export.load(path).module()`
    without svdtrain."""
    compact = compact.eval()
    dynamic = None
    if dynamic_batch:
        if example_input.shape[0] < 2:  # a batch of 1 would be specialised to 1
            example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
        dynamic = ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)
    program = torch.export.export(compact, (example_input,), dynamic_shapes=dynamic)
    if path is not None:
        torch.export.save(program, str(path))
    return program
