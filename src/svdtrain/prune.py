"""Singular-value pruning: by an energy threshold per layer, or to a whole-model MACs budget."""
from __future__ import annotations

import numbers

import torch
from torch import nn

from .layers import SVDLayer, svd_layers
from .allocation import allocate
from .importance import EnergyShare
from .macs import LayerCost, profile


def round_rank(k: int, round_to: int, limit: int) -> int:
    """k rounded up to a multiple of round_to, at most `limit` (the layer's rank)."""
    return min(limit, -(-k // round_to) * round_to)


def energy_rank(s: torch.Tensor, keep_energy: float) -> int:
    """Smallest k such that the k largest s_i^2 hold >= keep_energy of sum s_i^2 (k >= 1, or 0
    for no values)."""
    e = s.detach().double().pow(2).sort(descending=True).values
    if e.numel() == 0:
        return 0  # a layer with no active value keeps none
    if keep_energy >= 1.0:
        # Exactly all the energy: every nonzero value (float cumsums may stall before).
        return max(1, int((e > 0).sum()))
    cum = e.cumsum(0)
    total = cum[-1]
    if total <= 0:
        return 1  # all zero: one (zero) value keeps the layer exportable; it adds nothing
    # A relative 1e-12 below the threshold: a cumulative sum that reaches it exactly in exact
    # arithmetic (equal values, keep_energy j/n) is not pushed one value further by rounding.
    k = int((cum < keep_energy * total * (1 - 1e-12)).sum()) + 1
    return min(k, e.numel())


def _keep_top(layer: SVDLayer, k: int, score: torch.Tensor | None = None) -> None:
    """Keep the k active values of largest magnitude, or of largest `score` (ties: lower index first)."""
    # in float64: scores in a half-precision layer's dtype would round to ties or underflow to 0
    key = layer.s.detach().double().abs() if score is None else score.to(layer.s.device, torch.float64)
    mag = torch.where(layer.active, key, torch.full_like(key, -1.0))
    order = torch.sort(mag, descending=True, stable=True).indices
    mask = torch.zeros_like(layer.active)
    mask[order[:k]] = True
    layer.set_active(mask)


def prune(model: nn.Module, keep_energy: float | None = None, *, macs_budget: float | None = None,
          input_shape=None, optimizer: torch.optim.Optimizer | None = None, example_inputs=None,
          scores=None, round_to: int = 1, latency_budget: float | None = None, timer=None) -> dict[str, int]:
    """Prune singular values of every SVD layer; returns {qualified_name: rank}.

    keep_energy: per layer, keep the fewest largest values whose squares hold at least this
        fraction of the layer's energy (the paper's rule; the reference's -e is 1 - keep_energy).
    macs_budget: instead, bring the whole model's deploy MACs to <= this fraction of its
        dense MACs (needs `input_shape`, or `example_inputs` for models that take token ids or
        several inputs: a tensor or tuple passed to the model as is). Rule: a layer at rank k
        loses the importance of the values it drops (by default each value's energy share,
        s_i^2 / sum_j s_j^2 of its layer) and costs its deploy MACs over every call (the
        plan's rule: the factor pair, or the dense layer where that is cheaper, as `export`
        builds it). The total importance lost is kept low under the budget greedily over each
        layer's lower convex hull of (MACs, importance lost), not solved exactly (a brute force
        over small cases sometimes finds a better integer allocation): hull segments are taken cheapest
        first (least importance per MAC saved, never a layer's last value) until the budget
        holds, then values are given back, most importance per MAC first, while it still
        holds. The hull lets a layer above its crossover (dense: one value saves nothing) go
        straight to the rank where cutting pays, scored by the whole step; a layer never taken
        below its crossover keeps all its values.
    latency_budget: instead, bring the model's time on this device to <= this fraction of the
        dense model's: the same allocation over measured per-layer times (latency.py; `timer`
        replaces the wall clock); each layer is pinned to the form that was faster at its rank.
    scores: with macs_budget or latency_budget, the importance of each value instead of its energy share: an
        importance object called as `scores(name, layer)` (`EnergyShare`,
        `SingularValueImportance` filled in your loop, or your own), or a dict {layer name: one
        non-negative score per singular value} (e.g. `loss_importance`). Scores are compared
        across layers as they are; each layer keeps its highest-scored values.
    round_to: ranks are multiples of this (or a layer's full active rank): a constraint of the
        allocation (and of keep_energy's ranks, rounded up), for kernels that prefer such sizes.
    Pruned values are masked and zeroed: they no longer affect output, losses or training.
    optimizer: an optimizer you keep training with; its per-parameter state (momentum, Adam's
        moments) is zeroed at the pruned entries, so pruned values stay exactly zero.
    Calling prune again prunes again: keep_energy applies to what is still active, so each
    call can remove more; a macs_budget the model already meets removes nothing.
    """
    if sum(x is not None for x in (keep_energy, macs_budget, latency_budget)) != 1:
        raise ValueError("give exactly one of keep_energy, macs_budget or latency_budget")
    if scores is not None and keep_energy is not None:
        raise ValueError("scores rank singular values under a macs_budget or latency_budget only")
    if not (isinstance(round_to, int) and round_to >= 1):
        raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
    layers = list(svd_layers(model))
    if not layers:
        raise ValueError("the model has no SVD layers (decompose(model) first; it replaces plain Conv2d/Linear layers only)")
    if keep_energy is not None:
        if not (isinstance(keep_energy, (int, float)) and 0.0 < keep_energy <= 1.0):
            raise ValueError(f"keep_energy must be in (0, 1], got {keep_energy!r}")
        for _, layer in layers:
            active_s = layer.s.detach()[layer.active]
            k = energy_rank(active_s, float(keep_energy))
            _keep_top(layer, round_rank(k, round_to, layer.rank))
    elif latency_budget is not None:
        from .latency import prune_to_latency, wall_time
        prune_to_latency(model, float(latency_budget), input_shape, example_inputs, scores, round_to, timer or wall_time)
    else:
        _prune_to_budget(model, float(macs_budget), input_shape, example_inputs, _importance(model, scores), round_to)
    if optimizer is not None:
        clear_pruned_state(model, optimizer)
    return ranks(model)


def clear_pruned_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Zero the optimizer state (momentum buffers, Adam moments) of pruned singular values and
    of their U/V columns, and the pruned values themselves: a kept optimizer's momentum would
    otherwise move them away from zero."""
    for _, layer in svd_layers(model):
        dead = ~layer.active
        if not bool(dead.any()):
            continue
        with torch.no_grad():
            layer.s[dead] = 0.0
            for param, index in ((layer.s, (dead,)), (layer.U, (slice(None), dead)), (layer.V, (slice(None), dead))):
                zero_state(optimizer, param, index)


def zero_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, index=(...,)) -> None:
    """Zero `param`'s optimizer state (momentum buffers, Adam moments) at `index` (default all)."""
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value[index] = 0.0


def _importance(model: nn.Module, scores):
    """The budget rule's importance as one callable (name, layer) -> per-value scores: energy
    shares by default, an importance object as it is, a dict checked against the model."""
    if scores is None:
        return EnergyShare()
    if isinstance(scores, EnergyShare):
        return scores
    if callable(scores) and not isinstance(scores, dict):  # checked as each layer is scored
        return lambda name, layer: _checked(name, layer, scores(name, layer))
    layers = dict(svd_layers(model))
    if set(scores) != set(layers):
        missing, extra = sorted(set(layers) - set(scores)), sorted(set(scores) - set(layers))
        raise ValueError(f"scores must name every SVD layer: missing {missing[:3]}, unknown {extra[:3]}")
    checked = {name: _checked(name, layer, scores[name]) for name, layer in layers.items()}
    return lambda name, layer: checked[name]


def _checked(name: str, layer: SVDLayer, score) -> torch.Tensor:
    """A layer's scores: one finite value >= 0 per singular value (pruned ones are marked below 0)."""
    score = torch.as_tensor(score).detach().double().cpu()
    if score.shape != layer.s.shape or bool((score < 0).any()) or not bool(torch.isfinite(score).all()):
        raise ValueError(f"scores['{name}'] must hold {layer.s.numel()} finite values >= 0")
    return score


def rank_floor(records: list[LayerCost], round_to: int = 1) -> tuple[int, int]:
    """(deploy MACs at the lowest rank in every SVD layer, dense MACs) of a profiled pass: no
    budget below floor / dense can be met by pruning singular values. The lowest rank is 1, or
    `round_to` where ranks are its multiples (a layer's full rank if smaller)."""
    layers = {id(r.module): r.module for r in records if isinstance(r.module, SVDLayer)}
    fixed = sum(r.macs() for r in records if not isinstance(r.module, SVDLayer))
    return (fixed + sum(layer.plan.macs(min(round_to, layer.full_rank)) for layer in layers.values()),
            sum(r.macs("dense") for r in records))


def _prune_to_budget(model: nn.Module, budget: float, input_shape, example_inputs, importance,
                     round_to: int = 1) -> dict[str, int]:
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"macs_budget must be in (0, 1], got {budget!r}")
    if input_shape is None and example_inputs is None:
        raise ValueError("macs_budget needs input_shape, e.g. (1, 3, 32, 32), or example_inputs")
    records = profile(model, input_shape, example_inputs)  # records each layer's calls in its plan
    floor, dense_total = rank_floor(records, round_to)
    target = budget * dense_total
    if floor > target:
        reads = sum(1 for _, m in svd_layers(model) if m.plan.reads_weight)
        why = f"; {reads} SVD layers ship dense since other code reads their .weight" if reads else ""
        raise ValueError(f"macs_budget {budget:g} is below what rank {round_to} everywhere reaches "
                         f"({floor / dense_total:.3f} of dense MACs{why})")
    names = {id(m): n for n, m in svd_layers(model)}
    svd: dict[int, SVDLayer] = {}  # the layers whose rank is free, in call order
    for r in records:
        if isinstance(r.module, SVDLayer) and r.module.plan.form != "dense":  # "dense" plans: fixed cost
            svd.setdefault(id(r.module), r.module)
    fixed = sum(r.macs() for r in records if id(r.module) not in svd)
    rank = allocate(svd, names, importance, lambda key, k: svd[key].plan.macs(k), fixed, target, round_to)
    for key, layer in svd.items():
        _keep_top(layer, rank[key], None if isinstance(importance, EnergyShare) else importance(names[key], layer))
    return ranks(model)


def ranks(model: nn.Module) -> dict[str, int]:
    """{qualified_name: active rank} of every SVD layer."""
    return {name: layer.rank for name, layer in svd_layers(model)}


def set_ranks(model: nn.Module, rank_config: dict[str, int], scores=None) -> dict[str, int]:
    """Cut each named layer to its rank in `rank_config` ({layer name: rank}, e.g. another run's
    ranks.json), keeping its largest active values, or its highest-scored ones with `scores`
    (as in `prune`); layers not named are left as they are. Every entry is checked before any
    layer is cut (pruned values were zeroed: a rank above the current one cannot be reached).
    Returns the model's ranks."""
    check_rank_config(model, rank_config)
    layers = dict(svd_layers(model))
    importance = None if scores is None else _importance(model, scores)
    for name, k in rank_config.items():
        _keep_top(layers[name], int(k), None if importance is None else importance(name, layers[name]))
    return ranks(model)


def check_rank_config(model: nn.Module, rank_config) -> None:
    """The errors `set_ranks` would raise, as one-line ValueErrors, without cutting anything."""
    if not isinstance(rank_config, dict):
        raise ValueError(f"a rank config is a {{layer name: rank}} mapping, not a {type(rank_config).__name__}")
    if not rank_config:
        raise ValueError("the rank config is empty: it names no layer to cut")
    layers = dict(svd_layers(model))
    unknown = sorted(set(rank_config) - set(layers))
    if unknown:
        raise ValueError(f"rank config names layers the model lacks ({len(unknown)}), e.g. {unknown[0]!r}; "
                         f"names as svdtrain.ranks(model) gives them")
    for name, k in rank_config.items():
        if not (isinstance(k, numbers.Integral) and not isinstance(k, bool) and 1 <= k <= layers[name].rank):
            raise ValueError(f"rank {k!r} for {name} is not an integer in 1..{layers[name].rank} (its current rank)")
