"""The two regularizers of SVD training, and a hook for users' own training loops."""
from __future__ import annotations

import torch
from torch import nn

from .layers import SVDLayer, svd_layers

SPARSITY_KINDS = ("l1", "hoyer", "hoyer_square")
_EPS = 1e-12  # keeps Hoyer finite on a layer whose singular values are all zero


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _gram_deviation(f: torch.Tensor, probes: int = 0) -> torch.Tensor:
    """||G - I||_F^2 for G the Gram of the smaller side, as the reference code does for a factor
    with fewer rows. probes = k > 0 (and below G's size): the unbiased estimate ||(G - I) Z||_F^2 / k
    with Z a fresh Gaussian (size x k), which never forms G: 2·rows·size·k multiply-adds instead
    of rows·size^2, and an unbiased gradient of the same penalty."""
    if f.dtype in (torch.float16, torch.bfloat16) or _autocast_on(f.device.type):
        # near I the deviation is below half precision's resolution (and its sum can pass
        # float16's range): the Grams in float32, whatever autocast is on
        with torch.autocast(f.device.type, enabled=False):
            return _gram_deviation(f.float(), probes)
    tall = f.shape[0] >= f.shape[1]
    size = f.shape[1] if tall else f.shape[0]
    if 0 < probes < size:
        z = torch.randn(size, probes, device=f.device, dtype=f.dtype)
        gz = f.T @ (f @ z) if tall else f @ (f.T @ z)
        return (gz - z).pow(2).sum() / probes
    g = f.T @ f if tall else f @ f.T
    eye = torch.eye(g.shape[0], device=g.device, dtype=g.dtype)
    return (g - eye).pow(2).sum()


def layer_orthogonality(layer: SVDLayer, probes: int = 0) -> torch.Tensor:
    """(||U^T U - I||_F^2 + ||V^T V - I||_F^2) / r^2 over the active columns, r the active rank
    (the reference removes pruned columns before fine-tuning, so it divides by that r too); with a metric S
    (a whitened layer, `SVDLayer.set_metric`) V^T V is (S^T V)^T (S^T V) = V^T C V. probes > 0:
    each Gram term estimated with that many random probes (`_gram_deviation`)."""
    u, _, v = layer.factors()
    metric = layer._buffers.get("metric")
    if metric is not None:
        v = metric.T @ v if metric.dim() == 2 else metric[:, None] * v
    r = u.shape[1]
    if r == 0:  # no active value: nothing to hold orthogonal
        return u.sum() * 0.0
    return (_gram_deviation(u, probes) + _gram_deviation(v, probes)) / (r * r)


def layer_sparsity(layer: SVDLayer, kind: str) -> torch.Tensor:
    """Sparsity of the active singular values: l1, hoyer or hoyer_square."""
    s = layer.factors()[1]
    if s.dtype in (torch.float16, torch.bfloat16):  # _EPS underflows in half precision
        s = s.float()
    l1 = s.abs().sum()
    if kind == "l1":
        return l1
    sq = s.pow(2).sum()
    if kind == "hoyer":
        return l1 / sq.clamp_min(_EPS).sqrt()
    if kind == "hoyer_square":
        return l1.pow(2) / sq.clamp_min(_EPS)
    raise ValueError(f"sparsity kind must be one of {SPARSITY_KINDS}, got {kind!r}")


def _total(model: nn.Module, fn) -> torch.Tensor:
    terms = [fn(layer) for _, layer in svd_layers(model)]
    if not terms:
        raise ValueError("the model has no SVD layers (decompose(model) first; it replaces plain Conv2d/Linear layers only)")
    return torch.stack(terms).sum()


def orthogonality_loss(model: nn.Module, probes: int = 0) -> torch.Tensor:
    """Sum over SVD layers of (||U^T U - I||_F^2 + ||V^T V - I||_F^2) / r^2 (probes > 0: its
    unbiased random-probe estimate, for wide layers where the r x r Grams dominate a step)."""
    return _total(model, lambda layer: layer_orthogonality(layer, probes))


def sparsity_loss(model: nn.Module, kind: str = "hoyer") -> torch.Tensor:
    """Sum over SVD layers of the sparsity of s: "l1" sum|s|, "hoyer" ||s||_1/||s||_2,
    "hoyer_square" ||s||_1^2/||s||_2^2 (active values only)."""
    if kind not in SPARSITY_KINDS:
        raise ValueError(f"sparsity kind must be one of {SPARSITY_KINDS}, got {kind!r}")
    return _total(model, lambda layer: layer_sparsity(layer, kind))


class Regularizer:
    """`loss = task_loss + reg(model)`: orth * orthogonality + strength * sparsity.

    strength defaults to 0.005 (Hoyer on a CIFAR ResNet-20 gives about a third of the dense
    MACs in 10 epochs); a `BudgetController` steers it from there toward a MACs target.
    orth_probes = k > 0 replaces each r x r Gram of the orthogonality term by an unbiased
    estimate from k random probes (cost 2k/r of the exact term; for transformer-sized layers,
    where the exact term costs about half a step). Its variance grows with the distance from
    orthonormal: from a random start, 2 probes at lr 0.05 diverged where 4 and the exact term
    did not; the language-model benchmark uses 8.

    Without probes the value depends only on the parameters, so under DDP every rank computes
    the same term from its (synchronised) replica; with probes each rank draws its own, and
    their gradients are averaged as the task loss's are.
    """

    def __init__(self, orth: float = 1.0, sparsity: str | None = "hoyer", strength: float = 0.005,
                 orth_probes: int = 0):
        if sparsity is not None and sparsity not in SPARSITY_KINDS:
            raise ValueError(f"sparsity must be None or one of {SPARSITY_KINDS}, got {sparsity!r}")
        if orth < 0 or strength < 0:
            raise ValueError("regularizer weights must be >= 0")
        if sparsity is not None and strength == 0:
            raise ValueError(f"sparsity={sparsity!r} with strength 0 would be off: give a strength > 0 "
                             "(or sparsity=None)")
        if orth_probes < 0:
            raise ValueError(f"orth_probes must be >= 0 (0 = the exact term), got {orth_probes}")
        self.orth, self.sparsity, self.strength, self.orth_probes = orth, sparsity, strength, orth_probes
        self.last: dict[str, torch.Tensor] = {}

    def terms(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The unweighted loss terms that are switched on."""
        out = {}
        if self.orth:
            out["orthogonality"] = orthogonality_loss(model, self.orth_probes)
        if self.sparsity and self.strength:
            out["sparsity"] = sparsity_loss(model, self.sparsity)
        return out

    def __call__(self, model: nn.Module) -> torch.Tensor:
        terms = self.terms(model)
        # Detached tensors, not floats: converting here would sync a GPU every step.
        self.last = {k: v.detach() for k, v in terms.items()}
        weights = {"orthogonality": self.orth, "sparsity": self.strength}
        if not terms:
            return next(model.parameters()).new_zeros(())
        return sum(weights[k] * v for k, v in terms.items())


def param_groups(model: nn.Module, weight_decay: float, decay_s: bool = False) -> list[dict]:
    """Optimizer parameter groups with weight decay on everything but the singular values.

    Weight decay on s would fight (or double) the sparsity term, so s goes in a group with
    weight_decay=0 unless `decay_s` is True.
    """
    s_params = {id(layer.s) for _, layer in svd_layers(model)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if id(p) in s_params and not decay_s else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
