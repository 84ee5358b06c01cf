"""Importance of singular values, for ranking them under a MACs budget: one interface.

An importance is called as `imp(name, layer)` and returns one non-negative score per
singular value of that SVD layer; `prune(macs_budget=..., scores=imp)` keeps the values whose
loss costs least per MAC saved. `EnergyShare` (the default) scores each value by its share of
its layer's energy; `SingularValueImportance` by its effect on the loss, accumulated in any
training loop; a user's own object or dict of scores plugs in the same way.

Loss importance:

Removing value i of a layer changes its weight by -s_i u_i v_i^T, and the loss by about
-s_i dL/ds_i to first order. At a trained model that mean is near zero, so the score is its
square summed over batches, sum_b (s_i dL_b/ds_i)^2: a diagonal Fisher estimate of the loss
increase (Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019).
Unlike each layer's energy share, it compares values across layers on one scale.

    imp = svdtrain.SingularValueImportance(model)
    for x, y in loader:                    # your own loop, or loss_importance() below
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward()
        imp.accumulate()                   # reads s.grad
        opt.step()
    svdtrain.prune(model, macs_budget=0.33, input_shape=(1, 3, 32, 32), scores=imp.scores())
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
from torch import nn

from .calibrate import to_model_device
from .layers import svd_layers


class EnergyShare:
    """s_i^2 / sum_j s_j^2 over the layer's active values (0 for pruned ones): the paper's rule,
    the share of the layer's energy a value carries."""

    def __call__(self, name: str, layer) -> torch.Tensor:
        e = layer.s.detach().double().pow(2) * layer.active
        return e / e.sum().clamp_min(1e-300)


class SingularValueImportance:
    """Accumulates sum over calls of (s * s.grad)^2 per SVD layer of `model`; called as
    `imp(name, layer)` it gives that layer's mean over the calls so far."""

    def __init__(self, model: nn.Module):
        self.layers = dict(svd_layers(model))
        if not self.layers:
            raise ValueError("the model has no SVD layers (decompose(model) first)")
        self.reset()

    def reset(self) -> None:
        self.sums = {name: torch.zeros_like(layer.s, dtype=torch.float64) for name, layer in self.layers.items()}
        self.count = 0

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add the current gradients' contribution; call after backward(), before zero_grad()."""
        if all(layer.s.grad is None for layer in self.layers.values()):
            raise RuntimeError("SingularValueImportance.accumulate: no singular value has a gradient "
                               "(call it after backward() and before zero_grad())")
        for name, layer in self.layers.items():
            if layer.s.grad is not None:
                self.sums[name] += (layer.s.detach() * layer.s.grad).double().pow(2)
        self.count += 1

    def scores(self) -> dict[str, torch.Tensor]:
        """{layer name: per-value importance} (the mean over the calls so far)."""
        if self.count == 0:
            raise ValueError("no gradients accumulated yet: call accumulate() after backward()")
        return {name: total / self.count for name, total in self.sums.items()}

    def __call__(self, name: str, layer=None) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no gradients accumulated yet: call accumulate() after backward()")
        return self.sums[name] / self.count

    def state_dict(self) -> dict:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {k: v.to(self.sums[k].device) for k, v in state["sums"].items()}
        self.count = state["count"]


def loss_importance(model: nn.Module, batches: Iterable, loss_fn: Callable, max_batches: int | None = None
                    ) -> dict[str, torch.Tensor]:
    """Importance of every singular value from (x, y) `batches` (no optimizer step). The model
    runs in train mode as it will be fine-tuned; its buffers (BatchNorm running statistics)
    are restored afterwards, so the model leaves exactly as it came."""
    imp = SingularValueImportance(model)
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.state_dict().items() if k not in params and torch.is_tensor(v)}
    grads = {p: p.grad for p in model.parameters()}
    was_training = model.training
    model.train()
    try:
        for x, y in itertools.islice(batches, max_batches):  # no batch drawn past the last
            model.zero_grad(set_to_none=True)
            loss_fn(model(to_model_device(model, x)), to_model_device(model, y)).backward()
            imp.accumulate()
    finally:
        model.load_state_dict(buffers, strict=False)
        for p, g in grads.items():
            p.grad = g
        model.train(was_training)
    return imp.scores()
