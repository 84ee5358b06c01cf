"""Export a trained SVD-form model as a compact model made of ordinary torch.nn layers."""
from __future__ import annotations

import copy
import inspect
import logging
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .kinds import exported_by
from .latency import own_rng
from .layers import SVDLayer, unwrap
from .macs import profile

log = logging.getLogger("svdtrain")


def export(model: nn.Module, input_shape=None, trace: bool = True, choose: str = "macs",
           round_to: int = 8, reps: int = 7, channels_last: bool = False, example_inputs=None) -> nn.Module:
    """A new model with the same outputs in which every SVD layer is ordinary layers, in
    eval mode whatever mode `model` was in (dropout inside traced attention is off).

    Each SVD layer becomes what its plan says (`layer.plan.form`): "dense" one dense
    Conv2d/Linear, "factored" its two factor layers at its rank (an nn.Sequential of two
    Conv2d/Linear), "auto" whichever is cheaper:
      choose="macs"     fewer MACs over the calls its plan recorded: at `input_shape` /
                        `example_inputs` when given (the pass is profiled again), else at the
                        sizes of the last profiled pass (prune, count_macs, the budget
                        controller), so what ships is what those counted. A layer whose
                        `.weight` other code read in that pass ships dense.
      choose="latency"  faster on this machine, measured: each layer's dense form, its
                        factor pair, and the pair with its rank padded with zeros up to a
                        multiple of `round_to` (same outputs; kernels often prefer such
                        channel counts) run on random inputs of the layer's real shape at
                        `input_shape` (batch included: choose at the batch you deploy) with
                        the current torch thread count; the median of `reps` interleaved
                        runs decides. The result is specific to this CPU/GPU and batch.
    An SVDMultiheadAttention becomes an nn.MultiheadAttention when all its projections ship
    dense, else a torch.fx GraphModule of its projection layers and one call of
    `svdtrain.attention.attend` (plain torch code; torch.export programs of the result do not
    need svdtrain).
    example_inputs (a tensor or tuple passed to the model as is) replaces input_shape for
    models that take token ids, several inputs or another dtype.

    trace=True returns a torch.fx GraphModule, so the result holds no svdtrain class at all
    and unpickles without svdtrain (except where factored attention ships: its graph calls
    `svdtrain.attention.attend`; torch.export or ONNX export it without svdtrain); models that
    torch.fx cannot trace, or whose forward takes optional arguments (`mask=None`: a trace would
    fix the branch taken), fall back (logged) to a copy of the model's own structure. The original model is not changed.
    """
    p = next(unwrap(model).parameters(), None)
    # new layers' init and the timings' inputs draw from a stream of export's own: a user's
    # training loop that exports goes on as it would have
    with own_rng(p) if p is not None else torch.random.fork_rng(devices=[]):
        return _export(model, input_shape, trace, choose, round_to, reps, channels_last, example_inputs)


def _export(model, input_shape, trace, choose, round_to, reps, channels_last, example_inputs) -> nn.Module:
    if choose not in ("macs", "latency"):
        raise ValueError(f"choose must be 'macs' or 'latency', not {choose!r}")
    sized = input_shape is not None or example_inputs is not None
    if choose == "latency" and not sized:
        raise ValueError("choose='latency' needs input_shape (the deployment batch and size) or example_inputs")
    if not any(isinstance(m, SVDLayer) for m in unwrap(model).modules()):
        log.warning("svdtrain: export: the model has no SVD layers (was it decomposed?); "
                    "returning a copy of it as it is")
    if not sized and not any(m.plan.calls for m in unwrap(model).modules() if isinstance(m, SVDLayer)):
        log.warning("svdtrain: export: no forward pass was profiled (give input_shape or example_inputs): "
                    "a layer whose .weight other code reads (a tied head) is not known and may ship factored")
    compact = copy.deepcopy(unwrap(model)).eval()  # what ships runs in eval mode (traced so too)
    if sized:
        profile(compact, input_shape, example_inputs)  # each plan records its calls at these sizes
    replacements, built = [], {}
    # Every name: a layer registered under two names is replaced under both, by one module.
    for name, module in compact.named_modules(remove_duplicate=False):
        if not isinstance(module, SVDLayer):
            continue
        if id(module) not in built:
            calls = module.plan.calls
            if choose == "latency" and calls and module.plan.form == "auto" and not module.plan.reads_weight:
                new = _fastest(name, module, calls[0].shape, round_to, reps, channels_last)
            else:  # the plan: its form, or for "auto" its cost rule over the recorded calls
                new = module.exported()
            built[id(module)] = new.to(module.U.device, module.U.dtype).eval()
        replacements.append((name, built[id(module)]))
    for name, new in replacements:
        if not name:
            return new  # the model was a single SVD layer
        _set(compact, name, new)
    # Layer kinds built of SVD layers (attention) last: their projections are ordinary by now.
    containers = {}
    for name, module in list(compact.named_modules(remove_duplicate=False)):
        kind = exported_by(module)
        if kind is not None:
            containers.setdefault(id(module), kind(module).eval())
            if not name:
                return containers[id(module)]
            _set(compact, name, containers[id(module)])
    _restore_fast_paths(compact)
    if not trace:
        return compact
    optional = _optional_args(compact)
    if optional:  # fx would settle `if mask is None` once, at trace time, for every later call
        log.info("svdtrain: export keeps the model's module structure: its forward takes optional "
                 "arguments (%s) that a torch.fx trace would fix", ", ".join(optional))
        return compact
    try:
        return torch.fx.symbolic_trace(compact).eval()
    except Exception as err:  # data-dependent control flow etc.: keep the module structure
        log.info("svdtrain: torch.fx could not trace the model (%s); export keeps its "
                 "module structure", str(err).splitlines()[0] if str(err) else type(err).__name__)
        return compact


def _optional_args(module: nn.Module) -> list[str]:
    """The forward's arguments with a default value, or variadic ones."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is not p.empty
            or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _restore_fast_paths(compact: nn.Module) -> None:
    """decompose turns off nn.TransformerEncoderLayer's fused inference path (it would bypass
    the SVD layers); an encoder layer that ships all-plain takes it again, as PyTorch sets it."""
    for m in compact.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and type(m.self_attn) is nn.MultiheadAttention \
                and type(m.linear1) is nn.Linear and type(m.linear2) is nn.Linear:
            act = m.activation
            relu = act is F.relu or isinstance(act, nn.ReLU)
            m.activation_relu_or_gelu = 1 if relu else 2 if act is F.gelu or isinstance(act, nn.GELU) else 0


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def pad_rank(pair: nn.Sequential, rank: int) -> nn.Sequential:
    """The factor pair with `rank` inner channels/features, the added ones zero: same outputs."""
    first, second = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
    extra = rank - first.weight.shape[0]
    if extra < 0:
        raise ValueError(f"pad_rank: rank {rank} is below the pair's rank {first.weight.shape[0]}")
    with torch.no_grad():
        first.weight = nn.Parameter(torch.cat([first.weight, first.weight.new_zeros(
            (extra,) + first.weight.shape[1:])], 0))
        second.weight = nn.Parameter(torch.cat([second.weight, second.weight.new_zeros(
            (second.weight.shape[0], extra) + second.weight.shape[2:])], 1))
    if isinstance(first, nn.Conv2d):
        first.out_channels, second.in_channels = rank, rank
    else:
        first.out_features, second.in_features = rank, rank
    return nn.Sequential(first, second)


def _fastest(name: str, layer: SVDLayer, input_shape, round_to: int, reps: int,
             channels_last: bool) -> nn.Module:
    """Time the layer's ordinary forms on an input of `input_shape`; return the fastest."""
    pair = layer.factor_layers()
    candidates = {"dense": layer.dense_layer(), "factored": pair}
    padded = -(-layer.rank // round_to) * round_to if round_to > 1 else layer.rank  # rounded up
    if layer.rank < padded < layer.full_rank:
        candidates[f"factored, rank padded to {padded}"] = pad_rank(pair, padded)
    p = layer.U
    x = torch.randn(input_shape, device=p.device, dtype=p.dtype)
    fmt = torch.channels_last if channels_last and x.dim() == 4 else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    times = {key: [] for key in candidates}
    for m in candidates.values():  # outside inference mode: one of them joins the model
        m.to(p.device, p.dtype).eval().to(memory_format=fmt)
    with torch.inference_mode():
        for m in candidates.values():
            m(x)  # warm-up: kernel selection, allocation
        for _ in range(reps):
            for key, m in candidates.items():
                if p.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(x)
                if p.is_cuda:
                    torch.cuda.synchronize()
                times[key].append(time.perf_counter() - t0)
    best = min(times, key=lambda k: statistics.median(times[k]))
    log.debug("svdtrain: %s -> %s (%s)", name, best,
              ", ".join(f"{k} {1e3 * statistics.median(v):.3f} ms" for k, v in times.items()))
    # Weights go back to the standard layout: torch.export saves and loads that one cleanly;
    # converting the deployed model to channels_last is the user's one call.
    return candidates[best].to(memory_format=torch.contiguous_format)


def _dynamic_batch(example_inputs: tuple) -> tuple[tuple, tuple]:
    """Inputs with a batch of at least 2 (a batch of 1 would be specialised to 1) and the
    dynamic-shape spec marking dimension 0 of each as one shared batch size."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    inputs = tuple(x.expand(2, *x.shape[1:]).contiguous() if x.shape[0] < 2 else x for x in example_inputs)
    return inputs, tuple({0: batch} for _ in inputs)


def export_program(compact: nn.Module, example_input: torch.Tensor, path=None, dynamic_batch: bool = True):
    """torch.export the compact model (eval mode), batch size dynamic unless told otherwise;
    optionally save it as a .pt2 file that loads with `torch.export.load(path).module()`
    without svdtrain."""
    compact = compact.eval()
    inputs, dynamic = _dynamic_batch((example_input,)) if dynamic_batch else ((example_input,), None)
    program = torch.export.export(compact, inputs, dynamic_shapes=dynamic)
    if path is not None:
        torch.export.save(program, str(path))
    return program


def export_onnx(compact: nn.Module, example_inputs, path, dynamic_batch: bool = True):
    """Write the compact model (eval mode) as an ONNX file through torch's exporter (it traces
    with torch.export), batch size dynamic unless told otherwise; runs in ONNX Runtime with
    PyTorch's outputs. `example_inputs`: a tensor or a tuple of the model's positional inputs.
    The weights are stored in the file itself, except for models over ONNX's 2 GB limit: those
    get a `<name>.data` file beside it, which must travel with it. Needs onnx and onnxscript
    (`pip install svdtrain[onnx]`; onnxruntime to run it)."""
    try:
        import onnxscript  # noqa: F401  torch's exporter needs it
    except ImportError:
        raise ImportError("export_onnx needs onnx and onnxscript: pip install svdtrain[onnx]") from None
    compact = compact.eval()
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    inputs, dynamic = _dynamic_batch(inputs) if dynamic_batch else (inputs, None)
    with torch.no_grad():
        big = sum(p.numel() * p.element_size() for p in compact.parameters()) > 1.5e9
        torch.onnx.export(compact, inputs, str(path), dynamo=True, dynamic_shapes=dynamic, verbose=False,
                          external_data=big)
    return path
