"""Replace the Conv2d/Linear layers of any model by their SVD form."""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import nn

from .kinds import KINDS, kind_of
from .layers import SVDLayer, unwrap
from .macs import profile
from .whiten import check as check_calibration, whiten_model

log = logging.getLogger("svdtrain")

Skip = None | Iterable[str] | Callable[[str, nn.Module], bool]


def _skip_predicate(skip: Skip, root: nn.Module) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip):
        return skip
    names = {skip} if isinstance(skip, str) else set(skip)
    unknown = sorted(names - {n for n, _ in root.named_modules(remove_duplicate=False)})
    if unknown:  # a misspelt name would silently skip nothing
        raise ValueError(f"skip names no module of the model: {', '.join(unknown[:5])}")
    return lambda name, module: name in names


def decompose(model: nn.Module, mode: str = "channel", init: str = "svd", skip: Skip = None, *,
              input_shape=None, example_inputs=None, calibration: Iterable | None = None,
              whiten: str = "cholesky") -> nn.Module:
    """Replace, in place, every layer of a registered kind (kinds.py: nn.Conv2d, nn.Linear,
    nn.MultiheadAttention) of `model` by its SVD form (attention: SVDMultiheadAttention, its
    q, k, v and output projections each an SVDLinear with its own rank). With `input_shape`
    or `example_inputs` the new layers' plans record their calls (see `profile`).

    mode: "channel" or "spatial" (spatial applies to convs with a kernel larger than 1x1).
    init: "svd" keeps the model's function exactly (SVD of the current weights);
          "random" starts the factors afresh, for training from scratch (the reference's init:
          Kaiming-normal U and V^T, s ~ |N(0, 1)|, so Var(W) = 4 / cols);
          "random_scaled" Kaiming-normal U and V (V at fan-in r) with s scaled so that each
          W has the norm of the layer's current (freshly initialised) weight.
    skip: None, qualified module names, or a predicate (name, module) -> bool.
    calibration: with init="svd" and mode="channel", input batches (tensors, (x, y) tuples, or
          dicts of keyword arguments, whose attention_mask keeps padding out) run through the
          model to factor each new layer activation-aware (whiten.py): W S = U Σ V'^T with S from the layer's inputs,
          whiten="cholesky" (SVD-LLM: S the Cholesky factor of their second moment, slightly
          damped) or "diag" (ASVD: S = diag(mean |x|)^0.5); V^T = V'^T S^{-1}, so the outputs
          are unchanged and `s` ranks directions by output error. Attention projections are
          whitened by their own inputs.
    Grouped/depthwise convs, convs with string padding, Conv1d/3d, transposed convs, Linear
    subclasses, attention with add_bias_kv or add_zero_attn, RNNs, and layers whose weight
    another module holds too (an output head tied to the input embedding) stay dense: one log
    line says how many layers were decomposed, holding what share of the model's MACs (with `input_shape` or
    `example_inputs`; else of the weights of those kinds), and (as a WARNING) which were left
    dense and why. Returns `model`.
    """
    if mode not in ("channel", "spatial"):
        raise ValueError(f"mode must be 'channel' or 'spatial', got {mode!r}")
    if init not in ("svd", "random", "random_scaled"):
        raise ValueError(f"init must be 'svd', 'random' or 'random_scaled', got {init!r}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("decompose under torch.inference_mode() makes factors that can never be "
                           "trained; call it outside inference_mode (torch.no_grad is fine)")
    root = unwrap(model)
    named = list(root.named_modules(remove_duplicate=False))
    # A layer shared under two names is skipped under both when either is named: one module.
    asked = _skip_predicate(skip, root)
    skip_ids = {id(m) for name, m in named if asked(name, m)}

    def skipped(name: str, module: nn.Module) -> bool:
        return id(module) in skip_ids
    sized = input_shape is not None or example_inputs is not None
    # Collect first: replacing while iterating named_modules() would visit the new layers.
    # Duplicates are kept so a layer shared under two names becomes one SVD layer in both.
    targets = [(name, m) for name, m in named if kind_of(m) is not None and not skipped(name, m)]
    if calibration is not None:
        check_calibration(init, mode, whiten, [kind_of(m) for _, m in targets if kind_of(m).why_dense(m) is None])
    for name, m in targets:  # before any change: a refused model stays as it was
        flags = [p.requires_grad for p in m.parameters()]
        if any(flags) and not all(flags) and kind_of(m).why_dense(m) is None \
                and not isinstance(getattr(m, "weight", None), nn.Parameter):
            raise ValueError(f"decompose: {name} has frozen and trainable parameters in a way its SVD form "
                             f"cannot keep; freeze all of it or none, or skip it")
    tied = _tied_weights(root)
    done: dict[int, nn.Module] = {}
    left: dict[str, str] = {}  # name -> why it stays dense
    hooked: list[str] = []  # layers with hooks, which their SVD form does not carry
    for name, module in targets:
        if id(module) in done:
            _set_submodule(root, name, done[id(module)])
            continue
        if any(name.startswith(p + ".") for p in left):
            continue  # inside a layer that stays dense (an attention's out_proj)
        why = kind_of(module).why_dense(module)
        if why is None and id(getattr(module, "weight", None)) in tied:
            why = ("its weight is tied to another module's (an output head tied to the embedding): "
                   "factoring would untie it")
        if why is not None:
            left[name] = why
            continue
        new = kind_of(module).build(module, mode, init)
        if not all(bool(torch.isfinite(p).all()) for p in new.parameters()):
            left[name] = (f"its factors are not finite in {next(module.parameters()).dtype} (a singular value "
                          "above the dtype's range?)")
            continue
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
            hooked.append(name)
        new.train(module.training)
        _carry_frozen(module, new)
        done[id(module)] = new
        _set_submodule(root, name, new)
    for m in root.modules():
        if not isinstance(m, (nn.TransformerEncoder, nn.TransformerEncoderLayer)) or \
                not any(isinstance(a, SVDLayer) for a in m.modules()):
            continue
        if isinstance(m, nn.TransformerEncoder):  # its nested-tensor path packs q, k, v
            m.use_nested_tensor = False
        if isinstance(m, nn.TransformerEncoderLayer):
            # Its fused inference path reads linear1/linear2/attention weights directly and
            # bypasses their SVD forward; this flag is read only by that path's check.
            m.activation_relu_or_gelu = 0
    try:
        if calibration is not None:
            whiten_model(root, [m for new in done.values() for m in new.modules() if isinstance(m, SVDLayer)],
                         calibration, whiten)
        # the new layers' plans record their calls; the profile also gives the coverage's MACs
        records = profile(root, input_shape, example_inputs) if sized else None
    except BaseException:  # the model as it was: its own layers back in place
        for name, module in targets:
            if id(module) in done:
                _set_submodule(root, name, module)
        raise
    if hooked:
        log.warning("svdtrain: hooks registered on %s do not carry over to their SVD form: register them "
                    "again on the new layers (or skip these)", ", ".join(hooked[:8]))
    _log_coverage(root, done, left, skipped, records)
    return model


def _log_coverage(root: nn.Module, done: dict, left: dict, skipped, records=None) -> None:
    """One line: layers decomposed and the share of MACs (dense cost, from `records`, a profile
    taken after the change) or else of weights they hold; at WARNING level, with
    each kind and reason, when weight-bearing layers were left dense (they still count in
    count_macs, but gain nothing from SVD training)."""
    svd_forms = tuple(k.svd_type for k in KINDS.values() if k.svd_type is not None)
    passed = [n for n, m in root.named_modules() if n and (n in left or skipped(n, m))]
    for name, m in root.named_modules():
        if name in left or isinstance(m, (SVDLayer, *svd_forms)) or skipped(name, m) or any(
                name.startswith(p + ".") for p in passed):
            continue  # a skipped or dense-left layer's own parts are not reported again
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.MultiheadAttention, nn.RNNBase)) \
                and kind_of(m) is None:
            left[name] = f"{type(m).__name__} is not decomposed"
            continue
        stacked = [tuple(p.shape) for p in m.parameters(recurse=False) if p.dim() == 3 and p.shape[0] > 1]
        if stacked and not isinstance(m, (nn.modules.conv._ConvNd, nn.Embedding)):  # e.g. one weight per expert
            left[name] = f"{type(m).__name__} holds stacked weights {stacked[0]} (experts?), not decomposed"
    if records is not None:
        total = sum(r.dense for r in records)
        share = sum(r.dense for r in records if isinstance(r.module, SVDLayer)) / max(1, total)
        what = "of the model's MACs"
    else:
        kept = sum(layer.rows * layer.cols for new in done.values() for layer in new.modules()
                   if isinstance(layer, SVDLayer))
        # every weight matrix a layer left dense holds (stacked experts hold no `.weight`), once,
        # and not those of SVD layers inside it
        in_svd = {id(p) for m in root.modules() if isinstance(m, SVDLayer) for p in m.parameters()}
        held = {id(p): p for n in left for p in root.get_submodule(n).parameters()
                if p.dim() >= 2 and id(p) not in in_svd}
        dense_left = sum(p.numel() for p in held.values())
        share = kept / max(1, kept + dense_left)
        what = "of the weights of decomposable kinds"
    line = f"svdtrain: decomposed {len(done)} layers holding {share:.1%} {what}"
    idle = [n for n, m in root.named_modules() if isinstance(m, SVDLayer) and not m.plan.calls] \
        if records is not None else []
    if idle:  # e.g. a forward that reaches its layers through a plain list keeps the old ones
        log.warning("svdtrain: %d SVD layers were not called in the profiled pass (a branch that pass did "
                    "not take, e.g. a training-only head or an expert no token reached; or a forward that "
                    "calls the original layers through a list or another object, which training would "
                    "not reach either): %s", len(idle), ", ".join(idle[:8]))
    reads = [n for n, m in root.named_modules() if isinstance(m, SVDLayer) and m.plan.reads_weight]
    if reads:  # the profile saw other code read their .weight: they keep a dense form to ship
        log.warning("svdtrain: %d SVD layers ship dense at any rank: code outside them reads their .weight "
                    "(a tied head, or a dtype check such as T5's wo): %s", len(reads), ", ".join(reads[:8]))
    if left:
        reasons = "; ".join(f"{n}: {why}" for n, why in list(left.items())[:8])
        more = f" (+{len(left) - 8} more)" if len(left) > 8 else ""
        log.warning("%s; left dense: %s%s", line, reasons, more)
    else:
        log.info("%s", line)


def eligible(module: nn.Module) -> bool:
    """Whether `decompose` replaces this layer: its exact type has a registry entry (kinds.py)
    and the entry finds no reason to leave it dense."""
    kind = kind_of(module)
    return kind is not None and kind.why_dense(module) is None


def _carry_frozen(old: nn.Module, new: nn.Module) -> None:
    """A frozen layer stays frozen: its factors take the weight's requires_grad, the bias its own."""
    flags = [p.requires_grad for p in old.parameters()]
    if all(flags):
        return
    if not any(flags):
        new.requires_grad_(False)
        return
    weight, bias = old.weight, getattr(old, "bias", None)  # a plain layer (checked in decompose)
    for p in (new.U, new.s, new.V):
        p.requires_grad_(weight.requires_grad)
    if isinstance(bias, nn.Parameter) and new.bias is not None:
        new.bias.requires_grad_(bias.requires_grad)


def _tied_weights(root: nn.Module) -> set[int]:
    """ids of the parameters that two different modules hold (a tied output head and input
    embedding); one module registered under two names does not count."""
    owners: dict[int, set[int]] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    return {p for p, mods in owners.items() if len(mods) > 1}


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("decompose() needs a model that contains layers, not a bare layer; "
                         "use SVDConv2d.from_conv / SVDLinear.from_linear for one layer")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
