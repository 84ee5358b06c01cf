"""The benchmarks' comparison methods (benchmarks/baselines/): filter pruning (Torch-Pruning) and
TRP, checked against hand computations (own MAC counter, own SVDs and energy ranks); and the
training-cost benchmark's TRP steps."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import svdtrain
from helpers import GroupedNet, TinyResNet, randomize_bn
from svdtrain.models import SmallCNN, resnet20

# benchmarks/ is on sys.path when a benchmark runs as a script; the same here
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_cost  # noqa: E402
from baselines import TRP, GroupSparsity, filter_prune  # noqa: E402


# ----- independent helpers -----
def hand_macs(model, shape):
    """MACs of Conv2d/Linear layers counted with our own hooks (any groups)."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total[0] += out.numel() * m.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(shape))
    model.train(was)
    for h in hs:
        h.remove()
    return total[0]


def hand_energy_rank(s, keep):
    e = (s.double() ** 2).sort(descending=True).values
    frac = e.cumsum(0) / e.sum()
    return next(i + 1 for i in range(len(e)) if frac[i] >= keep - 1e-12)


def spatial(w):
    n, c, kh, kw = w.shape
    return w.permute(0, 2, 1, 3).reshape(n * kh, c * kw)


def num_rank(m):
    s = torch.linalg.svdvals(m.double())
    return int((s > 1e-5 * s.max()).sum())


# ----- filter pruning -----
def test_filter_prune_resnet20_meets_target():
    model = resnet20().train()
    shape = (1, 3, 32, 32)
    dense = hand_macs(model, shape)
    out = filter_prune(model, torch.randn(shape), 0.5)
    assert out is model and model.training
    # the pruning trace ran in eval mode: no BN statistics were updated
    assert all(int(m.num_batches_tracked) == 0 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    macs = hand_macs(model, shape)
    assert 0.46 * dense <= macs <= 0.5 * dense
    assert model.fc.out_features == 10 and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_filter_prune_small_cnn_with_ignored_layer():
    model = SmallCNN(num_classes=7, in_channels=1, width=16)
    shape = (1, 1, 8, 8)
    dense = hand_macs(model, shape)
    filter_prune(model, torch.randn(shape), 0.3, ignored_layers=["features.0"])
    assert 0.25 * dense <= hand_macs(model, shape) <= 0.3 * dense
    assert model.features[0].out_channels == 16 and model.fc.out_features == 7
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 7)


def test_group_sparsity_shrinks_weak_channel_groups_then_filter_prune_meets_target():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=5, in_channels=1, width=16)
    shape = (1, 1, 8, 8)
    dense = hand_macs(model, shape)
    sparsity = GroupSparsity(model, torch.zeros(shape), reg=0.5)
    before = model.features[0].weight.detach().flatten(1).norm(dim=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,))
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y) * 0  # the penalty alone
        opt.zero_grad()
        loss.backward()
        sparsity.regularize()
        opt.step()
    after = model.features[0].weight.detach().flatten(1).norm(dim=1)
    # Every group shrinks; the weakest ones (relatively) the most, up to 2^alpha times faster.
    assert torch.all(after < before)
    ratio = after / before
    assert ratio[before.argmin()] < ratio[before.argmax()]
    filter_prune(model, torch.randn(shape), 0.4, p=2)
    assert hand_macs(model, shape) <= 0.4 * dense and model.fc.out_features == 5


def test_filter_prune_unreachable_target():
    model = SmallCNN(in_channels=1, width=8)
    with pytest.raises(ValueError, match="out of reach"):
        filter_prune(model, torch.randn(1, 1, 8, 8), 1e-6)


# ----- TRP -----
def test_trp_truncates_every_m_steps_only_eligible_layers():
    model = GroupedNet()  # conv, dw (groups 8), gc (groups 4), pw (1x1), fc
    trp = TRP(model, every=3, keep_energy=0.9, nuclear=0.0, skip=["pw"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not trp.step(1) and not trp.step(2)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert trp.step(3)
    expected = {}
    for name in ("conv", "fc"):
        w0 = before[f"{name}.weight"]
        m0 = w0.reshape(w0.shape[0], -1)
        u, s, vh = torch.linalg.svd(m0.double(), full_matrices=False)
        k = expected[name] = hand_energy_rank(s, 0.9)
        w = model.get_submodule(name).weight.detach()
        assert num_rank(w.reshape(w.shape[0], -1)) == k < len(s)
        best = ((u[:, :k] * s[:k]) @ vh[:k]).reshape(w0.shape)  # Eckart-Young optimum
        assert torch.allclose(w.double(), best, atol=1e-5)
    assert trp.ranks == expected
    for name in ("dw.weight", "gc.weight", "pw.weight", "conv.bias", "fc.bias"):
        assert torch.equal(dict(model.named_parameters())[name], before[name])


def test_trp_spatial_view():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, (3, 2)))
    w0 = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    trp = TRP(model, every=1, keep_energy=0.8, mode="spatial")
    trp.step(1)
    for layer, w in zip((model[0], model[2]), w0):
        k = hand_energy_rank(torch.linalg.svdvals(spatial(w).double()), 0.8)
        assert num_rank(spatial(layer.weight.detach())) == k < min(spatial(w).shape)


def test_trp_regularize_adds_nuclear_subgradient():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Conv2d(1, 3, 3))
    lin, conv = model[0], model[2]
    trp = TRP(model, every=2, keep_energy=0.9, nuclear=0.01, mode="spatial")

    def backward():
        model.zero_grad()
        lin(torch.randn(4, 6)).square().sum().backward()
        conv(torch.randn(2, 1, 5, 5)).square().sum().backward()
        return lin.weight.grad.clone(), conv.weight.grad.clone()

    g = backward()
    assert not trp.regularize() and torch.equal(lin.weight.grad, g[0])  # no truncation yet
    trp.step(1)
    assert not trp.regularize() and torch.equal(lin.weight.grad, g[0])
    trp.step(2)  # truncation: the next step's regularize() is due
    g_lin, g_conv = backward()
    assert trp.regularize()
    # hand SVDs of the current (truncated) weights: subgradient U_k V_k^T
    u, s, vh = torch.linalg.svd(lin.weight.detach().double())
    k = num_rank(lin.weight.detach())
    assert k == trp.ranks["0"] < 5
    want = 0.01 * (u[:, :k] @ vh[:k])
    assert torch.allclose((lin.weight.grad - g_lin).double(), want, atol=1e-6)
    m = spatial(conv.weight.detach())  # 9 x 3
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    k = num_rank(m)
    sub = (u[:, :k] @ vh[:k]).reshape(3, 3, 1, 3).permute(0, 2, 1, 3)
    assert torch.allclose((conv.weight.grad - g_conv).double(), 0.01 * sub, atol=1e-6)
    # once per truncation
    g2 = lin.weight.grad.clone()
    assert not trp.regularize() and torch.equal(lin.weight.grad, g2)


def test_trp_to_svd_model_matches_truncated_dense():
    model = randomize_bn(TinyResNet()).eval()
    trp = TRP(model, every=1, keep_energy=0.9)
    trp.step(1)
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    truncated = dict(trp.ranks)
    ranks = trp.to_svd_model()
    assert ranks == truncated and len(ranks) == 7
    assert all(isinstance(layer, svdtrain.SVDLayer) for _, layer in svdtrain.svd_layers(model))
    assert torch.allclose(model(x), ref, atol=1e-4)
    with pytest.raises(RuntimeError):
        trp.step(2)


def test_trp_to_svd_model_after_more_training_truncates_again():
    model = randomize_bn(TinyResNet()).eval()
    trp = TRP(model, every=1, keep_energy=0.9)
    trp.step(1)
    with torch.no_grad():  # an optimizer step after the truncation
        model.fc.weight.add_(0.01 * torch.randn_like(model.fc.weight))
    w = model.fc.weight.detach().clone()
    expect_fc = hand_energy_rank(torch.linalg.svdvals(w.double()), 0.9)
    ranks = trp.to_svd_model()
    assert ranks["fc"] == expect_fc
    assert ranks["stem"] == trp.ranks["stem"]


def test_trp_to_svd_model_budget():
    model = TinyResNet()
    shape = (1, 3, 16, 16)
    dense = hand_macs(model, shape)
    trp = TRP(model, every=1)
    trp.step(1)
    trp.to_svd_model(input_shape=shape, macs_budget=0.4)
    assert svdtrain.count_macs(model, shape) <= 0.4 * dense


def test_trp_leaves_multihead_attention_dense():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 6)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    model = Attn().eval()
    attn = {n: p.detach().clone() for n, p in model.attn.named_parameters()}
    trp = TRP(model, every=1, keep_energy=0.8)
    assert trp.layer_names == ["fc"]
    assert trp.step(1)
    assert all(torch.equal(p, attn[n]) for n, p in model.attn.named_parameters())
    assert num_rank(model.fc.weight.detach()) == trp.ranks["fc"] < 6
    x = torch.randn(2, 5, 8)
    ref = model(x)
    assert trp.to_svd_model() == {"fc": trp.ranks["fc"]}
    assert type(model.attn) is nn.MultiheadAttention
    assert torch.allclose(model(x), ref, atol=1e-5)


# ----- benchmarks/train_cost.py -----
def weight_matrices(model):
    return {n: m.weight.detach().flatten(1) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_train_cost_trp_step_truncates_every_m_steps():
    # dense and trp start from the same weights and take the same steps on the same batch, so
    # the dense model holds the weights that TRP's truncation starts from
    steps, models = train_cost.build_steps("small_cnn", ["dense", "trp"], trp_every=2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for method in ("dense", "trp"):
        steps[method](x, y)
    dense, trp = weight_matrices(models["dense"]), weight_matrices(models["trp"])
    assert len(dense) == 4  # 3 convs + fc
    # step 1 of every 2: a plain training step, no truncation
    assert all(torch.allclose(trp[n], w, atol=1e-6) for n, w in dense.items())
    assert all(num_rank(w) == min(w.shape) for w in dense.values())
    for method in ("dense", "trp"):
        steps[method](x, y)
    dense, trp = weight_matrices(models["dense"]), weight_matrices(models["trp"])
    # step 2: every weight replaced by its truncated SVD keeping 98% of the energy
    cut = 0
    for n, w in dense.items():
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        k = hand_energy_rank(s, 0.98)
        assert num_rank(trp[n]) == k
        assert torch.allclose(trp[n].double(), (u[:, :k] * s[:k]) @ vh[:k], atol=1e-5)
        cut += k < min(w.shape)
    assert cut >= 3  # the convs at least (the 10 x 64 classifier may keep all 10)


def test_train_cost_records_a_time_per_method_and_ratios_to_dense(tmp_path):
    out = tmp_path / "train_cost.json"
    train_cost.main(["--models", "small_cnn", "--methods", "dense", "svd_training", "trp", "--batch", "4",
                     "--reps", "2", "--warmup", "1", "--trp-every", "2", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    (only,) = result["per_model"]
    assert only["model"] == result["model"] == "small_cnn" and result["trp_every"] == 2 and result["reps"] == 2
    seconds = only["seconds_per_step"]
    assert set(seconds) == {"dense", "svd_training", "trp"} and all(t > 0 for t in seconds.values())
    assert set(only["ratios"]) == {"svd_training", "trp"}
    for method, ratio in only["ratios"].items():
        assert ratio == pytest.approx(seconds[method] / seconds["dense"])
