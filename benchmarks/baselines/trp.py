"""Trained Rank Pruning (Xu et al., IJCAI 2020): dense training with a periodic in-place SVD
truncation of every weight and a nuclear-norm subgradient, converted to svdtrain's SVD form
at the end."""
from __future__ import annotations

import logging

import torch
from torch import nn

import svdtrain
from svdtrain.decompose import Skip, _skip_predicate, eligible
from svdtrain.layers import matrix_to_weight, unwrap, weight_to_matrix
from svdtrain.prune import energy_rank

log = logging.getLogger(__name__)


def _truncatable(module: nn.Module) -> bool:
    """A layer TRP truncates: one that `decompose` turns into an SVD layer and that holds a
    single weight matrix (Linear, Conv2d; not MultiheadAttention's packed projections)."""
    return eligible(module) and isinstance(module, (nn.Linear, nn.Conv2d))


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
        and nn.Conv2d with groups=1 (the reference code also skips the first conv);
        nn.MultiheadAttention stays dense.

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
        skipped = _skip_predicate(skip, unwrap(model))
        self._layers = [(name, m) for name, m in unwrap(model).named_modules()
                        if _truncatable(m) and not skipped(name, m)]
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
        log.debug("TRP truncation at step %d: total rank %d over %d layers",
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
        svdtrain.decompose(self.model, mode=self.mode, init="svd", skip=lambda name, m: name not in names)
        self._converted = True
        self._factors.clear()
        if macs_budget is not None:
            return svdtrain.prune(self.model, macs_budget=macs_budget, input_shape=input_shape)
        if keep_energy is not None:
            return svdtrain.prune(self.model, keep_energy=keep_energy)
        config = {name: self.ranks[name] if name in unchanged else energy_rank(layer.s, self.keep_energy)
                  for name, layer in svdtrain.svd_layers(self.model)}
        svdtrain.set_ranks(self.model, config)
        return svdtrain.ranks(self.model)

    def _check_live(self) -> None:
        if self._converted:
            raise RuntimeError("this TRP has converted its model (to_svd_model); "
                               "its layers are SVD layers now")
