"""The layer plan: saved, side-effect free, one cost rule that counts, budgets and export share;
every product counted; wrappers and compiled graphs. One test per defect a review found."""
import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import svdtrain
from helpers import TinyResNet, randomize_bn


def torch_macs(model, *inputs) -> int:
    """PyTorch's own count (math attention backend), FLOPs / 2."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() // 2


def pickled(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_a_decomposed_model_pickles_whole():
    model = svdtrain.decompose(randomize_bn(TinyResNet()), init="svd").eval()
    svdtrain.prune(model, keep_energy=0.9)
    x = torch.randn(2, 3, 16, 16)
    copy_ = pickled(model)
    assert svdtrain.ranks(copy_) == svdtrain.ranks(model)
    with torch.no_grad():
        assert torch.equal(copy_(x), model(x))


def test_reading_weight_has_no_side_effect_and_budgets_still_cut():
    model = svdtrain.decompose(TinyResNet(), init="svd")
    model.apply(lambda m: hasattr(m, "weight"))
    assert all(layer.plan.form == "auto" for _, layer in svdtrain.svd_layers(model))
    svdtrain.prune(model, macs_budget=0.5, input_shape=(1, 3, 16, 16))
    assert svdtrain.count_macs(model, (1, 3, 16, 16)) <= 0.5 * svdtrain.count_macs(model, (1, 3, 16, 16), "dense")


def test_encoder_fast_path_leaves_linear_layers_as_they_are_and_exports():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=64, dropout=0.0, batch_first=True).eval()
    svd = svdtrain.decompose(copy.deepcopy(layer), skip=["self_attn"])  # attention stays plain
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.allclose(svd(x), layer(x), atol=1e-5)  # an eval forward
    assert svd.linear1.plan.form == "auto" and not svd.linear1.plan.reads_weight
    svdtrain.prune(svd, macs_budget=0.8, example_inputs=(x,))
    assert svd.linear1.plan.ships_factored()
    with torch.no_grad():
        want = svd(x)
        compact = svdtrain.export(svd, example_inputs=(x,))
        assert torch.allclose(compact(x), want, atol=1e-5)


def test_form_and_recorded_calls_survive_state_dict_and_weights_only_load():
    model = svdtrain.decompose(TinyResNet(), mode="spatial")
    model.b2.set_form("factored")
    svdtrain.count_macs(model, (1, 3, 20, 20))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = svdtrain.decompose(TinyResNet(), mode="spatial")
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.b2.plan.form == "factored" and fresh.a1.plan.form == "auto"
    assert fresh.a1.plan.calls == model.a1.plan.calls and fresh.a1.plan.calls[0].shape == (1, 8, 20, 20)
    # A state dict written before plans were saved still loads (forms stay as they are).
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    svdtrain.decompose(TinyResNet(), mode="spatial").load_state_dict(old)


def test_export_of_a_model_in_train_mode_has_eval_semantics():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True)
    block = nn.Sequential(nn.Linear(16, 16), Attend(mha), nn.Linear(16, 8))
    svd = svdtrain.decompose(block).train()
    svdtrain.prune(svd, keep_energy=0.6)
    compact = svdtrain.export(svd)
    assert not compact.training
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.allclose(compact(x), svd.eval()(x), atol=1e-5)
        assert torch.equal(compact(x), compact(x))


class Attend(nn.Module):
    """A user's module around an attention layer, called by keyword."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return x + self.attn(query=x, key=x, value=x, need_weights=False)[0]


def test_products_are_counted_by_keyword_traced_or_functional():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    dense = nn.Sequential(Attend(nn.MultiheadAttention(16, 4, batch_first=True)), nn.Linear(16, 8)).eval()
    want = 2 * 5 * 16 * 16 * 4 + 2 * 2 * 5 * 5 * 16 + 2 * 5 * 16 * 8  # projections, products, head
    # PyTorch's counter misses the fused inference kernel: it counts the train-mode path (no dropout).
    assert svdtrain.count_macs(dense, example_inputs=(x,)) == want == torch_macs(dense.train(), x)
    dense.eval()
    svd = svdtrain.decompose(copy.deepcopy(dense))
    assert svdtrain.count_macs(svd, example_inputs=(x,), cost="dense") == want
    svdtrain.prune(svd, macs_budget=0.5, example_inputs=(x,))
    shipped = svdtrain.count_macs(svd, example_inputs=(x,))
    compact = svdtrain.export(svd, example_inputs=(x,))  # traced: attend inlined into the graph
    assert isinstance(compact, torch.fx.GraphModule)
    assert svdtrain.count_macs(compact, example_inputs=(x,)) == shipped == torch_macs(compact, x)


def test_profile_restores_each_modules_mode():
    model = svdtrain.decompose(TinyResNet()).train()
    model.bn0.eval()  # frozen by the user
    svdtrain.count_macs(model, (1, 3, 16, 16))
    svdtrain.export(model, (1, 3, 16, 16))
    assert model.training and not model.bn0.training and model.bnb.training


def test_spatial_counts_params_budget_and_export_agree_without_shapes_again():
    torch.manual_seed(0)
    # Unpadded 3x3 convs on a 6x6 input: each 1x3 first factor runs over 1.5x the output rows,
    # so per output pixel the pair costs 120 r MACs against 2304 dense (16 -> 16 channels):
    # at rank 21 it ships dense at the real size, though one output pixel alone says factored.
    net = nn.Sequential(nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(64, 4))
    model = svdtrain.decompose(net, mode="spatial", init="svd")
    svdtrain.set_ranks(model, {"0": 21, "2": 40})
    shape = (1, 16, 6, 6)
    macs = svdtrain.count_macs(model, shape)
    assert macs == 16 * 2304 + 4 * 2304 + 64 * 4  # both convs dense at these ranks (hand count)
    compact = svdtrain.export(model)  # no shape: the recorded calls decide
    assert svdtrain.count_macs(compact, shape) == macs == torch_macs(compact, torch.randn(shape))
    assert svdtrain.count_params(compact) == svdtrain.count_params(model)
    svdtrain.prune(model, macs_budget=0.6, input_shape=shape)
    compact = svdtrain.export(model)
    macs = svdtrain.count_macs(model, shape)
    assert svdtrain.count_macs(compact, shape) == macs <= 0.6 * svdtrain.count_macs(model, shape, "dense")
    assert svdtrain.count_params(compact) == svdtrain.count_params(model)


def test_budget_controller_refuses_a_target_below_the_rank_one_floor():
    model = svdtrain.decompose(TinyResNet())
    reg = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=1e-3)
    with pytest.raises(ValueError, match=r"below the rank-1 floor: .* keeps 0\.\d+ of dense"):
        svdtrain.BudgetController(model, reg, 0.01, (1, 3, 16, 16), total_steps=100)


@pytest.mark.parametrize("pinned", [False, True])
def test_ranks_moving_under_masks_do_not_recompile(pinned):
    torch.manual_seed(0)
    model = svdtrain.decompose(TinyResNet(), init="svd")
    if pinned:  # a layer pinned to its pair runs it at full width times the mask too
        model.b2.set_form("factored")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    reg = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=1e-3)
    budget = svdtrain.BudgetController(model, reg, 0.4, (1, 3, 16, 16), total_steps=20, every=1, target_at=0.5,
                                       mask=True, optimizer=opt)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    seen = []
    for _ in range(10):
        loss = F.cross_entropy(compiled(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        budget.step()
        seen.append(tuple(svdtrain.ranks(model).values()))
    assert len(set(seen)) >= 5  # ranks changed at most steps of the ramp
    assert len(graphs) == 1
    with torch.no_grad():  # the masked forward computes what the pruned layers compute
        masked = compiled(x)
        for _, layer in svdtrain.svd_layers(model):
            layer.plan.masked = False
        assert torch.allclose(masked, model(x), atol=1e-5)


def test_compiled_and_wrapped_models_name_layers_as_the_model_does(caplog):
    model = svdtrain.decompose(TinyResNet())
    assert svdtrain.ranks(torch.compile(model)) == svdtrain.ranks(model)
    net = nn.Sequential(nn.MultiheadAttention(16, 4), nn.Linear(16, 16))
    with caplog.at_level(logging.WARNING, logger="svdtrain"):
        svdtrain.decompose(net, skip=["0"])
    assert "out_proj" not in caplog.text


def test_round_to_constrains_the_allocation():
    torch.manual_seed(0)
    model = svdtrain.decompose(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48)), init="svd")
    got = svdtrain.prune(model, macs_budget=0.4, input_shape=(1, 64), round_to=8)
    assert all(k % 8 == 0 for k in got.values())
    assert svdtrain.count_macs(model, (1, 64)) <= 0.4 * (64 * 64 + 64 * 48)


def test_importance_objects_and_dicts_are_one_interface():
    torch.manual_seed(0)
    base = svdtrain.decompose(TinyResNet(), init="svd")
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    imp = svdtrain.SingularValueImportance(base)
    F.cross_entropy(base(x), y).backward()
    imp.accumulate()
    shape = (1, 3, 16, 16)
    a, b, c, d = (copy.deepcopy(base) for _ in range(4))
    assert svdtrain.prune(a, macs_budget=0.5, input_shape=shape) == \
        svdtrain.prune(b, macs_budget=0.5, input_shape=shape, scores=svdtrain.EnergyShare())
    by_object = svdtrain.prune(c, macs_budget=0.5, input_shape=shape, scores=imp)
    assert by_object == svdtrain.prune(d, macs_budget=0.5, input_shape=shape, scores=imp.scores())
    assert by_object != svdtrain.ranks(a)  # loss scores allocate otherwise than energy here
    assert all(torch.equal(lc.active, ld.active) for (_, lc), (_, ld) in zip(svdtrain.svd_layers(c), svdtrain.svd_layers(d)))


def test_budget_controller_follows_a_schedule_object():
    model = svdtrain.decompose(TinyResNet())
    reg = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=1e-3)
    budget = svdtrain.BudgetController(model, reg, 0.5, (1, 3, 16, 16), total_steps=100, target_at=0.4)
    budget.step()
    line = svdtrain.LinearSchedule(0.5, until=40)
    assert budget.schedule(20) == line(20, budget.start) == pytest.approx(0.5 + (budget.start - 0.5) / 2)
    steps = svdtrain.BudgetController(model, reg, 0.5, (1, 3, 16, 16), total_steps=100,
                                      schedule=lambda step, start: 0.9 if step < 50 else 0.5)
    assert steps.schedule(10) == 0.9 and steps.schedule(60) == 0.5


def test_an_encoder_layer_that_ships_plain_takes_pytorchs_fused_path_again():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    svd = svdtrain.decompose(copy.deepcopy(layer))
    assert svd.activation_relu_or_gelu == 0  # the SVD form runs its layers, not the fused kernel
    x = torch.randn(2, 5, 16)
    compact = svdtrain.export(svd, example_inputs=(x,))  # full rank: everything ships dense
    assert type(compact.self_attn) is nn.MultiheadAttention and compact.activation_relu_or_gelu == 1
    with torch.no_grad():
        assert torch.allclose(compact(x), layer(x), atol=1e-5)
