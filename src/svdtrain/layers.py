"""SVD-form layers: a weight kept as W = U diag(s) V^T and trained in that form.

Each layer holds three parameters, U (rows x r), s (r,) and V (cols x r), over a matrix
view of the dense weight (conv.py: the two views of a conv weight), plus a boolean buffer
`active` that marks the singular values that survived pruning: the one store of what was
pruned. Pruned values are masked, not deleted, so parameter shapes never change: a user's
optimizer stays valid and a state_dict loads into a freshly decomposed model (the mask
carries the ranks; the plan's form and recorded calls travel as the layer's extra state).

Each layer carries a `Plan` (plan.py): its rank, its form and the input sizes of its last
profiled calls; forward, counts, budget pruning and export all read it. Forward runs one of
two exact paths:
- "dense": rebuild W from the factors (one small matmul) and run one dense op; cheapest
  while the rank is high (training at full rank costs about what dense training costs);
- "factored": run the two factor layers at the active rank; cheapest once the rank is low.
While ranks move (`plan.masked`, gradual pruning) it runs at full width times the mask, so a
compiled model is not recompiled at every rank change.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .matrix_view import matrix_to_weight, weight_to_matrix
from .plan import FORMS, Call, Plan, Recording

# Forward takes the factored path only when its MACs are below this fraction of the dense
# op's: two small convs carry overhead (an extra kernel launch, an intermediate tensor)
# that the MAC count does not see.
FACTORED_BELOW = 0.7


class SVDLayer(nn.Module):
    """Base class: holds U, s, V, the pruning mask, the plan and the losses' view of them."""

    rows: int
    cols: int

    def _init_factors(self, matrix: torch.Tensor | None, init: str) -> None:
        rows, cols = self.rows, self.cols
        r = min(rows, cols)
        if init == "svd":
            if matrix is None:
                raise ValueError("init='svd' needs the dense weight")
            # SVD in float64 for accuracy, factors stored in the weight's own dtype
            dtype = matrix.dtype if matrix.dtype in (torch.float64,) else torch.float32
            u, s, vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)
            u, s, v = u.to(dtype), s.to(dtype), vh.mH.to(dtype)
        elif init in ("random", "random_scaled"):
            # Kaiming-normal factors, s drawn as |N(0,1)| (so U diag(s) V^T equals the
            # reference's U diag(|s|) V^T at the start). s then trains signed: a value that
            # crosses zero is the reference's |s_i| with u_i negated, the same weights without
            # the kink of |s| at 0; sparsity terms and pruning read |s|. "random" is the
            # reference code's scratch init: its V^T (r x cols) drawn with fan-in cols, so
            # Var(W) = 4/cols (sqrt(2) x a Kaiming dense init's std; in spatial mode the
            # reference's matrix is this view's transpose, so its fan-in is out x kh, not
            # in x kw). "random_scaled" draws V (cols x r) with fan-in r
            # (Var(W) = 4/r) and scales s so that ||U diag(s) V^T|| equals the norm of the
            # layer's own fresh dense weight.
            u = torch.empty(rows, r)
            nn.init.kaiming_normal_(u)
            if init == "random":
                v = nn.init.kaiming_normal_(torch.empty(r, cols)).T
            else:
                v = nn.init.kaiming_normal_(torch.empty(cols, r))
            s = torch.randn(r).abs()
            if init == "random_scaled":
                if matrix is None:
                    raise ValueError("init='random_scaled' needs the dense weight (its scale)")
                s = s * (matrix.detach().float().norm() / ((u * s) @ v.T).norm())
        else:
            raise ValueError(f"init must be 'svd', 'random' or 'random_scaled', got {init!r}")
        self.U = nn.Parameter(u.contiguous())
        self.s = nn.Parameter(s.contiguous())
        self.V = nn.Parameter(v.contiguous())
        self.register_buffer("active", torch.ones(r, dtype=torch.bool))
        self.plan = Plan(r, rows, cols, unit=Call((), *self.macs(None, rank=1)))

    # ----- the plan: kept current by set_active, load_state_dict and .to() -----
    def _refresh(self) -> None:
        self.plan.refresh(self.active)

    def get_extra_state(self) -> dict:
        return self.plan.state()

    def set_extra_state(self, state: dict) -> None:
        self.plan.load(state)

    def set_metric(self, factor: torch.Tensor | None) -> None:
        """The metric of V's orthogonality: with S (lower-triangular cols x cols, or a vector for
        a diagonal), `orthogonality_loss` penalises (S^T V)^T (S^T V) - I, i.e. V^T C V = I for
        C = S S^T, instead of V^T V = I. whiten.py sets it to the factor of the layer's input
        moment (V is orthonormal in that metric after whitening); None: the plain one. Saved
        in the state dict."""
        if factor is None:
            self._buffers.pop("metric", None)
        else:
            self.register_buffer("metric", factor.detach().to(self.V.dtype).clone())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "metric"  # a whitened layer's metric: made here, filled by the load
        if key in state_dict and "metric" not in self._buffers:
            self.register_buffer("metric", torch.empty_like(state_dict[key], dtype=self.V.dtype, device=self.V.device))
        elif key not in state_dict and prefix + "U" in state_dict:  # a load of this layer without one
            self._buffers.pop("metric", None)
        saved = state_dict.get(prefix + "U")
        if torch.is_tensor(saved) and saved.shape != self.U.shape and getattr(self, "mode", None):
            error_msgs.append(f"{prefix[:-1] or 'the layer'}: factors of shape {tuple(saved.shape)} do not fit this "
                              f"{self.mode}-mode layer's {tuple(self.U.shape)}: saved from a model decomposed "
                              f"in the other mode (decompose(mode=...)) or another layer")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        key = prefix + "_extra_state"
        if key in missing_keys:  # saved before plans were: the form stays as it is
            missing_keys.remove(key)
        self._refresh()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if "active" in self._buffers:
            self._refresh()  # the mask buffer was replaced (device/dtype move): so are its indices
        return out

    def set_form(self, form: str) -> None:
        """Fix what the layer trains and ships as: "dense" (e.g. for code that reads `.weight`
        of the exported layer), "factored", or "auto" (the cheaper, by the plan's cost rule)."""
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.plan.form, self.plan.timed = form, False

    @property
    def forward_path(self) -> str:
        """The plan's form (its earlier name); assigning it calls `set_form`."""
        return self.plan.form

    @forward_path.setter
    def forward_path(self, form: str) -> None:
        self.set_form(form)

    # ----- the active (unpruned) part of the factors -----
    @property
    def full_rank(self) -> int:
        return self.s.numel()

    @property
    def rank(self) -> int:
        """Number of singular values still active (not pruned)."""
        return self.plan.rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, s, V) restricted to the active singular values; differentiable."""
        idx = self.plan.idx
        if idx is None:
            return self.U, self.s, self.V
        return self.U[:, idx], self.s[idx], self.V[:, idx]

    def _run_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The factors forward uses: the active ones, or while ranks move (plan.masked) all of
        them with s times the mask (same product; shapes that do not change with the rank)."""
        if self.plan.masked:
            return self.U, self.s * self.active, self.V
        return self.factors()

    @property
    def weight(self) -> torch.Tensor:
        """U diag(s) V^T in the original layer's weight shape, differentiable: code that reads
        `layer.weight` (a tied head) runs unchanged. Reading it changes nothing, except during
        a profiled pass (`svdtrain.macs.profile`), which records the read in the plan: such a
        layer then ships dense, since its exported form must still have a `.weight`."""
        if Recording.active:
            self.plan.reads_weight = True
            counter = Recording.products
            if counter is not None:
                counter.depth += 1  # the rebuild is not the model's work
                try:
                    return self.dense_weight()
                finally:
                    counter.depth -= 1
        return self.dense_weight()

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def matrix(self) -> torch.Tensor:
        """The matrix view U diag(s) V^T at the active rank."""
        u, s, v = self._run_factors()
        return (u * s) @ v.T

    def set_active(self, mask: torch.Tensor) -> None:
        """Keep only the singular values where `mask` is True; zero the others."""
        mask = mask.to(device=self.active.device, dtype=torch.bool)
        if mask.shape != self.active.shape:  # a broadcast mask would cut every value alike
            raise ValueError(f"set_active needs a mask of shape {tuple(self.active.shape)}, got {tuple(mask.shape)}")
        with torch.no_grad():
            self.active.copy_(mask)
            self.s.masked_fill_(~self.active, 0.0)
        self._refresh()

    # ----- cost -----
    def macs(self, in_hw: tuple[int, int] | None = None, rank: int | None = None) -> tuple[int, int]:
        """(dense MACs, factored MACs at `rank`) per sample for an input of spatial size in_hw."""
        raise NotImplementedError

    def call_cost(self, shape: tuple) -> Call:
        """The cost of one call on an input of `shape` (batch included)."""
        raise NotImplementedError

    def _use_factored(self, in_hw: tuple[int, int] | None) -> bool:
        """The training path: the plan's form, or for "auto" the factor pair where it costs
        under FACTORED_BELOW of the dense op (never while ranks move: one graph)."""
        if self.plan.form != "auto":  # a pair of 0 channels cannot run: at rank 0 the dense weight (0)
            return self.plan.form == "factored" and (self.plan.masked or self.plan.rank > 0)
        if self.plan.masked:
            return False
        if self.plan.rank == 0:
            return False
        dense, factored = self.macs(in_hw)
        return factored < FACTORED_BELOW * dense

    def exported(self) -> nn.Module:
        """The ordinary layer(s) this layer ships as, by its plan: the factor pair or one dense layer."""
        return self.factor_layers() if self.plan.ships_factored() else self.dense_layer()

    def _like(self) -> dict:
        """dtype and device of the factors: exported layers are made in them, never rounded."""
        return {"dtype": self.U.dtype, "device": self.U.device}

    def extra_repr(self) -> str:
        return f"rank={self.rank}/{self.full_rank}"


class SVDLinear(SVDLayer):
    """nn.Linear in SVD form; matrix view out x in."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 weight: torch.Tensor | None = None, init: str = "random"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rows, self.cols = out_features, in_features
        self._init_factors(weight, init)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, layer: nn.Linear, init: str = "svd") -> "SVDLinear":
        new = cls(layer.in_features, layer.out_features, layer.bias is not None,
                  weight=layer.weight, init=init)
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.detach())
        return new.to(device=layer.weight.device, dtype=layer.weight.dtype)

    def dense_weight(self) -> torch.Tensor:
        """U diag(s) V^T in nn.Linear's weight shape (out, in)."""
        return self.matrix()

    def macs(self, in_hw=None, rank=None):
        r = self.rank if rank is None else rank
        return self.in_features * self.out_features, r * (self.in_features + self.out_features)

    def call_cost(self, shape):
        positions = 1  # applies to every position of the last dim
        for n in shape[:-1]:
            positions *= n
        dense, per_rank = self.macs(rank=1)
        return Call(tuple(shape), positions * dense, positions * per_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_factored(None):
            u, s, v = self._run_factors()
            return F.linear(F.linear(x, v.T), u * s, self.bias)
        return F.linear(x, self.dense_weight(), self.bias)

    def factor_layers(self) -> nn.Sequential:
        """The two ordinary nn.Linear layers (in->r, r->out) at the active rank."""
        u, s, v = (t.detach() for t in self.factors())
        first = nn.Linear(self.in_features, u.shape[1], bias=False, **self._like())
        second = nn.Linear(u.shape[1], self.out_features, bias=self.bias is not None, **self._like())
        first.weight.data.copy_(v.T)
        second.weight.data.copy_(u * s)
        if self.bias is not None:
            second.bias.data.copy_(self.bias.detach())
        return nn.Sequential(first, second)

    def dense_layer(self) -> nn.Linear:
        """One ordinary nn.Linear holding U diag(s) V^T."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, **self._like())
        layer.weight.data.copy_(self.dense_weight().detach())
        if self.bias is not None:
            layer.bias.data.copy_(self.bias.detach())
        return layer


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def svd_layers(model: nn.Module):
    """Yield (qualified_name, layer) for every SVD-form layer in `model`."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, SVDLayer):
            yield name, module


__all__ = ["Plan", "SVDLayer", "SVDLinear", "svd_layers", "unwrap", "weight_to_matrix", "matrix_to_weight",
           "FACTORED_BELOW"]
