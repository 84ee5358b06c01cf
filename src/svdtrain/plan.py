"""The plan of one SVD layer: what it runs, what it ships and what that costs.

A plan holds the layer's form, the rank and indices of its active singular values (a cache
of the layer's `active` mask, the one store of what was pruned), and the facts recorded by
the last profiled forward pass (`svdtrain.macs.profile`: decompose with example inputs,
prune, the budget controller, count_macs, export with shapes): the input size of every call
and whether other code read the layer's `.weight`. Every count, the budget allocation and
export read the one cost rule here, so they agree by construction, with or without input
sizes passed again. The form, the recorded calls and the weight reads are saved in the
layer's state (`get_extra_state`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

FORMS = ("auto", "dense", "factored")


@dataclass
class Call:
    """One recorded call of the layer: its input's shape and its MACs (batch included) as one
    dense layer and, per unit of rank, as the factor pair (the pair's cost is linear in rank)."""
    shape: tuple
    dense: int
    per_rank: int


@dataclass
class Plan:
    """What an SVD layer runs and ships.

    rank, idx: the number and indices (None when all are active) of active singular values,
        read from the mask once per change, so the forward never reads the mask.
    form: "auto" ships the factor pair where that costs fewer MACs than the dense layer over
        the recorded calls, else the dense layer; "dense" / "factored" always that form.
    rows, cols: the matrix view's shape (parameters of each form).
    unit: the cost of one call when no pass was recorded (one output position).
    calls: the calls of the last profiled pass. reads_weight: in that pass code outside the
        layer read its `.weight`, so its shipped form must keep one (it ships dense).
    masked: ranks are moving (gradual pruning): the forward runs at full width times the
        mask, so compiled graphs do not depend on the rank.
    timed: the form was pinned by a latency table (the faster at the rank), not by the user:
        a later table (a resumed run) times the layer again as a free one.
    """
    rank: int
    rows: int
    cols: int
    unit: Call
    idx: torch.Tensor | None = None
    form: str = "auto"
    calls: list[Call] = field(default_factory=list)
    reads_weight: bool = False
    masked: bool = False
    timed: bool = False

    def refresh(self, mask: torch.Tensor) -> None:
        """Read the mask into rank and idx."""
        if mask.is_meta:  # no values to read (a model built on the meta device): full until loaded
            self.rank, self.idx = mask.numel(), None
            return
        self.rank = int(mask.sum())
        self.idx = None if self.rank == mask.numel() else mask.nonzero().squeeze(1)

    def totals(self) -> tuple[int, int]:
        """(dense MACs, factored MACs per unit of rank) over the recorded calls (or `unit`)."""
        calls = self.calls or [self.unit]
        return sum(c.dense for c in calls), sum(c.per_rank for c in calls)

    def ships_factored(self, rank: int | None = None) -> bool:
        """The one deploy rule: whether the layer ships as its factor pair at `rank`."""
        k = self.rank if rank is None else rank
        if self.reads_weight or k == 0:  # other code reads its .weight / a pair of 0 channels cannot run
            return False
        if self.form != "auto":
            return self.form == "factored"
        dense, per_rank = self.totals()
        return per_rank * k < dense

    def call_macs(self, call: Call, rank: int | None = None, cost: str = "deploy") -> int:
        """MACs of one call at `rank` as shipped ("deploy"), as the pair or as dense."""
        k = self.rank if rank is None else rank
        if cost == "dense" or (cost == "deploy" and not self.ships_factored(k)):
            return call.dense
        return call.per_rank * k

    def macs(self, rank: int | None = None, cost: str = "deploy") -> int:
        """MACs of all recorded calls at `rank` (default: the current rank)."""
        return sum(self.call_macs(c, rank, cost) for c in (self.calls or [self.unit]))

    def params(self, rank: int | None = None, cost: str = "deploy") -> int:
        """Weight parameters (bias excluded) at `rank` as shipped, as the pair or as dense."""
        k = self.rank if rank is None else rank
        if cost == "dense" or (cost == "deploy" and not self.ships_factored(k)):
            return self.rows * self.cols
        return k * (self.rows + self.cols)

    # ----- saved with the layer's state -----
    def state(self) -> dict:
        return {"form": self.form, "reads_weight": self.reads_weight, "timed": self.timed, "masked": self.masked,
                "calls": [[list(c.shape), c.dense, c.per_rank] for c in self.calls]}

    def load(self, state: dict) -> None:
        form = state.get("form", "auto")
        if form not in FORMS:
            raise ValueError(f"saved layer form must be one of {FORMS}, got {form!r}")
        self.form = form
        self.reads_weight = bool(state.get("reads_weight", False))
        self.timed = bool(state.get("timed", False))
        self.masked = bool(state.get("masked", False))
        self.calls = [Call(tuple(shape), int(d), int(r)) for shape, d, r in state.get("calls", [])]


class Recording:
    """Set while `profile` runs its forward pass: SVD layers append their calls, and a read of
    `.weight` from outside a layer's own forward is noted in its plan. Outside a profiled pass
    reading `.weight` has no side effect. `products`: the pass's counter of products outside
    counted modules, which must not count the U diag(s) V^T a `.weight` read rebuilds (the
    dense layer, and the dense form such a layer ships as, have that weight stored)."""
    active = False
    products = None
