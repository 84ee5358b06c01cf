"""save_pretrained / from_pretrained on plain PyTorch models: what must match, what round-trips,
and that a refused load leaves the base model as it was."""
import copy

import pytest
import torch
from torch import nn

import svdtrain
from helpers import SharedLinear

pytest.importorskip("safetensors")


def cut(model, x):
    svdtrain.set_ranks(model, {n: max(1, layer.full_rank // 2) for n, layer in svdtrain.svd_layers(model)})
    with torch.no_grad():
        return model(x)


def test_a_layer_of_another_kernel_or_kind_is_refused_and_the_base_kept(tmp_path):
    """A 1x3 conv and a 3x1 conv share a matrix shape (8 x 3), as do Linear(3, 8) and a
    Conv2d(1, 8, 3x1): neither takes the other's factors."""
    torch.manual_seed(0)
    saved = svdtrain.decompose(nn.Sequential(nn.Conv2d(1, 8, (1, 3)), nn.ReLU()), init="random")
    svdtrain.save_pretrained(saved, tmp_path / "svd")
    for base, key in ((nn.Sequential(nn.Conv2d(1, 8, (3, 1)), nn.ReLU()), "kernel_size"),
                      (nn.Sequential(nn.Linear(3, 8), nn.ReLU()), "kind")):
        layer, weight = base[0], base[0].weight.detach().clone()
        assert svdtrain.SVDLinear.from_linear(nn.Linear(3, 8)).full_rank == saved[0].full_rank
        with pytest.raises(ValueError, match=f"does not match this model: 0 has {key} "):
            svdtrain.from_pretrained(base, tmp_path / "svd")
        assert base[0] is layer and torch.equal(layer.weight, weight)  # the user's layer, untouched


def test_a_wider_layer_of_the_same_rank_is_a_one_line_error(tmp_path):
    svdtrain.save_pretrained(svdtrain.decompose(nn.Sequential(nn.Linear(8, 16))), tmp_path / "svd")
    base = nn.Sequential(nn.Linear(8, 32))
    with pytest.raises(ValueError, match=r"0 has matrix \[32, 8\], saved \[16, 8\]$"):
        svdtrain.from_pretrained(base, tmp_path / "svd")
    assert isinstance(base[0], nn.Linear)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        svdtrain.save_pretrained(svdtrain.decompose(nn.Sequential(nn.Linear(8, 16))), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


def test_a_layer_shared_under_two_names_and_mixed_conv_modes_round_trip(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    shared = svdtrain.decompose(SharedLinear(8))
    want = cut(shared, x)
    svdtrain.save_pretrained(shared, tmp_path / "shared")
    loaded = svdtrain.from_pretrained(SharedLinear(8), tmp_path / "shared")
    assert loaded.a is loaded.b and isinstance(loaded.b, svdtrain.SVDLinear)
    assert torch.equal(loaded(x), want)

    def net():
        return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    mixed = svdtrain.decompose(net(), mode="channel", skip=["2"])
    svdtrain.decompose(mixed, mode="spatial")
    x = torch.randn(2, 4, 6, 6)
    want = cut(mixed, x)
    svdtrain.save_pretrained(mixed, tmp_path / "mixed")
    loaded = svdtrain.from_pretrained(net(), tmp_path / "mixed")
    assert (loaded[0].mode, loaded[2].mode) == ("channel", "spatial")
    assert torch.equal(loaded(x), want)


def test_a_whitened_metric_takes_the_base_models_dtype(tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    svd = svdtrain.decompose(build(), calibration=[torch.randn(16, 8) for _ in range(4)])
    assert svd[0].metric.dtype == torch.float32
    svdtrain.save_pretrained(svd, tmp_path / "svd")
    half = svdtrain.from_pretrained(build().to(torch.bfloat16), tmp_path / "svd")
    assert half[0].metric.dtype == half[0].V.dtype == torch.bfloat16
    want = svdtrain.Regularizer(orth=1.0)(copy.deepcopy(svd).to(torch.bfloat16))
    assert torch.allclose(svdtrain.Regularizer(orth=1.0)(half).float(), want.float())
