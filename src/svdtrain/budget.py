"""Budget-driven SVD training: adapt the sparsity strength so that the MACs pruning would keep
follow a schedule down to the budget the user asked for ("a third of the MACs").

The rule, in full (BudgetController):
- Measured: m, the whole-model deploy MACs as a fraction of the dense model's, if every SVD
  layer were pruned now at `keep_energy` (what `prune(keep_energy=...)` would keep; every
  call of a layer counted, a layer deploys dense where its factor pair would cost more).
- How often: every `every` optimizer steps (default: total_steps // 100, between 1 and 20),
  and at the first step, which fixes the start m0.
- Schedule: m*(t) = target + (m0 - target) * max(0, 1 - t / (target_at * total_steps)),
  a straight line from m0 to the target, reached at `target_at` of the stage, then held.
- Update law: with d the smoothed change of m per update (d <- 0.7 d + 0.3 (m - m_prev)) and
  the prediction p = m + horizon * d (where m will be `horizon` updates from now: singular
  values on their way to zero keep falling after the strength drops, so reacting to m alone
  overshoots), err = clip((p - m*(t)) / m*(t), -1, 1) and
  strength <- strength * exp(gain * err) if err > 0 else strength * exp(relax * gain * err),
  then clamped to [min_strength, max_strength] (defaults: gain 0.5, horizon 5, relax 4,
  [1e-6, 10]): above the schedule the sparsity term grows by at most e^gain per update,
  below it relaxes up to `relax` times faster, because values that died do not come back.
- With mask=True (gradual pruning), each update also masks the lowest-scored singular values
  (`prune(macs_budget=m*(t))`, the optimizer's state of them zeroed) until the deploy MACs
  are at most m*(t): the ranks follow the schedule and the last part of the stage trains at
  the final ranks. The strength is then steered toward m*(t + lead) instead (lead: a tenth of
  the ramp). The smoothed slope then includes the masks' own descent along the schedule, so
  where the lead is shorter than the horizon (a ramp of under ~50 updates) the prediction
  runs ahead of the aim and the strength relaxes toward its floor: the masks do the cutting
  and the sparsity term stays weak. Compressing a trained ResNet-20 this measured better on
  the validation split than keeping the sparsity term on ahead of the cuts (horizon 0, lead
  a quarter of the ramp: 0.7 points lower; benchmarks/README.md).
  While the masks move, every SVD layer runs at full width times its mask (`Plan.masked`),
  so a compiled model keeps one graph through the ramp; at its end the layers return to
  their active ranks (one recompile). `round_to` makes every rank a multiple of it.
  With score="loss", the masks rank values by loss importance instead of energy share:
  (s * dL/ds)^2 summed over the training steps since the previous update (importance.py),
  dL/ds the gradient the optimizer stepped on: task loss plus the sparsity term (one-shot
  prune's `loss_importance` takes the task loss alone).
- A target below the rank-1 floor (rank 1 in every SVD layer) is refused at construction.
- If the target is not reached by the end of the stage (m > target + tolerance), `report()`
  says so; the prune stage still meets the budget (prune(macs_budget=target)), by cutting
  energy training did not empty.
Everything depends only on the parameters and the step count, so every DDP rank computes
the same strength, and state_dict() / load_state_dict() make a resumed run identical.
"""
from __future__ import annotations

import math

from torch import nn

from .importance import SingularValueImportance
from .layers import SVDLayer, svd_layers
from .losses import Regularizer
from .macs import LayerCost, profile
from .prune import clear_pruned_state, energy_rank, prune, rank_floor, round_rank


def macs_at_energy(records: list[LayerCost], keep_energy: float, round_to: int = 1) -> tuple[int, list[int]]:
    """(deploy MACs, ranks) if every SVD layer in `records` (a `profile` of the model) were
    pruned now at `keep_energy` (ranks rounded up to multiples of `round_to`, as prune does);
    every call of a layer counts (the plan's cost rule)."""
    layers = {id(r.module): r.module for r in records if isinstance(r.module, SVDLayer)}
    total = sum(r.macs() for r in records if not isinstance(r.module, SVDLayer))
    ranks = []
    for layer in layers.values():
        k = energy_rank(layer.s.detach()[layer.active], keep_energy)
        k = round_rank(k, round_to, layer.rank)
        total += layer.plan.macs(k)
        ranks.append(k)
    return total, ranks


def budget_warning(fraction: float, target: float, keep_energy: float, tolerance: float = 0.03,
                   what: str = "MACs") -> str | None:
    """The one-line warning for `what` (MACs, or latency) at keep_energy still above target +
    tolerance, else None."""
    if fraction <= target + tolerance:
        return None
    return (f"budget not reached in training: {what} at keep_energy {keep_energy:g} are {fraction:.1%} "
            f"of dense, target {target:.1%}; pruning to the budget cuts singular values that still "
            "carry energy (train longer, or start from a larger sparsity strength)")


class LinearSchedule:
    """The MACs fraction asked for at a step: a straight line from the start (the fraction
    measured at the first step) down to `target`, reached at step `until`, then held. Any
    callable `(step, start) -> fraction` can stand in for it (`BudgetController(schedule=...)`)."""

    def __init__(self, target: float, until: float):
        self.target, self.until = float(target), max(float(until), 1e-9)

    def __call__(self, step: int, start: float) -> float:
        start = max(start, self.target)
        return self.target + (start - self.target) * max(0.0, 1.0 - step / self.until)


class BudgetController:
    """Steers `reg.strength` so the MACs at `keep_energy` reach `target_macs` (a fraction of
    the dense whole-model MACs) at `target_at` of `total_steps` and stay there. With
    `target_latency` instead, the same law steers the model's predicted time on this device (a
    LatencyTable measured once at construction, on `example_inputs` or `input_shape`, with
    `timer`), masks cut with prune's latency_budget rule, and each layer is pinned to the form
    that was faster at its rank; prune(latency_budget=...) at the end meets it. `on_final()`,
    if given, is called once when the masks' ranks become final (e.g. `unwhiten`).

        reg = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=0.005)   # start value
        ctrl = svdtrain.BudgetController(model, reg, target_macs=0.33, input_shape=(1, 3, 32, 32),
                                         total_steps=epochs * len(loader))
        for x, y in loader:
            loss = task_loss(model(x), y) + reg(model)
            opt.zero_grad(); loss.backward(); opt.step()
            ctrl.step()            # every `every` steps: measure, update reg.strength
        svdtrain.prune(model, macs_budget=0.33, input_shape=(1, 3, 32, 32))
    """

    def __init__(self, model: nn.Module, reg: Regularizer, target_macs: float | None = None, input_shape=None,
                 total_steps: int | None = None, *, target_latency: float | None = None, timer=None,
                 target_at: float = 0.5, keep_energy: float = 0.9999, every: int | None = None, gain: float = 0.5,
                 horizon: int = 5, relax: float = 4.0, mask: bool = False, optimizer=None, example_inputs=None,
                 min_strength: float = 1e-6, max_strength: float = 10.0, tolerance: float = 0.03,
                 score: str = "energy", round_to: int = 1, schedule=None, on_final=None):
        if (target_macs is None) == (target_latency is None):
            raise ValueError("give exactly one of target_macs or target_latency")
        kind, target = ("latency", target_latency) if target_macs is None else ("macs", target_macs)
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target_{kind} must be in (0, 1], got {target!r}")
        if total_steps is None:
            raise ValueError("total_steps is needed: the optimizer steps of the stage the budget is reached in")
        if not 0.0 < target_at <= 1.0:
            raise ValueError(f"target_at must be in (0, 1], got {target_at!r}")
        if reg.sparsity is None:
            raise ValueError("a budget needs a sparsity term: Regularizer(sparsity='hoyer', ...)")
        if every is None:  # about 100 updates per stage, at most one per 20 steps' worth of work
            every = max(1, min(20, total_steps // 100))
        if total_steps < 1 or every < 1:
            raise ValueError("total_steps and every must be >= 1")
        self.model, self.reg = model, reg
        self.target, self.target_at, self.total = float(target), float(target_at), int(total_steps)
        self.keep_energy, self.every, self.gain, self.horizon = keep_energy, every, gain, horizon
        self.relax = relax
        self.bounds, self.tolerance = (min_strength, max_strength), tolerance
        self.reg.strength = min(max(reg.strength or min_strength, min_strength), max_strength)
        self._schedule = schedule or LinearSchedule(self.target, self.target_at * self.total)
        self.lead = int(0.1 * self.target_at * self.total)  # with mask: a tenth of the ramp ahead
        self.mask, self.optimizer, self.inputs = mask, optimizer, {"input_shape": input_shape,
                                                                   "example_inputs": example_inputs}
        self._records = profile(model, **self.inputs)
        if not (isinstance(round_to, int) and round_to >= 1):
            raise ValueError(f"round_to must be an integer >= 1, got {round_to!r}")
        if not (isinstance(keep_energy, (int, float)) and 0.0 < keep_energy <= 1.0):
            raise ValueError(f"keep_energy must be in (0, 1], got {keep_energy!r}")
        floor, self.dense_macs = rank_floor(self._records, round_to)
        floor /= self.dense_macs
        self.what, self.table = "MACs", None
        if kind == "latency":
            from .latency import LatencyTable, wall_time
            self.what = "latency"
            self.table = LatencyTable(model, input_shape, example_inputs, round_to, timer or wall_time)
            floor = self.table.floor()
        if self.target < floor:
            raise ValueError(f"target_{kind} {self.target:g} is below the rank-{round_to} floor: "
                             f"rank {round_to} in every SVD layer keeps {floor:.3f} of dense {self.what}")
        self.round_to, self.on_final = round_to, on_final
        self._set_masked(mask)
        self.steps, self.start, self.last, self.slope = 0, None, None, 0.0
        if score not in ("energy", "loss"):
            raise ValueError(f"score must be 'energy' or 'loss', got {score!r}")
        # Loss scores come from the gradients of the steps between two mask updates.
        self.importance = SingularValueImportance(model) if mask and score == "loss" else None

    def measure(self) -> float:
        """MACs (or predicted time) at keep_energy now, as a fraction of the dense model's."""
        if self.table is not None:
            return self.table.at_energy(self.keep_energy)
        return macs_at_energy(self._records, self.keep_energy, self.round_to)[0] / self.dense_macs

    def schedule(self, step: int | None = None) -> float:
        """The MACs fraction the schedule asks for at `step` (default: now)."""
        t = self.steps if step is None else step
        return self._schedule(t, self.target if self.start is None else self.start)

    def step(self) -> float:
        """Call after every optimizer step; returns the strength in force."""
        if self.start is None:
            self.start = self.measure()
            self.last = self.start
        self.steps += 1
        if self.importance is not None:
            self.importance.accumulate()
        if self.steps % self.every == 0:
            m = self.measure()
            self.slope = 0.7 * self.slope + 0.3 * (m - self.last)
            self.last = m
            want = self.schedule()
            # Masking follows the schedule; the sparsity term aims a little ahead of it, so the
            # values cut next have already lost their energy when the cut comes.
            aim = self.schedule(self.steps + self.lead) if self.mask else want
            err = max(-1.0, min(1.0, (m + self.horizon * self.slope - aim) / aim))
            # Values that died do not come back: relax faster than tighten.
            s = self.reg.strength * math.exp(self.gain * err * (1.0 if err > 0 else self.relax))
            self.reg.strength = min(max(s, self.bounds[0]), self.bounds[1])
            if self.mask:
                self._mask_to(want)
        if self.masked and (self.steps >= self.total or (self.steps % self.every == 0 and self._ramp_done())):
            self._set_masked(False)  # ranks are final: the forward runs at them
            if self.table is not None:
                self.table.pin_forms()  # each layer ships the form that is faster at its rank
            if self.on_final is not None:
                self.on_final()
        return self.reg.strength

    def _ramp_done(self) -> bool:
        return self.start is not None and self.schedule() <= self.target

    def _set_masked(self, masked: bool) -> None:
        """While masks move, SVD layers run at full width times the mask (see Plan.masked)."""
        self.masked = masked
        for _, layer in svd_layers(self.model):
            layer.plan.masked = masked

    def _mask_to(self, fraction: float) -> None:
        """Gradual pruning: mask the lowest-scored singular values (prune's macs_budget rule, or
        latency_budget's over the table) until the deploy cost is at most `fraction` of dense;
        never unmasks."""
        fraction = min(fraction, 1.0)  # a schedule that starts above dense (table's parts > whole)
        if self.table is not None:
            deployed = self.table.now()
        else:
            deployed = sum(r.macs() for r in self._records) / self.dense_macs
        if deployed > fraction:
            scores = self.importance.scores() if self.importance is not None else None
            if self.table is not None:
                from .latency import prune_to_latency
                # forms are pinned once the ranks are final (a form does not change what trains)
                prune_to_latency(self.model, fraction, importance=scores, round_to=self.round_to, table=self.table,
                                 pin=False, refine=0)
                if self.optimizer is not None:
                    clear_pruned_state(self.model, self.optimizer)
            else:
                prune(self.model, macs_budget=fraction, optimizer=self.optimizer, scores=scores,
                      round_to=self.round_to, **self.inputs)
        if self.importance is not None:
            self.importance.reset()  # the next cut reads only the gradients from here on

    def report(self) -> str | None:
        """A one-line warning if the target was not reached, else None."""
        return budget_warning(self.measure(), self.target, self.keep_energy, self.tolerance, self.what)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "start": self.start, "last": self.last, "slope": self.slope,
                "strength": self.reg.strength, "masked": self.masked,
                "importance": self.importance.state_dict() if self.importance is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.start, self.last, self.slope = state["steps"], state["start"], state["last"], state["slope"]
        # masked until the step that ends the ramp runs on_final (a state saved between the
        # ramp's end and that step is still masked); states without the key: by the schedule
        self._set_masked(state["masked"] if "masked" in state else self.mask and not self._ramp_done())
        self.reg.strength = state["strength"]
        if self.importance is not None and state.get("importance") is not None:
            self.importance.load_state_dict(state["importance"])
