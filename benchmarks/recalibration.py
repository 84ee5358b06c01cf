"""Right after a cut, with and without BatchNorm recalibration: post-hoc SVD of the committed
trained ResNet-20 (results/pretrained_dense, 89.57% test) to 50 / 33 / 25% of MACs by the
energy rule (convex hull), no fine-tuning; accuracy on the 5k validation split (carved from the
training images as compare.py does) before and after `recalibrate_batchnorm` on a number of
augmented training batches of 128.

    python benchmarks/recalibration.py --data-dir ~/.cache/cifar10 --batches 16
Result: results/recalibration.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
from pathlib import Path

import torch

import svdtrain
from svdtrain.context import run_dataset
from svdtrain.engine import evaluate
from svdtrain.loader import BatchLoader
from svdtrain.models import build_model

HERE = Path(__file__).resolve().parent


def trained_model(data_dir: str):
    """The committed trained ResNet-20 (eval mode), its 5k validation loader, and an augmented
    training loader of batch 128 (seed 0), both normalised as the run that trained it."""
    state = torch.load(HERE / "results" / "pretrained_dense" / "checkpoint.pt", map_location="cpu", weights_only=True)
    cfg = dict(state["config"], data_dir=data_dir, val_size=5000)
    data = run_dataset(cfg)
    dense = build_model(cfg["model"], num_classes=data.num_classes)
    dense.load_state_dict(state["model"])
    norm = dict(mean=data.mean, std=data.std)
    val = BatchLoader(data.x_val, data.y_val, 500, train=False, **norm)
    train = BatchLoader(data.x_train, data.y_train, 128, train=True, augment=True, seed=0, **norm)
    return dense.eval(), val, train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(Path.home() / ".cache" / "cifar10"))
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "recalibration.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense, val, train = trained_model(args.data_dir)
    points = [{"level": "dense", "val_accuracy": evaluate(dense.eval(), val)}]
    for level in (0.5, 1 / 3, 0.25):
        model = svdtrain.decompose(copy.deepcopy(dense), init="svd").eval()
        svdtrain.prune(model, macs_budget=level, input_shape=(1, 3, 32, 32))
        before = evaluate(model, val)
        train.set_epoch(0)
        used = svdtrain.recalibrate_batchnorm(model, train, max_batches=args.batches)
        points.append({"level": f"{level:.0%}", "val_accuracy_cut": before, "val_accuracy_recalibrated": evaluate(model, val),
                       "batches": used})
        print(points[-1], flush=True)
    out = {"points": points, "machine": f"{platform.machine()}, {args.threads} threads; no GPU was available for this run",
           "torch": torch.__version__, "date": datetime.date.today().isoformat(),
           "command": f"python benchmarks/recalibration.py --data-dir DATA --batches {args.batches}"}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
