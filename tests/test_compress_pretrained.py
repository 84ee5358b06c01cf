"""benchmarks/compress_pretrained.py end to end on tiny generated CIFAR data: every method runs,
points resume, and the result file has the keys its readers rely on."""
import json
import subprocess
import sys
from pathlib import Path

from svdtrain.data import write_fake_cifar

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compress_pretrained.py"


def test_every_method_gives_a_point_at_the_level(tmp_path):
    write_fake_cifar(tmp_path / "data", n_train=320, n_test=100)
    args = [sys.executable, str(SCRIPT), "--data-dir", str(tmp_path / "data"), "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out"), "--dense-epochs", "1", "--compress-epochs", "1", "--finetune-epochs", "1",
            "--val-size", "64", "--threads", "1", "--levels", "50%"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "compress_pretrained.json").read_text())
    assert {"budget", "dense", "points"} <= set(result)
    dense = result["dense"]
    assert 0 <= dense["accuracy"] <= 1 and dense["macs"] > 0
    methods = {p["method"] for p in result["points"]}
    assert methods == {"svd_training", "posthoc_svd", "filter_pruning", "filter_pruning_l1", "trp"}
    for p in result["points"]:
        assert p["level"] == "50%" and p["seed"] == 0 and 0 <= p["accuracy"] <= 1
        assert p["macs"] <= 0.5 * dense["macs"], p["method"]
    # A rerun finds every point done and rebuilds the same table.
    before = (tmp_path / "out" / "compress_pretrained.md").read_text()
    res = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "==" not in res.stdout
    assert (tmp_path / "out" / "compress_pretrained.md").read_text() == before
