"""Pruning to a latency budget: ranks allocated by measured time on this device.

For each SVD layer, on the input sizes its plan recorded, the time of its dense form and of
its factor pair at a grid of ranks (linear in between) is measured; the rest of the model
costs the dense model's measured time minus its SVD layers' dense times. The allocation is
the MACs budget's (allocation.py) over this table; each layer is then pinned to the form that
was faster at its rank, so export ships what was timed. Layers with a pinned form keep it
and count as they run in the dense model.

    svdtrain.prune(model, latency_budget=0.6, example_inputs=(x,))   # 60% of the dense model's time
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import torch
from torch import nn

from .allocation import allocate
from .importance import EnergyShare
from .layers import SVDLayer, svd_layers, unwrap
from .macs import as_inputs, profile

GRID = 8  # ranks timed per layer, besides its full rank


def wall_time(module: nn.Module, inputs: tuple, reps: int = 7) -> float:
    """Median seconds of module(*inputs) (inference mode, after one warm-up run)."""
    times = []
    with torch.inference_mode():
        module(*inputs)
        for _ in range(reps):
            t0 = time.perf_counter()
            module(*inputs)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _at_rank(layer: SVDLayer, k: int, form: str) -> nn.Module:
    """The layer's exported form at its top-k values (timing needs shapes, not values)."""
    trial = copy.deepcopy(layer)
    trial.set_active(torch.arange(trial.full_rank, device=trial.active.device) < k)
    return (trial.factor_layers() if form == "factored" else trial.dense_layer()).eval()


def layer_times(layer: SVDLayer, timer: Callable, round_to: int = 1) -> tuple[float, dict[int, float]]:
    """(dense time, {rank: pair time}) over the layer's recorded calls, at a grid of allowed ranks."""
    top = layer.rank
    allowed = [k for k in range(1, top + 1) if k == top or k % round_to == 0]
    grid = sorted({allowed[round(i * (len(allowed) - 1) / GRID)] for i in range(GRID + 1)})
    shapes = [c.shape for c in layer.plan.calls]
    p = layer.U

    def run(module):
        return sum(timer(module, (torch.randn(s, device=p.device, dtype=p.dtype),)) for s in shapes)
    return run(_at_rank(layer, top, "dense")), {k: run(_at_rank(layer, k, "factored")) for k in grid}


def _interpolate(points: dict[int, float], k: int) -> float:
    ks = sorted(points)
    lo = max(r for r in ks if r <= k)
    hi = min(r for r in ks if r >= k)
    return points[lo] if lo == hi else points[lo] + (points[hi] - points[lo]) * (k - lo) / (hi - lo)


def prune_to_latency(model: nn.Module, budget: float, input_shape=None, example_inputs=None, importance=None,
                     round_to: int = 1, timer: Callable = wall_time) -> dict[str, float]:
    """Cut ranks so the model's predicted time is <= budget x the dense model's, measured with
    `timer(module, inputs) -> seconds` (default: median wall time here). Returns the measured
    dense time, the time the table predicts, and the fixed part (seconds)."""
    from .export import export
    from .prune import _importance, _keep_top
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"latency_budget must be in (0, 1], got {budget!r}")
    inputs = as_inputs(model, input_shape, example_inputs)
    profile(model, example_inputs=inputs)  # each plan records its calls' input sizes
    names = {id(m): n for n, m in svd_layers(model)}
    layers = {id(m): m for _, m in svd_layers(model) if m.plan.form == "auto" and m.plan.calls}
    table = {key: layer_times(layer, timer, round_to) for key, layer in layers.items()}
    dense = copy.deepcopy(unwrap(model))
    for _, layer in svd_layers(dense):
        layer.set_form("dense")
    total = timer(export(dense, example_inputs=inputs), inputs)
    fixed = max(0.0, total - sum(d for d, _ in table.values()))

    def cost(key: int, k: int) -> float:
        d, pairs = table[key]
        return min(d, _interpolate(pairs, k))
    importance = _importance(model, importance)
    rank = allocate(layers, names, importance, cost, fixed, budget * total, round_to)
    for key, layer in layers.items():
        _keep_top(layer, rank[key], None if isinstance(importance, EnergyShare) else importance(names[key], layer))
        d, pairs = table[key]
        layer.set_form("factored" if _interpolate(pairs, rank[key]) < d else "dense")
    return {"dense_seconds": total, "predicted_seconds": fixed + sum(cost(k, rank[k]) for k in layers),
            "fixed_seconds": fixed}
