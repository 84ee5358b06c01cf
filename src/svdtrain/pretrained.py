"""A decomposed model saved beside its base model, loaded back the way peft's adapters are.

    svdtrain.save_pretrained(model, "out/")          # svdtrain_model.safetensors + svdtrain_plan.json
    model = svdtrain.from_pretrained(build_base(), "out/")   # same outputs, ranks and MACs

The safetensors file holds the model's tensors (the factors, masks and every other weight;
a tensor shared under two names once); the JSON holds the plan of each SVD layer (rank, form,
recorded calls; its type, matrix shape and, for a conv, kernel and mode, checked on load), the
other names of a layer shared under several, and the svdtrain version. A load that does not fit
is refused before any tensor is copied, and `from_pretrained` then leaves the base model as it was. Needs
`safetensors` (`pip install svdtrain[hf]`).
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .conv import SVDConv2d
from .layers import svd_layers, unwrap

WEIGHTS = "svdtrain_model.safetensors"
PLAN = "svdtrain_plan.json"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("save_pretrained / from_pretrained need safetensors: pip install svdtrain[hf]") from None
    return safetensors.torch


def save_pretrained(model: nn.Module, directory) -> Path:
    """Write `model`'s SVD form to `directory` (created if needed); returns the directory."""
    from . import __version__
    model = unwrap(model)
    layers = dict(svd_layers(model))
    if not layers:
        raise ValueError("save_pretrained: the model has no SVD layers (decompose it first)")
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"save_pretrained: {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for name, value in model.state_dict(keep_vars=False).items():
        if not hasattr(value, "data_ptr"):
            continue  # extra state: in the plan
        key = (value.data_ptr(), value.dtype, tuple(value.shape))
        if value.numel() and key in seen:
            continue  # a tied weight: its first name carries it
        seen.add(key)
        tensors[name] = value.detach().cpu().contiguous()
    modes = {n: layer.mode for n, layer in layers.items() if isinstance(layer, SVDConv2d) and layer.kernel_size != (1, 1)}
    first = {id(m): n for n, m in layers.items()}
    aliases = {n: first[id(m)] for n, m in model.named_modules(remove_duplicate=False)
               if id(m) in first and n != first[id(m)]}  # a layer shared under another name
    plan = {"svdtrain_version": __version__, "mode": next(iter(modes.values()), "channel"),
            "layers": {n: {"rank": layer.rank, "full_rank": layer.full_rank, **_shape(layer), **layer.plan.state()}
                       for n, layer in layers.items()},
            "aliases": aliases}
    _safetensors().save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / PLAN).write_text(json.dumps(plan, indent=1) + "\n")
    return out


def _shape(layer) -> dict:
    """What a layer must match to take the saved factors: its type, matrix view and, for a
    conv, its kernel and mode (two convs of transposed kernels share a matrix shape)."""
    shape = {"kind": type(layer).__name__, "matrix": [layer.rows, layer.cols]}
    if isinstance(layer, SVDConv2d):
        shape.update(kernel_size=list(layer.kernel_size), mode=layer.mode)
    return shape


def read_plan(directory) -> dict:
    """The saved plan, or a one-line error naming what is wrong with the directory."""
    path = Path(directory)
    if not (path / PLAN).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} holds no svdtrain model ({PLAN} and {WEIGHTS}); write one with save_pretrained")
    try:
        plan = json.loads((path / PLAN).read_text())
        plan["layers"], plan["mode"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path / PLAN} is not an svdtrain plan") from None
    return plan


def from_pretrained(base_model: nn.Module, directory) -> nn.Module:
    """Decompose a freshly built `base_model` as the saved one was (same layers, mode) and load
    the saved factors, masks, weights and plans into it; returns it."""
    from .decompose import _set_submodule, decompose
    plan = read_plan(directory)
    own = dict(base_model.named_modules(remove_duplicate=False))
    aliases = plan.get("aliases", {})
    modes = {n: saved.get("mode", plan["mode"]) for n, saved in plan["layers"].items()}
    modes.update({alias: modes[n] for alias, n in aliases.items() if n in modes})
    for mode in sorted(set(modes.values())):  # a saved model may mix channel and spatial convs
        names = {n for n, m in modes.items() if m == mode}

        def skip(name, module, names=names):  # a layer kind the saved model left dense, or of another mode
            return not any(n == name or n.startswith(name + ".") for n in names)
        decompose(base_model, mode=mode, init="random", skip=skip)
    try:
        return load_into(base_model, directory, plan)
    except BaseException:  # the base model as it was: its own layers back in place
        for name, module in own.items():
            if name and base_model.get_submodule(name) is not module:
                _set_submodule(base_model, name, module)
        raise


def load_into(model: nn.Module, directory, plan: dict | None = None) -> nn.Module:
    """Load a saved SVD form into `model`, decomposed already with the same layers."""
    plan = read_plan(directory) if plan is None else plan
    model = unwrap(model)
    layers = dict(svd_layers(model))
    if set(layers) != set(plan["layers"]):
        missing, extra = sorted(set(plan["layers"]) - set(layers)), sorted(set(layers) - set(plan["layers"]))
        raise ValueError(f"{directory} does not match this model: saved SVD layers it lacks {missing[:3]}, "
                         f"its SVD layers not saved {extra[:3]}")
    for name, saved in plan["layers"].items():
        if saved["full_rank"] != layers[name].full_rank:
            raise ValueError(f"{directory} does not match this model: {name} has full rank "
                             f"{layers[name].full_rank}, saved {saved['full_rank']}")
        have = _shape(layers[name])
        for key in (k for k in have if k in saved and saved[k] != have[k]):  # older plans lack these keys
            raise ValueError(f"{directory} does not match this model: {name} has {key} {have[key]}, saved {saved[key]}")
    state = _safetensors().load_file(str(Path(directory) / WEIGHTS))
    for name, saved in plan["layers"].items():
        state[f"{name}._extra_state" if name else "_extra_state"] = saved
    own = {k: v for k, v in model.state_dict().items() if hasattr(v, "data_ptr")}
    wrong = [k for k, v in state.items() if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    if wrong:  # before any tensor is copied
        raise ValueError(f"{directory} does not match this model: {wrong[0]} has shape {tuple(own[wrong[0]].shape)}, "
                         f"saved {tuple(state[wrong[0]].shape)}")
    loaded = {own[k].data_ptr() for k in state if k in own}
    shared = {k for k, v in own.items() if k not in state and v.numel() and v.data_ptr() in loaded}  # tied
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in shared]
    if missing or result.unexpected_keys:
        raise ValueError(f"{directory} does not match this model: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    return model
