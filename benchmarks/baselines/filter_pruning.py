"""Structured filter pruning with Torch-Pruning (`pip install torch-pruning`): one-shot global
group-magnitude pruning to a whole-model MACs target (`filter_prune`), and the group-norm
sparse training that precedes it in DepGraph (`GroupSparsity`)."""
from __future__ import annotations

import copy
import logging
from typing import Iterable

import torch
from torch import nn

import svdtrain
from svdtrain.layers import unwrap
from svdtrain.macs import profile

log = logging.getLogger(__name__)

_BISECTION_TRIALS = 12


def _torch_pruning(what: str):
    try:
        import torch_pruning as tp
    except ImportError as err:
        raise ImportError(f"{what} needs Torch-Pruning: pip install torch-pruning "
                          "(or svdtrain[baselines])") from err
    return tp


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
    tp = _torch_pruning("filter_prune")
    if not 0.0 < macs_target <= 1.0:
        raise ValueError(f"macs_target must be in (0, 1], got {macs_target!r}")
    root = unwrap(model)
    if any(True for _ in svdtrain.svd_layers(root)):
        raise ValueError("filter_prune works on dense models; this one has SVD layers")
    shape = tuple(example_inputs.shape)
    dense = svdtrain.count_macs(root, shape)
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
        return svdtrain.count_macs(net, shape)

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
        log.warning("filter_prune ended at %.4f of dense MACs, above the target %.4f",
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
        tp = _torch_pruning("GroupSparsity")
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
