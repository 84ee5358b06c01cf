"""Budget-driven training: the strength controller and the pipeline that uses it."""
import copy
import json
import math
import subprocess
import sys

import pytest
import torch

import svdtrain
from helpers import TINY_CONFIG, TinyResNet
from svdtrain.budget import BudgetController, macs_at_energy
from svdtrain.data import write_fake_cifar
from svdtrain.macs import profile

SHAPE = (1, 3, 16, 16)


def _controller(signal, **kw):
    """A controller whose measurement follows the scripted `signal` (one value per call)."""
    model = svdtrain.decompose(TinyResNet(), init="random")
    reg = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=0.01)
    ctrl = BudgetController(model, reg, 0.5, SHAPE, total_steps=100, every=1, target_at=0.5, **kw)
    values = iter(signal)
    ctrl.measure = lambda: next(values)
    return ctrl, reg


def test_controller_raises_strength_above_schedule_and_lowers_it_below():
    # Start at 0.6: the schedule runs 0.6 -> 0.5 over 50 steps. Measured 1.0: above it.
    ctrl, reg = _controller([0.6] + [1.0] * 10, horizon=0)
    strengths = [ctrl.step() for _ in range(10)]
    assert all(b > a for a, b in zip(strengths, strengths[1:]))
    # Measured far below the schedule: the strength falls every update.
    ctrl, reg = _controller([1.0] + [0.2] * 10, horizon=0)
    strengths = [ctrl.step() for _ in range(10)]
    assert strengths[0] < 0.01 and strengths[-1] < strengths[0]
    assert all(b <= a for a, b in zip(strengths, strengths[1:]))


def test_controller_update_law_by_hand():
    """The law as budget.py's docstring states it, computed here step by step: the smoothed slope,
    the prediction `horizon` updates ahead, the clip, the gain, the faster relax, the clamp."""
    signal = [0.6, 0.65, 0.55, 5.0, 0.58, 0.58]
    ctrl, reg = _controller(signal, max_strength=0.011)  # the first rise (to 0.0111) is clamped
    strength, slope, last = 0.01, 0.0, 0.6
    for t, m in enumerate(signal[1:], start=1):
        slope = 0.7 * slope + 0.3 * (m - last)
        last = m
        want = 0.5 + (0.6 - 0.5) * max(0.0, 1 - t / 50)  # the line from m0 = 0.6 to 0.5 at step 50
        err = max(-1.0, min(1.0, (m + 5 * slope - want) / want))
        strength = min(max(strength * math.exp(0.5 * err * (1.0 if err > 0 else 4.0)), 1e-6), 0.011)
        assert ctrl.step() == pytest.approx(strength, rel=1e-12), t
    # the path went up, down (four times faster per unit of error), clipped up, clamped
    assert reg.strength == pytest.approx(strength, rel=1e-12)


def test_controller_schedule_reaches_target_and_holds():
    ctrl, _ = _controller([0.9] * 200)
    ctrl.step()
    assert ctrl.schedule(0) == pytest.approx(0.9)
    assert ctrl.schedule(25) == pytest.approx(0.7)       # halfway down the line
    assert ctrl.schedule(50) == ctrl.schedule(99) == pytest.approx(0.5)


def test_controller_state_round_trip_and_bounds():
    ctrl, reg = _controller([0.6] + [1.0] * 30, max_strength=0.02)
    for _ in range(5):
        ctrl.step()
    assert reg.strength == 0.02  # clamped
    state = ctrl.state_dict()
    other, reg2 = _controller([0.6] + [1.0] * 30, max_strength=0.02)
    other.load_state_dict(state)
    assert reg2.strength == reg.strength and other.steps == ctrl.steps and other.schedule() == ctrl.schedule()


def test_controller_refuses_bad_input():
    model = svdtrain.decompose(TinyResNet(), init="random")
    with pytest.raises(ValueError, match="target_macs"):
        BudgetController(model, svdtrain.Regularizer(strength=0.01), 1.5, SHAPE, 10)
    with pytest.raises(ValueError, match="sparsity"):
        BudgetController(model, svdtrain.Regularizer(sparsity=None), 0.5, SHAPE, 10)


def test_macs_at_energy_matches_prune_then_count():
    torch.manual_seed(0)
    model = svdtrain.decompose(TinyResNet(), init="random")
    for _, layer in svdtrain.svd_layers(model):  # a spread-out spectrum
        layer.s.data = torch.logspace(0, -5, layer.s.numel())
    predicted, _ = macs_at_energy(profile(model, SHAPE), 0.999)
    rounded, _ = macs_at_energy(profile(model, SHAPE), 0.999, round_to=4)
    other = copy.deepcopy(model)
    svdtrain.prune(model, keep_energy=0.999)
    assert predicted == svdtrain.count_macs(model, SHAPE)
    svdtrain.prune(other, keep_energy=0.999, round_to=4)  # ranks rounded up, as the measure counts them
    assert rounded == svdtrain.count_macs(other, SHAPE) > predicted


# The CLI with the latency table's clock reading MACs (deterministic, unlike the wall clock).
MACS_CLOCK = ("import sys, svdtrain, svdtrain.latency as L; "
              "L.wall_time = lambda m, i, reps=7: float(svdtrain.count_macs(m, example_inputs=i)); "
              "from svdtrain.cli import main; sys.exit(main())")


def _run(tmp_path, *overrides, macs_clock=False):
    write_fake_cifar(tmp_path / "data", n_train=192, n_test=96)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.format(data=tmp_path / "data"))
    out = tmp_path / "run"
    cli = ["-c", MACS_CLOCK] if macs_clock else ["-m", "svdtrain"]
    res = subprocess.run([sys.executable, *cli, "run", str(cfg), "--out", str(out), *overrides],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return out, res


def test_unreachable_target_warns_in_log_and_report_and_prune_meets_budget(tmp_path):
    out, res = _run(tmp_path, "epochs.orth=0", "epochs.train=1", "regularizer.strength=1e-6",
                    "regularizer.target_macs=0.25", "regularizer.target_at=1.0")
    assert "WARNING: budget not reached" in res.stdout
    assert "budget not reached" in (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budget_warning"] and summary["macs"] <= 0.25 * summary["dense_macs"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("strength" in r and "macs_at_threshold" in r for r in rows if r["stage"] == "train")
    assert (out / "budget.png").is_file()


def test_gradual_masking_follows_the_schedule_and_keeps_masked_values_at_zero():
    torch.manual_seed(0)
    model = svdtrain.decompose(TinyResNet(), init="random")
    reg = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    final = []  # the steps on_final was called at: once, when the ramp's ranks are final
    ctrl = BudgetController(model, reg, 0.4, SHAPE, total_steps=20, every=2, target_at=0.5, mask=True, optimizer=opt,
                            on_final=lambda: final.append(ctrl.steps))
    dense = svdtrain.count_macs(model, SHAPE, cost="dense")
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    for step in range(1, 21):
        loss = torch.nn.functional.cross_entropy(model(x), y) + reg(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctrl.step()
        if step % 2 == 0:
            assert svdtrain.count_macs(model, SHAPE) <= ctrl.schedule(step) * dense + 1
    assert final == [10]  # target_at 0.5 of 20 steps
    assert svdtrain.count_macs(model, SHAPE) <= 0.4 * dense
    for _, layer in svdtrain.svd_layers(model):
        assert torch.all(layer.s.detach()[~layer.active] == 0)


def test_a_latency_target_runs_through_the_pipeline_and_reports_the_measured_latency(tmp_path):
    """On a clock that reads MACs the shipped model's time is its MACs: the cut meets the target
    as a MACs budget would (the measured ratio in the summary is the wall clock's)."""
    out, res = _run(tmp_path, "epochs.orth=0", "epochs.train=1", "epochs.finetune=0", "regularizer.target_latency=0.6",
                    "prune.gradual=true", "export.batch=4", macs_clock=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["latency_budget"] == 0.6 and summary["latency_batch"] == 4 and summary["latency_ratio"] > 0
    assert 0.5 < summary["macs_ratio"] <= 0.6 * 1.05
    assert "budget 60.0%" in (out / "report.md").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["stage"] == "train"]
    assert train and all(0 < r["latency_at_threshold"] <= 1.0 and "latency_schedule" in r for r in train)
    assert any(k < 16 for k in summary["ranks"].values())  # the cut happened
