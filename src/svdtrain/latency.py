"""Pruning to a latency budget: ranks allocated by measured time on this device.

For each SVD layer, on the input sizes its plan recorded, the time of its dense form and of
its factor pair at a grid of ranks (linear in between) is measured; the rest of the model
costs the dense model's measured time minus its SVD layers' dense times (LatencyTable). The
allocation is the MACs budget's (allocation.py) over this table; each layer is then pinned to the form that
was faster at its rank, so export ships what was timed. Layers with a pinned form keep it
and count as they run in the dense model.

    svdtrain.prune(model, latency_budget=0.6, example_inputs=(x,))   # 60% of the dense model's time
    svdtrain.BudgetController(model, reg, target_latency=0.6, ...)   # steered in training toward it
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


def own_rng(p: torch.Tensor):
    """A random stream of the timing's own (on `p`'s device): the caller's is left as it was."""
    return torch.random.fork_rng(devices=[p.device.index or 0] if p.is_cuda else [])


def dense_export(model: nn.Module, inputs: tuple) -> nn.Module:
    """The model exported with every SVD layer in its dense form (the baseline latency is taken of)."""
    from .export import export
    dense = copy.deepcopy(unwrap(model))
    for _, layer in svd_layers(dense):
        layer.set_form("dense")
    return export(dense, example_inputs=inputs).eval()


def measured_latency_ratio(model: nn.Module, compact: nn.Module, input_shape, reps: int = 9) -> float:
    """Wall time of `compact` (the export of `model`) over that of `model` exported with every
    SVD layer dense, on zeros of `input_shape` here: the median of interleaved single runs."""
    p = next(model.parameters())
    x = torch.zeros(tuple(input_shape), device=p.device, dtype=p.dtype)
    dense = dense_export(model, (x,))
    ratios = []
    with torch.inference_mode():
        compact(x), dense(x)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            compact(x)
            t1 = time.perf_counter()
            dense(x)
            ratios.append((t1 - t0) / (time.perf_counter() - t1))
    return statistics.median(ratios)


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
    g = torch.Generator(device=p.device).manual_seed(0)  # inputs without touching the caller's random stream

    def run(module):
        return sum(timer(module, (torch.randn(s, device=p.device, dtype=p.dtype, generator=g),)) for s in shapes)
    return run(_at_rank(layer, top, "dense")), {k: run(_at_rank(layer, k, "factored")) for k in grid}


def _interpolate(points: dict[int, float], k: int) -> float:
    ks = sorted(points)
    k = min(max(k, ks[0]), ks[-1])  # below the grid's lowest rank: its time (rank rounding keeps k there)
    lo = max(r for r in ks if r <= k)
    hi = min(r for r in ks if r >= k)
    return points[lo] if lo == hi else points[lo] + (points[hi] - points[lo]) * (k - lo) / (hi - lo)


class LatencyTable:
    """What each free SVD layer costs on this device, measured once: its dense form's time and
    its factor pair's at a grid of ranks (linear in between), over the calls its plan recorded;
    the rest of the model costs the dense model's measured time minus those layers' dense times.
    The cost table of `prune(latency_budget=...)` and `BudgetController(target_latency=...)`.
    Layers whose form is pinned when it is built (by the user; not by an earlier table's
    pin_forms), or whose `.weight` other code reads (they ship dense), count as they run, in the
    fixed part."""

    def __init__(self, model: nn.Module, input_shape=None, example_inputs=None, round_to: int = 1,
                 timer: Callable = wall_time):
        inputs = as_inputs(model, input_shape, example_inputs)
        profile(model, example_inputs=inputs)  # each plan records its calls' input sizes
        self.names = {id(m): n for n, m in svd_layers(model)}
        # free: not pinned, called, and no code outside reads its .weight (such a layer ships dense)
        self.layers = {id(m): m for _, m in svd_layers(model)
                       if (m.plan.form == "auto" or m.plan.timed) and m.plan.calls and not m.plan.reads_weight}
        p = next(model.parameters())
        # Building the timed layers draws their (discarded) initial weights: the caller's random
        # stream is left as it was, so a training run does not depend on whether it was timed.
        with own_rng(p):
            self.times = {key: layer_times(layer, timer, round_to) for key, layer in self.layers.items()}
            self.dense_seconds = timer(dense_export(model, inputs), inputs)
        self.fixed = max(0.0, self.dense_seconds - sum(d for d, _ in self.times.values()))
        self.inputs, self.timer, self.round_to = inputs, timer, round_to

    def cost(self, key: int, k: int) -> float:
        """Seconds of layer `key` as shipped at rank k: the faster of its pair and its dense form."""
        d, pairs = self.times[key]
        return min(d, _interpolate(pairs, k))

    def factored_is_faster(self, key: int, k: int) -> bool:
        d, pairs = self.times[key]
        return _interpolate(pairs, k) < d

    def pin_forms(self) -> None:
        """Pin each layer to the form that is faster at its active rank (what export then ships)."""
        for key, layer in self.layers.items():
            layer.set_form("factored" if self.factored_is_faster(key, layer.rank) else "dense")
            layer.plan.timed = True

    def fraction(self, ranks: dict[int, int]) -> float:
        """Predicted time at these ranks ({key: rank}) as a fraction of the dense model's."""
        return (self.fixed + sum(self.cost(key, ranks[key]) for key in self.layers)) / self.dense_seconds

    def now(self) -> float:
        """The fraction at the layers' active ranks."""
        return self.fraction({key: layer.rank for key, layer in self.layers.items()})

    def at_energy(self, keep_energy: float) -> float:
        """The fraction if every layer were pruned now at keep_energy, ranks rounded up to
        multiples of round_to as prune does (what the budget controller steers)."""
        from .prune import energy_rank, round_rank
        return self.fraction({key: round_rank(energy_rank(layer.s.detach()[layer.active], keep_energy),
                                              self.round_to, layer.rank) for key, layer in self.layers.items()})

    def measure(self, model: nn.Module, rank: dict[int, int]) -> float:
        """The measured time of `model` shipped at these ranks (each layer in its faster form; a
        copy is cut, not the model), as a fraction of the dense time: the table sums layers timed
        alone, which the whole model need not match."""
        from .export import export
        from .prune import _keep_top
        trial = copy.deepcopy(model)
        layers = dict(svd_layers(trial))
        p = next(model.parameters())
        with own_rng(p):
            for key, k in rank.items():
                layer = layers[self.names[key]]
                _keep_top(layer, k)  # the time depends on the rank, not on which values
                layer.set_form("factored" if self.factored_is_faster(key, k) else "dense")
            return self.timer(export(unwrap(trial), example_inputs=self.inputs), self.inputs) / self.dense_seconds

    def floor(self) -> float:
        """The fraction at the lowest rank in every layer (1, or round_to where ranks are its
        multiples): no latency budget below it can be met."""
        return self.fraction({key: min(self.round_to, layer.full_rank) for key, layer in self.layers.items()})


def prune_to_latency(model: nn.Module, budget: float, input_shape=None, example_inputs=None, importance=None,
                     round_to: int = 1, timer: Callable = wall_time, table: LatencyTable | None = None,
                     pin: bool = True, refine: int = 3) -> dict[str, float]:
    """Cut ranks so the model's time is budget x the dense model's (the table's prediction <= it), measured with
    `timer(module, inputs) -> seconds` (default: median wall time here), or read from `table`
    (a LatencyTable of this model, measured once: the budget controller cuts many times). The
    table's prediction is then checked on the whole model shipped at the chosen ranks (a cut
    copy), up to `refine` times: while the measured fraction is more than 5% from the budget and
    the table mispredicts it, the allocation's target is moved (first by the table's error,
    budget x predicted / measured, then by the secant through the nearest measurements on either
    side of the budget) and the ranks chosen again; of the measured allocations, the one nearest
    the budget without exceeding it by more than 5% is kept. With
    `pin`, each layer is then pinned to the form that is faster at its new rank.
    Returns the dense time, the time the table predicts, the fixed part (seconds), and the
    measured fraction of what was kept (None with refine=0)."""
    from .prune import _importance, _keep_top
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"latency_budget must be in (0, 1], got {budget!r}")
    table = table or LatencyTable(model, input_shape, example_inputs, round_to, timer)
    floor = table.floor()
    if budget < floor:
        raise ValueError(f"latency_budget {budget:g} is below what rank {round_to} everywhere reaches "
                         f"({floor:.3f} of the dense model's time)")
    importance = _importance(model, importance)
    def ranks_at(target):
        return allocate(table.layers, table.names, importance, table.cost, table.fixed, target * table.dense_seconds,
                        round_to)
    rank, target, tried = ranks_at(budget), budget, []  # tried: (target, measured, ranks)
    for step in range(refine):
        measured, predicted = table.measure(model, rank), table.fraction(rank)
        tried.append((target, measured, rank))
        if abs(measured - budget) <= 0.05 * budget or abs(measured / predicted - 1) <= 0.01 or step == refine - 1:
            break  # on budget, or the table is right (what is left is the ranks' granularity), or out of tries
        below = [(t, m) for t, m, _ in tried if m < budget]
        above = [(t, m) for t, m, _ in tried if m > budget]
        if below and above:  # the secant between the nearest measurements on either side
            (t0, m0), (t1, m1) = max(below, key=lambda q: q[1]), min(above, key=lambda q: q[1])
            target = t0 + (budget - m0) * (t1 - t0) / (m1 - m0)
        else:  # the table's error taken out of its target
            target = min(1.0, budget * predicted / measured)
        rank = ranks_at(target)
    measured = None
    if tried:  # the nearest to the budget among those at most 5% over it, else the fastest
        fits = [q for q in tried if q[1] <= 1.05 * budget]
        _, measured, rank = min(fits, key=lambda q: abs(q[1] - budget)) if fits else min(tried, key=lambda q: q[1])
    for key, layer in table.layers.items():
        _keep_top(layer, rank[key], None if isinstance(importance, EnergyShare) else importance(table.names[key], layer))
    if pin:
        table.pin_forms()
    return {"dense_seconds": table.dense_seconds, "predicted_seconds": table.fraction(rank) * table.dense_seconds,
            "fixed_seconds": table.fixed, "measured_fraction": measured}
