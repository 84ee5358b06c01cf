"""`svdtrain demo`: the whole pipeline on the bundled digits set, every output file."""
import json
import subprocess
import sys


def test_demo_produces_every_output(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "svdtrain", "demo", "--out", str(out), "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("svdtrain: top-1") and str(out / "report.md") in last
    for name in ("checkpoint.pt", "metrics.jsonl", "summary.json", "compact.pt2", "model_state.pt", "ranks.json",
                 "report.md", "stages.png", "spectra.png", "ranks.png", "budget.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] > 0.9  # digits is easy: a broken pipeline would not get there
    # The demo asks for 40% of dense MACs: training brings the MACs pruning would keep there,
    # pruning meets the budget and costs at most a point.
    trained = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in trained if m["stage"] == "train"][-1]
    assert abs(trained["macs_at_threshold"] / summary["dense_macs"] - 0.4) <= 0.05
    assert summary["macs"] <= 0.4 * summary["dense_macs"]
    assert summary["accuracy_trained"] - summary["accuracy_pruned"] <= 0.01
    assert "![" in (out / "report.md").read_text()
