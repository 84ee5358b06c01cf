"""Export to ordinary layers: equivalence, dense fallback, torch.export, loading without svdtrain."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import svdtrain
from helpers import GroupedNet, SharedLinear, TinyResNet, mlp, randomize_bn


def _only_torch_modules(model):
    return all(type(m).__module__.startswith("torch") for m in model.modules())


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("make,shape", [(TinyResNet, (4, 3, 16, 16)), (GroupedNet, (2, 3, 10, 10)),
                                         (mlp, (5, 3, 4, 4))])
@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_export_matches_pruned_model(make, shape, mode):
    model = randomize_bn(make()).eval()
    svdtrain.decompose(model, mode=mode, init="svd")
    svdtrain.prune(model, keep_energy=0.8)
    x = torch.randn(shape)
    compact = svdtrain.export(model, input_shape=shape).eval()
    assert _only_torch_modules(compact)
    assert not any(isinstance(m, svdtrain.SVDLayer) for m in compact.modules())
    with torch.no_grad():
        assert _rel_err(compact(x), model(x)) < 1e-4
    assert svdtrain.count_macs(compact, shape) == svdtrain.count_macs(model, shape)
    assert svdtrain.count_params(compact) == svdtrain.count_params(model)


def test_grouped_convs_stay_dense_and_are_logged(caplog):
    with caplog.at_level("INFO", logger="svdtrain"):
        model = svdtrain.decompose(GroupedNet())
    assert type(model.dw) is nn.Conv2d and type(model.gc) is nn.Conv2d
    assert isinstance(model.conv, svdtrain.SVDConv2d) and isinstance(model.fc, svdtrain.SVDLinear)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "dw: grouped conv" in warnings[0] and "gc: grouped conv" in warnings[0]
    assert "decomposed 3 layers" in warnings[0]


def test_layers_of_kinds_not_decomposed_are_named_in_one_warning(caplog):
    model = nn.Sequential(nn.Conv1d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 4),
                          nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 3, padding="same"))
    with caplog.at_level("INFO", logger="svdtrain"):
        svdtrain.decompose(model)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "0: Conv1d is not decomposed" in warnings[0]
    assert "5: padding='same'" in warnings[0]
    share = (8 * 6 * 4) / (8 * 6 * 4 + 8 * 2 * 3 + 2 * 1 * 9)
    assert f"{share:.1%} of the weights" in warnings[0]
    with caplog.at_level("INFO", logger="svdtrain"):  # with an input: the share of the MACs
        caplog.clear()
        fresh = nn.Sequential(nn.Conv1d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 4))
        svdtrain.decompose(fresh, input_shape=(1, 2, 8))
    conv, fc = 6 * 8 * (2 * 3), 48 * 4
    assert f"{fc / (conv + fc):.1%} of the model's MACs" in caplog.records[-1].getMessage()
    with caplog.at_level("INFO", logger="svdtrain"):
        caplog.clear()
        svdtrain.decompose(mlp())
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_export_uses_dense_layer_where_cheaper():
    model = svdtrain.decompose(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)))
    model[1].set_active(torch.arange(16) < 2)  # 2*(16+16)=64 MACs < 256 dense
    compact = svdtrain.export(model, trace=False)
    assert isinstance(compact[0], nn.Linear)  # full rank: 512 factored > 256 dense
    assert isinstance(compact[1], nn.Sequential) and compact[1][0].out_features == 2


def test_skip_by_name_and_predicate():
    model = svdtrain.decompose(TinyResNet(), skip=["stem", "fc"])
    assert type(model.stem) is nn.Conv2d and type(model.fc) is nn.Linear
    model = svdtrain.decompose(TinyResNet(), skip=lambda name, m: name.startswith("down"))
    assert type(model.down[0]) is nn.Conv2d and isinstance(model.a1, svdtrain.SVDConv2d)


def test_torch_export_round_trip(tmp_path):
    model = randomize_bn(TinyResNet()).eval()
    svdtrain.decompose(model)
    svdtrain.prune(model, keep_energy=0.7)
    compact = svdtrain.export(model)
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "compact.pt2"
    svdtrain.export_program(compact, x, path)
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        assert _rel_err(loaded(x), model(x)) < 1e-4


BLOCK_SVDTRAIN = """
import sys, torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "svdtrain" or name.startswith("svdtrain."):
            raise ImportError("svdtrain must not be imported")
sys.meta_path.insert(0, Block())
x = torch.load(sys.argv[2])
{load}
print(float((m(x) - torch.load(sys.argv[3])).abs().max()))
"""


@pytest.mark.parametrize("how", ["pickle", "pt2"])
def test_compact_model_loads_without_svdtrain(tmp_path, how):
    model = randomize_bn(TinyResNet()).eval()
    svdtrain.decompose(model)
    svdtrain.prune(model, keep_energy=0.8)
    compact = svdtrain.export(model).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    if how == "pickle":
        torch.save(compact, tmp_path / "m.bin")
        load = "m = torch.load(sys.argv[1], weights_only=False)"
    else:
        svdtrain.export_program(compact, x, tmp_path / "m.bin")
        load = "m = torch.export.load(sys.argv[1]).module()"
    script = BLOCK_SVDTRAIN.format(load=load)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.bin"), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 1e-4


def test_state_dict_of_pruned_model_rebuilds_it():
    model = svdtrain.decompose(TinyResNet(), init="random")
    ranks = svdtrain.prune(model, keep_energy=0.5)
    fresh = svdtrain.decompose(TinyResNet(), init="random")
    fresh.load_state_dict(model.state_dict())
    assert svdtrain.ranks(fresh) == ranks
    x = torch.randn(2, 3, 16, 16)
    model.eval(), fresh.eval()
    assert torch.allclose(fresh(x), model(x), atol=1e-6)


def test_decompose_keeps_dtype_and_shared_layers():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    ref = model(x)
    svdtrain.decompose(model)
    assert model[0].U.dtype == torch.float64 and (model(x) - ref).abs().max() < 1e-10

    tied = SharedLinear(5)
    x = torch.randn(3, 5)
    ref = tied(x)
    svdtrain.decompose(tied)
    assert tied.a is tied.b and isinstance(tied.a, svdtrain.SVDLinear)
    assert (tied(x) - ref).abs().max() < 1e-5
    assert type(svdtrain.decompose(TinyResNet(), skip="stem").stem) is nn.Conv2d  # one name, not letters


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_latency_choice_keeps_outputs_and_never_undercuts_the_macs_choice(mode):
    model = randomize_bn(TinyResNet()).eval()
    svdtrain.decompose(model, mode=mode, init="svd")
    svdtrain.prune(model, keep_energy=0.8)
    shape = (8, 3, 16, 16)
    compact = svdtrain.export(model, input_shape=shape, choose="latency", reps=2).eval()
    assert _only_torch_modules(compact)
    x = torch.randn(shape)
    with torch.no_grad():
        assert _rel_err(compact(x), model(x)) < 1e-4
    # Each layer took its dense form, its pair or its zero-padded pair: never fewer MACs
    # than the per-layer minimum that the MACs choice takes.
    assert svdtrain.count_macs(compact, shape) >= svdtrain.count_macs(model, shape)


def test_latency_choice_takes_a_far_faster_factor_pair():
    model = svdtrain.decompose(nn.Sequential(nn.Linear(1024, 1024)))
    model[0].set_active(torch.arange(1024) < 1)  # ~500x fewer MACs than the dense layer
    compact = svdtrain.export(model, input_shape=(256, 1024), choose="latency", trace=False)
    assert isinstance(compact[0], nn.Sequential)


@pytest.mark.parametrize("fast", ["dense", "factored"])
def test_latency_choice_follows_the_clock_not_the_macs_rule(monkeypatch, fast):
    """A scripted clock on which `fast` always runs in 1 ms and the other form in 1 s: the layer
    ships in `fast`, also where the MACs rule would pick the other (rank 1 dense, rank 1000 factored)."""
    import sys
    import types
    calls = []  # perf_counter calls come in (start, stop) pairs, the candidates in turn: dense, factored

    def clock():
        calls.append(None)
        i = len(calls) - 1
        if i % 2 == 0:
            return 10.0 * i
        form = ("dense", "factored")[(i // 2) % 2]
        return 10.0 * (i - 1) + (1e-3 if form == fast else 1.0)
    monkeypatch.setattr(sys.modules["svdtrain.export"], "time", types.SimpleNamespace(perf_counter=clock))
    model = svdtrain.decompose(nn.Sequential(nn.Linear(1024, 1024)))
    rank = 1 if fast == "dense" else 1000  # the MACs rule: factored at rank 1, dense at rank 1000
    model[0].set_active(torch.arange(1024) < rank)
    macs_choice = svdtrain.export(model, input_shape=(4, 1024), trace=False)
    compact = svdtrain.export(model, input_shape=(4, 1024), choose="latency", reps=3, round_to=1, trace=False)
    assert isinstance(macs_choice[0], nn.Sequential if fast == "dense" else nn.Linear)
    assert isinstance(compact[0], nn.Linear if fast == "dense" else nn.Sequential)
    assert len(calls) == 2 * 2 * 3  # two candidates, three repetitions


def test_latency_choice_needs_an_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        svdtrain.export(svdtrain.decompose(mlp()), choose="latency")


@pytest.mark.parametrize("mode", ["channel", "spatial", "linear"])
def test_pad_rank_adds_zero_channels_with_the_same_outputs(mode):
    from svdtrain.export import pad_rank
    if mode == "linear":
        layer, x = svdtrain.SVDLinear.from_linear(nn.Linear(12, 10)), torch.randn(3, 12)
    else:
        conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
        layer, x = svdtrain.SVDConv2d.from_conv(conv, mode=mode), torch.randn(2, 6, 9, 9)
    layer.set_active(torch.arange(layer.full_rank) < 3)
    pair, padded = layer.factor_layers(), pad_rank(layer.factor_layers(), 8)
    assert padded[0].weight.shape[0] == 8 and padded[1].weight.shape[1] == 8
    with torch.no_grad():
        assert _rel_err(padded(x), pair(x)) < 1e-6
        assert _rel_err(padded(x), layer(x)) < 1e-5


def test_latency_choice_in_channels_last_saves_and_loads_as_a_program(tmp_path):
    model = randomize_bn(TinyResNet()).eval()
    svdtrain.decompose(model, mode="channel", init="svd")
    svdtrain.prune(model, keep_energy=0.8)
    shape = (4, 3, 16, 16)
    compact = svdtrain.export(model, input_shape=shape, choose="latency", reps=1, channels_last=True)
    svdtrain.export_program(compact, torch.zeros(shape), tmp_path / "m.pt2")
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = torch.randn(shape)
    with torch.no_grad():
        assert _rel_err(loaded(x), model(x)) < 1e-4
        assert _rel_err(loaded(x.contiguous(memory_format=torch.channels_last)), model(x)) < 1e-4


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_float64_model_exports_in_float64_without_rounding(mode):
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet()).double().eval()
    svdtrain.decompose(model, mode=mode, init="svd")
    svdtrain.prune(model, keep_energy=0.9)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    compact = svdtrain.export(model, input_shape=(2, 3, 16, 16)).eval()
    assert all(p.dtype == torch.float64 for p in compact.parameters())
    with torch.no_grad():
        assert (compact(x) - model(x)).abs().max().item() < 1e-10  # float32 rounding would give ~1e-7


def test_export_of_a_model_without_svd_layers_warns(caplog):
    with caplog.at_level("WARNING", logger="svdtrain"):
        svdtrain.export(mlp())
    assert any("no SVD layers" in r.message for r in caplog.records)


class Shared(nn.Module):
    """One Linear registered under two names and called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(24, 24)
        self.b = self.a
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("trace", [False, True])
def test_a_layer_shared_under_two_names_exports_under_both(trace):
    torch.manual_seed(0)
    model = svdtrain.decompose(Shared(), init="svd")
    svdtrain.prune(model, keep_energy=0.8)
    compact = svdtrain.export(model, input_shape=(2, 24), trace=trace)
    assert not any(type(m).__module__.startswith("svdtrain") for m in compact.modules())
    x = torch.randn(2, 24)
    with torch.no_grad():
        assert torch.allclose(compact(x), model(x), atol=1e-5)
    assert svdtrain.count_macs(compact, (2, 24)) == svdtrain.count_macs(model, (2, 24))


def test_transposed_convs_attention_and_rnns_are_named_as_left_dense(caplog):
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
            self.attn = nn.MultiheadAttention(8, 2, add_zero_attn=True)  # a kind SVD form does not cover
            self.rnn = nn.GRU(8, 8)
            self.fc = nn.Linear(8, 2)

    with caplog.at_level("INFO", logger="svdtrain"):
        model = svdtrain.decompose(Mixed())
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"][0]
    for part in ("up: ConvTranspose2d", "attn: attention with add_bias_kv or add_zero_attn", "rnn: GRU"):
        assert part in warning
    assert "attn.out_proj" not in warning  # inside the attention module: named once, as the module
    assert isinstance(model.fc, svdtrain.SVDLinear)


def test_skipping_one_name_of_a_shared_layer_skips_the_layer():
    model = svdtrain.decompose(SharedLinear(), skip=["b"])
    assert type(model.a) is nn.Linear and model.a is model.b  # still one module, not untied


def test_frozen_layers_stay_frozen_and_mixed_freezing_of_attention_is_refused():
    model = mlp()
    for p in model[1].parameters():
        p.requires_grad_(False)
    model[3].weight.requires_grad_(False)  # bias-only tuning of one layer
    svdtrain.decompose(model)
    assert not any(p.requires_grad for p in model[1].parameters())
    assert [p.requires_grad for p in (model[3].U, model[3].s, model[3].V, model[3].bias)] == [False] * 3 + [True]
    assert all(p.requires_grad for p in model[5].parameters())
    before = model[1].weight.detach().clone()
    opt = torch.optim.SGD(svdtrain.param_groups(model, 0.0), lr=0.5)
    model(torch.randn(4, 3, 4, 4)).square().mean().backward()
    opt.step()
    assert torch.equal(model[1].weight, before)
    attn = nn.Sequential(nn.MultiheadAttention(8, 2))
    attn[0].out_proj.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen and trainable"):
        svdtrain.decompose(attn)
    assert type(attn[0]) is nn.MultiheadAttention  # refused before any change
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        svdtrain.decompose(mlp())


class Masked(nn.Module):
    """A forward with an optional argument that changes the result when given."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x, mask=None):
        h = torch.relu(self.fc1(x))
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.fc2(h.mean(1))


def test_a_forward_with_optional_arguments_exports_untraced_and_keeps_them():
    torch.manual_seed(0)
    x, mask = torch.randn(2, 5, 8), (torch.rand(2, 5) > 0.5).float()
    model = svdtrain.decompose(Masked(), example_inputs=(x,))
    svdtrain.prune(model, keep_energy=0.9)
    compact = svdtrain.export(model.eval(), example_inputs=(x,))
    assert not isinstance(compact, torch.fx.GraphModule)
    with torch.no_grad():
        for args in ((x,), (x, mask)):
            torch.testing.assert_close(compact(*args), model(*args), atol=1e-5, rtol=1e-5)


def test_layers_the_forward_never_calls_are_named(caplog):
    class ListRef(nn.Module):  # calls its layers through a plain list: decompose cannot reach them
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)
            self.layers = [self.a, self.b]

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    with caplog.at_level("WARNING", logger="svdtrain"):
        svdtrain.decompose(ListRef(), example_inputs=(torch.randn(3, 8),))
    assert "2 SVD layers were not called" in caplog.text and ": a, b" in caplog.text


@pytest.mark.parametrize("choose", ["macs", "latency"])
def test_export_leaves_the_callers_random_stream_as_it_was(choose):
    model = svdtrain.decompose(TinyResNet(), input_shape=(1, 3, 8, 8))
    svdtrain.prune(model, keep_energy=0.9)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    svdtrain.export(model, input_shape=(1, 3, 8, 8), choose=choose, reps=1)
    assert torch.equal(torch.rand(4), expected)


def test_hooks_that_do_not_carry_over_and_bilinear_layers_are_named(caplog):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].register_forward_hook(lambda m, i, o: None)
    with caplog.at_level("WARNING", logger="svdtrain"):
        svdtrain.decompose(model)
    assert "hooks registered on 1 do not carry over" in caplog.text
    caplog.clear()

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.bi, self.fc = nn.Bilinear(4, 4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.bi(x, x))

    with caplog.at_level("WARNING", logger="svdtrain"):
        svdtrain.decompose(Pair())
    assert "bi: Bilinear is not decomposed" in caplog.text and "experts" not in caplog.text


def test_the_weight_share_counts_a_decomposed_layer_inside_a_dense_one_once(caplog):
    class Experts(nn.Module):  # stacked expert weights (left dense) and a router Linear inside
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(16, 4)
            self.w = nn.Parameter(torch.randn(4, 16, 16))

        def forward(self, x):
            return torch.einsum("bd,edh->bh", x, self.w) + self.router(x).sum(-1, keepdim=True)

    with caplog.at_level("INFO", logger="svdtrain"):
        svdtrain.decompose(nn.Sequential(Experts()))
    assert f"holding {16 * 4 / (16 * 4 + 4 * 16 * 16):.1%} of the weights" in caplog.text


def test_a_half_precision_layer_whose_singular_values_overflow_stays_dense(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4)).half()
    with torch.no_grad():
        model[0].weight.normal_(0, 1e4)  # entries fit float16; its largest singular value does not
    with caplog.at_level("WARNING", logger="svdtrain"):
        svdtrain.decompose(model)
    assert type(model[0]) is nn.Linear and isinstance(model[1], svdtrain.SVDLinear)
    assert "0: its factors are not finite in torch.float16" in caplog.text
