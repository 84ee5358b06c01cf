"""Right after a cut, plain vs activation-aware SVD: the committed trained ResNet-20
(results/pretrained_dense, 89.57% test) decomposed with init="svd" plainly, whitened by the
Cholesky factor of each layer's input second moment (SVD-LLM) or by diag(mean |x|)^0.5 (ASVD),
both from 16 calibration batches of 128 training images; ranks by
prune(macs_budget=level) (energy share, convex hull) at 50 / 33 / 25% of MACs, no fine-tuning;
accuracy on the 5k validation split (carved from the training images as compare.py does)
without and with `recalibrate_batchnorm` on the same 16 training batches.

    python benchmarks/whiten_probe.py --data-dir ~/.cache/cifar10 --batches 16
Result: results/whiten_probe.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import svdtrain
from svdtrain.engine import evaluate
from svdtrain.loader import BatchLoader

from recalibration import trained_model  # benchmarks/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent
STARTS = {"plain": {}, "cholesky": {"whiten": "cholesky"}, "diag": {"whiten": "diag"}}


def first_batches(loader: BatchLoader, n: int) -> list:
    """The first `n` input batches of epoch 0 (the same ones on every call)."""
    loader.set_epoch(0)
    out = []
    for x, _ in loader:
        if len(out) == n:
            break
        out.append(x)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(Path.home() / ".cache" / "cifar10"))
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "whiten_probe.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense, val, train = trained_model(args.data_dir)
    batches = first_batches(train, args.batches)  # calibration and recalibration alike
    points = [{"start": "dense", "level": "100%", "val_accuracy": evaluate(dense.eval(), val)}]
    print(points[-1], flush=True)
    for start, kw in STARTS.items():
        t0 = time.perf_counter()
        calibration = {"calibration": batches} if kw else {}
        base = svdtrain.decompose(copy.deepcopy(dense), init="svd", **calibration, **kw).eval()
        seconds = time.perf_counter() - t0
        uncut = evaluate(base, val)  # every start computes the dense model's function
        with torch.no_grad():
            x = next(iter(val))[0]
            deviation = float((base(x) - dense(x)).abs().max())
        for level in (0.5, 1 / 3, 0.25):
            model = copy.deepcopy(base)
            svdtrain.prune(model, macs_budget=level, input_shape=(1, 3, 32, 32))
            macs = svdtrain.count_macs(model, (1, 3, 32, 32)) / svdtrain.count_macs(dense, (1, 3, 32, 32))
            cut = evaluate(model, val)
            used = svdtrain.recalibrate_batchnorm(model, batches)
            points.append({"start": start, "level": f"{level:.0%}", "macs_ratio": round(macs, 4),
                           "val_accuracy_uncut": uncut, "max_logit_deviation_uncut": deviation,
                           "val_accuracy_cut": cut, "val_accuracy_recalibrated": evaluate(model, val),
                           "recalibration_batches": used, "decompose_seconds": round(seconds, 1),
                           "ranks": list(svdtrain.ranks(model).values())})
            print({k: v for k, v in points[-1].items() if k != "ranks"}, flush=True)
    out = {"points": points,
           "settings": {"calibration_batches": args.batches, "batch_size": 128,
                        "batches": "the first 16 augmented training batches of epoch 0 (seed 0), for calibration and recalibration",
                        "rule": "prune(macs_budget=level, input_shape=(1,3,32,32)), energy share of each start's spectrum"},
           "machine": f"{platform.machine()}, {args.threads} thread(s); no GPU was used",
           "torch": torch.__version__, "date": datetime.date.today().isoformat(),
           "command": f"python benchmarks/whiten_probe.py --data-dir DATA --batches {args.batches} --threads {args.threads}"}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
