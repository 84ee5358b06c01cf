"""Two gloo processes through torchrun on CPU: sharded data, rank-0 I/O, replicas in sync."""
import json
import subprocess
import sys

import pytest

import svdtrain
from helpers import TINY_CONFIG, normalized_test_data, program_accuracy
from svdtrain.data import write_fake_cifar


def test_torchrun_two_gloo_processes(tmp_path):
    write_fake_cifar(tmp_path / "data", n_train=128, n_test=64)
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(TINY_CONFIG.format(data=tmp_path / "data"))
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "svdtrain",
                          "run", str(cfg), "--out", str(out), "--quiet", "epochs.orth=0",
                          "regularizer.target_macs=0.6"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("svdtrain: top-1") == 1  # one result line: rank 0 only
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if m["stage"] in ("train", "finetune")]
    assert len(trained) == 3
    # Every rank ran the same regularized steps on its own shard and DDP kept the replicas equal.
    assert all(m["world_size"] == 2 and m["replica_spread"] < 1e-6 for m in trained)
    # The budget controller reads only synced parameters: the same strength on every rank.
    steered = [m for m in trained if m["stage"] == "train"]
    assert steered and all(m["strength_spread"] == 0.0 for m in steered)
    assert not list(out.glob("*.tmp*"))
    # The summary's accuracy, summed over the two ranks' test shards, is the exported model's
    # on the whole test set: every test image counted once.
    summary = json.loads((out / "summary.json").read_text())
    x, y = normalized_test_data(tmp_path / "data")
    assert summary["accuracy"] == pytest.approx(program_accuracy(out / "compact.pt2", x, y), abs=1e-9)


RANKS_AGREE = """
import json, sys
import torch, torch.distributed as dist
from torch import nn
from svdtrain.distributed import rank0_timer, replica_spread
from svdtrain.engine import RunError
dist.init_process_group("gloo")
rank = dist.get_rank()
timer = rank0_timer(lambda module, inputs: 1.0 + rank)  # each process times differently
readings = [timer(None, None) for _ in range(2)]
torch.manual_seed(0)
model = nn.Linear(3, 3)
model.register_buffer("active", torch.ones(3, dtype=torch.bool))
model.register_buffer("num_batches_tracked", torch.tensor(10 ** 6))  # a large counter, equal everywhere
same = replica_spread(model)
with torch.no_grad():
    model.weight[0, 0] += 1e-3 * rank  # a small difference of the weights, beside that counter
try:
    replica_spread(model)
    small = False
except RunError:
    small = True
with torch.no_grad():
    model.weight[0, 0] -= 1e-3 * rank
if rank == 1:
    model.active[0] = False  # one rank keeps another rank: the models differ
try:
    replica_spread(model)
    caught = False
except RunError:
    caught = True
json.dump({"readings": readings, "same": same, "small": small, "caught": caught}, open(sys.argv[1] + str(rank), "w"))
dist.barrier()
dist.destroy_process_group()  # a group left open can abort the process at exit
"""


def test_latency_readings_are_rank_0s_and_diverged_masks_are_caught(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(RANKS_AGREE)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                          str(tmp_path / "rank")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}").read_text())
        assert got == {"readings": [1.0, 1.0], "same": 0.0, "small": True, "caught": True}


def test_the_pipelines_latency_choices_time_through_the_rank_0_timer(tmp_path, monkeypatch):
    """Under DDP the budget controller and the prune stage must take rank 0's readings: both
    time through distributed.rank0_timer (whose broadcast the test above checks)."""
    import svdtrain.latency as latency
    import svdtrain.stages as stages
    from svdtrain.config import load_config
    from svdtrain.train import Run
    write_fake_cifar(tmp_path / "data", n_train=128, n_test=64)
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(TINY_CONFIG.format(data=tmp_path / "data"))
    readings = []

    def clock(module, inputs):
        readings.append(1)
        return float(svdtrain.count_macs(module, example_inputs=inputs))

    monkeypatch.setattr(stages, "rank0_timer", lambda timer=None: clock)
    monkeypatch.setattr(latency, "wall_time", lambda *a, **k: pytest.fail("timed around the rank-0 timer"))
    cfg = load_config(cfg_file, ["epochs.orth=0", "epochs.train=1", "epochs.finetune=0",
                                 "regularizer.target_latency=0.7"])
    Run(tmp_path / "run", cfg, quiet=True).execute(until="prune")
    assert readings
