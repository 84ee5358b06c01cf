"""The comparison methods of the benchmarks, usable on any model.

- `posthoc_svd`: truncated SVD of a trained dense model (decompose with init="svd", prune);
  fine-tune afterwards with your ordinary loop.
- `filter_prune`: structured filter pruning (Torch-Pruning, global group magnitude) to a
  whole-model MACs target; needs `pip install svdtrain[baselines]`.
- `GroupSparsity`: Torch-Pruning's sparse-training path (DepGraph's group-norm
  regularization) to run in your loop before `filter_prune(..., p=2)`.
- `TRP`: Trained Rank Pruning (Xu et al., IJCAI 2020): dense training with a periodic
  in-place SVD truncation of every weight and a nuclear-norm subgradient.
"""
from __future__ import annotations

import copy
import logging
from typing import Iterable

import torch
from torch import nn

from .decompose import Skip, _skip_predicate, decompose, eligible
from .layers import svd_layers, unwrap
from .matrix_view import matrix_to_weight, weight_to_matrix
from .macs import count_macs, profile
from .prune import energy_rank, prune, ranks, set_ranks

log = logging.getLogger("svdtrain")


# ----------------------------------------------------------------------------------------
# Post-hoc SVD
# ----------------------------------------------------------------------------------------
def posthoc_svd(model: nn.Module, macs_budget: float | None = None, keep_energy: float | None = None,
                input_shape=None, mode: str = "channel", skip: Skip = None) -> dict[str, int]:
    """Truncated SVD of a trained dense model, in place; returns {layer name: rank}.

    Decomposes every eligible layer with init="svd" (the model's function is kept exactly)
    and prunes singular values by exactly one target: `keep_energy` (per layer) or
    `macs_budget` (fraction of the dense whole-model MACs; needs `input_shape`). The SVD
    layers then fine-tune as they are.
    """
    if (keep_energy is None) == (macs_budget is None):
        raise ValueError("give exactly one of keep_energy or macs_budget")
    # Check here, before the model is changed: prune() would only fail after decompose().
    if macs_budget is not None and input_shape is None:
        raise ValueError("macs_budget needs input_shape, e.g. (1, 3, 32, 32)")
    decompose(model, mode=mode, init="svd", skip=skip)
    if keep_energy is not None:
        return prune(model, keep_energy=keep_energy)
    return prune(model, macs_budget=macs_budget, input_shape=input_shape)


# ----------------------------------------------------------------------------------------
# Filter pruning (Torch-Pruning)
# ----------------------------------------------------------------------------------------
_BISECTION_TRIALS = 12


def filter_prune(model: nn.Module, example_inputs: torch.Tensor, macs_target: float, *,
                 ignored_layers: Iterable[nn.Module | str] | None = None, round_to: int | None = None,
                 iterative_steps: int = 1, p: int = 1) -> nn.Module:
    """Prune filters (output channels) globally by group magnitude (Lp norm of each coupled
    channel group, p=1 by default; p=2 after `GroupSparsity` training) until the whole
    model's MACs are <= `macs_target` x its dense MACs; modifies `model` in place and
    returns it.

    Torch-Pruning takes a channel ratio, not a MACs target: the ratio is found by bisection
    (each trial prunes a deep copy and measures `svdtrain.count_macs`), then the model is
    pruned once at the smallest ratio found that meets the target.
    The last Conv2d/Linear to run (the classifier) is always ignored so the output shape
    stays; `ignored_layers` (modules or qualified names) adds to it. `round_to` and
    `iterative_steps` are passed to Torch-Pruning. BatchNorm statistics are not touched
    (the pruning trace runs in eval mode).
    """
    try:
        import torch_pruning as tp
    except ImportError as err:
        raise ImportError("filter_prune needs Torch-Pruning: pip install svdtrain[baselines]") from err
    if not 0.0 < macs_target <= 1.0:
        raise ValueError(f"macs_target must be in (0, 1], got {macs_target!r}")
    root = unwrap(model)
    if any(True for _ in svd_layers(root)):
        raise ValueError("filter_prune works on dense models; this one has SVD layers")
    shape = tuple(example_inputs.shape)
    dense = count_macs(root, shape)
    target = macs_target * dense
    if dense <= target:
        return model
    ignored = _ignored_names(root, shape, ignored_layers)

    def prune_at(net: nn.Module, ratio: float) -> int:
        was_training = net.training
        net.eval()  # Torch-Pruning traces with a forward pass: keep BN running stats intact
        try:
            pruner = tp.pruner.BasePruner(
                net, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=p),
                global_pruning=True, pruning_ratio=ratio, iterative_steps=iterative_steps,
                ignored_layers=[net.get_submodule(n) for n in ignored], round_to=round_to)
            for _ in range(iterative_steps):
                pruner.step()
        finally:
            net.train(was_training)
        return count_macs(net, shape)

    # Invariant: ratio `lo` misses the target, ratio `hi` meets it (hi=1 is a sentinel,
    # never tried: there Torch-Pruning skips every group). MACs fall with the ratio except
    # near 1, where groups that would lose all channels are skipped; we only ever keep a
    # ratio that was measured to meet the target, so the result holds the target regardless.
    lo, hi, best = 0.0, 1.0, None
    lowest = dense
    for _ in range(_BISECTION_TRIALS):
        mid = (lo + hi) / 2
        macs = prune_at(copy.deepcopy(root), mid)
        lowest = min(lowest, macs)
        if macs <= target:
            hi, best = mid, mid
        else:
            lo = mid
    if best is None:
        raise ValueError(f"filter pruning reached only {lowest / dense:.3f} of the dense MACs; "
                         f"macs_target={macs_target:g} is out of reach")
    final = prune_at(root, best)
    if final > target:  # deterministic, so not expected; say so rather than return silently
        log.warning("svdtrain: filter_prune ended at %.4f of dense MACs, above the target %.4f",
                    final / dense, macs_target)
    return model


class GroupSparsity:
    """Torch-Pruning's sparse-training path (DepGraph, Fang et al. CVPR 2023): during training,
    a group-norm penalty pushes whole coupled channel groups toward zero, with the weakest
    groups pushed hardest (up to 2^alpha times), so that the later `filter_prune(..., p=2)`
    removes channels that no longer matter.

        sparsity = GroupSparsity(model, torch.zeros(1, 3, 32, 32), reg=5e-4)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward()
            sparsity.regularize()      # adds the penalty's gradient
            opt.step()
        filter_prune(model, torch.zeros(1, 3, 32, 32), 0.33, p=2)

    reg: the penalty's weight (DepGraph's CIFAR default 5e-4). The classifier (the last layer
    to run) is never penalized, as filter_prune never prunes it.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, reg: float = 5e-4, alpha: float = 4.0,
                 ignored_layers: Iterable[nn.Module | str] | None = None):
        try:
            import torch_pruning as tp
        except ImportError as err:
            raise ImportError("GroupSparsity needs Torch-Pruning: pip install svdtrain[baselines]") from err
        if reg < 0:
            raise ValueError(f"reg must be >= 0, got {reg!r}")
        root = unwrap(model)
        ignored = _ignored_names(root, tuple(example_inputs.shape), ignored_layers)
        was_training = root.training
        root.eval()  # the dependency trace runs a forward pass: keep BN running stats intact
        try:
            self.pruner = tp.pruner.GroupNormPruner(
                root, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=2), reg=reg,
                global_pruning=True, ignored_layers=[root.get_submodule(n) for n in ignored])
        finally:
            root.train(was_training)
        self.model, self.alpha = root, 2.0 ** alpha

    def regularize(self) -> None:
        """Add the group-norm penalty's gradient to .grad; call between backward() and step()."""
        self.pruner.regularize(self.model, alpha=self.alpha)


def _ignored_names(root: nn.Module, shape, extra) -> list[str]:
    """Qualified names of the layers to keep whole: the classifier plus the user's ones.
    Names, not modules, so that they resolve inside each deep copy."""
    records = profile(root, shape)  # forward-hook order = execution order
    if not records:
        raise ValueError("the model has no Conv2d/Linear layer to prune")
    names = {id(m): n for n, m in root.named_modules()}
    ignored = [records[-1].name]
    for layer in extra or ():
        if isinstance(layer, str):
            root.get_submodule(layer)  # raises on an unknown name
            ignored.append(layer)
        elif id(layer) in names:
            ignored.append(names[id(layer)])
        else:
            raise ValueError(f"ignored layer {type(layer).__name__} is not part of the model")
    return ignored


# ----------------------------------------------------------------------------------------
# Trained Rank Pruning
# ----------------------------------------------------------------------------------------
class TRP:
    """Trained Rank Pruning (Xu et al., IJCAI 2020) around your own training loop.

        trp = TRP(model, every=20, keep_energy=0.98, nuclear=3e-4)
        for i, (x, y) in enumerate(loader, 1):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward()
            trp.regularize()        # nuclear-norm subgradient, when due
            opt.step()
            trp.step(i)             # every `every` steps: truncate every weight in place
        ranks = trp.to_svd_model()  # svdtrain SVD form at those ranks: fine-tune / export

    every (m, default 20): optimizer steps between truncations (the reference CIFAR
        script truncates at every iteration, i.e. every=1; larger m is cheaper).
    keep_energy (e, default 0.98): each truncation keeps, per weight, the fewest largest
        singular values whose squares hold >= e of the energy (`svdtrain.prune.energy_rank`;
        the reference CIFAR script uses 0.99).
    nuclear (lambda, default 3e-4, the reference code's weight; 0 turns it off): weight of
        the nuclear norm sum ||W||_*, applied as its subgradient lambda * U_k V_k^T.
    The defaults are those of our benchmarks (benchmarks/train_cost.py).
    mode: the matrix view, "channel" (n x c*kh*kw) or "spatial" ((n*kh) x (c*kw), as
        `SVDConv2d`); 1x1 convs and Linear layers always use their plain matrix.
    skip: layers left alone (names or predicate, as in `decompose`). Eligible: nn.Linear
        and nn.Conv2d with groups=1 (the reference code also skips the first conv).

    The subgradient needs an SVD. We reuse the truncation's, as the reference code does:
    `regularize()` acts on the step right after each truncation, when W is exactly
    U_k S_k V_k^T and U_k V_k^T is its exact (minimal-norm) subgradient, at the cost of one
    small matmul per layer. So with m > 1 the nuclear term acts once every m steps; raise
    `nuclear` (or use every=1) for a stronger pull. Without `regularize()` calls, TRP is
    the truncation alone. `step(i)` costs nothing on the other steps.
    """

    def __init__(self, model: nn.Module, every: int = 20, keep_energy: float = 0.98,
                 nuclear: float = 3e-4, mode: str = "channel", skip: Skip = None):
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if not 0.0 < keep_energy <= 1.0:
            raise ValueError(f"keep_energy must be in (0, 1], got {keep_energy!r}")
        if nuclear < 0:
            raise ValueError(f"nuclear must be >= 0, got {nuclear!r}")
        if mode not in ("channel", "spatial"):
            raise ValueError(f"mode must be 'channel' or 'spatial', got {mode!r}")
        self.model, self.every, self.keep_energy = model, every, float(keep_energy)
        self.nuclear, self.mode = float(nuclear), mode
        skipped = _skip_predicate(skip)
        self._layers = [(name, m) for name, m in unwrap(model).named_modules()
                        if eligible(m) and not skipped(name, m)]
        self.ranks: dict[str, int] = {}
        self.last_step = 0
        # Per layer: weight._version right after its last truncation (to tell whether the
        # weight changed since) and the (U_k, V_k^T) of that truncation for regularize().
        self._versions: dict[str, int] = {}
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._converted = False

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self._layers]

    def regularize(self) -> bool:
        """Add nuclear * U_k V_k^T to each weight's .grad; call between backward() and
        optimizer.step() (with a GradScaler: after scaler.unscale_(optimizer)). Acts only
        on the step right after a truncation (see the class docstring); returns whether
        it did."""
        self._check_live()
        if self.nuclear == 0 or not self._factors:
            return False
        done = False
        with torch.no_grad():
            for name, m in self._layers:
                w = m.weight
                if name not in self._factors or w._version != self._versions[name]:
                    continue  # the weight moved since its truncation: the SVD is stale
                u, vh = self._factors.pop(name)
                sub = matrix_to_weight(u @ vh, w.shape, self.mode).to(w.dtype) * self.nuclear
                if w.grad is None:
                    w.grad = sub.contiguous()
                else:
                    w.grad.add_(sub)
                done = True
        self._factors.clear()
        return done

    def step(self, i: int) -> bool:
        """Call after optimizer.step() with the global step count i (1-based); truncates
        every weight in place when i % every == 0. Returns whether it truncated."""
        self._check_live()
        self.last_step = i
        if i % self.every:
            self._factors.clear()  # a regularize() is due only right after a truncation
            return False
        self.truncate()
        return True

    @torch.no_grad()
    def truncate(self) -> dict[str, int]:
        """Replace every eligible weight by its truncated SVD at keep_energy, now."""
        self._check_live()
        self._factors.clear()
        for name, m in self._layers:
            w = m.weight
            mat = weight_to_matrix(w.detach(), self.mode)
            # float32 at least: SVD has no half-precision kernels, and the rank test on
            # small singular values needs the precision.
            work = mat if mat.dtype in (torch.float32, torch.float64) else mat.float()
            u, s, vh = torch.linalg.svd(work, full_matrices=False)
            k = energy_rank(s, self.keep_energy)
            u, s, vh = u[:, :k], s[:k], vh[:k]
            w.copy_(matrix_to_weight((u * s) @ vh, w.shape, self.mode))
            self.ranks[name] = k
            self._versions[name] = w._version
            if self.nuclear:
                self._factors[name] = (u, vh)
        log.debug("svdtrain: TRP truncation at step %d: total rank %d over %d layers",
                  self.last_step, sum(self.ranks.values()), len(self.ranks))
        return dict(self.ranks)

    def to_svd_model(self, input_shape=None, keep_energy: float | None = None,
                     macs_budget: float | None = None) -> dict[str, int]:
        """Convert the model in place to svdtrain's SVD form and prune it; returns ranks.

        Default: the ranks TRP's truncation gives. A weight still as its last truncation
        left it keeps that rank exactly (re-applying the threshold to a truncated spectrum
        would cut further); a weight trained since is truncated at `self.keep_energy`.
        Either way the SVD model computes what the truncated dense model computes.
        `keep_energy` instead prunes the current spectra at that threshold; `macs_budget`
        prunes to that fraction of the dense MACs (needs `input_shape`).
        After this, the TRP object is done: fine-tune and export with svdtrain.
        """
        self._check_live()
        if keep_energy is not None and macs_budget is not None:
            raise ValueError("give at most one of keep_energy or macs_budget")
        if macs_budget is not None and input_shape is None:
            raise ValueError("macs_budget needs input_shape, e.g. (1, 3, 32, 32)")
        unchanged = {name for name, m in self._layers
                     if name in self._versions and m.weight._version == self._versions[name]}
        names = set(self.layer_names)
        decompose(self.model, mode=self.mode, init="svd", skip=lambda name, m: name not in names)
        self._converted = True
        self._factors.clear()
        if macs_budget is not None:
            return prune(self.model, macs_budget=macs_budget, input_shape=input_shape)
        if keep_energy is not None:
            return prune(self.model, keep_energy=keep_energy)
        config = {name: self.ranks[name] if name in unchanged else energy_rank(layer.s, self.keep_energy)
                  for name, layer in svd_layers(self.model)}
        set_ranks(self.model, config)
        return ranks(self.model)

    def _check_live(self) -> None:
        if self._converted:
            raise RuntimeError("this TRP has converted its model (to_svd_model); "
                               "its layers are SVD layers now")


__all__ = ["posthoc_svd", "filter_prune", "GroupSparsity", "TRP"]
