"""engine.fit: the pipeline's training loop for any model, its training state in one file that
a rerun resumes from to the identical result."""
import pytest
import torch

from svdtrain.config import load_config
from svdtrain.data import load_cifar, write_fake_cifar
from svdtrain.engine import RunError, fit
from svdtrain.models import build_model


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    write_fake_cifar(root / "data", n_train=64, n_test=32)
    cfg = load_config(None, ["model=small_cnn", "batch_size=16", "eval_batch_size=32", "device=cpu", "threads=1"])
    return load_cifar(root / "data"), cfg


def fresh_model():
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=10, in_channels=3)


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def crash_after(steps):
    count = [0]

    def on_step(model):
        count[0] += 1
        if count[0] == steps:
            raise Crash
    return on_step


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_fit_resumes_from_its_training_state_to_the_identical_result(setting, tmp_path):
    data, cfg = setting
    reference = fresh_model()
    rows = fit(reference, data, cfg, 2, quiet=True)
    ckpt = tmp_path / "train.pt"
    with pytest.raises(Crash):  # killed in the middle of epoch 2 (4 steps per epoch)
        fit(fresh_model(), data, cfg, 2, quiet=True, checkpoint=ckpt, on_step=crash_after(6))
    state = torch.load(ckpt, weights_only=True)
    # The training-state layout of a run checkpoint (checkpoint.py), marked as fit's own file.
    assert set(state) == {"format", "version", "epoch", "metrics", "model", "optimizer", "rng", "fit"}
    assert state["format"] == "svdtrain-train" and state["epoch"] == 1 and set(state["optimizer"]) == {"opt", "sched"}
    resumed, steps = fresh_model(), []
    assert without_seconds(fit(resumed, data, cfg, 2, quiet=True, checkpoint=ckpt, on_step=steps.append)) == \
        without_seconds(rows)
    assert same_weights(resumed, reference) and len(steps) == 4  # only epoch 2 ran again


def test_fit_resumes_a_checkpoint_of_the_layout_before_the_format_marker(setting, tmp_path):
    data, cfg = setting
    reference = fresh_model()
    rows = fit(reference, data, cfg, 2, quiet=True)
    ckpt = tmp_path / "train.pt"
    with pytest.raises(Crash):
        fit(fresh_model(), data, cfg, 2, quiet=True, checkpoint=ckpt, on_step=crash_after(6))
    state = torch.load(ckpt, weights_only=True)
    torch.save({"epoch": state["epoch"], "metrics": state["metrics"], "model": state["model"],
                "opt": state["optimizer"]["opt"], "sched": state["optimizer"]["sched"], "rng": state["rng"]}, ckpt)
    resumed, steps = fresh_model(), []
    assert without_seconds(fit(resumed, data, cfg, 2, quiet=True, checkpoint=ckpt, on_step=steps.append)) == \
        without_seconds(rows)
    assert same_weights(resumed, reference) and len(steps) == 4  # only epoch 2 ran again


def test_fit_refuses_a_file_that_is_no_training_state(setting, tmp_path):
    data, cfg = setting
    ckpt = tmp_path / "train.pt"
    torch.save({"format": "svdtrain-run", "epoch": 1}, ckpt)
    with pytest.raises(RunError, match="not an svdtrain training checkpoint"):
        fit(fresh_model(), data, cfg, 1, quiet=True, checkpoint=ckpt)


def test_fit_refuses_to_resume_under_other_epochs_or_settings(setting, tmp_path):
    data, cfg = setting
    ckpt = tmp_path / "train.pt"
    with pytest.raises(Crash):
        fit(fresh_model(), data, cfg, 2, quiet=True, checkpoint=ckpt, on_step=crash_after(6))
    with pytest.raises(RunError, match="other epochs"):  # its schedule was laid out for 2
        fit(fresh_model(), data, cfg, 4, quiet=True, checkpoint=ckpt)
    other = {**cfg, "optim": {**cfg["optim"], "lr": cfg["optim"]["lr"] / 10}}
    with pytest.raises(RunError, match="other optim"):
        fit(fresh_model(), data, other, 2, quiet=True, checkpoint=ckpt)
    unread = {**cfg, "optim": {**cfg["optim"], "finetune_lr": 0.5}}  # a train stage does not read it
    steps = []
    rows = fit(fresh_model(), data, unread, 2, quiet=True, checkpoint=ckpt, on_step=steps.append)
    assert len(steps) == 4  # resumed: only epoch 2's four steps ran, to the uninterrupted result
    assert without_seconds(rows) == without_seconds(fit(fresh_model(), data, cfg, 2, quiet=True))


def test_fit_resumes_a_checkpoint_that_recorded_all_of_optim(setting, tmp_path):
    data, cfg = setting
    ckpt = tmp_path / "train.pt"
    with pytest.raises(Crash):
        fit(fresh_model(), data, cfg, 2, quiet=True, checkpoint=ckpt, on_step=crash_after(6))
    state = torch.load(ckpt, weights_only=True)
    state["fit"]["optim"] = dict(cfg["optim"])  # as the first checkpoints with settings wrote them
    torch.save(state, ckpt)
    steps = []
    rows = fit(fresh_model(), data, cfg, 2, quiet=True, checkpoint=ckpt, on_step=steps.append)
    assert len(steps) == 4 and without_seconds(rows) == without_seconds(fit(fresh_model(), data, cfg, 2, quiet=True))
