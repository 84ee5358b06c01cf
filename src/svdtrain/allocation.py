"""The rank allocation under a budget: which ranks lose the least importance for what they
cost. One rule for every cost table (MACs from the plans, measured latency): per layer, the
lower convex hull of (cost, importance lost) over its allowed ranks; hull segments taken
cheapest first until the budget holds, then values given back while it still holds."""
from __future__ import annotations

import heapq
from typing import Callable


def allocate(layers: dict, names: dict, importance, cost: Callable[[int, int], float], fixed: float,
             target: float, round_to: int = 1) -> dict[int, int]:
    """{key: rank} for `layers` ({key: SVD layer}, in call order) such that
    fixed + sum cost(key, rank) <= target where reachable. importance(name, layer) scores each
    value; cost(key, k) is what the layer costs as shipped at rank k (a layer is cut only where
    its cost falls below its full rank's); ranks are multiples of `round_to` or a layer's full rank."""
    rank = {key: layer.rank for key, layer in layers.items()}
    full = dict(rank)
    shares = {}  # per layer: what each active value is worth, smallest first (the removal order)
    for key, layer in layers.items():
        score = importance(names[key], layer).detach().double().cpu()
        shares[key] = score[layer.active.cpu()].sort().values.tolist()
    hulls = {key: _hull(shares[key], lambda k, key=key: cost(key, k),
                        lambda k, top=full[key]: k == top or k % round_to == 0) for key in layers}
    order = {key: i for i, key in enumerate(layers)}  # ties break by layer order, not by id()

    def push(heap, key, i):  # the layer's next hull segment, scored by importance lost per cost saved
        hull = hulls[key]
        if i + 1 < len(hull):
            (_, c0, l0), (_, c1, l1) = hull[i], hull[i + 1]
            heapq.heappush(heap, ((l1 - l0) / (c0 - c1), order[key], key, i + 1))

    heap = []
    for key in layers:
        push(heap, key, 0)
    current = fixed + sum(cost(key, rank[key]) for key in layers)
    while current > target and heap:
        _, _, key, i = heapq.heappop(heap)
        new = hulls[key][i][0]
        current -= cost(key, rank[key]) - cost(key, new)
        rank[key] = new
        push(heap, key, i)
    # The last segment may overshoot the budget: give back the most importance per cost that fits.
    while True:
        best = None
        for key in layers:
            k, top = rank[key], full[key]
            if k >= top:
                continue
            back = min(top, k + round_to - k % round_to)
            back = back if cost(key, back) < cost(key, top) else top  # a cut that no longer pays: all back
            added = cost(key, back) - cost(key, k)
            gained = sum(shares[key][top - back: top - k])
            if added <= target - current and (best is None or gained * best[0] > best[1] * added):
                best = (added, gained, key, back)
        if best is None:
            break
        current += best[0]
        rank[best[2]] = best[3]
    return rank


def _hull(shares: list[float], cost, allowed=lambda k: True) -> list[tuple[int, int, float]]:
    """The ranks worth stopping at in one layer: the lower convex hull of (cost, importance
    lost) over the allowed k = K..1, as (k, cost(k), lost(k)) from k = K down, so
    that its segments lose ever more per unit of cost saved. `shares`: the K active values' scores,
    ascending."""
    top = len(shares)
    hull, lost = [(top, cost(top), 0.0)], 0.0
    for k in range(top - 1, 0, -1):
        lost += shares[top - k - 1]
        if not allowed(k):
            continue
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
