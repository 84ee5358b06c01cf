"""Loss importance of singular values and the MACs-budget rule driven by it."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svdtrain
from helpers import TinyResNet


def test_loss_importance_matches_the_dense_weight_gradient():
    # Independent: dL/ds_i = u_i^T (dL/dW) v_i, with dL/dW from a plain nn.Linear holding W.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model = svdtrain.decompose(copy.deepcopy(net), init="svd")
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(3)]
    scores = svdtrain.loss_importance(model, batches, F.cross_entropy)
    expected = {name: torch.zeros(layer.s.numel(), dtype=torch.float64) for name, layer in svdtrain.svd_layers(model)}
    for x, y in batches:
        plain = copy.deepcopy(net)
        with torch.no_grad():
            for i, name in ((0, "0"), (2, "2")):
                plain[i].weight.copy_(model[i].dense_weight())
                plain[i].bias.copy_(model[i].bias)
        F.cross_entropy(plain(x), y).backward()
        for i, name in ((0, "0"), (2, "2")):
            layer, grad = model[i], plain[i].weight.grad
            ds = torch.einsum("oi,or,ir->r", grad, layer.U.detach(), layer.V.detach())
            expected[name] += (layer.s.detach() * ds).double().pow(2)
    for name in expected:
        assert torch.allclose(scores[name], expected[name] / len(batches), rtol=1e-4, atol=1e-12), name


def test_loss_importance_leaves_the_model_as_it_came():
    torch.manual_seed(0)
    model = svdtrain.decompose(TinyResNet(), init="svd").eval()
    before = copy.deepcopy(model.state_dict())
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))) for _ in range(2)]
    svdtrain.loss_importance(model, batches, F.cross_entropy)
    assert not model.training
    assert all(torch.equal(before[k], v) if torch.is_tensor(v) else before[k] == v for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_scores_decide_which_layer_and_which_values_are_cut():
    # Two equal layers with equal spectra: energy cannot tell them apart; the scores say the
    # first layer's values matter and, in the second, that its largest value matters least.
    model = svdtrain.decompose(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    with torch.no_grad():
        for layer in model:
            layer.s.copy_(torch.linspace(2.0, 1.0, 8))
    scores = {"0": torch.full((8,), 10.0), "1": torch.arange(8, dtype=torch.float64)}
    ranks = svdtrain.prune(model, macs_budget=0.75, input_shape=(1, 8), scores=scores)
    assert ranks["0"] == 8 and ranks["1"] < 8
    kept = model[1].active.nonzero().flatten().tolist()
    assert kept == list(range(8 - ranks["1"], 8))  # the highest-scored, not the largest, values


def test_bad_scores_are_clear_errors():
    model = svdtrain.decompose(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    good = {"0": torch.ones(4), "1": torch.ones(4)}
    with pytest.raises(ValueError, match="macs_budget or latency_budget only"):
        svdtrain.prune(model, keep_energy=0.9, scores=good)
    with pytest.raises(ValueError, match="missing"):
        svdtrain.prune(model, macs_budget=0.5, input_shape=(1, 4), scores={"0": torch.ones(4)})
    with pytest.raises(ValueError, match="finite values"):
        svdtrain.prune(model, macs_budget=0.5, input_shape=(1, 4), scores={"0": -torch.ones(4), "1": torch.ones(4)})
    with pytest.raises(ValueError, match="finite values"):  # a callable's scores are checked too
        svdtrain.prune(model, macs_budget=0.5, input_shape=(1, 4), scores=lambda name, layer: -2 * torch.ones(4))


def test_importance_and_recalibration_draw_no_batch_past_the_last():
    model = svdtrain.decompose(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    drawn = []

    def batches():
        for i in range(10):
            drawn.append(i)
            yield torch.randn(8, 4), torch.randint(0, 2, (8,))

    svdtrain.loss_importance(model, batches(), F.cross_entropy, max_batches=2)
    assert drawn == [0, 1]
    drawn.clear()
    svdtrain.recalibrate_batchnorm(model, batches(), max_batches=3)
    assert drawn == [0, 1, 2]


def test_gradual_masks_follow_loss_scores_and_resume_identically():
    torch.manual_seed(0)
    base = svdtrain.decompose(TinyResNet(), init="svd")
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))) for _ in range(12)]

    def train(model, steps, ctrl_state=None):
        reg = svdtrain.Regularizer(orth=0.0, sparsity="hoyer", strength=1e-6)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ctrl = svdtrain.BudgetController(model, reg, 0.5, (1, 3, 16, 16), total_steps=12, target_at=0.5,
                                         every=2, mask=True, optimizer=opt, score="loss")
        if ctrl_state is not None:
            ctrl.load_state_dict(ctrl_state)
        for x, y in data[ctrl.steps:ctrl.steps + steps]:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            ctrl.step()
        return ctrl

    whole = copy.deepcopy(base)
    train(whole, 12)
    assert svdtrain.count_macs(whole, (1, 3, 16, 16)) <= 0.5 * svdtrain.count_macs(whole, (1, 3, 16, 16), cost="dense")
    energy = copy.deepcopy(base)
    reg = svdtrain.Regularizer(orth=0.0, sparsity="hoyer", strength=1e-6)
    with pytest.raises(ValueError, match="score"):
        svdtrain.BudgetController(energy, reg, 0.5, (1, 3, 16, 16), 12, mask=True, score="magnitude")
    half = copy.deepcopy(base)
    state = train(half, 5).state_dict()
    # Resuming between two mask updates keeps the scores gathered so far (SGD has no state).
    train(half, 7, copy.deepcopy(state))
    assert svdtrain.ranks(half) == svdtrain.ranks(whole)


def test_gradual_mask_update_cuts_by_the_accumulated_loss_scores():
    """The first mask update equals prune(macs_budget=schedule, scores=(s * dL/ds)^2 averaged over
    the steps since the start, computed here), and differs from the energy rule's cut."""
    torch.manual_seed(0)
    model = svdtrain.decompose(TinyResNet(), init="svd")
    reg = svdtrain.Regularizer(orth=0.0, sparsity="hoyer", strength=1e-6)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ctrl = svdtrain.BudgetController(model, reg, 0.3, (1, 3, 16, 16), total_steps=8, target_at=0.5,
                                     every=2, mask=True, optimizer=opt, score="loss")
    layers = dict(svdtrain.svd_layers(model))
    hand = {name: torch.zeros(layer.s.numel(), dtype=torch.float64) for name, layer in layers.items()}
    for step in (1, 2):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for name, layer in layers.items():
            hand[name] += (layer.s.detach().double() * layer.s.grad.double()) ** 2 / 2
        if step == 2:
            before = copy.deepcopy(model)
        ctrl.step()
    cut = {name: layer.active.clone() for name, layer in layers.items()}
    assert sum(int(m.sum()) for m in cut.values()) < sum(m.numel() for m in cut.values())  # it cut
    by_loss, by_energy = copy.deepcopy(before), copy.deepcopy(before)
    svdtrain.prune(by_loss, macs_budget=ctrl.schedule(), input_shape=(1, 3, 16, 16), scores=hand)
    svdtrain.prune(by_energy, macs_budget=ctrl.schedule(), input_shape=(1, 3, 16, 16))
    for name, layer in svdtrain.svd_layers(by_loss):
        assert torch.equal(layer.active, cut[name]), name
    assert any(not torch.equal(layer.active, cut[name]) for name, layer in svdtrain.svd_layers(by_energy))


def test_loss_importance_takes_dict_inputs():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, batch):
            return self.fc(batch["x"])

    model = svdtrain.decompose(Keyword())
    batches = [({"x": torch.randn(8, 4)}, torch.randint(0, 3, (8,)))]
    scores = svdtrain.loss_importance(model, batches, F.cross_entropy)
    assert scores["fc"].shape == (3,) and bool((scores["fc"] > 0).all())
