"""Singular-value pruning: by an energy threshold per layer, or to a whole-model MACs budget."""
from __future__ import annotations

import heapq

import torch
from torch import nn

from .layers import SVDLayer, svd_layers
from .macs import LayerCost, profile


def energy_rank(s: torch.Tensor, keep_energy: float) -> int:
    """Smallest k such that the k largest s_i^2 hold >= keep_energy of sum s_i^2 (k >= 1)."""
    e = s.detach().double().pow(2).sort(descending=True).values
    if keep_energy >= 1.0:
        # Exactly all the energy: every nonzero value (float cumsums may stall before).
        return max(1, int((e > 0).sum()))
    cum = e.cumsum(0)
    total = cum[-1]
    if total <= 0:
        return 1  # all zero: one (zero) value keeps the layer exportable; it adds nothing
    k = int((cum < keep_energy * total).sum()) + 1
    return min(k, e.numel())


def _keep_top(layer: SVDLayer, k: int, score: torch.Tensor | None = None) -> None:
    """Keep the k active values of largest magnitude, or of largest `score` (ties: lower index first)."""
    key = layer.s.detach().abs() if score is None else score.to(layer.s.device, layer.s.dtype)
    mag = torch.where(layer.active, key, torch.full_like(layer.s, -1.0))
    order = torch.sort(mag, descending=True, stable=True).indices
    mask = torch.zeros_like(layer.active)
    mask[order[:k]] = True
    layer.set_active(mask)


def prune(model: nn.Module, keep_energy: float | None = None, *, macs_budget: float | None = None,
          input_shape=None, optimizer: torch.optim.Optimizer | None = None, example_inputs=None,
          scores: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Prune singular values of every SVD layer; returns {qualified_name: rank}.

    keep_energy: per layer, keep the fewest largest values whose squares hold at least this
        fraction of the layer's energy (the paper's rule; the reference's -e is 1 - keep_energy).
    macs_budget: instead, bring the whole model's deploy MACs to <= this fraction of its
        dense MACs (needs `input_shape`, or `example_inputs` for models that take token ids or
        several inputs: a tensor or tuple passed to the model as is). Rule: a layer at rank k
        loses the energy share of the values it drops (sum of s_i^2 / sum_j s_j^2 over them)
        and costs its deploy MACs: the factor pair, or the dense layer where that is cheaper
        (as `export` builds it). The total share lost is minimised under the budget over each
        layer's lower convex hull of (MACs, share lost): hull segments are taken cheapest
        first (least energy per MAC saved, never a layer's last value) until the budget holds,
        then single values are given back, most energy per MAC first, while it still holds.
        The hull lets a layer above its crossover (dense: one value saves nothing) go straight
        to the rank where cutting pays, scored by the whole step; a layer never taken below
        its crossover keeps all its values.
    scores: with macs_budget, {layer name: one non-negative importance per singular value}
        (e.g. `loss_importance`) replaces the energy shares: the same rule then minimises the
        total importance lost, compared across layers as is, and each layer keeps its
        highest-scored values.
    Pruned values are masked and zeroed: they no longer affect output, losses or training.
    optimizer: an optimizer you keep training with; its per-parameter state (momentum, Adam's
        moments) is zeroed at the pruned entries, so pruned values stay exactly zero.
    Calling prune again prunes again: keep_energy applies to what is still active, so each
    call can remove more; a macs_budget the model already meets removes nothing.
    """
    if (keep_energy is None) == (macs_budget is None):
        raise ValueError("give exactly one of keep_energy or macs_budget")
    if scores is not None and macs_budget is None:
        raise ValueError("scores rank singular values under a macs_budget only")
    layers = list(svd_layers(model))
    if not layers:
        raise ValueError("the model has no SVD layers (decompose(model) first; it replaces plain Conv2d/Linear layers only)")
    if keep_energy is not None:
        if not (isinstance(keep_energy, (int, float)) and 0.0 < keep_energy <= 1.0):
            raise ValueError(f"keep_energy must be in (0, 1], got {keep_energy!r}")
        for _, layer in layers:
            active_s = layer.s.detach()[layer.active]
            _keep_top(layer, energy_rank(active_s, float(keep_energy)))
    else:
        _prune_to_budget(model, float(macs_budget), input_shape, example_inputs, _by_layer(model, scores))
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
                for value in optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value[index] = 0.0


def _by_layer(model: nn.Module, scores: dict[str, torch.Tensor] | None) -> dict[int, torch.Tensor] | None:
    """{id(layer): its scores}, checked against the model's SVD layers."""
    if scores is None:
        return None
    layers = dict(svd_layers(model))
    if set(scores) != set(layers):
        missing, extra = sorted(set(layers) - set(scores)), sorted(set(scores) - set(layers))
        raise ValueError(f"scores must name every SVD layer: missing {missing[:3]}, unknown {extra[:3]}")
    out = {}
    for name, layer in layers.items():
        score = torch.as_tensor(scores[name]).detach().double().cpu()
        if score.shape != layer.s.shape or bool((score < 0).any()) or not bool(torch.isfinite(score).all()):
            raise ValueError(f"scores['{name}'] must hold {layer.s.numel()} finite values >= 0")
        out[id(layer)] = score
    return out


def _prune_to_budget(model: nn.Module, budget: float, input_shape, example_inputs=None,
                     scores: dict[int, torch.Tensor] | None = None) -> dict[str, int]:
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"macs_budget must be in (0, 1], got {budget!r}")
    if input_shape is None and example_inputs is None:
        raise ValueError("macs_budget needs input_shape, e.g. (1, 3, 32, 32), or example_inputs")
    records = profile(model, input_shape, example_inputs)
    dense_total = sum(r.macs("dense") for r in records)
    target = budget * dense_total
    svd: dict[int, LayerCost] = {}  # per layer, its costs summed over every call in the pass
    for r in records:
        if isinstance(r.module, SVDLayer) and r.module.plan.form != "dense":  # "dense" plans: fixed cost
            total_cost = svd.setdefault(id(r.module), LayerCost(r.name, r.module, 0, 0))
            total_cost.dense += r.dense
            total_cost.per_rank += r.per_rank
    rank = {key: r.module.rank for key, r in svd.items()}
    fixed = sum(r.macs() for r in records if id(r.module) not in svd)

    def cost(r: LayerCost, k: int) -> int:  # as the layer ships at rank k
        return r.per_rank * k if r.module.ships_factored(r.dense, r.per_rank * k) else r.dense

    def total() -> int:
        return fixed + sum(cost(r, rank[k]) for k, r in svd.items())

    floor = fixed + sum(cost(r, 1) for r in svd.values())
    if floor > target:
        raise ValueError(f"macs_budget {budget:g} is below what rank 1 everywhere reaches "
                         f"({floor / dense_total:.3f} of dense MACs)")
    # Per layer: what each active value is worth, smallest first (the removal order): its
    # energy share, or its given score.
    shares, full = {}, dict(rank)
    for key, r in svd.items():
        layer = r.module
        if scores is None:
            e = layer.s.detach().double()[layer.active].pow(2)
            shares[key] = (e / e.sum().clamp_min(1e-300)).sort().values.tolist()
        else:
            shares[key] = scores[key][layer.active.cpu()].sort().values.tolist()
    hulls = {key: _hull(shares[key], lambda k, r=r: cost(r, k)) for key, r in svd.items()}
    order = {key: i for i, key in enumerate(svd)}  # ties break by layer order, not by id()

    def push(heap, key, i):  # the layer's next hull segment, scored by energy lost per MAC saved
        hull = hulls[key]
        if i + 1 < len(hull):
            (_, c0, l0), (_, c1, l1) = hull[i], hull[i + 1]
            heapq.heappush(heap, ((l1 - l0) / (c0 - c1), order[key], key, i + 1))

    heap = []
    for key in svd:
        push(heap, key, 0)
    current = total()
    while current > target and heap:
        _, _, key, i = heapq.heappop(heap)
        r, new = svd[key], hulls[key][i][0]
        current -= cost(r, rank[key]) - cost(r, new)
        rank[key] = new
        push(heap, key, i)
    # The last segment may overshoot the budget: give back the most energy per MAC that fits.
    while True:
        best = None
        for key, r in svd.items():
            k, top = rank[key], full[key]
            if k >= top:
                continue
            back = k + 1 if r.module.ships_factored(r.dense, r.per_rank * (k + 1)) else top
            added = cost(r, back) - cost(r, k)
            gained = sum(shares[key][top - back: top - k])
            if added <= target - current and (best is None or gained * best[0] > best[1] * added):
                best = (added, gained, key, back)
        if best is None:
            break
        current += best[0]
        rank[best[2]] = best[3]
    for key, r in svd.items():
        _keep_top(r.module, rank[key], None if scores is None else scores[key])
    return ranks(model)


def _hull(shares: list[float], cost) -> list[tuple[int, int, float]]:
    """The ranks worth stopping at in one layer: the lower convex hull of (deploy MACs, energy
    share lost) over k = K..1, as (k, cost(k), lost(k)) from k = K down, so that its segments
    lose ever more energy per MAC saved. `shares`: the K active values' shares, ascending."""
    top = len(shares)
    hull, lost = [(top, cost(top), 0.0)], 0.0
    for k in range(top - 1, 0, -1):
        lost += shares[top - k - 1]
        c = cost(k)
        if c >= hull[-1][1]:
            continue  # saves nothing over a rank that loses less (a layer above its crossover)
        while len(hull) >= 2:
            (_, c0, l0), (_, c1, l1) = hull[-2], hull[-1]
            if (l1 - l0) * (c1 - c) < (lost - l1) * (c0 - c1):
                break
            hull.pop()  # hull[-1] lies on or above the line from hull[-2] to k
        hull.append((k, c, lost))
    return hull


def ranks(model: nn.Module) -> dict[str, int]:
    """{qualified_name: active rank} of every SVD layer."""
    return {name: layer.rank for name, layer in svd_layers(model)}


def set_ranks(model: nn.Module, rank_config: dict[str, int]) -> None:
    """Keep, in each named layer, its `rank` largest active singular values."""
    layers = dict(svd_layers(model))
    unknown = set(rank_config) - set(layers)
    if unknown:
        raise ValueError(f"rank config names layers the model lacks: {sorted(unknown)[:5]}")
    for name, k in rank_config.items():
        if not 1 <= int(k) <= layers[name].rank:
            # Pruned values were zeroed: they cannot come back.
            raise ValueError(f"rank {k} for {name} is outside 1..{layers[name].rank} (its current rank)")
        _keep_top(layers[name], int(k))
