"""BatchNorm recalibration: running statistics re-estimated as the average of the batches'
statistics, computed here independently; nothing else about the model changes."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import svdtrain
from helpers import TinyResNet, randomize_bn


def test_running_statistics_are_the_average_of_the_batches():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3)
    model = nn.Sequential(conv, bn, nn.ReLU()).train()
    model[1].running_mean.fill_(5.0)
    batches = [torch.randn(6, 3, 8, 8) for _ in range(3)]
    with torch.no_grad():
        acts = [conv(x) for x in batches]
    want_mean = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    want_var = torch.stack([a.transpose(0, 1).reshape(4, -1).var(1, unbiased=True) for a in acts]).mean(0)
    weight = bn.weight.detach().clone()
    assert svdtrain.recalibrate_batchnorm(model, [(x, 0) for x in batches]) == 3
    assert torch.allclose(bn.running_mean, want_mean, atol=1e-5) and torch.allclose(bn.running_var, want_var, atol=1e-5)
    assert bn.momentum == 0.3 and model.training and torch.equal(bn.weight, weight)


def test_recalibration_after_a_cut_restores_eval_statistics():
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet()).eval()
    svd = svdtrain.decompose(copy.deepcopy(model), init="svd").eval()
    svdtrain.prune(svd, keep_energy=0.5)  # a deep cut: the stored statistics no longer fit
    x = torch.randn(32, 3, 16, 16)
    svdtrain.recalibrate_batchnorm(svd, [x[:16], x[16:]])
    with torch.no_grad():  # eval-mode output now uses statistics of the cut model's own activations
        stem = F.batch_norm(svd.stem(x), None, None, svd.bn0.weight, svd.bn0.bias, training=True)
        assert torch.allclose(svd.bn0(svd.stem(x)), stem, atol=0.05)
    assert not svd.training and svdtrain.recalibrate_batchnorm(nn.Sequential(nn.Linear(2, 2)), [torch.ones(1, 2)]) == 0


def test_the_prune_stage_recalibrates_when_asked(tmp_path):
    import json
    import subprocess
    import sys

    from helpers import TINY_CONFIG
    from svdtrain.data import write_fake_cifar
    write_fake_cifar(tmp_path / "data", n_train=64, n_test=32)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.format(data=tmp_path / "data").replace("model: small_cnn", "model: resnet20"))
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "svdtrain", "run", str(cfg), "--out", str(out), "--quiet",
                          "epochs.orth=0", "epochs.train=1", "epochs.finetune=0", "prune.recalibrate=2"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["recalibrated_batches"] for r in rows if r["stage"] == "prune"] == [2]


def test_batches_as_keyword_dicts_recalibrate_alike():
    """Hugging Face style batches (dicts of keyword arguments) give the same statistics."""
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, pixel_values):
            return self.bn(self.conv(pixel_values))

    torch.manual_seed(0)
    model = Kw()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    twin = copy.deepcopy(model)
    assert svdtrain.recalibrate_batchnorm(model, batches) == 2
    assert svdtrain.recalibrate_batchnorm(twin, [{"pixel_values": x} for x in batches]) == 2
    assert torch.equal(model.bn.running_mean, twin.bn.running_mean) and torch.equal(model.bn.running_var, twin.bn.running_var)
