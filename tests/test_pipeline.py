"""The CLI pipeline end to end on tiny generated CIFAR-format data."""
import copy
import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY_CONFIG as TINY, normalized_test_data
import svdtrain
from svdtrain.config import with_defaults
from svdtrain.data import write_fake_cifar
from svdtrain.engine import RunError
from svdtrain.train import Run

OUTPUTS = ["checkpoint.pt", "metrics.jsonl", "summary.json", "compact.pt2", "model_state.pt", "ranks.json",
           "report.md", "stages.png", "spectra.png", "ranks.png"]


def cli(*args, check=True, env=None, **kw):
    out = subprocess.run([sys.executable, "-m", "svdtrain", *map(str, args)], capture_output=True, text=True,
                         env=env, **kw)
    if check:
        assert out.returncode == 0, out.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_fake_cifar(root / "data", n_train=192, n_test=96)
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY.format(data=root / "data"))
    return root, cfg


@pytest.fixture(scope="module")
def finished(tiny):
    root, cfg = tiny
    out = root / "run"
    cli("run", cfg, "--out", out, "--quiet")
    return out


def test_run_writes_every_output(finished):
    for name in OUTPUTS:
        assert (finished / name).is_file(), name
    summary = json.loads((finished / "summary.json").read_text())
    for key in ("accuracy", "dense_accuracy", "macs", "dense_macs", "params", "dense_params", "ranks", "keep_energy"):
        assert key in summary
    assert summary["macs"] <= summary["dense_macs"]
    metrics = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == ["orth", "train", "train", "prune", "finetune"]
    # The exported model is the fine-tuned one: the accuracy its last epoch measured. Chance is
    # 0.1; the generated classes differ in brightness, which four epochs learn.
    assert summary["accuracy"] == metrics[-1]["test_accuracy"] and summary["accuracy"] > 0.3
    assert json.loads((finished / "ranks.json").read_text()) == summary["ranks"]


def test_rerun_of_finished_run_changes_nothing(finished, tiny):
    before = (finished / "summary.json").read_text()
    out = cli("run", tiny[1], "--out", finished, "--quiet")
    assert "top-1" in out.stdout
    assert (finished / "summary.json").read_text() == before


BLOCKED_EVAL = """
import sys, torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "svdtrain":
            raise ImportError("svdtrain imported")
sys.meta_path.insert(0, Block())
m = torch.export.load(sys.argv[1]).module()
x, y = torch.load(sys.argv[2])
print(float((m(x).argmax(1) == y).float().mean()))
"""


def test_compact_pt2_loads_without_svdtrain_and_matches_accuracy(finished, tiny, tmp_path):
    torch.save(normalized_test_data(tiny[0] / "data"), tmp_path / "test.pt")
    out = subprocess.run([sys.executable, "-c", BLOCKED_EVAL, str(finished / "compact.pt2"), str(tmp_path / "test.pt")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((finished / "summary.json").read_text())
    assert float(out.stdout) == pytest.approx(summary["accuracy"], abs=1e-6)  # float32 mean
    ev = json.loads(cli("evaluate", "--out", finished).stdout)
    assert ev["compact_accuracy"] == pytest.approx(summary["accuracy"], abs=1e-9)
    assert ev["model_accuracy"] == pytest.approx(summary["accuracy"], abs=1e-9)


def test_stage_commands(tiny):
    root, cfg = tiny
    out = root / "stages"
    cli("train", cfg, "--out", out, "--quiet")
    assert not (out / "summary.json").exists()
    bad = cli("finetune", "--out", out, check=False)
    assert bad.returncode == 2 and "needs 'prune' first" in bad.stderr
    cli("prune", "--out", out, "prune.keep_energy=0.99")
    cli("finetune", "--out", out, "--quiet")
    locked = cli("export", "--out", out, "prune.keep_energy=0.5", check=False)
    assert locked.returncode == 2 and "prune.keep_energy" in locked.stderr
    cli("export", "--out", out, "export.choose=latency", "export.batch=8", "export.channels_last=true")
    cli("report", "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["keep_energy"] == 0.99
    ev = json.loads(cli("evaluate", "--out", out).stdout)  # latency-chosen layers, same function
    assert ev["compact_accuracy"] == pytest.approx(ev["model_accuracy"], abs=0.01)
    assert summary["macs"] == program_macs(out / "compact.pt2", (1, 3, 32, 32))  # what ships


def program_macs(path, shape):
    """MACs of a saved .pt2, counted from its graph's conv and linear ops (independent of
    svdtrain's counters): re-exported at a static batch so every shape is concrete."""
    module = torch.export.load(str(path)).module()
    graph = torch.export.export(module, (torch.zeros(shape),)).graph
    total = 0
    for node in graph.nodes:
        name = str(node.target)
        if node.op != "call_function" or not any(k in name for k in ("conv2d", "convolution", "linear")):
            continue
        weight, out = node.args[1].meta["val"], node.meta["val"]
        total += out.numel() * weight[0].numel()  # each output element: in/groups * kh * kw (or in) MACs
    return total


def test_summary_macs_are_those_of_the_shipped_program(finished):
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["macs"] == program_macs(finished / "compact.pt2", (1, 3, 32, 32))


def test_values_of_stages_that_do_not_train_are_not_checked():
    from svdtrain.config import load_config
    load_config(None, ["epochs.finetune=0", "optim.finetune_lr=0", "optim.warmup_fraction=1.0"])


@pytest.mark.parametrize("args,message", [
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'; valid keys:"),
    (["optim.lr=fast"], "config key 'optim.lr' must be float"),
    (["decompose.mode=diagonal"], "must be one of channel, spatial"),
    (["prune.keep_energy=1.5"], "keep_energy must be in (0, 1]"),
    (["prune.score=loss"], "prune.score: loss ranks values under a budget"),
    (["regularizer.target_latency=0.5", "regularizer.target_macs=0.5"], "target_latency is a budget of its own"),
    (["optim.schedule_span=[0.5,0.2]"], "optim.schedule_span must be [start, end]"),
    (["lr"], "not of the form key=value"),
    (["optim.warmup_fraction=3"], "optim.warmup_fraction in [0, 1]"),
    (["regularizer.orth=-1"], "regularizer.orth and optim.weight_decay must be >= 0"),
    (["optim.step_milestones=[a]"], "optim.step_milestones must be fractions"),
])
def test_config_errors_are_one_line(tiny, tmp_path, args, message):
    out = cli("run", tiny[1], "--out", tmp_path / "x", *args, check=False)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet20\noptim: {lr: 0.1\nbatch_size: 64\n")
    out = cli("run", bad, "--out", tmp_path / "x", check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert f"{bad}:3:" in out.stderr and "not valid YAML" in out.stderr


def test_report_of_a_finished_run_is_rebuilt(finished):
    (finished / "report.md").unlink()
    out = cli("report", "--out", finished)
    assert "top-1" in out.stdout and (finished / "report.md").is_file()


def test_missing_data_and_config_files(tmp_path, tiny):
    out = cli("run", tmp_path / "nope.yaml", "--out", tmp_path / "x", check=False)
    assert out.returncode == 2 and "config file not found" in out.stderr
    out = cli("run", tiny[1], "--out", tmp_path / "y", f"data_dir={tmp_path}", check=False)
    assert out.returncode == 2 and "svdtrain download cifar10" in out.stderr


def test_corrupt_or_foreign_checkpoint_is_left_alone(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    res = cli("run", tiny[1], "--out", out, check=False)
    assert res.returncode == 2 and "not a readable checkpoint" in res.stderr
    assert (out / "checkpoint.pt").read_bytes() == b"not a checkpoint"
    torch.save({"epoch": 3}, out / "checkpoint.pt")
    res = cli("run", tiny[1], "--out", out, check=False)
    assert res.returncode == 2 and "not an svdtrain run checkpoint" in res.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text("{}")
    res = cli("run", tiny[1], "--out", other, check=False)
    assert res.returncode == 2 and "not empty" in res.stderr
    assert (other / "results.json").read_text() == "{}"


def test_changed_config_of_a_started_run_is_refused(finished, tiny):
    res = cli("run", tiny[1], "--out", finished, "optim.lr=0.3", check=False)
    assert res.returncode == 2 and "optim.lr" in res.stderr


def test_run_written_before_a_new_config_key_still_resumes(finished, tiny):
    ckpt = finished / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    del state["config"]["export"]  # as written by a version without the export section
    del state["config"]["prune"]["unwhiten"], state["config"]["decompose"]["orth_metric"]  # nor these keys
    torch.save(state, ckpt)
    assert cli("run", tiny[1], "--out", finished, "--quiet").returncode == 0


def test_non_finite_loss_stops_with_stage_and_step(tiny, tmp_path):
    out = tmp_path / "nan"
    res = cli("run", tiny[1], "--out", out, "optim.lr=1e30", "epochs.orth=0", "--quiet", check=False)
    assert res.returncode == 2
    assert "non-finite loss" in res.stderr and "stage 'train'" in res.stderr and "step" in res.stderr


def _final(out):
    s = json.loads((out / "summary.json").read_text())
    return s["accuracy"], s["ranks"], s["macs"], [
        {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [(), ("regularizer.target_macs=0.5",), ("regularizer.target_macs=0.5", "prune.gradual=true")],
                         ids=["fixed", "budget", "gradual"])
def test_resume_after_sigkill_gives_identical_result(finished, tiny, tmp_path, extra):
    if extra:  # the uninterrupted reference with the same settings
        finished = tmp_path / "reference"
        cli("run", tiny[1], "--out", finished, "--quiet", *extra)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "svdtrain", "run", str(tiny[1]), "--out", str(out), "--quiet", *extra]
    for lines_before_kill in (1, 3):  # kill in the orth stage, then in the train stage
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        metrics = out / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= lines_before_kill:
                break
            time.sleep(0.02)
        time.sleep(0.15)  # land somewhere inside the next epoch
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "summary.json").exists()
    subprocess.run(cmd, check=True, capture_output=True)
    assert _final(out) == _final(finished)


def test_dense_run_then_svd_init_from_its_checkpoint(tiny, tmp_path):
    root, cfg = tiny
    dense = tmp_path / "dense"
    cli("run", cfg, "--out", dense, "--quiet", "decompose.enabled=false", "epochs.orth=0", "epochs.finetune=0")
    d = json.loads((dense / "summary.json").read_text())
    assert d["macs"] == d["dense_macs"] and d["ranks"] == {}
    for score in ("energy", "loss"):  # post-hoc SVD, its values ranked either way
        svd = tmp_path / f"svd_{score}"
        cli("run", cfg, "--out", svd, "--quiet", "decompose.init=svd", f"decompose.dense_checkpoint={dense / 'model_state.pt'}",
            "epochs.orth=0", "epochs.train=0", "prune.macs_budget=0.5", "epochs.finetune=1", f"prune.score={score}")
        s = json.loads((svd / "summary.json").read_text())
        # svd init computes what the dense model computes: the same accuracy, before any training
        assert s["dense_accuracy"] == pytest.approx(d["accuracy"], abs=1e-9)
        assert s["macs"] <= 0.5 * s["dense_macs"]
        info = torch.load(svd / "checkpoint.pt", weights_only=True)["info"]
        assert info["dense_checkpoint_sha256"] == hashlib.sha256((dense / "model_state.pt").read_bytes()).hexdigest()


def test_an_unusable_or_occupied_out_is_refused_before_training(tiny, tmp_path):
    (tmp_path / "afile").write_text("")
    out = cli("run", tiny[1], "--out", tmp_path / "afile" / "sub", check=False)
    assert out.returncode == 2 and "cannot create --out" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    user = tmp_path / "mine"
    (user / "onnx.tmp").mkdir(parents=True)  # a user's folder whose name looks like a temp file's
    (user / "onnx.tmp" / "notes.txt").write_text("keep")
    out = cli("run", tiny[1], "--out", user, "export.onnx=true", check=False)
    assert out.returncode == 2 and "is not empty" in out.stderr
    assert (user / "onnx.tmp" / "notes.txt").read_text() == "keep"


def test_a_missing_optional_model_library_is_named_without_the_cli_extras_hint(tiny, tmp_path):
    try:
        importlib.import_module("torchvision")
        pytest.skip("torchvision is installed here")
    except Exception:
        pass
    out = cli("run", tiny[1], "--out", tmp_path / "x", "model=tv:resnet18", check=False)
    assert out.returncode == 2 and "torchvision" in out.stderr and "svdtrain[cli]" not in out.stderr


def test_kill_during_first_checkpoint_write_still_resumes(tiny, tmp_path):
    out = tmp_path / "early"
    out.mkdir()
    (out / "checkpoint.pt.tmp").write_bytes(b"half written")
    cli("train", tiny[1], "--out", out, "--quiet", "epochs.orth=0", "epochs.train=1")
    assert (out / "checkpoint.pt").is_file()


def test_dense_init_starts_from_the_fresh_dense_model_in_svd_form():
    from types import SimpleNamespace

    from svdtrain.config import load_config
    from svdtrain.models import build_model
    from svdtrain.context import build_run_model
    data = SimpleNamespace(num_classes=10, in_channels=3, image_size=32)
    cfg = load_config(None, ["model=small_cnn", "decompose.init=dense_init", "seed=3"])
    svd = build_run_model(cfg, data).eval()
    torch.manual_seed(3)
    dense = build_model("small_cnn", num_classes=10, in_channels=3).eval()
    x = torch.randn(4, 3, 32, 32)
    assert list(svdtrain.svd_layers(svd))
    with torch.no_grad():
        assert torch.allclose(svd(x), dense(x), atol=1e-4)


def test_fork_a_trained_run_into_two_budgets(tiny, tmp_path):
    from svdtrain.train import fork_run
    root, cfg = tiny
    trained = tmp_path / "trained"
    cli("train", cfg, "--out", trained, "--quiet")
    for budget in (0.6, 0.3):
        out = fork_run(trained, tmp_path / f"b{budget}")
        cli("run", cfg, "--out", out, "--quiet", f"prune.macs_budget={budget}")
        s = json.loads((out / "summary.json").read_text())
        assert s["macs"] <= budget * s["dense_macs"]
    assert not (trained / "summary.json").exists()  # the source run is untouched
    assert fork_run(trained, tmp_path / "b0.3") == tmp_path / "b0.3"  # an existing fork is kept
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(RunError, match="is not empty"):  # a user's folder is not written into
        fork_run(trained, tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("name", sorted(f.removesuffix(".yaml") for f in os.listdir(
    os.path.join(os.path.dirname(__file__), os.pardir, "configs")) if f.endswith(".yaml")))
def test_shipped_configs_load(name, tmp_path):
    """Every shipped config validates, says what its comment says, is the copy the CLI finds
    by name, and builds its model in SVD form for its dataset: one image in, num_classes
    logits out, and its MACs target reachable by pruning."""
    from pathlib import Path

    from svdtrain.cli import CONFIG_DIR
    from svdtrain.config import flatten, load_config
    from svdtrain.models import build_model
    from svdtrain.context import build_run_model, input_shape, run_dataset
    # the values each config's comment states
    stated = {
        "digits": {"model": "small_cnn", "dataset": "digits", "regularizer.target_macs": 0.4,
                   "regularizer.strength": 0.005, "regularizer.target_at": 0.5, "prune.gradual": True},
        "cifar10_resnet20": {"model": "resnet20", "dataset": "cifar10", "regularizer.target_macs": 0.33,
                             "regularizer.target_at": 0.5, "epochs.train": 10, "epochs.finetune": 2,
                             "val_size": 5000, "prune.gradual": True, "regularizer.strength": 0.005},
        "cifar10_resnet20_compress": {"model": "resnet20", "dataset": "cifar10", "decompose.init": "svd",
                                      "regularizer.target_macs": 0.33, "prune.gradual": True, "epochs.train": 6,
                                      "epochs.finetune": 0, "optim.lr": 0.05, "regularizer.target_at": 0.17,
                                      "val_size": 5000},
        "cifar10_resnet20_full": {"model": "resnet20", "dataset": "cifar10", "regularizer.target_macs": 0.28,
                                  "epochs.orth": 20, "epochs.train": 164, "epochs.finetune": 60, "compile": "inductor"},
        "cifar10_resnet56": {"model": "resnet56", "dataset": "cifar10"},
        "cifar10_vit": {"model": "vit", "dataset": "cifar10", "decompose.init": "dense_init",
                        "regularizer.target_macs": 0.33},
    }[name]
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    assert (CONFIG_DIR / f"{name}.yaml").read_text() == path.read_text()
    overrides = [f"data_dir={tmp_path}"]
    if name.endswith("compress"):
        dense = tmp_path / "dense.pt"
        torch.save(build_model("resnet20", 10).state_dict(), dense)
        overrides.append(f"decompose.dense_checkpoint={dense}")
    cfg = load_config(path, overrides)
    flat = flatten(cfg)
    assert {key: flat[key] for key in stated} == stated
    assert cfg["epochs"]["train"] > 0 and cfg["decompose"]["enabled"]
    if name == "cifar10_resnet20_full":  # an orthogonality-only warm-up before the sparsity stage
        assert cfg["epochs"]["orth"] > 0
    if cfg["dataset"] == "cifar10":
        write_fake_cifar(tmp_path, n_train=20, n_test=10)
    data = run_dataset({**cfg, "val_size": 0})  # the fake set is smaller than the validation split
    model = build_run_model(cfg, data).eval()
    assert list(svdtrain.svd_layers(model))
    shape = input_shape(data)
    with torch.no_grad():
        assert model(torch.zeros(shape)).shape == (1, data.num_classes)
    if target := cfg["regularizer"]["target_macs"]:
        dense_macs = svdtrain.count_macs(build_model(cfg["model"], data.num_classes, data.in_channels), shape)
        svdtrain.prune(model, macs_budget=target, input_shape=shape)
        assert svdtrain.count_macs(model, shape) <= target * dense_macs


def test_compiled_training_matches_eager(finished, tiny):
    # compile=aot_eager traces the training forward (no code generation: fast on CPU); the run
    # must follow the eager one epoch for epoch up to float rounding.
    root, cfg = tiny
    out = root / "compiled"
    cli("run", cfg, "--out", out, "--quiet", "compile=aot_eager", "epochs.train=0", "epochs.finetune=0")
    eager = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    compiled = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in compiled] == ["orth", "prune"]  # the orth epoch: same start, same data order
    for key in ("task_loss", "train_accuracy", "orthogonality"):
        assert compiled[0][key] == pytest.approx(eager[0][key], rel=1e-3), key


def test_compiled_gradual_pruning_matches_eager_without_recompiling_per_rank_change(tiny):
    # The train stage masks values at every step of its ramp (6 steps, target reached at step 3):
    # compiled, the ranks it cuts and its losses follow the eager run, and the rank changes do
    # not recompile the training forward (at most once more, when the ramp ends).
    root, cfg = tiny
    args = ("--quiet", "epochs.orth=0", "epochs.train=1", "epochs.finetune=0", "regularizer.target_macs=0.5",
            "prune.gradual=true", "regularizer.target_at=0.5")
    cli("run", cfg, "--out", root / "gradual_eager", *args)
    run = cli("run", cfg, "--out", root / "gradual_compiled", *args, "compile=aot_eager",
              env={**os.environ, "TORCH_LOGS": "recompiles"})
    assert run.stderr.count("Recompiling function") <= 1, run.stderr[-2000:]
    eager, compiled = ([json.loads(line) for line in (root / d / "metrics.jsonl").read_text().splitlines()]
                       for d in ("gradual_eager", "gradual_compiled"))
    assert [m["stage"] for m in compiled] == ["train", "prune"]
    for key in ("task_loss", "train_accuracy", "orthogonality", "mean_rank"):
        assert compiled[0][key] == pytest.approx(eager[0][key], rel=1e-3), key
    ranks_ = [json.loads((root / d / "ranks.json").read_text()) for d in ("gradual_eager", "gradual_compiled")]
    assert ranks_[0] == ranks_[1] and any(k < 16 for k in ranks_[0].values())


def test_dense_run_resumes_when_an_unread_decompose_setting_changed(finished):
    state = torch.load(finished / "checkpoint.pt", weights_only=True)
    state["config"] = with_defaults(state["config"])
    for enabled, refused in ((False, False), (True, True)):
        old = copy.deepcopy(state["config"])
        old["decompose"].update(enabled=enabled, init="dense_init")
        new = copy.deepcopy(old)
        new["decompose"]["init"] = "random_scaled"
        s = dict(state, config=old)
        if refused:  # a decomposed run read decompose.init in its first stage
            with pytest.raises(RunError, match="decompose.init"):
                Run._merge_config(s, new)
        else:
            Run._merge_config(s, new)
            assert s["config"]["decompose"]["init"] == "random_scaled"


def test_svd_init_run_resumes_from_a_copy_of_its_dense_checkpoint(finished, tmp_path):
    state = torch.load(finished / "checkpoint.pt", weights_only=True)
    state["config"] = with_defaults(state["config"])
    first, copy_, other = tmp_path / "a.pt", tmp_path / "moved" / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"dense weights")
    copy_.parent.mkdir()
    copy_.write_bytes(b"dense weights")
    other.write_bytes(b"other weights")
    old = copy.deepcopy(state["config"])
    old["decompose"].update(enabled=True, init="svd", dense_checkpoint=str(first))
    digest = hashlib.sha256(b"dense weights").hexdigest()
    for info in ({"dense_checkpoint_sha256": digest}, {}):  # recorded, or read from the old path
        for path, refused in ((copy_, False), (other, True)):
            new = copy.deepcopy(old)
            new["decompose"]["dense_checkpoint"] = str(path)
            s = dict(state, config=copy.deepcopy(old), info=dict(info), done=["orth"])
            if refused:
                with pytest.raises(RunError, match="decompose.dense_checkpoint"):
                    Run._merge_config(s, new)
            else:
                Run._merge_config(s, new)
                assert s["config"]["decompose"]["dense_checkpoint"] == str(path)


SECOND_RUN = """
import sys
from svdtrain.config import load_config
from svdtrain.train import Run
for i, budget in enumerate((0.3, 0.1)):
    cfg = load_config(sys.argv[1], ["compile=inductor", "epochs.orth=0", "epochs.train=0", "epochs.finetune=1",
                                    f"prune.macs_budget={budget}"])
    Run(f"{sys.argv[2]}/inductor{i}", cfg, quiet=True).execute()
"""


def test_inductor_compiles_a_second_run_at_other_ranks_in_one_process(tiny):
    # Two runs in one process (as compare.py and a user's sweep do), compiled by inductor, cut to
    # other ranks: the second compile of the same forward must specialize to its ranks. Left to
    # dynamo's automatic dynamic shapes, the kept values' index got a symbolic size that inductor
    # could not lower ("cannot determine truth value of Relational") and the second run failed.
    root, cfg = tiny
    run = subprocess.run([sys.executable, "-c", SECOND_RUN, str(cfg), str(root)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    ranks = [json.loads((root / f"inductor{i}" / "ranks.json").read_text()) for i in range(2)]
    assert ranks[0] != ranks[1]
    for i in range(2):
        metrics = (root / f"inductor{i}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["stage"] for line in metrics] == ["prune", "finetune"]


USER_MODELS = """
import torch.nn as nn

def build(num_classes):  # takes no in_channels: only what it takes is passed
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, num_classes))

def not_a_model(num_classes, in_channels):
    return 3

def broken(num_classes):
    return {}["width"]
"""


def test_a_users_own_model_by_module_and_function(tiny, tmp_path):
    (tmp_path / "my_models.py").write_text(USER_MODELS)
    out = tmp_path / "run"
    command = Path(sys.executable).with_name("svdtrain")  # the installed command: cwd not on its path
    launcher = [str(command)] if command.exists() else [sys.executable, "-m", "svdtrain"]
    res = subprocess.run([*launcher, "run", str(tiny[1]), "--out", str(out), "--quiet", "model=my_models:build",
                          "epochs.orth=0", "epochs.finetune=0"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["ranks"]) == {"0", "4", "6"} and (out / "compact.pt2").is_file()
    for spec, message in [("no_such_module:build", "cannot import 'no_such_module'"),
                          ("my_models:missing", "has no function 'missing'"),
                          ("my_models:not_a_model", "returned int, not an nn.Module"),
                          ("my_models:broken", "raised KeyError: 'width'")]:
        res = cli("run", tiny[1], "--out", tmp_path / "x", f"model={spec}", check=False, cwd=tmp_path)
        assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1
