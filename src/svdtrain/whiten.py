"""Activation-aware decomposition: factor W·S instead of W, S from the layer's inputs on a few
calibration batches (SVD-LLM's whitening; ASVD's diagonal scaling as the cheaper variant).

A layer's output error under a weight change D is ||X D^T||_F^2 = tr(D C D^T) n, with X the
n inputs (rows) it saw and C = X^T X / n their second moment. With S S^T = C,
||X D^T||_F^2 / n = ||D S||_F^2, so the truncated SVD of W S is the rank-k weight of least
output error, and its singular values squared are each direction's share of it. Here:

    W S = U Σ V'^T   ->   U, s := Σ, V^T := V'^T S^{-1}   (W = U diag(s) V^T exactly)

so the layer still computes W, its `s` is the whitened spectrum (energy share and the
MACs-budget rule then rank values by output error), and V is orthonormal in the activation
metric (V^T C V = I), no longer in the plain one: the layer keeps S (`set_metric`) and SVD
training's orthogonality term holds V to V^T C V = I (the plain term would start at hundreds on
a trained ResNet-20 and pull V back to the plain metric, undoing the whitening). Two choices of S:

- "cholesky" (SVD-LLM): S = L, the lower Cholesky factor of C + eps·mean(diag C)·I with
  eps = DAMPING = 1e-6: the small relative damping keeps rank-deficient moments (fewer samples
  than columns, input channels that are always zero) factorable; it adds eps·mean(diag C)
  ||D||_F^2 to the error the truncation minimises, negligible otherwise.
- "diag" (ASVD): S = diag(mean_rows |x_j|)^ALPHA, ALPHA = 0.5, floored at DAMPING times its
  mean (a column that is always zero).

The rows of X: a Linear's inputs flattened over every dim but the last; a channel-mode Conv2d's
unfolded patches (torch.nn.functional.unfold with its stride, padding, dilation and padding
mode; c·kh·kw columns in the order of the weight's channel view).
`decompose(model, init="svd", calibration=batches, whiten=...)` calls `whiten_model` on the
layers it has just put in SVD form; the inputs are read by forward pre-hooks on those SVD layers,
which compute exactly what the replaced layers did. nn.MultiheadAttention is covered: its q, k,
v and out projections are SVD layers called on the attention's query, key, value inputs and on
its attention output, each whitened by what it sees.

`unwhiten(model)` goes back: once the whitened spectrum has chosen the ranks, each whitened
layer is re-factored as the plain SVD of its cut matrix (outputs unchanged), so training goes on
in the plain parametrization (`prune.unwhiten` in a run).
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SVDMultiheadAttention
from .calibrate import run_batch
from .conv import SVDConv2d
from .layers import SVDLayer, SVDLinear, svd_layers
from .prune import zero_state

log = logging.getLogger("svdtrain")

WHITEN = ("cholesky", "diag")
DAMPING = 1e-6
ALPHA = 0.5
# The SVD forms whose inputs are read here; a kind whose SVD form is another type is refused.
SUPPORTED = (SVDLinear, SVDConv2d, SVDMultiheadAttention)


def check(init: str, mode: str, whiten: str, kinds: Iterable) -> None:
    """The one-line ValueErrors of a calibrated `decompose`, raised before any layer changes."""
    if init != "svd":
        raise ValueError(f"calibration needs init='svd' (it refactors the trained weights), got init={init!r}")
    if mode != "channel":
        raise ValueError(f"calibration supports mode='channel' only (a spatial view has no input "
                         f"second moment to whiten by), got mode={mode!r}")
    if whiten not in WHITEN:
        raise ValueError(f"whiten must be one of {WHITEN}, got {whiten!r}")
    for kind in kinds:
        if kind.svd_type not in SUPPORTED:
            raise ValueError(f"calibration cannot whiten layer kind {kind.name!r} "
                             f"(supported: Linear, Conv2d, MultiheadAttention, GPT-2 Conv1D)")


class Moment:
    """The running input statistic of one layer: sum of x x^T ("cholesky") or of |x| ("diag")
    over its input rows, in float64, and the row count."""

    def __init__(self, layer: SVDLayer, whiten: str):
        self.layer, self.whiten, self.rows = layer, whiten, 0
        self.total = None

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """x: the layer's input; mask: (batch, seq) bools of the real (unpadded) positions,
        applied where x is a Linear input shaped (batch, seq, features), or those rows
        flattened in order (batch x seq, features), as a mixture-of-experts block's shared expert sees them."""
        x = x.detach()
        if mask is not None and isinstance(self.layer, SVDLinear):
            if x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask.to(x.device)]
            elif x.dim() == 2 and x.shape[0] == mask.numel():
                x = x[mask.to(x.device).reshape(-1)]
        rows = input_rows(self.layer, x).double()  # float32 products err by more than the damping
        part = rows.T @ rows if self.whiten == "cholesky" else rows.abs().sum(0)
        self.total = part.double() if self.total is None else self.total + part.double()
        self.rows += rows.shape[0]

    def matrix(self) -> torch.Tensor:
        """S: lower triangular (cholesky), or the diagonal as a vector (diag); float64."""
        mean = self.total / self.rows
        if self.whiten == "diag":
            d = mean.pow(ALPHA)
            return d.clamp_min(DAMPING * float(d.mean()))
        eye = torch.eye(mean.shape[0], dtype=mean.dtype, device=mean.device)
        damping = DAMPING * float(mean.diagonal().mean())
        for _ in range(6):  # a rank-deficient moment may need more damping than DAMPING: x10 at a time
            factor, info = torch.linalg.cholesky_ex(mean + damping * eye)
            if int(info) == 0:
                return factor
            damping *= 10
        return torch.linalg.cholesky(mean + damping * eye)  # still not positive definite: its error


class Overflow(ValueError):
    """Whitened factors that do not fit the layer's dtype (float16 with inputs that are always
    near zero in some direction): whiten_model keeps that layer's plain SVD."""


def input_rows(layer: SVDLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its matrix view's columns: (positions, cols)."""
    if isinstance(layer, SVDConv2d):
        if layer.mode != "channel":
            raise ValueError("whitening needs a channel-mode SVDConv2d")
        if x.dim() == 3:  # unbatched (C, H, W)
            x = x.unsqueeze(0)
        padding = layer.padding
        if layer.padding_mode != "zeros":
            ph, pw = padding
            x = F.pad(x, (pw, pw, ph, ph), mode=layer.padding_mode)
            padding = (0, 0)
        patches = F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)
        return patches.transpose(1, 2).reshape(-1, layer.cols)
    if isinstance(layer, SVDLinear):
        return x.reshape(-1, layer.cols)
    raise ValueError(f"cannot whiten a {type(layer).__name__}")


@torch.no_grad()
def whiten_layer(layer: SVDLayer, S: torch.Tensor) -> None:
    """Refactor an unpruned SVD layer in place as W S = U Σ V'^T, s = Σ, V^T = V'^T S^{-1}, so it
    computes the same W. S: a lower-triangular (cols x cols) matrix, or a vector (a diagonal)."""
    if layer.rank != layer.full_rank:
        raise ValueError("whiten_layer needs an unpruned layer (whiten before pruning)")
    if S.shape not in ((layer.cols,), (layer.cols, layer.cols)):
        raise ValueError(f"S must be ({layer.cols},) or ({layer.cols}, {layer.cols}), got {tuple(S.shape)}")
    S = S.double()
    if S.dim() == 2 and not torch.equal(S, S.tril()):
        raise ValueError("S must be lower triangular (a Cholesky factor) or a vector")
    if not bool((S.diagonal() if S.dim() == 2 else S).abs().min() > 0):
        raise ValueError("S must be invertible (no zero on its diagonal)")
    w = layer.matrix().double()
    u, s, vh = torch.linalg.svd(w * S if S.dim() == 1 else w @ S, full_matrices=False)
    if S.dim() == 1:
        vh = vh / S
    else:  # V'^T S^{-1}: the solution X of X S = V'^T
        vh = torch.linalg.solve_triangular(S.to(vh.device), vh, upper=False, left=False)
    pairs = ((layer.U, u), (layer.s, s), (layer.V, vh.mT), (layer.V, S))
    if not all(bool(torch.isfinite(value.to(param.dtype)).all()) for param, value in pairs):
        raise Overflow(f"the whitened factors overflow {layer.V.dtype} (inputs near zero in some "
                       f"direction); the layer keeps its plain SVD")
    for param, value in pairs[:3]:
        param.copy_(value.to(param.dtype))
    layer.set_metric(S)  # V^T C V = I: orthogonality is kept in the activation metric


def collect_moments(model: nn.Module, layers: Iterable[SVDLayer], batches: Iterable, whiten: str) -> tuple[dict, int]:
    """Run `batches` through `model` (eval mode, no grad; every module's mode restored) with a
    forward pre-hook on each of `layers`; returns ({layer: Moment}, number of batches). A batch
    is a tensor, an (x, y, ...) tuple or list (x is passed), or a dict of keyword arguments;
    a dict's `attention_mask` (batch, seq) drops padded positions from the rows of every
    Linear input shaped (batch, seq, features)."""
    moments = {layer: Moment(layer, whiten) for layer in layers}
    current = {"mask": None}

    def hook(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        moments[module].add(x, current["mask"])

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in moments]
    modes = {m: m.training for m in model.modules()}
    used = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask") if isinstance(batch, dict) else None
                current["mask"] = mask.bool() if torch.is_tensor(mask) and mask.dim() == 2 else None
                run_batch(model, batch)
                used += 1
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return moments, used


def whiten_model(model: nn.Module, layers: Iterable[SVDLayer], batches: Iterable, whiten: str = "cholesky") -> int:
    """Whiten each of `layers` (unpruned SVD layers of `model`) by its inputs on `batches`;
    returns the number of batches used. A layer the batches never reach keeps its plain SVD
    (a WARNING names it)."""
    if whiten not in WHITEN:
        raise ValueError(f"whiten must be one of {WHITEN}, got {whiten!r}")
    layers = list(dict.fromkeys(layers))  # a shared layer once
    moments, used = collect_moments(model, layers, batches, whiten)
    if used == 0:
        raise ValueError("calibration gave no batches")
    unseen, overflow = [], []
    for layer, moment in moments.items():
        if moment.rows == 0 or not bool(moment.total.abs().sum() > 0):
            unseen.append(layer)
            continue
        try:
            whiten_layer(layer, moment.matrix())
        except Overflow:
            overflow.append(layer)
    names = {id(m): n for n, m in model.named_modules()}
    log.info("svdtrain: whitened %d layers (%s) on %d calibration batches",
             len(layers) - len(unseen) - len(overflow), whiten, used)
    for left, why in ((unseen, "no calibration input reached"),
                      (overflow, "whitened factors overflow the dtype of")):
        if left:
            log.warning("svdtrain: %s %s: plain SVD kept", why, ", ".join(names.get(id(m), "?") for m in left[:8]))
    return used


@torch.no_grad()
def unwhiten(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, every: bool = False) -> int:
    """Re-factor each whitened SVD layer of `model` (one with a metric; with `every`, each SVD
    layer: a whitened one whose metric was dropped for plain orthogonality has none) at its
    active rank as the plain SVD of the same matrix, and drop its metric: the outputs are unchanged, U and V are
    orthonormal in the plain metric again (the orthogonality term starts at ~0), and training
    goes on in the plain parametrization once the whitened spectrum has chosen the ranks (the
    whitened V, V'^T S^{-1}, is badly conditioned for SGD). The optimizer's state of those
    factors is zeroed (it belongs to the old parametrization). Returns the layers re-factored."""
    done = 0
    for _, layer in svd_layers(model):
        if getattr(layer, "metric", None) is None and not every:
            continue
        idx = layer.active.nonzero().squeeze(1)
        u, s, v = (f.detach().double() for f in layer.factors())
        qu, ru = torch.linalg.qr(u)  # U diag(s) V^T = Qu (Ru diag(s) Rv^T) Qv^T: the SVD of the r x r core
        qv, rv = torch.linalg.qr(v)
        a, sigma, bh = torch.linalg.svd((ru * s) @ rv.mT)
        for param, value in ((layer.U, qu @ a), (layer.V, qv @ bh.mT)):
            param[:, idx] = value.to(param.dtype)
        layer.s[idx] = sigma.to(layer.s.dtype)
        layer.set_metric(None)
        for param in (layer.U, layer.s, layer.V) if optimizer is not None else ():
            zero_state(optimizer, param)
        done += 1
    if done:
        log.info("svdtrain: %d whitened layers re-factored as plain SVDs at their ranks", done)
    return done
