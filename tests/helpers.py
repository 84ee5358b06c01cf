"""Small models and a tiny run config used across tests (independent of svdtrain.models), and
a direct accuracy count for exported programs (independent of svdtrain's evaluation)."""
import torch
import torch.nn.functional as F
from torch import nn


class TinyResNet(nn.Module):
    """Stem, one identity block, one block with a strided 1x1-conv downsample, head."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bnb = nn.BatchNorm2d(16)
        self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.a2(F.relu(self.a1(x))))
        x = F.relu(self.down(x) + self.b2(F.relu(self.bnb(self.b1(x)))))
        return self.fc(x.mean((2, 3)))


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gc = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = F.relu(self.pw(F.relu(self.gc(F.relu(self.dw(F.relu(self.conv(x))))))))
        return self.fc(x.mean((2, 3)))


class SharedLinear(nn.Module):
    """One Linear registered under two names (a and b), called twice."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = self.a

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 3))


def randomize_bn(model):
    """Give BatchNorms non-trivial statistics so eval-mode tests exercise them."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


# A run config that trains in seconds on write_fake_cifar data ({data} = its folder).
TINY_CONFIG = """
model: small_cnn
dataset: cifar10
data_dir: {data}
batch_size: 32
eval_batch_size: 64
threads: 1
decompose: {{mode: channel, init: random}}
regularizer: {{orth: 1.0, sparsity: hoyer, strength: 0.02}}
prune: {{keep_energy: 0.999}}
epochs: {{orth: 1, train: 2, finetune: 1}}
optim: {{lr: 0.05, schedule: onecycle, finetune_lr: 0.01}}
"""


def normalized_test_data(data_dir, val_size=0):
    """(x, y): the test images of a CIFAR-format folder as a run feeds them, normalized by the
    statistics of its training split (after holding out val_size images for validation)."""
    from svdtrain.data import load_cifar
    data = load_cifar(data_dir)
    if val_size:
        data = data.with_validation(val_size)
    x = (data.x_test.float() / 255 - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1)
    return x, data.y_test


def program_accuracy(path, x, y) -> float:
    """Top-1 accuracy of a saved torch.export program (.pt2) on (x, y), counted directly."""
    module = torch.export.load(str(path)).module()
    with torch.no_grad():
        return (module(x).argmax(1) == y).sum().item() / len(y)
