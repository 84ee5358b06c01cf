"""benchmarks/compare.py end to end on tiny generated CIFAR data, in both regimes: every method
runs, points resume, and the result files have the keys their readers rely on."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import normalized_test_data, program_accuracy
from svdtrain.data import write_fake_cifar

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
METHODS = {"svd_training", "posthoc_svd", "filter_pruning", "filter_pruning_l1", "trp"}


@pytest.mark.parametrize("regime", ["pretrained", "scratch"])
def test_every_method_gives_a_point_at_the_level(tmp_path, regime):
    write_fake_cifar(tmp_path / "data", n_train=256, n_test=100)
    out = tmp_path / "out"
    args = [sys.executable, str(SCRIPT), "--regime", regime, "--data-dir", str(tmp_path / "data"),
            "--work", str(tmp_path / "work"), "--out", str(out), "--dense-epochs", "1", "--compress-epochs", "1",
            "--train-epochs", "1", "--finetune-epochs", "1", "--val-size", "64", "--threads", "1", "--levels", "50%"]
    methods = METHODS
    if regime == "scratch":  # the earlier comparison's file: its points move under "earlier"
        # the paths that differ from the pretrained regime: a fresh init in the pipeline and in
        # the loop, and a loop start from the seed's own dense model (posthoc_svd and trp take
        # the same paths as svd_training and filter_pruning)
        methods = {"svd_training", "filter_pruning", "filter_pruning_l1"}
        args += ["--methods", *sorted(methods)]
        out.mkdir()
        (out / "compare_cifar10.json").write_text(json.dumps({"points": [{"method": "svd_training", "hoyer": 0.01}]}))
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    name = "compress_pretrained" if regime == "pretrained" else "compare_cifar10"
    result = json.loads((out / f"{name}.json").read_text())
    assert {"budget", "dense", "points"} <= set(result) and result["regime"] == regime
    dense = result["dense"]
    # Accuracies are those of the exported programs, counted here on the test set (normalized
    # by the statistics of the training split left after the validation images).
    x, y = normalized_test_data(tmp_path / "data", val_size=64)
    dense_run = tmp_path / "work" / ("dense" if regime == "pretrained" else "dense_s0")
    assert dense["accuracy"] == pytest.approx(program_accuracy(dense_run / "compact.pt2", x, y), abs=1e-9)
    assert dense["macs"] > 0
    assert {p["method"] for p in result["points"]} == methods
    for p in result["points"]:
        assert p["level"] == "50%" and p["seed"] == 0
        assert p["macs"] <= 0.5 * dense["macs"], p["method"]
        (run,) = (tmp_path / "work").glob(f"{p['method']}_50_s0_*")  # keyed by budget and settings
        assert p["accuracy"] == pytest.approx(program_accuracy(run / "compact.pt2", x, y), abs=1e-9), p["method"]
        rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
        stages = ["train", "finetune"]  # one epoch each
        if p["method"] in ("posthoc_svd", "filter_pruning_l1"):  # no training: from a trained model, 2 fine-tunes
            stages = ["finetune"] * (2 if regime == "pretrained" else 1)
        if p["method"] == "svd_training" and regime == "pretrained":  # its recipe: one schedule, no restart
            stages = ["train", "train"]
        assert [r["stage"] for r in rows if r["stage"] != "prune"] == stages, p["method"]
    assert (out / f"{name}.png").is_file()
    if regime == "scratch":
        assert result["earlier"]["points"] == [{"method": "svd_training", "hoyer": 0.01}]
        assert "| 50% | random_scaled init | 0 |" in (out / "compare_cifar10.md").read_text()  # the stages table
        assert next(p for p in result["points"] if p["method"] == "svd_training")["settings"]["init"] == "random_scaled"
    # A rerun finds every point done and rebuilds the same table (and keeps "earlier").
    before = (out / f"{name}.md").read_text()
    res = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "==" not in res.stdout
    assert (out / f"{name}.md").read_text() == before
    # A point made with other settings is not taken for the one asked for.
    res = subprocess.run(args + ["--methods", "filter_pruning", "--group-reg", "1e-3"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "other filter_pruning settings" in res.stderr
    # Nor does a point of another budget join the record (its table states one budget).
    res = subprocess.run(args + ["--finetune-epochs", "2"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "another budget: finetune_epochs 1 (asked 2)" in res.stderr
    assert "Traceback" not in res.stderr
    if regime == "scratch":
        assert json.loads((out / f"{name}.json").read_text())["earlier"]["points"][0]["hoyer"] == 0.01
    else:  # another seed compresses the same dense model
        res = subprocess.run(args + ["--seeds", "1", "--methods", "filter_pruning_l1"], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        seeds = [p["seed"] for p in json.loads((out / f"{name}.json").read_text())["points"]]
        assert sorted(seeds) == [0] * 5 + [1] and not list((tmp_path / "work").glob("dense_s*"))
        # An activation-aware start is a point of its own beside the plain one, its start and
        # its recalibrated right-after-cut figure marked in the table.
        res = subprocess.run(args + ["--methods", "posthoc_svd", "--calibration", "2", "--recalibrate", "2"],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert (out / f"{name}_points" / "posthoc_svd_cholesky_50_s0.json").is_file()
        starts = {p["start"] for p in json.loads((out / f"{name}.json").read_text())["points"]
                  if p["method"] == "posthoc_svd"}
        assert starts == {"SVD", "whitened SVD (cholesky, 2 batches)"}
        rows = [r for r in (out / f"{name}.md").read_text().splitlines() if r.startswith("| 50% | posthoc_svd |")]
        assert len(rows) == 2 and rows[1].startswith("| 50% | posthoc_svd | whitened SVD") and rows[1].endswith("(r) |")
    # The points record beside the results rebuilds them alone, on a machine without the run directories.
    shutil.rmtree(tmp_path / "work")
    table = (out / f"{name}.md").read_text()
    (out / f"{name}.md").unlink()
    res = subprocess.run(args + ["--report-only"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / f"{name}.md").read_text() == table


@pytest.mark.parametrize("regime", ["scratch", "pretrained"])
def test_svd_training_points_run_the_shipped_config(regime, tmp_path, monkeypatch):
    """A benchmark point of SVD training is its regime's shipped config, as a user runs it: every
    key equal but those a point sets (level, seed, split, machine, the trained model's path); a
    value given on the command line (a tuning point) shows up as a difference."""
    from svdtrain.config import flatten, load_config
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import compare
    import compare_settings
    shipped = compare_settings.SVD_CONFIGS[regime]
    assert shipped.parent.name == "configs"

    def differences(*argv):
        args = compare_settings.parse_args(["--regime", regime, "--data-dir", str(tmp_path), *argv])
        point = flatten(compare.svd_training_config(args, tmp_path, 2, 0.25))
        user = flatten(load_config(shipped, ["decompose.dense_checkpoint=dense.pt"]))
        assert set(point) == set(user)
        return {key for key in point if point[key] != user[key]}, point
    keys, point = differences()
    assert keys <= compare_settings.POINT_KEYS
    assert point["regularizer.target_macs"] == 0.25 and point["seed"] == 2
    keys, point = differences("--compile", "inductor")  # a machine key: the same recipe, compiled
    assert "compile" in keys and keys <= compare_settings.POINT_KEYS and point["compile"] == "inductor"
    keys, point = differences("--target-at", "0.7", "--no-gradual")
    assert keys - compare_settings.POINT_KEYS == {"regularizer.target_at", "prune.gradual"}
    # an activation-aware start whitens the SVD of a trained model; from scratch there is none
    keys, point = differences("--calibration", "4")
    assert keys - compare_settings.POINT_KEYS == ({"decompose.calibration"} if regime == "pretrained" else set())
    keys, point = differences("--calibration", "4", "--unwhiten")  # plain factors once the ranks are final
    assert keys - compare_settings.POINT_KEYS == ({"decompose.calibration", "prune.unwhiten"}
                                                  if regime == "pretrained" else set())


def test_scratch_svd_training_alone_needs_no_dense_model(tmp_path):
    """From scratch, SVD training starts from its own init: no dense model is trained for it, its
    point records the MACs pruning would keep before the cut, and the report waits for the dense model.
    Its own --method-lr is the one-cycle's peak; fine-tuning keeps the budget's lr."""
    write_fake_cifar(tmp_path / "data", n_train=256, n_test=100)
    out = tmp_path / "out"
    args = [sys.executable, str(SCRIPT), "--regime", "scratch", "--data-dir", str(tmp_path / "data"),
            "--work", str(tmp_path / "work"), "--out", str(out), "--train-epochs", "1", "--finetune-epochs", "1",
            "--val-size", "64", "--threads", "1", "--levels", "33%", "--methods", "svd_training",
            "--method-lr", "svd_training=0.4"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (tmp_path / "work" / "dense_s0").exists() and "no dense model yet" in res.stdout
    point = json.loads((out / "compare_cifar10_points" / "svd_training_33_s0.json").read_text())
    assert 0 < point["macs_at_threshold_trained"] <= 1 and point["settings"]["init"] == "random_scaled"
    optim = torch.load(Path(point["run_dir"]) / "checkpoint.pt", weights_only=True)["config"]["optim"]
    assert (optim["lr"], optim["finetune_lr"], optim["schedule"]) == (0.4, 0.02, "onecycle")
    assert point["settings"]["lr"] == 0.4
    res = subprocess.run(args + ["posthoc_svd=0.1"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "--method-lr posthoc_svd" in res.stderr and "Traceback" not in res.stderr
    assert not (out / "compare_cifar10.json").exists()
    res = subprocess.run(args + ["--report-only"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "no dense model yet" in res.stderr and "Traceback" not in res.stderr


def test_trp_cuts_by_loss_importance_when_asked(tmp_path):
    """--rank-score loss reaches TRP's cut to the level too, and its point records the rule; a method
    takes a rule of its own with --method-rank-score."""
    write_fake_cifar(tmp_path / "data", n_train=256, n_test=100)
    out = tmp_path / "out"
    args = [sys.executable, str(SCRIPT), "--regime", "pretrained", "--data-dir", str(tmp_path / "data"),
            "--work", str(tmp_path / "work"), "--out", str(out), "--dense-epochs", "1", "--compress-epochs", "1",
            "--finetune-epochs", "1", "--val-size", "64", "--threads", "1", "--levels", "33%",
            "--methods", "trp", "--rank-score", "loss"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "compress_pretrained.json").read_text())
    (point,) = result["points"]
    assert point["settings"]["rank_score"] == "loss" and point["macs"] <= 0.33 * result["dense"]["macs"]
    assert result["budget"]["rank_allocation"].endswith("score: loss importance")
    # A rule of a method's own: post-hoc SVD by loss, SVD training by the record's energy rule.
    base = args[:args.index("--methods")]
    res = subprocess.run(base + ["--methods", "posthoc_svd", "svd_training", "--method-rank-score", "posthoc_svd=loss"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "compress_pretrained.json").read_text())
    rules = {p["method"]: p["settings"].get("rank_score", "energy") for p in result["points"]}
    assert rules == {"trp": "loss", "posthoc_svd": "loss", "svd_training": "energy"}
    assert result["budget"]["rank_allocation"].endswith("score: energy; loss importance for posthoc_svd, trp")
    assert "posthoc_svd rank score loss, trp rank score loss." in (out / "compress_pretrained.md").read_text()
    res = subprocess.run(base + ["--method-rank-score", "filter_pruning=loss"], capture_output=True, text=True)
    assert res.returncode != 0 and "--method-rank-score filter_pruning=loss" in res.stderr


def test_a_trained_dense_model_serves_other_learning_rates(tmp_path):
    """Tuning the compression's learning rates reuses the trained dense model (it never fine-tunes)."""
    write_fake_cifar(tmp_path / "data", n_train=256, n_test=100)
    common = [sys.executable, str(SCRIPT), "--regime", "pretrained", "--data-dir", str(tmp_path / "data"),
              "--dense-epochs", "1", "--compress-epochs", "1", "--finetune-epochs", "1", "--val-size", "64",
              "--threads", "1", "--levels", "50%", "--methods", "filter_pruning_l1"]
    res = subprocess.run(common + ["--work", str(tmp_path / "w1"), "--out", str(tmp_path / "o1")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    shutil.copytree(tmp_path / "w1" / "dense", tmp_path / "w2" / "dense")
    before = (tmp_path / "w2" / "dense" / "checkpoint.pt").read_bytes()
    res = subprocess.run(common + ["--work", str(tmp_path / "w2"), "--out", str(tmp_path / "o2"),
                                   "--lr", "0.05", "--finetune-lr", "0.05"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "w2" / "dense" / "checkpoint.pt").read_bytes() == before  # not retrained
    result = json.loads((tmp_path / "o2" / "compress_pretrained.json").read_text())
    assert "0.05" in result["budget"]["schedule"] and len(result["points"]) == 1


def test_a_method_takes_its_own_learning_rate(tmp_path):
    """--method-lr gives a method its own peak lr (applied, recorded in its points and named under
    the table); a malformed pair is a one-line error."""
    write_fake_cifar(tmp_path / "data", n_train=256, n_test=100)
    args = [sys.executable, str(SCRIPT), "--regime", "pretrained", "--data-dir", str(tmp_path / "data"),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--dense-epochs", "1",
            "--compress-epochs", "1", "--finetune-epochs", "1", "--val-size", "64", "--threads", "1",
            "--levels", "50%", "--methods", "posthoc_svd", "filter_pruning_l1"]
    res = subprocess.run(args + ["--method-lr", "posthoc_svd=0.05", "filter_pruning_l1=0.08"], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    points = {p["method"]: p for p in json.loads((tmp_path / "out" / "compress_pretrained.json").read_text())["points"]}
    assert points["posthoc_svd"]["settings"]["lr"] == 0.05 and points["filter_pruning_l1"]["settings"]["lr"] == 0.08
    (posthoc,) = (tmp_path / "work").glob("posthoc_svd_50_s0_*")
    optim = torch.load(posthoc / "checkpoint.pt", weights_only=True)["config"]["optim"]
    assert optim["finetune_lr"] == 0.05 and optim["lr"] == 0.05
    (l1,) = (tmp_path / "work").glob("filter_pruning_l1_50_s0_*")
    rows = [json.loads(r) for r in (l1 / "metrics.jsonl").read_text().splitlines()]
    assert max(r["lr"] for r in rows if "lr" in r) > 0.02  # cosine from 0.08 (0.02 would end epoch 1 at 0.01)
    named = "the energy rule for the rest): posthoc_svd lr 0.05, filter_pruning_l1 lr 0.08."
    assert named in (tmp_path / "out" / "compress_pretrained.md").read_text()
    # The budget's lr in the same work directory is a run of its own, not a resume of the 0.05 one.
    res = subprocess.run(args[:-2] + ["posthoc_svd", "--out", str(tmp_path / "out_budget_lr")], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((tmp_path / "work").glob("posthoc_svd_50_s0_*"))) == 2
    for bad in ("posthoc=0.05", "trp=fast", "trp=-1"):
        res = subprocess.run(args + ["--method-lr", bad], capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and "--method-lr" in res.stderr and "Traceback" not in res.stderr, bad


@pytest.mark.parametrize("peak", [None, 0.1])
def test_scratch_svd_training_after_a_dense_warmup_keeps_one_schedule(tmp_path, peak):
    """--svd-warmup K: the dense model trains the first K of E epochs, SVD training goes on from
    its SVD over the rest of the same one-cycle schedule (lr by hand: peak 0.2 or SVD training's
    own --method-lr, warm-up 0.25 of the run, linear decay) and reaches the level at the same
    point of the whole run."""
    write_fake_cifar(tmp_path / "data", n_train=256, n_test=100)
    args = [sys.executable, str(SCRIPT), "--regime", "scratch", "--data-dir", str(tmp_path / "data"),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--train-epochs", "3",
            "--finetune-epochs", "1", "--val-size", "64", "--threads", "1", "--levels", "50%",
            "--methods", "svd_training"] + ([] if peak is None else ["--method-lr", f"svd_training={peak}"])
    res = subprocess.run(args + ["--svd-warmup", "1"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    point = json.loads((tmp_path / "out" / "compare_cifar10_points" / "svd_training_50_s0.json").read_text())
    assert point["settings"]["warmup"] == 1 and point["settings"]["init"] == "svd"
    run = Path(point["run_dir"])
    cfg = torch.load(run / "checkpoint.pt", weights_only=True)["config"]
    assert cfg["decompose"]["dense_checkpoint"] == str(tmp_path / "work" / "warmup1_s0" / "model_state.pt")
    assert cfg["epochs"]["train"] == 2 and cfg["regularizer"]["target_at"] == pytest.approx(0.25)  # epoch 1.5 of 3
    dense_rows = [json.loads(r) for r in (tmp_path / "work" / "warmup1_s0" / "metrics.jsonl").read_text().splitlines()]
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in dense_rows + rows if r.get("stage") == "train"]
    # lr after epochs 1, 2, 3 of one 3-epoch one-cycle: 0.2 * (1 - (t - 0.25) / 0.75) at t = 1/3, 2/3, 1
    top = peak or 0.2
    assert lrs == pytest.approx([top * 8 / 9, top * 4 / 9, 0.0], abs=1e-9)
    if peak:
        return
    for bad in (["--svd-warmup", "2"], ["--svd-warmup", "1", "--regime", "pretrained"]):
        res = subprocess.run(args + bad, capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and "--svd-warmup" in res.stderr and "Traceback" not in res.stderr, bad


def test_a_row_never_pools_seeds_run_with_different_settings():
    sys.path.insert(0, str(SCRIPT.parent))
    import compare_report
    point = {"method": "filter_pruning", "level": "33%", "accuracy": 0.8, "val_accuracy": 0.8, "macs": 10,
             "accuracy_before_finetune": 0.2}
    dense = {"epochs": 1, "n": 1, "accuracy": 0.9, "macs": 30}
    same = [{**point, "seed": s, "settings": {"group_reg": 5e-4}} for s in (0, 1)]
    assert any("| 33% | filter_pruning |" in line for line in
               compare_report.summary_table(same, dense, "scratch", ["33%"], ["filter_pruning"]))
    mixed = [same[0], {**same[1], "settings": {"group_reg": 1e-4}}]
    with pytest.raises(SystemExit, match="pools points of different settings"):
        compare_report.summary_table(mixed, dense, "scratch", ["33%"], ["filter_pruning"])
