"""Models: CIFAR ResNets (He et al. 2016), a small CNN for 8x8 digits, a small ViT for 32x32
images, torchvision passthrough, and a user's own builder ('module:function').

The CNN forwards use only modules, F.relu and `+` (no data-dependent control flow), so
torch.fx and torch.export can trace them and layer-replacement code sees every conv as an
nn.Conv2d. The ViT is built from nn.TransformerEncoderLayer, as users' transformers are.
"""
import importlib
import inspect
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

MODEL_NAMES = ["resnet20", "resnet32", "resnet56", "resnet110", "small_cnn", "vit"]


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _init(model):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual; 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()  # identity; traced away by fx
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3 stages of n BasicBlocks with 16/32/64 channels."""

    def __init__(self, depth, num_classes=10, in_channels=3):
        super().__init__()
        assert (depth - 2) % 6 == 0, "depth must be 6n+2"
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.fc = nn.Linear(64, num_classes)
        _init(self)

    @staticmethod
    def _stage(cin, cout, n, stride):
        return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet20(num_classes=10, in_channels=3):
    """ResNet-20 (0.27M params)."""
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes=10, in_channels=3):
    """ResNet-32 (0.46M params)."""
    return CifarResNet(32, num_classes, in_channels)


def resnet56(num_classes=10, in_channels=3):
    """ResNet-56 (0.86M params)."""
    return CifarResNet(56, num_classes, in_channels)


def resnet110(num_classes=10, in_channels=3):
    """ResNet-110 (1.7M params)."""
    return CifarResNet(110, num_classes, in_channels)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers (last one stride 2), average pool, linear: for 8x8 digits."""

    def __init__(self, num_classes=10, in_channels=1, width=32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv3x3(in_channels, w), nn.BatchNorm2d(w), nn.ReLU(),
            _conv3x3(w, 2 * w), nn.BatchNorm2d(2 * w), nn.ReLU(),
            _conv3x3(2 * w, 2 * w, stride=2), nn.BatchNorm2d(2 * w), nn.ReLU(),
        )
        self.fc = nn.Linear(2 * w, num_classes)
        _init(self)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.fc(x)


class ViT(nn.Module):
    """Vision transformer for 32x32 images (Dosovitskiy et al. 2021): 4x4 patches (64 tokens)
    + a class token, `depth` pre-norm nn.TransformerEncoderLayer blocks (nn.MultiheadAttention,
    GELU MLP), a linear head on the class token."""

    def __init__(self, num_classes=10, in_channels=3, image_size=32, patch=4, width=128, depth=6, heads=4,
                 mlp_ratio=2, dropout=0.0):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        tokens = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, mlp_ratio * width, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, tokens, width)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])


_BUILDERS = {"resnet20": resnet20, "resnet32": resnet32, "resnet56": resnet56, "resnet110": resnet110,
             "small_cnn": SmallCNN, "vit": ViT}


def build_model(name, num_classes, in_channels=3) -> nn.Module:
    """Build a model by name: one of MODEL_NAMES, 'tv:<torchvision model name>', or a user's
    'package.module:function' (importable, e.g. a file in the working directory), called with
    num_classes and in_channels where it takes them."""
    if ":" in name and not name.startswith("tv:"):
        return _user_model(name, num_classes, in_channels)
    if name.startswith("tv:"):
        try:
            import torchvision
        except ImportError as e:
            raise ImportError(f"model {name!r} needs torchvision: pip install svdtrain[torchvision]") from e
        if in_channels != 3:
            raise ValueError(f"torchvision models take 3 input channels, got in_channels={in_channels}")
        return torchvision.models.get_model(name[3:], weights=None, num_classes=num_classes)
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}, tv:<torchvision name>, "
                         "or module:function")
    return _BUILDERS[name](num_classes=num_classes, in_channels=in_channels)


def _user_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the installed command's path lacks it
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - whatever the user's module raised, one line
        raise ValueError(f"model {name!r}: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
    build = getattr(module, attr, None)
    if not callable(build):
        raise ValueError(f"model {name!r}: {module_name} has no function {attr!r}")
    try:
        params = inspect.signature(build).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels))
              if takes_any or k in params}
    try:
        model = build(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's builder: one line, not a traceback
        raise ValueError(f"model {name!r} raised {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned {type(model).__name__}, not an nn.Module")
    return model
