"""Decomposed layers: exact reconstruction, matrix views, forward paths."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import svdtrain
from helpers import TinyResNet
from svdtrain import SVDConv2d, SVDLinear

CONVS = [
    dict(in_channels=5, out_channels=7, kernel_size=3, stride=1, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(in_channels=3, out_channels=8, kernel_size=(1, 5), stride=2, padding=(0, 2), bias=False),
    dict(in_channels=6, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=6, out_channels=4, kernel_size=1, stride=2),
]


@pytest.mark.parametrize("kw", CONVS)
@pytest.mark.parametrize("mode", ["channel", "spatial"])
@pytest.mark.parametrize("path", ["dense", "factored", "auto"])
def test_conv_svd_init_reconstructs_exactly(kw, mode, path):
    conv = nn.Conv2d(**kw)
    x = torch.randn(2, kw["in_channels"], 13, 11)
    layer = SVDConv2d.from_conv(conv, mode=mode, init="svd")
    layer.forward_path = path
    assert (layer.dense_weight() - conv.weight).abs().max() < 1e-5
    assert (layer(x) - conv(x)).abs().max() < 1e-4
    assert layer.rank == min(layer.rows, layer.cols)


def test_matrix_views_follow_the_spec():
    w = torch.randn(4, 3, 2, 5)
    conv = nn.Conv2d(3, 4, (2, 5), bias=False)
    conv.weight.data.copy_(w)
    ch = SVDConv2d.from_conv(conv, mode="channel")
    sp = SVDConv2d.from_conv(conv, mode="spatial")
    assert (ch.U.shape, ch.V.shape) == ((4, 4), (30, 4))
    assert (sp.U.shape, sp.V.shape) == ((8, 8), (15, 8))
    m = sp.matrix().detach()
    for n, c, h, k in [(0, 0, 0, 0), (3, 2, 1, 4), (1, 2, 0, 3)]:
        assert m[n * 2 + h, c * 5 + k] == pytest.approx(w[n, c, h, k].item(), abs=1e-5)
    assert torch.allclose(ch.matrix().detach(), w.reshape(4, -1), atol=1e-5)


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_linear_reconstructs_and_views(path):
    lin = nn.Linear(9, 4)
    layer = SVDLinear.from_linear(lin)
    layer.forward_path = path
    x = torch.randn(3, 2, 9)
    assert (layer(x) - lin(x)).abs().max() < 1e-5
    assert layer.U.shape == (4, 4) and layer.V.shape == (9, 4) and layer.s.shape == (4,)
    u, s, v = layer.U.detach(), layer.s.detach(), layer.V.detach()
    assert torch.allclose(u @ torch.diag(s) @ v.T, lin.weight, atol=1e-5)


def test_random_init_is_u_diag_s_vt():
    layer = SVDConv2d(4, 6, 3, padding=1, init="random")
    u, s, v = layer.U.detach(), layer.s.detach(), layer.V.detach()
    assert (s >= 0).all()
    assert torch.allclose(layer.dense_weight().detach().reshape(6, -1), u @ torch.diag(s) @ v.T, atol=1e-5)


def test_factored_and_dense_paths_agree_after_pruning():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = SVDConv2d.from_conv(conv, mode="spatial")
    svdtrain.SVDLayer.set_active(layer, torch.arange(layer.full_rank) < 3)
    x = torch.randn(2, 8, 10, 10)
    layer.forward_path = "dense"
    a = layer(x)
    layer.forward_path = "factored"
    b = layer(x)
    assert (a - b).abs().max() < 1e-4
    assert layer.rank == 3


def test_auto_path_picks_factored_only_when_cheaper():
    layer = SVDConv2d.from_conv(nn.Conv2d(16, 16, 3, padding=1))
    assert not layer._use_factored((8, 8))  # full rank: factor pair costs more
    layer.set_active(torch.arange(16) < 2)
    assert layer._use_factored((8, 8))


def test_pruned_forward_and_training_step_compile_with_fullgraph():
    import torch.nn.functional as F

    from helpers import TinyResNet, randomize_bn
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet())
    svdtrain.decompose(model, init="svd")
    svdtrain.prune(model, keep_energy=0.9)
    assert any(layer.rank < layer.full_rank for _, layer in svdtrain.svd_layers(model))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    model.eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
    model.train()
    reg = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=0.01)

    def loss_fn(x, y):  # forward + losses in one graph; AOT autograd compiles its backward
        return F.cross_entropy(model(x), y) + reg(model)

    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(layer.s.grad is not None and layer.U.grad is not None for _, layer in svdtrain.svd_layers(model))


def test_plan_follows_masks_through_load_state_dict_and_to():
    from helpers import TinyResNet
    a = svdtrain.decompose(TinyResNet(), init="random")
    svdtrain.prune(a, keep_energy=0.5)
    b = svdtrain.decompose(TinyResNet(), init="random")
    b.load_state_dict(a.state_dict())
    assert svdtrain.ranks(b) == svdtrain.ranks(a)
    c = b.double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert svdtrain.ranks(c) == svdtrain.ranks(a) and c(x).dtype == torch.float64


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_runs_in_svd_form_and_reads_weight(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    ref = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    svd = svdtrain.decompose(copy.deepcopy(ref), init="svd").eval()
    assert isinstance(svd.layers[0].linear1, SVDLinear)
    x = torch.randn((2, 5, 16) if batch_first else (5, 2, 16))
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        assert torch.allclose(svd(x, src_key_padding_mask=pad), ref(x, src_key_padding_mask=pad), atol=1e-4)
    svd.train()
    out = svd(x, src_key_padding_mask=pad)
    (out.square().mean() + svdtrain.orthogonality_loss(svd)).backward()
    lin = svd.layers[0].linear1
    assert lin.weight.shape == (32, 16) and lin.U.grad is not None and lin.s.grad is not None


def test_random_scaled_init_matches_the_dense_weight_norm_not_its_values():
    torch.manual_seed(0)
    ref = TinyResNet()
    norms = {n: m.weight.norm().item() for n, m in ref.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    model = svdtrain.decompose(copy.deepcopy(ref), init="random_scaled")
    for name, layer in svdtrain.svd_layers(model):
        w = layer.dense_weight()
        assert w.norm().item() == pytest.approx(norms[name], rel=1e-4)
        assert not torch.allclose(w, ref.get_submodule(name).weight, atol=1e-3)  # random directions
    plain = svdtrain.decompose(copy.deepcopy(ref), init="random")  # the reference's spread: wider
    assert plain.stem.dense_weight().norm() > 1.5 * norms["stem"]


def test_the_random_init_has_the_reference_codes_spread():
    """The reference draws its r x cols factor Kaiming-normal (fan-in cols), the rows x r one
    with fan-in r, and s ~ N(0, 1): Var(W) = r * (2 / r) * (2 / cols) * 1 = 4 / cols."""
    torch.manual_seed(0)
    layer = SVDConv2d(64, 64, 3, padding=1, init="random")
    cols = 64 * 9
    assert abs(float(layer.V.std()) / math.sqrt(2 / cols) - 1) < 0.05
    assert abs(float(layer.U.std()) / math.sqrt(2 / layer.full_rank) - 1) < 0.05
    assert abs(float(layer.weight.std()) / math.sqrt(4 / cols) - 1) < 0.1


def test_factors_saved_in_the_other_conv_mode_are_refused_with_the_mode_named():
    torch.manual_seed(0)
    spatial = svdtrain.decompose(TinyResNet(), mode="spatial")
    channel = svdtrain.decompose(TinyResNet(), mode="channel")
    with pytest.raises(RuntimeError, match="channel-mode layer.*other mode"):
        channel.load_state_dict(spatial.state_dict())


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_a_conv_at_rank_0_runs_counts_and_exports_as_a_zero_weight(mode):
    torch.manual_seed(0)
    model = svdtrain.decompose(TinyResNet(), mode=mode, input_shape=(1, 3, 8, 8)).eval()
    model.a1.set_active(torch.zeros_like(model.a1.active))
    for form in ("auto", "factored"):
        model.a1.set_form(form)
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            out = model(x)
            compact = svdtrain.export(model, input_shape=(1, 3, 8, 8))
            torch.testing.assert_close(compact(x), out)
            # the count is what the exported model runs, by PyTorch's own FLOP counter
            with FlopCounterMode(display=False) as counter:
                compact(x[:1])
        assert svdtrain.count_macs(model, (1, 3, 8, 8)) == counter.get_total_flops() // 2
    with pytest.raises(ValueError, match="mask of shape"):
        model.a1.set_active(torch.tensor([False]))


def test_meta_device_and_the_masked_state_round_trip():
    layer = SVDLinear(8, 4).to("meta")  # builds without reading values
    assert layer.rank == 4 and layer.U.is_meta
    model = svdtrain.decompose(TinyResNet())
    model.a1.plan.masked = True  # mid-ramp of gradual pruning: full width times the mask
    fresh = svdtrain.decompose(TinyResNet())
    fresh.load_state_dict(model.state_dict())
    assert fresh.a1.plan.masked and not fresh.a2.plan.masked
