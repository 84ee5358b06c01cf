"""What a run's config may change on resume, where its prune-stage batches come from, and the
one-line errors of bad run inputs (tiny generated CIFAR-format data)."""
import json
import subprocess
import sys

import pytest
import torch

from helpers import TINY_CONFIG
from svdtrain.config import load_config
from svdtrain.data import write_fake_cifar
from svdtrain.engine import RunError
from svdtrain.train import Run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar(root / "a", n_train=64, n_test=32)
    write_fake_cifar(root / "b", n_train=96, n_test=32)
    (root / "tiny.yaml").write_text(TINY_CONFIG.format(data=root / "a"))
    return root


def config(data, *over):
    return load_config(data / "tiny.yaml", ["epochs.orth=0", "epochs.train=1", "epochs.finetune=0", *over])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "svdtrain", *map(str, args)], capture_output=True, text=True)


def test_the_prune_stage_reads_the_same_batches_in_one_run_or_after_a_restart(data, tmp_path):
    """BatchNorm recalibration and loss scores read the prune stage's own epoch of the data
    stream: `run` in one process and `train`, then `run` in a new one, cut and recalibrate alike."""
    over = ["prune.recalibrate=2", "prune.macs_budget=0.6", "prune.score=loss", "prune.score_batches=2"]
    Run(tmp_path / "one", config(data, *over), quiet=True).execute(until="prune")
    Run(tmp_path / "two", config(data, *over), quiet=True).execute(until="train")
    Run(tmp_path / "two", config(data, *over), quiet=True).execute(until="prune")
    one, two = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]) if torch.is_tensor(one[key]) else one[key] == two[key], key


def test_a_run_that_failed_before_training_takes_a_corrected_config(data, tmp_path):
    out = tmp_path / "run"
    bad = cli("run", data / "tiny.yaml", "--out", out, "--quiet", "epochs.orth=0", "regularizer.target_macs=0.001")
    assert bad.returncode == 2 and "0.001" in bad.stderr and (out / "checkpoint.pt").exists()
    good = cli("run", data / "tiny.yaml", "--out", out, "--quiet", "epochs.orth=0", "epochs.train=1",
               "epochs.finetune=0", "optim.lr=0.05")
    assert good.returncode == 0, good.stderr[-1000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["optim"]["lr"] == 0.05


def test_what_training_read_is_locked_and_what_only_pruning_reads_is_not(data, tmp_path):
    """prune.score_batches is read by the prune stage only; prune.keep_energy is the measure a
    MACs target's controller steers during training, so it locks with the train stage."""
    run = tmp_path / "scored"
    Run(run, config(data, "prune.macs_budget=0.5", "prune.score=loss"), quiet=True).execute(until="train")
    Run(run, config(data, "prune.macs_budget=0.5", "prune.score=loss", "prune.score_batches=2"),
        quiet=True).execute(until="prune")
    steered = tmp_path / "steered"
    Run(steered, config(data, "regularizer.target_macs=0.5"), quiet=True).execute(until="train")
    with pytest.raises(RunError, match="prune.keep_energy"):
        Run(steered, config(data, "regularizer.target_macs=0.5", "prune.keep_energy=0.5"), quiet=True)
    Run(steered, config(data, "regularizer.target_macs=0.5", "prune.macs_budget=0.4"), quiet=True)  # prune's own


def test_a_run_resumed_on_other_data_is_refused(data, tmp_path):
    out = tmp_path / "run"
    Run(out, config(data), quiet=True).execute(until="train")
    with pytest.raises(RunError, match="holds other data than the run started with .*96 training"):
        Run(out, config(data, f"data_dir={data / 'b'}"), quiet=True).execute(until="prune")
    Run(out, config(data), quiet=True).execute(until="prune")  # the same data: goes on


@pytest.mark.parametrize("over, message", [
    (["decompose.skip=[feature.0]"], "skip names no module of the model: feature.0"),
    (["prune.recalibrate=-5"], "prune.recalibrate must be >= 0"),
    (["decompose.init=svd", "decompose.dense_checkpoint=TENSOR"], "holds a Tensor, not a state_dict"),
    (["prune.ranks=TENSOR"], "prune.ranks "),  # not JSON: refused before training
    (["prune.ranks=NAMES"], "rank config names layers the model lacks (1), e.g. 'conv9'"),
    (["prune.ranks=r.json", "prune.macs_budget=0.5"], "prune.ranks gives the layers' ranks"),
    (["prune.ranks=r.json", "regularizer.target_macs=0.5", "prune.gradual=true"], "prune.gradual (its masks cut"),
])
def test_bad_run_inputs_are_one_line_errors(data, tmp_path, over, message):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    (tmp_path / "names.json").write_text(json.dumps({"conv9": 1}))
    over = [o.replace("TENSOR", str(tmp_path / "tensor.pt")).replace("NAMES", str(tmp_path / "names.json"))
            for o in over]
    res = cli("run", data / "tiny.yaml", "--out", tmp_path / "x", "--quiet", *over)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_later_stage_command_joins_with_the_saved_runs_device(data, tmp_path, monkeypatch):
    import svdtrain.train
    out = tmp_path / "run"
    Run(out, config(data, "device=cpu"), quiet=True).execute(until="train")
    asked = []
    real = svdtrain.train.setup_distributed
    monkeypatch.setattr(svdtrain.train, "setup_distributed", lambda device: asked.append(device) or real(device))
    Run(out, quiet=True)  # as `svdtrain prune --out DIR` builds it
    assert asked == ["cpu"]


def test_a_later_stage_with_overrides_goes_on_after_stages_of_zero_epochs(data, tmp_path):
    """Post-hoc style: train with no epochs, then prune with an override: not a restart."""
    out = tmp_path / "run"
    first = cli("train", data / "tiny.yaml", "--out", out, "--quiet", "epochs.orth=0", "epochs.train=0")
    assert first.returncode == 0, first.stderr[-1000:]
    res = cli("prune", "--out", out, "--quiet", "prune.keep_energy=0.9")
    assert res.returncode == 0, res.stderr[-1000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_a_run_saved_for_cuda_opens_on_a_machine_without_one(data, tmp_path):
    out = tmp_path / "run"
    Run(out, config(data), quiet=True).execute(until="train")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["config"]["device"] = "cuda"
    torch.save(state, out / "checkpoint.pt")
    assert Run(out, quiet=True).device.type == "cpu"  # as `svdtrain evaluate` / a later stage opens it


def test_prune_ranks_cuts_a_run_to_another_runs_ranks(data, tmp_path):
    first = tmp_path / "first"
    Run(first, config(data, "prune.keep_energy=0.8"), quiet=True).execute(until="export")
    ranks = json.loads((first / "ranks.json").read_text())
    ranks = {name: max(1, k - 1) for name, k in ranks.items()}  # another allocation than keep_energy's
    (tmp_path / "r.json").write_text(json.dumps(ranks))
    second = tmp_path / "second"
    Run(second, config(data, f"prune.ranks={tmp_path / 'r.json'}"), quiet=True).execute(until="prune")
    info = torch.load(second / "checkpoint.pt", weights_only=True)["info"]
    assert info["ranks"] == ranks
    (tmp_path / "high.json").write_text(json.dumps({**ranks, next(iter(ranks)): 10**6}))
    with pytest.raises(RunError, match="not an integer in 1.."):  # refused before the train stage runs
        Run(tmp_path / "third", config(data, f"prune.ranks={tmp_path / 'high.json'}"), quiet=True).execute(until="train")


def test_val_split_is_free_to_change_only_where_no_validation_split_is_held_out(data, tmp_path):
    Run(tmp_path / "none", config(data), quiet=True).execute(until="train")
    Run(tmp_path / "none", config(data, "val_split=stratified"), quiet=True).execute(until="prune")  # not read
    Run(tmp_path / "held", config(data, "val_size=16"), quiet=True).execute(until="train")
    with pytest.raises(RunError, match="val_split"):  # another split: other training images
        Run(tmp_path / "held", config(data, "val_size=16", "val_split=stratified"), quiet=True).execute(until="prune")
