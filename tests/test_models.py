import importlib.util

import pytest
import torch
import torch.nn as nn

from svdtrain.models import MODEL_NAMES, SmallCNN, build_model, resnet20, resnet56


def _count(m):
    return sum(p.numel() for p in m.parameters())


def _resnet_params(n, num_classes=10, cin=3):
    """Hand count for ResNet-(6n+2): 3x3 convs, BN (weight+bias), 1x1 conv+BN shortcuts, linear."""
    conv3 = lambda a, b: 9 * a * b
    bn = lambda c: 2 * c
    total = conv3(cin, 16) + bn(16)
    for a, b in [(16, 16), (16, 32), (32, 64)]:
        for i in range(n):
            ci = a if i == 0 else b
            total += conv3(ci, b) + bn(b) + conv3(b, b) + bn(b)
            if ci != b:
                total += ci * b + bn(b)
    return total + 64 * num_classes + num_classes


def test_resnet20_param_count():
    m = resnet20()
    assert _count(m) == _resnet_params(3) == 272_474  # the "0.27M" of He et al. with B shortcuts
    assert _count(resnet20(num_classes=100)) == _resnet_params(3, 100)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 19 + 2 and all(c.bias is None for c in convs)


def test_resnet56_forward():
    m = resnet56(num_classes=100)
    assert _count(m) == _resnet_params(9, 100)
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_small_cnn():
    m = SmallCNN(num_classes=10, in_channels=1, width=8)
    assert m(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert build_model("small_cnn", 5, in_channels=1)(torch.randn(2, 1, 8, 8)).shape == (2, 5)


def test_fx_trace_resnet20():
    m = resnet20().eval()
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x))
    assert sum(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d) for n in gm.graph.nodes) == 21


def test_build_model():
    for name in MODEL_NAMES:
        assert isinstance(build_model(name, 10, in_channels=1 if name == "small_cnn" else 3), nn.Module)
    assert build_model("resnet20", 7, in_channels=1)(torch.randn(1, 1, 8, 8)).shape == (1, 7)
    with pytest.raises(ValueError, match="resnet20"):
        build_model("vgg16", 10)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision installed")
def test_build_model_torchvision_missing():
    with pytest.raises(ImportError, match=r"pip install svdtrain\[torchvision\]"):
        build_model("tv:resnet18", 10)
