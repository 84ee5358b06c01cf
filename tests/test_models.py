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


def _small_cnn_params(num_classes, cin, w=32):
    """Hand count for SmallCNN: 3x3 convs cin->w->2w->2w without bias, each with BN, linear."""
    return (9 * cin * w + 2 * w) + (9 * w * 2 * w + 2 * 2 * w) + (9 * 2 * w * 2 * w + 2 * 2 * w) + 2 * w * num_classes + num_classes


def _vit_params(num_classes, cin, width=128, depth=6, patch=4, tokens=64, mlp=256):
    """Hand count for the ViT: patch conv, class token, positions, pre-norm encoder blocks
    (packed q/k/v projection, output projection, 2-layer MLP, 2 LayerNorms), final norm, head."""
    embed = cin * patch * patch * width + width + width + (tokens + 1) * width
    block = (3 * width * width + 3 * width) + (width * width + width) + (width * mlp + mlp) + (mlp * width + width) \
        + 2 * 2 * width
    return embed + depth * block + 2 * width + width * num_classes + num_classes


HAND_PARAMS = {"resnet20": lambda c, cin: _resnet_params(3, c, cin), "resnet32": lambda c, cin: _resnet_params(5, c, cin),
               "resnet56": lambda c, cin: _resnet_params(9, c, cin), "resnet110": lambda c, cin: _resnet_params(18, c, cin),
               "small_cnn": _small_cnn_params, "vit": _vit_params}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build_model(name):
    """Every name builds its architecture (hand parameter count) with the asked classes and
    input channels (neither the defaults), and maps an image of its size to num_classes logits."""
    m = build_model(name, 7, in_channels=1).eval()
    assert _count(m) == HAND_PARAMS[name](7, 1)
    size = 8 if name == "small_cnn" else 32
    with torch.no_grad():
        assert m(torch.randn(2, 1, size, size)).shape == (2, 7)


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match="resnet20"):
        build_model("vgg16", 10)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision installed")
def test_build_model_torchvision_missing():
    with pytest.raises(ImportError, match=r"pip install svdtrain\[torchvision\]"):
        build_model("tv:resnet18", 10)
