"""Pruning to a latency budget: the MACs budget's allocation over a table of measured times.
Deterministic timers stand in for the clock, so the allocation is checked exactly."""
import copy

import pytest
import torch
from torch import nn

import svdtrain
from helpers import TinyResNet


def macs_timer(module, inputs):
    """A clock that reads MACs: time proportional to the work."""
    return float(svdtrain.count_macs(module, example_inputs=inputs))


def slow_pairs_timer(module, inputs):
    """A clock on which a factor pair runs 3x slower than its MACs say."""
    pairs = [m for m in module.modules() if isinstance(m, nn.Sequential) and len(m) == 2
             and all(isinstance(c, (nn.Conv2d, nn.Linear)) for c in m)]
    extra = sum(2 * svdtrain.count_macs(p, example_inputs=(x,)) for p, x in _inputs_of(module, pairs, inputs))
    return macs_timer(module, inputs) + extra


def _inputs_of(module, pairs, inputs):
    seen = []
    hooks = [p.register_forward_hook(lambda m, a, o: seen.append((m, a[0]))) for p in pairs]
    with torch.no_grad():
        module(*inputs)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("make, shape", [(TinyResNet, (1, 3, 16, 16)),
                                          (lambda: nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 40)), (2, 48))])
def test_a_clock_that_reads_macs_allocates_as_the_macs_budget(make, shape):
    torch.manual_seed(0)
    base = svdtrain.decompose(make(), init="svd").eval()
    by_macs, by_time = copy.deepcopy(base), copy.deepcopy(base)
    want = svdtrain.prune(by_macs, macs_budget=0.5, input_shape=shape)
    got = svdtrain.prune(by_time, latency_budget=0.5, input_shape=shape, timer=macs_timer)
    assert got == want and any(k < by_time.get_submodule(n).full_rank for n, k in got.items())
    assert svdtrain.count_macs(by_time, shape) == svdtrain.count_macs(by_macs, shape)


def _tiny_and_dense():
    """A decomposed TinyResNet, an input, and the model exported with every layer dense."""
    torch.manual_seed(0)
    model = svdtrain.decompose(TinyResNet(), init="svd").eval()
    x = torch.randn(2, 3, 16, 16)
    dense = copy.deepcopy(model)
    for _, layer in svdtrain.svd_layers(dense):
        layer.set_form("dense")
    return model, x, svdtrain.export(dense)


def test_the_shipped_model_meets_the_budget_on_the_clock_it_was_timed_on():
    model, x, dense = _tiny_and_dense()
    budget = 0.7
    svdtrain.prune(model, latency_budget=budget, example_inputs=(x,), timer=slow_pairs_timer)
    compact = svdtrain.export(model, example_inputs=(x,))
    assert slow_pairs_timer(compact, (x,)) <= budget * slow_pairs_timer(dense, (x,)) * (1 + 1e-9)
    # each layer ships the form that was faster at its rank on that clock
    for name, layer in svdtrain.svd_layers(model):
        assert layer.plan.form in ("dense", "factored")
        if layer.plan.form == "factored":
            dense_macs, pair_macs = layer.plan.macs(cost="dense"), layer.plan.macs(cost="factored")
            assert 3 * pair_macs < dense_macs, name


def test_latency_budget_on_the_wall_clock_runs_and_cuts():
    torch.manual_seed(0)
    model = svdtrain.decompose(nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)), init="svd").eval()
    ranks = svdtrain.prune(model, latency_budget=0.5, input_shape=(64, 256))
    assert set(ranks) == {"0", "2"} and all(1 <= k <= 256 for k in ranks.values())
    assert any(k < 256 for k in ranks.values())  # half the dense time cannot be met at full rank
    # each layer is pinned to the form that was faster at its rank, and a cut layer ships its pair
    for name, layer in svdtrain.svd_layers(model):
        assert layer.plan.form in ("dense", "factored")
        assert layer.plan.form == "factored" or ranks[name] == 256
    with pytest.raises(ValueError, match="exactly one of keep_energy, macs_budget or latency_budget"):
        svdtrain.prune(model, macs_budget=0.5, latency_budget=0.5, input_shape=(1, 256))


def _steer(target_kw, timer=None):
    """Twenty steps of budget-driven training with masks on a fixed batch; (strengths, ranks, model)."""
    torch.manual_seed(0)
    model = svdtrain.decompose(TinyResNet(), init="random")
    reg = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctrl = svdtrain.BudgetController(model, reg, input_shape=(1, 3, 16, 16), total_steps=20, every=2, target_at=0.5,
                                     mask=True, optimizer=opt, timer=timer, **target_kw)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    strengths = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y) + reg(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        strengths.append(ctrl.step())
    return strengths, svdtrain.ranks(model), model, ctrl


def test_the_controller_steers_a_latency_target_as_the_macs_target_on_a_clock_that_reads_macs():
    by_macs = _steer({"target_macs": 0.4})
    by_time = _steer({"target_latency": 0.4}, timer=macs_timer)
    assert by_time[0] == pytest.approx(by_macs[0], rel=1e-9) and by_time[1] == by_macs[1]
    assert by_time[3].measure() == pytest.approx(by_macs[3].measure(), rel=1e-9)


def test_the_controller_meets_a_latency_target_on_a_clock_where_pairs_run_slow():
    strengths, ranks, model, ctrl = _steer({"target_latency": 0.7}, timer=slow_pairs_timer)
    x = torch.randn(1, 3, 16, 16)
    dense = copy.deepcopy(model)
    for _, layer in svdtrain.svd_layers(dense):
        layer.set_form("dense")
    shipped = slow_pairs_timer(svdtrain.export(model.eval(), example_inputs=(x,)), (x,))
    assert shipped <= 0.7 * slow_pairs_timer(svdtrain.export(dense.eval()), (x,)) * (1 + 1e-9)
    assert any(k < model.get_submodule(n).full_rank for n, k in ranks.items())
    with pytest.raises(ValueError, match="exactly one of target_macs or target_latency"):
        svdtrain.BudgetController(model, svdtrain.Regularizer(strength=0.01), 0.5, (1, 3, 16, 16), 10,
                                  target_latency=0.5)
    with pytest.raises(ValueError, match="target_latency 0.001 is below the rank-1 floor"):
        svdtrain.BudgetController(model, svdtrain.Regularizer(strength=0.01), input_shape=(1, 3, 16, 16),
                                  total_steps=10, target_latency=0.001, timer=macs_timer)


def whole_model_slow_timer(module, inputs):
    """A clock on which a whole model runs 1.5x slower than its layers timed alone (a single
    layer or factor pair keeps its MACs): the table's sum of parts mispredicts the model."""
    counted = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return macs_timer(module, inputs) * (1.5 if len(counted) > 2 else 1.0)


def test_a_latency_budget_is_checked_on_the_whole_model_and_the_allocation_corrected():
    base, x, dense = _tiny_and_dense()
    dense_time = whole_model_slow_timer(dense, (x,))

    def shipped(refine):
        model = copy.deepcopy(base)
        svdtrain.latency.prune_to_latency(model, 0.6, example_inputs=(x,), timer=whole_model_slow_timer, refine=refine)
        return whole_model_slow_timer(svdtrain.export(model, example_inputs=(x,)), (x,)) / dense_time
    assert abs(shipped(0) - 0.6) > 0.05 * 0.6  # the sum of parts alone misses
    assert abs(shipped(3) - 0.6) <= 0.05 * 0.6


def _ramp(model, timer=None, finals=None, **target):
    """A controller over 40 steps whose ramp ends at step 18 (updates every 4)."""
    reg = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=0.005)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    c = svdtrain.BudgetController(model, reg, input_shape=(1, 32), total_steps=40, every=4, target_at=0.45,
                                  mask=True, optimizer=opt, timer=timer, **target,
                                  on_final=None if finals is None else lambda: finals.append(c.steps))
    return reg, opt, c


def _train(model, parts, steps, x, y):
    reg, opt, c = parts
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y) + reg(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        c.step()


@pytest.mark.parametrize("target", [{"target_macs": 0.4}, {"target_latency": 0.6}])
def test_a_run_resumed_after_the_ramp_ends_equals_the_uninterrupted_one(target):
    """A checkpoint between the ramp's end (step 18) and the update that ends the masks (step 20):
    the resumed run calls on_final at the same step; with a latency target, a checkpoint after
    the forms were pinned (step 30) builds its controller again, and both end as the
    uninterrupted run does."""
    torch.manual_seed(0)
    base = svdtrain.decompose(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)), input_shape=(1, 32))
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
    timer = macs_timer if "target_latency" in target else None
    whole, finals = copy.deepcopy(base), []
    _train(whole, _ramp(whole, timer, finals, **target), 40, x, y)
    assert finals == [20]
    for stop in (18, 30):
        first, seen = copy.deepcopy(base), []
        parts = _ramp(first, timer, seen, **target)
        _train(first, parts, stop, x, y)
        saved = [copy.deepcopy(p.state_dict()) for p in (first, parts[1], parts[2])]
        resumed, later = copy.deepcopy(base), []
        resumed.load_state_dict(saved[0])  # forms pinned at step 20 come back with the plans
        parts = _ramp(resumed, timer, later, **target)
        parts[1].load_state_dict(saved[1])
        parts[2].load_state_dict(saved[2])
        _train(resumed, parts, 40 - stop, x, y)
        assert seen + later == [20], stop
        assert [m.plan.form for _, m in svdtrain.svd_layers(resumed)] == \
            [m.plan.form for _, m in svdtrain.svd_layers(whole)]
        for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
            assert a == b if not torch.is_tensor(a) else torch.allclose(a, b, atol=1e-5), (stop, name)


def test_the_tables_energy_measure_rounds_ranks_as_prune_does():
    from svdtrain.latency import LatencyTable
    torch.manual_seed(0)
    model = svdtrain.decompose(TinyResNet(), init="random")
    for _, layer in svdtrain.svd_layers(model):  # energy ranks 3, 5 and 10: between multiples of 4
        layer.s.data = torch.logspace(0, -1, layer.s.numel())
    table = LatencyTable(model, (1, 3, 16, 16), round_to=4, timer=macs_timer)
    pruned = copy.deepcopy(model)
    svdtrain.prune(pruned, keep_energy=0.95, round_to=4)
    rounded = {id(layer): dict(svdtrain.svd_layers(pruned))[name].rank for name, layer in svdtrain.svd_layers(model)}
    assert table.at_energy(0.95) == pytest.approx(table.fraction(rounded))
