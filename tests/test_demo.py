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
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in rows if m["stage"] == "train"]
    # The budget controller tracks its schedule (a straight line from the start to 40%, reached
    # halfway): after the first two epochs the MACs pruning would keep are within 5 points of
    # it at every epoch's measurement, and reach the target by 55% of the stage.
    dense = summary["dense_macs"]
    for m in train[2:]:
        assert abs(m["macs_at_threshold"] - m["macs_schedule"]) / dense <= 0.05, m["epoch"]
    reached = next(m["epoch"] for m in train if m["macs_at_threshold"] / dense <= 0.41)
    assert reached <= 0.55 * len(train)
    trained = train[-1]
    assert abs(trained["macs_at_threshold"] / summary["dense_macs"] - 0.4) <= 0.05
    assert summary["macs"] <= 0.4 * summary["dense_macs"]
    assert summary["accuracy_trained"] - summary["accuracy_pruned"] <= 0.01
    assert "![" in (out / "report.md").read_text()
