"""BatchNorm recalibration after a cut: the running statistics of the uncut model no longer
describe the activations of the cut one, so they are re-estimated on a few batches.

    svdtrain.prune(model, macs_budget=0.33, input_shape=(1, 3, 32, 32))
    svdtrain.recalibrate_batchnorm(model, (x for x, _ in train_loader), max_batches=16)
"""
from __future__ import annotations

import itertools
from typing import Iterable

import torch
from torch import nn


def run_batch(model: nn.Module, batch):
    """Call `model` on one batch: a tensor, an (x, y, ...) tuple or list (x is passed), or a dict
    of keyword arguments (Hugging Face style); tensors are moved to the model's device."""
    if isinstance(batch, dict):
        return model(**to_model_device(model, batch))
    return model(to_model_device(model, batch[0] if isinstance(batch, (tuple, list)) else batch))


def to_model_device(model: nn.Module, obj):
    """`obj` with its tensors (also inside dicts, tuples and lists) on the model's device."""
    param = next(model.parameters(), None)
    return obj if param is None else _to(obj, param.device)


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def recalibrate_batchnorm(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> int:
    """Re-estimate every BatchNorm's running mean and variance from `batches` (inputs, (inputs,
    targets) pairs or dicts of keyword arguments, moved to the model's device) as the plain
    average over the batches of their statistics, with the model as it is now: no gradient, no
    weight changes, every module's mode and each BatchNorm's momentum restored afterwards. Returns the number of batches used (0: nothing
    changed, e.g. a model without BatchNorm)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    saved = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms}
    used = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
            m.train()
        with torch.no_grad():
            for batch in itertools.islice(batches, max_batches):  # no batch drawn past the last
                run_batch(model, batch)
                used += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
        if used == 0:  # nothing seen: keep what the model had
            for m, (mean, var, count) in saved.items():
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
    return used
