"""Orthogonality and sparsity losses against hand computations."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import svdtrain
from helpers import TinyResNet


def _orth_numpy(u, v):
    def dev(f):
        g = f.T @ f if f.shape[0] >= f.shape[1] else f @ f.T
        return ((g - np.eye(g.shape[0])) ** 2).sum()
    r = u.shape[1]
    return (dev(u) + dev(v)) / r ** 2


def test_orthogonality_is_zero_after_svd_init():
    model = svdtrain.decompose(TinyResNet())
    assert svdtrain.orthogonality_loss(model).item() < 1e-8


def test_orthogonality_matches_hand_value_after_perturbing_u():
    model = svdtrain.decompose(nn.Sequential(nn.Linear(10, 6), nn.Conv2d(3, 5, 3)))
    with torch.no_grad():
        model[0].U.add_(0.1 * torch.randn_like(model[0].U))
    expected = sum(_orth_numpy(m.U.detach().double().numpy(), m.V.detach().double().numpy())
                   for m in (model[0], model[1]))
    assert expected > 1e-3
    assert svdtrain.orthogonality_loss(model).item() == pytest.approx(expected, rel=1e-4)


def test_orthogonality_counts_active_columns_only():
    layer = svdtrain.SVDLinear.from_linear(nn.Linear(8, 6))
    with torch.no_grad():
        layer.U[:, 4:] = 5.0  # wreck the columns about to be pruned
    layer.set_active(torch.arange(6) < 4)
    model = nn.Sequential(layer)
    assert svdtrain.orthogonality_loss(model).item() < 1e-8


def test_probed_orthogonality_is_an_unbiased_cheaper_estimate():
    """orth_probes=k: the mean over many draws of the estimate and of its gradient equal the exact
    term's (numpy above) within their sampling error, and a draw costs a fraction of the exact
    term's FLOPs (PyTorch's own counter) on a wide layer."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = svdtrain.decompose(nn.Sequential(nn.Linear(40, 30), nn.Conv2d(4, 12, 3)), init="random")
    params = [p for _, m in svdtrain.svd_layers(model) for p in (m.U, m.V)]
    exact = svdtrain.orthogonality_loss(model)
    want = sum(_orth_numpy(m.U.detach().double().numpy(), m.V.detach().double().numpy()) for m in model)
    assert exact.item() == pytest.approx(want, rel=1e-4)
    grad = torch.autograd.grad(exact, params)
    draws = 3000
    values, grads = [], [torch.zeros_like(g) for g in grad]
    for _ in range(draws):
        est = svdtrain.orthogonality_loss(model, probes=2)
        values.append(est.item())
        for acc, g in zip(grads, torch.autograd.grad(est, params)):
            acc += g / draws
    mean, sem = np.mean(values), np.std(values) / math.sqrt(draws)
    assert abs(mean - want) < 4 * sem and sem < 0.05 * want
    for acc, g in zip(grads, grad):
        assert torch.linalg.norm(acc - g) < 0.1 * torch.linalg.norm(g)
    wide = svdtrain.decompose(nn.Sequential(nn.Linear(512, 512)), init="random")
    flops = []
    for probes in (0, 8):
        with FlopCounterMode(display=False) as counter:
            svdtrain.orthogonality_loss(wide, probes=probes).backward()
        flops.append(counter.get_total_flops())
    assert flops[1] < 0.1 * flops[0]


def test_sparsity_values_on_known_s():
    model = svdtrain.decompose(nn.Sequential(nn.Linear(4, 4), nn.Linear(3, 3)))
    with torch.no_grad():
        model[0].s.copy_(torch.tensor([3.0, -4.0, 0.0, 0.0]))
        model[1].s.copy_(torch.tensor([1.0, 1.0, 1.0]))
    # l1: 7 + 3; hoyer: 7/5 + 3/sqrt(3); hoyer_square: 49/25 + 9/3
    assert svdtrain.sparsity_loss(model, "l1").item() == pytest.approx(10.0)
    assert svdtrain.sparsity_loss(model, "hoyer").item() == pytest.approx(1.4 + math.sqrt(3), rel=1e-6)
    assert svdtrain.sparsity_loss(model, "hoyer_square").item() == pytest.approx(1.96 + 3.0, rel=1e-6)


def test_sparsity_of_all_zero_layer_is_finite():
    model = svdtrain.decompose(nn.Sequential(nn.Linear(4, 4)))
    with torch.no_grad():
        model[0].s.zero_()
    for kind in ("l1", "hoyer", "hoyer_square"):
        value = svdtrain.sparsity_loss(model, kind)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(model[0].s.grad).all()


def test_regularizer_combines_weighted_terms():
    model = svdtrain.decompose(TinyResNet(), init="random")
    reg = svdtrain.Regularizer(orth=0.5, sparsity="hoyer", strength=0.2)
    expected = 0.5 * svdtrain.orthogonality_loss(model) + 0.2 * svdtrain.sparsity_loss(model, "hoyer")
    assert reg(model).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="sparsity"):
        svdtrain.Regularizer(sparsity="l2")
    with pytest.raises(ValueError, match="strength 0"):
        svdtrain.Regularizer(sparsity="hoyer", strength=0.0)


def test_losses_need_svd_layers():
    with pytest.raises(ValueError, match="decompose"):
        svdtrain.orthogonality_loss(nn.Sequential(nn.Linear(2, 2)))


def test_param_groups_exclude_s_from_weight_decay():
    model = svdtrain.decompose(TinyResNet())
    groups = svdtrain.param_groups(model, weight_decay=5e-4)
    s_ids = {id(m.s) for _, m in svdtrain.svd_layers(model)}
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == s_ids and not (decayed & s_ids)
    assert len(decayed) + len(s_ids) == len(list(model.parameters()))


def test_edge_cases_stay_finite_and_partial_loads_keep_the_metric():
    """A layer with no active value adds no orthogonality; Hoyer of all-zero values in float16
    is 0, not 0/0; a partial load that names none of a whitened layer's keys keeps its metric."""
    import torch
    from torch import nn
    import svdtrain
    model = svdtrain.decompose(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
                               calibration=[torch.randn(16, 8)])
    model[2].set_active(torch.zeros(4, dtype=torch.bool))
    total = svdtrain.Regularizer(orth=1.0, sparsity=None)(model)
    assert torch.isfinite(total) and torch.allclose(total, svdtrain.losses.layer_orthogonality(model[0]))
    half = svdtrain.decompose(nn.Sequential(nn.Linear(8, 8))).half()
    with torch.no_grad():
        half[0].s.zero_()
    for kind in ("hoyer", "hoyer_square"):
        assert float(svdtrain.losses.layer_sparsity(half[0], kind)) == 0.0
    assert model[0].metric is not None
    model.load_state_dict({"2.bias": torch.zeros(4)}, strict=False)
    assert model[0].metric is not None


def test_the_orthogonality_term_is_computed_in_float32_under_half_precision():
    """Near orthonormal factors the deviation is below bfloat16's resolution, and a large layer's
    sum passes float16's range: the term follows float32 under autocast and in .half() models."""
    torch.manual_seed(0)
    model = svdtrain.decompose(nn.Sequential(nn.Linear(64, 256)))
    exact = float(svdtrain.orthogonality_loss(model))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert float(svdtrain.orthogonality_loss(model)) == pytest.approx(exact, abs=1e-9)
    big = svdtrain.decompose(nn.Sequential(nn.Conv2d(512, 512, 3)), init="random_scaled")
    full = float(svdtrain.orthogonality_loss(big))
    assert float(svdtrain.orthogonality_loss(big.half())) == pytest.approx(full, rel=1e-2)
