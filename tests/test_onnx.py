"""ONNX export of compact models: ONNX Runtime gives PyTorch's outputs at any batch size."""
import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import svdtrain
from helpers import TINY_CONFIG, TinyResNet, randomize_bn
from svdtrain.data import write_fake_cifar

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def run_onnx(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(x + self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("kind", ["cnn", "attention"])
def test_onnx_runtime_matches_pytorch(kind, tmp_path):
    torch.manual_seed(0)
    model, x = ((randomize_bn(TinyResNet()), torch.randn(1, 3, 16, 16)) if kind == "cnn"
                else (Block(), torch.randn(1, 6, 16)))
    svd = svdtrain.decompose(copy.deepcopy(model).eval(), init="svd")
    svdtrain.prune(svd, macs_budget=0.6, example_inputs=(x,))
    compact = svdtrain.export(svd, example_inputs=(x,))
    path = svdtrain.export_onnx(compact, x, tmp_path / "m.onnx")
    for batch in (1, 3):
        xb = torch.randn(batch, *x.shape[1:])
        with torch.no_grad():
            want = compact(xb)
        assert (run_onnx(path, xb) - want).abs().max() < 1e-4


def test_the_pipeline_writes_compact_onnx_when_asked(tmp_path):
    write_fake_cifar(tmp_path / "data", n_train=64, n_test=32)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.format(data=tmp_path / "data"))
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "svdtrain", "run", str(cfg), "--out", str(out), "--quiet",
                          "epochs.orth=0", "epochs.train=1", "epochs.finetune=0", "export.onnx=true"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    program = torch.export.load(str(out / "compact.pt2")).module()
    x = torch.randn(4, 3, 32, 32)
    alone = tmp_path / "shipped"  # the .onnx copied on its own still runs: its weights are inside it
    alone.mkdir()
    shutil.copy(out / "compact.onnx", alone / "compact.onnx")
    assert (run_onnx(alone / "compact.onnx", x) - program(x)).abs().max() < 1e-4
    assert not any("tmp" in f.name for f in out.iterdir())
    assert json.loads((out / "summary.json").read_text())["macs"] > 0
