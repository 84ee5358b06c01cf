"""Replace the Conv2d/Linear layers of any model by their SVD form."""
from __future__ import annotations

import logging
from typing import Callable, Iterable

from torch import nn

from .layers import SVDConv2d, SVDLinear, unwrap

log = logging.getLogger("svdtrain")

Skip = None | Iterable[str] | Callable[[str, nn.Module], bool]


def _skip_predicate(skip: Skip) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip):
        return skip
    names = {skip} if isinstance(skip, str) else set(skip)
    return lambda name, module: name in names


def decompose(model: nn.Module, mode: str = "channel", init: str = "svd", skip: Skip = None) -> nn.Module:
    """Replace, in place, every eligible nn.Conv2d / nn.Linear of `model` by its SVD form.

    mode: "channel" or "spatial" (spatial applies to convs with a kernel larger than 1x1).
    init: "svd" keeps the model's function exactly (SVD of the current weights);
          "random" starts the factors afresh, for training from scratch.
    skip: None, qualified module names, or a predicate (name, module) -> bool.
    Grouped/depthwise convs stay dense (logged once each). Returns `model`.
    """
    if mode not in ("channel", "spatial"):
        raise ValueError(f"mode must be 'channel' or 'spatial', got {mode!r}")
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    skipped = _skip_predicate(skip)
    root = unwrap(model)
    # Collect first: replacing while iterating named_modules() would visit the new layers.
    # Duplicates are kept so a layer shared under two names becomes one SVD layer in both.
    targets = [(name, m) for name, m in root.named_modules(remove_duplicate=False)
               if type(m) in (nn.Conv2d, nn.Linear) and not skipped(name, m)]  # exact types only
    done: dict[int, nn.Module] = {}
    for name, module in targets:
        if id(module) in done:
            _set_submodule(root, name, done[id(module)])
            continue
        if not eligible(module):  # a Conv2d that is grouped or has string padding
            why = (f"is a grouped conv (groups={module.groups})" if module.groups != 1
                   else f"uses padding={module.padding!r}")
            log.info("svdtrain: %s %s; left dense", name, why)
            continue
        if isinstance(module, nn.Conv2d):
            new = SVDConv2d.from_conv(module, mode=mode, init=init)
        else:
            new = SVDLinear.from_linear(module, init=init)
        new.train(module.training)
        done[id(module)] = new
        _set_submodule(root, name, new)
    return model


def eligible(module: nn.Module) -> bool:
    """Whether `decompose` replaces this layer: a plain Linear, or a plain Conv2d with
    groups=1 and integer padding (exact types: subclasses may change forward)."""
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Conv2d and module.groups == 1 and not isinstance(module.padding, str)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("decompose() needs a model that contains layers, not a bare layer; "
                         "use SVDConv2d.from_conv / SVDLinear.from_linear for one layer")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
