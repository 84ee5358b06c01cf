"""Activation-aware decomposition (whiten.py): exact at init; its truncation is the rank-k weight
of least output error, checked against Eckart-Young on the outputs themselves; errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svdtrain
from svdtrain.kinds import KINDS, LayerKind, register
from svdtrain.whiten import DAMPING, whiten_layer
from helpers import SharedLinear, TinyResNet, randomize_bn


def correlated(n, dim, generator=None):
    """Rows with strongly correlated coordinates and scales spread over two decades."""
    mix = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    scales = torch.logspace(0, -2, dim, dtype=torch.float64)
    return (torch.randn(n, dim, generator=generator, dtype=torch.float64) * scales) @ mix


@pytest.mark.parametrize("whiten", ["cholesky", "diag"])
def test_whitened_decomposition_is_exact(whiten):
    model = randomize_bn(TinyResNet()).eval()
    model.a1.padding_mode = "reflect"  # the unfold path pads as the conv does
    x = torch.randn(16, 3, 16, 16)
    svd = svdtrain.decompose(copy.deepcopy(model), init="svd",
                             calibration=[(x[:8], None), x[8:]], whiten=whiten)
    with torch.no_grad():
        assert torch.allclose(svd(x), model(x), atol=1e-4)
        assert torch.allclose(svd(x + 1), model(x + 1), atol=1e-4)  # W itself, not only on the calibration data
    for name in ("stem", "a1", "a2", "b1", "b2", "down.0", "fc"):
        assert torch.allclose(svd.get_submodule(name).dense_weight(), model.get_submodule(name).weight, atol=1e-5)
    gram = svd.b2.V.T @ svd.b2.V  # the factors did change: V is no longer orthonormal
    assert not torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-2)


def test_linear_truncation_is_the_optimal_rank_k_approximation():
    g = torch.Generator().manual_seed(0)
    x = correlated(2000, 24, g)
    dense = nn.Sequential(nn.Linear(24, 16)).double()
    y = dense(x).detach()
    k = 6
    # Independent: the best rank-k approximation of the outputs Y - b = X W^T (Eckart-Young) is
    # itself X W'^T for a rank-k W' (its columns lie in X's column space), so the least output
    # error over rank-k weights is the tail of Y's singular values.
    tail = torch.linalg.svdvals(x @ dense[0].weight.detach().T)[k:]
    optimal = float(tail.pow(2).sum().sqrt())

    def error(**kw):
        model = svdtrain.decompose(copy.deepcopy(dense), init="svd", **kw)
        svdtrain.set_ranks(model, {"0": k})
        return float((model(x).detach() - y).norm())

    whitened = error(calibration=[x[:1000], x[1000:]], whiten="cholesky")
    plain = error()
    assert whitened == pytest.approx(optimal, rel=1e-4)
    assert plain > 1.5 * whitened
    diag = error(calibration=[x], whiten="diag")
    assert optimal * (1 - 1e-6) <= diag < plain


def test_diag_whitening_scales_columns_by_the_root_of_mean_abs_input():
    # ASVD's S = diag(mean_rows |x_j|)^0.5, computed here: s are the singular values of W S.
    g = torch.Generator().manual_seed(1)
    x = correlated(500, 12, g)
    dense = nn.Sequential(nn.Linear(12, 8)).double()
    model = svdtrain.decompose(copy.deepcopy(dense), init="svd", calibration=[x[:200], x[200:]], whiten="diag")
    d = x.abs().mean(0).sqrt()
    expected = torch.linalg.svdvals(dense[0].weight.detach() * d)
    assert torch.allclose(model[0].s.detach().abs().sort(descending=True).values, expected, rtol=1e-9)
    assert not torch.allclose(expected, torch.linalg.svdvals(dense[0].weight.detach()), rtol=1e-2)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_energy_is_output_error(padding_mode):
    """Strided, padded conv: dropping whitened values costs their energy in output error,
    per output position. A wrong patch layout (stride, padding) would break the equality."""
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode=padding_mode).double()
    g = torch.Generator().manual_seed(1)
    x = correlated(8 * 11 * 11, 4, g).reshape(8, 11, 11, 4).permute(0, 3, 1, 2).contiguous()
    model = svdtrain.decompose(nn.Sequential(copy.deepcopy(conv)), init="svd", calibration=[x])
    s = model[0].s.detach().clone()
    svdtrain.set_ranks(model, {"0": 3})
    with torch.no_grad():
        out, ref = model(x), conv(x)
    positions = out.shape[0] * out.shape[2] * out.shape[3]
    assert float((out - ref).pow(2).sum() / positions) == pytest.approx(float(s[3:].pow(2).sum()), rel=1e-4)


def test_attention_projections_are_whitened_by_their_inputs():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    model = nn.Sequential(layer)
    x = torch.randn(4, 10, 16) @ torch.randn(16, 16)
    ref = model(x).detach()
    svdtrain.decompose(model, init="svd", calibration=[x])
    assert torch.allclose(model(x), ref, atol=1e-4)
    # q's V is orthonormal in the metric of its input, the attention input: V^T C V = I
    # (C the damped second moment whiten.py documents)
    rows = x.reshape(-1, 16).double()
    c = rows.T @ rows / rows.shape[0]
    c = c + DAMPING * c.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    v = model[0].self_attn.q_proj.V.detach().double()
    assert torch.allclose(v.T @ c @ v, torch.eye(16, dtype=torch.float64), atol=1e-4)


def test_bad_input_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="init='svd'"):
        svdtrain.decompose(copy.deepcopy(model), init="random", calibration=[x])
    with pytest.raises(ValueError, match="mode='channel'"):
        svdtrain.decompose(copy.deepcopy(model), mode="spatial", calibration=[x])
    with pytest.raises(ValueError, match="whiten must be"):
        svdtrain.decompose(copy.deepcopy(model), calibration=[x], whiten="pca")
    kept = copy.deepcopy(model)
    with pytest.raises(ValueError, match="no batches"):
        svdtrain.decompose(kept, calibration=[])
    assert isinstance(kept[0], nn.Conv2d) and isinstance(kept[2], nn.Linear)  # left as it was
    assert torch.equal(kept[2].weight, model[2].weight)

    class Scaled(nn.Linear):
        pass

    register(LayerKind("scaled", Scaled, lambda m, mode, init: svdtrain.SVDLinear.from_linear(m, init)))
    try:
        unsupported = nn.Sequential(Scaled(4, 4))
        with pytest.raises(ValueError, match="cannot whiten layer kind 'scaled'"):
            svdtrain.decompose(unsupported, calibration=[torch.randn(2, 4)])
        assert isinstance(unsupported[0], Scaled)  # refused before anything changed
    finally:
        del KINDS[Scaled]
    layer = svdtrain.decompose(nn.Sequential(nn.Linear(4, 3)))[0]
    with pytest.raises(ValueError, match="lower triangular"):
        whiten_layer(layer, torch.ones(4, 4))
    svdtrain.set_ranks(nn.Sequential(layer), {"0": 2})
    with pytest.raises(ValueError, match="unpruned"):
        whiten_layer(layer, torch.ones(4))


def test_the_pipeline_whitens_on_its_first_training_batches(tmp_path):
    """decompose.calibration=N: a run's init factors each layer by its inputs on the first N
    training batches of its seed. Checked on the first conv, whose inputs are the images
    themselves: its singular values are those of W·L, L computed here from those batches."""
    from svdtrain.config import ConfigError, load_config
    from svdtrain.context import build_run_model, run_dataset
    from svdtrain.data import write_fake_cifar
    from svdtrain.loader import BatchLoader
    from svdtrain.models import build_model
    write_fake_cifar(tmp_path, n_train=64, n_test=16)
    dense = build_model("resnet20", 10).eval()
    torch.save({"model": dense.state_dict(), "config": {}}, tmp_path / "checkpoint.pt")  # a dense run's file
    over = [f"data_dir={tmp_path}", "model=resnet20", "decompose.init=svd", "batch_size=16",
            f"decompose.dense_checkpoint={tmp_path / 'checkpoint.pt'}"]
    cfg = load_config(None, over + ["decompose.calibration=2"])
    data = run_dataset(cfg)
    model = build_run_model(cfg, data).eval()
    loader = BatchLoader(data.x_train, data.y_train, 16, train=True, seed=0, mean=data.mean, std=data.std)
    x = torch.cat([b for b, _ in list(loader)[:2]]).double()
    rows = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    chol = torch.linalg.cholesky(rows.T @ rows / len(rows))
    want = torch.linalg.svdvals(dense.conv1.weight.detach().double().reshape(16, 27) @ chol)
    assert torch.allclose(model.conv1.s.detach().double(), want, rtol=1e-3)
    with torch.no_grad():
        assert torch.allclose(model(x[:4].float()), dense(x[:4].float()), atol=1e-3)
    plain = build_run_model(load_config(None, over), data)
    assert not torch.allclose(plain.conv1.s, model.conv1.s, rtol=1e-2)
    # orth_metric=plain: the same whitened factors, their orthogonality measured as V^T V = I
    flat = build_run_model(load_config(None, over + ["decompose.calibration=2", "decompose.orth_metric=plain"]), data)
    assert torch.equal(flat.conv1.V, model.conv1.V)
    assert svdtrain.orthogonality_loss(model).item() < 1e-3 < svdtrain.orthogonality_loss(flat).item()
    with pytest.raises(ConfigError, match="decompose.init=svd"):
        load_config(None, [f"data_dir={tmp_path}", "decompose.calibration=2"])


def plain_orthogonality(model) -> float:
    """The plain term, sum over layers of (||U^T U - I||^2 + ||V^T V - I||^2) / r^2, computed here."""
    total = 0.0
    for _, layer in svdtrain.svd_layers(model):
        u, _, v = (f.detach().double() for f in layer.factors())
        eye = torch.eye(v.shape[1], dtype=torch.float64)
        total += ((v.T @ v - eye).pow(2).sum() + (u.T @ u - eye).pow(2).sum()).item() / v.shape[1] ** 2
    return total


@pytest.mark.parametrize("whiten", ["cholesky", "diag"])
def test_orthogonality_is_kept_in_the_activation_metric(whiten):
    """A whitened V is orthonormal in the input metric: the orthogonality term (V^T C V = I)
    starts at zero while the plain V^T V = I, computed here, is far from it; the metric travels
    with the state dict into a fresh decomposition, and is dropped with a plain one."""
    model = randomize_bn(TinyResNet()).eval()
    x = torch.randn(16, 3, 16, 16)
    svd = svdtrain.decompose(copy.deepcopy(model), init="svd", calibration=[x], whiten=whiten)
    assert svdtrain.orthogonality_loss(svd).item() < 1e-3
    assert plain_orthogonality(svd) > 1.0
    fresh = svdtrain.decompose(copy.deepcopy(model), init="random")
    fresh.load_state_dict(svd.state_dict())
    assert svdtrain.orthogonality_loss(fresh).item() == pytest.approx(svdtrain.orthogonality_loss(svd).item())
    fresh.load_state_dict(svdtrain.decompose(copy.deepcopy(model), init="svd").state_dict())
    assert svdtrain.orthogonality_loss(fresh).item() < 1e-3
    assert not any(name.endswith("metric") for name, _ in fresh.named_buffers())


def test_a_rank_deficient_input_moment_still_factors():
    """Inputs spanning few directions of a wide layer (an embedding of a small vocabulary feeding
    q/k/v): the moment is rank-deficient; the factor still exists and the layer stays exact."""
    torch.manual_seed(0)
    emb = torch.randn(12, 64) * 30  # 12 distinct input rows in 64 dimensions, large scale
    model = nn.Sequential(nn.Linear(64, 48))
    batches = [emb[torch.randint(0, 12, (4096,))] for _ in range(16)]
    svd = svdtrain.decompose(copy.deepcopy(model), init="svd", calibration=batches)
    with torch.no_grad():
        assert torch.allclose(svd(emb), model(emb), atol=1e-3)


def test_unwhiten_keeps_the_cut_model_and_makes_its_factors_plain():
    """After a cut, unwhiten re-factors each whitened layer at its rank as the plain SVD of the
    same matrix: outputs unchanged, U and V orthonormal (the plain term at ~0), singular values
    those of the cut matrix, the metric and the factors' optimizer state gone."""
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet()).eval()
    x = torch.randn(16, 3, 16, 16)
    svd = svdtrain.decompose(copy.deepcopy(model), init="svd", calibration=[x])
    svdtrain.prune(svd, macs_budget=0.5, input_shape=(1, 3, 16, 16))
    opt = torch.optim.SGD(svd.parameters(), lr=0.01, momentum=0.9)
    svd(x).square().mean().backward()
    opt.step()  # momentum buffers for every factor
    layers = dict(svdtrain.svd_layers(svd))
    cut = {name: layer.matrix().detach().double() for name, layer in layers.items()}
    with torch.no_grad():
        before = svd(x)
    assert plain_orthogonality(svd) > 1.0
    assert svdtrain.unwhiten(svd, opt) == len(layers)
    with torch.no_grad():
        assert torch.allclose(svd(x), before, atol=1e-4)
    assert plain_orthogonality(svd) < 1e-8 and svdtrain.orthogonality_loss(svd).item() < 1e-6
    for name, layer in layers.items():
        assert getattr(layer, "metric", None) is None
        _, s, _ = layer.factors()
        want = torch.linalg.svdvals(cut[name])[:layer.rank]
        assert torch.allclose(s.detach().double(), want, rtol=1e-4, atol=1e-6), name
        assert all(opt.state[p]["momentum_buffer"].abs().sum() == 0 for p in (layer.U, layer.s, layer.V))
    assert svdtrain.unwhiten(svd, opt) == 0  # nothing whitened is left


def test_the_pipeline_unwhitens_when_the_gradual_masks_end(tmp_path, monkeypatch):
    """prune.unwhiten with gradual masks: the layers are re-factored when the ramp ends (the
    prune stage's call finds nothing left to do) and the run's model ends unwhitened at the
    budget; without it the whitened layers keep their metric."""
    import svdtrain.stages
    calls = []
    monkeypatch.setattr(svdtrain.stages, "unwhiten", lambda *a, **k: calls.append(svdtrain.unwhiten(*a, **k)) or calls[-1])
    import json
    from svdtrain.data import write_fake_cifar
    from svdtrain.models import build_model
    from svdtrain.train import Run
    from svdtrain.config import load_config
    write_fake_cifar(tmp_path / "data", n_train=96, n_test=32)
    torch.manual_seed(0)
    torch.save(build_model("resnet20", 10).state_dict(), tmp_path / "dense.pt")
    over = [f"data_dir={tmp_path / 'data'}", "model=resnet20", "decompose.init=svd", "batch_size=16",
            f"decompose.dense_checkpoint={tmp_path / 'dense.pt'}", "decompose.calibration=2", "epochs.train=1", "optim.lr=0.001",
            "epochs.finetune=0", "regularizer.target_macs=0.5", "regularizer.target_at=0.5", "prune.gradual=true"]
    for unwhiten, metric in ((True, "activation"), (False, "activation"), (True, "plain")):
        calls.clear()
        out = tmp_path / f"run_{unwhiten}_{metric}"
        Run(out, load_config(None, over + [f"prune.unwhiten={str(unwhiten).lower()}",
                                           f"decompose.orth_metric={metric}"]), quiet=True).execute()
        state = torch.load(out / "model_state.pt", weights_only=True)
        assert any(k.endswith(".metric") for k in state) == (not unwhiten)
        layers = sum(k.endswith(".active") for k in state)
        # every layer at the ramp's end, none left to the cut; with plain orthogonality the
        # whitened layers keep no metric, so each layer is re-factored (again at the cut)
        assert calls == ({"activation": [layers, 0], "plain": [layers, layers]}[metric] if unwhiten else [])
        assert json.loads((out / "summary.json").read_text())["macs_ratio"] <= 0.5 + 1e-6
        if metric == "plain":  # re-factored at the cut: V orthonormal in the plain metric at its active columns
            for k in (k for k in state if k.endswith(".active")):
                v = state[k[:-len("active")] + "V"][:, state[k]].double()
                assert torch.allclose(v.mT @ v, torch.eye(v.shape[1], dtype=v.dtype), atol=1e-4), k


def test_padded_positions_are_left_out_of_the_moments():
    """A dict batch's attention_mask: the padded positions of a (batch, seq, features) input do
    not enter the moment, so a padded batch whitens as its unpadded tokens do."""
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.proj = nn.Embedding(50, 16), nn.Linear(16, 12)

        def forward(self, input_ids, attention_mask=None):
            return self.proj(self.emb(input_ids))

    class Flat(Tiny):  # as a mixture-of-experts block feeds its shared expert: tokens flattened in order
        def forward(self, input_ids, attention_mask=None):
            x = self.emb(input_ids)
            return self.proj(x.view(-1, x.shape[-1])).view(*x.shape[:2], -1)

    for model_type in (Tiny, Flat):
        _padding_is_left_out(model_type)


def _padding_is_left_out(model_type):
    torch.manual_seed(0)
    model = model_type()
    ids = torch.randint(1, 50, (2, 9))
    padded = torch.cat([ids, torch.zeros(2, 30, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 9), torch.zeros(2, 30)], 1).long()
    real = svdtrain.decompose(copy.deepcopy(model), calibration=[{"input_ids": ids, "attention_mask": torch.ones(2, 9)}])
    pad = svdtrain.decompose(copy.deepcopy(model), calibration=[{"input_ids": padded, "attention_mask": mask}])
    unmasked = svdtrain.decompose(copy.deepcopy(model), calibration=[{"input_ids": padded}])
    want = real.proj.factors()[1]
    assert torch.allclose(pad.proj.factors()[1], want, rtol=1e-5)
    assert not torch.allclose(unmasked.proj.factors()[1], want, rtol=1e-2)  # the pads would count


def test_float16_factors_that_overflow_keep_the_plain_svd(caplog):
    """Inputs that are always zero in some columns make V'^T S^-1 huge: in float16 it would
    overflow to inf; the layer keeps its plain SVD instead (a WARNING names it) and stays finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).half()
    x = torch.randn(512, 64) * 1e-2
    x[:, :8] = 0
    with caplog.at_level("WARNING", logger="svdtrain"):
        svd = svdtrain.decompose(copy.deepcopy(model), calibration=[x.half()])
    assert "whitened factors overflow the dtype of 0: plain SVD kept" in caplog.text
    assert getattr(svd[0], "metric", None) is None  # plain SVD kept
    assert all(bool(torch.isfinite(p).all()) for p in svd.parameters())
    with torch.no_grad():
        assert torch.allclose(svd(x.half()).float(), model(x.half()).float(), atol=1e-2)


def test_a_failing_profile_or_a_shared_name_in_skip_leaves_decompose_consistent():
    """Inputs of the wrong shape fail the profile after the layers were built: the model keeps
    its own layers. A layer's second name (one module under two names) is a valid skip name."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(RuntimeError):
        svdtrain.decompose(model, input_shape=(1, 5))
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]

    assert type(svdtrain.decompose(SharedLinear(4), skip=["b"]).b) is nn.Linear  # no "names no module" error
