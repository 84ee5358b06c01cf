"""A small ViT on CIFAR-10 (configs/cifar10_vit.yaml): dense against post-hoc SVD and SVD
training at 50% and 33% of dense MACs, at equal budgets, with the CPU latency of every
exported model against the dense one.

The dense model trains E epochs (the shared recipe: AdamW, cosine, batch 128, crop + flip).
Regimes (--regime):
  pretrained    both methods start from the trained dense model (decomposed at `svd` init) and
                get the same E_c epochs, cosine from --lr without warm-up:
                  posthoc_svd   prune to the level, fine-tune E_c
                  svd_training  one budget-driven train stage of E_c epochs reaching the level at
                                --target-at of it with gradual pruning, then prune (no restart)
  scratch       posthoc_svd   the dense model, pruned to the level, fine-tuned E_f
                svd_training  from scratch (dense_init), budget-driven to the level with gradual
                              pruning over E epochs, prune, fine-tune E_f
                so both compressed models cost E + E_f epochs.
Latency: each model exported with svdtrain.export(choose="latency") timed at batch 64 (the
dense model as it is, PyTorch's fused attention path included), median of interleaved
repetitions, at batch 64 and batch 1. Every run resumes from its checkpoint; finished points
are kept.

    python benchmarks/vit_cifar10.py --data-dir ~/.cache/cifar10
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

import svdtrain
from deploy_latency import time_models  # benchmarks/ is on sys.path when run as a script
from svdtrain.config import load_config
from svdtrain.models import build_model
from svdtrain.train import Run, load_run_model

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "cifar10_vit.yaml"
LEVELS = {"50%": 0.50, "33%": 0.33}


def config(args, *overrides: str) -> dict:
    return load_config(CONFIG, [f"data_dir={args.data_dir}", f"threads={args.threads}", f"device={args.device}",
                                f"epochs.train={args.epochs}", f"epochs.finetune={args.finetune_epochs}",
                                f"seed={args.seed}", *overrides])


def run(out: Path, cfg: dict) -> dict:
    return Run(out, cfg, quiet=True).execute()


def latency(work: Path, names: list[str], batch: int, args) -> dict:
    """Median seconds per forward at `batch` of the dense model and each point's export."""
    dense = build_model("vit", 10)
    dense.load_state_dict(torch.load(work / "dense" / "model_state.pt", map_location="cpu", weights_only=True))
    models = {("dense", "nchw"): dense.eval()}
    for name in names:
        models[(name, "nchw")] = svdtrain.export(load_run_model(work / name), input_shape=(args.latency_batch, 3, 32, 32),
                                                 choose="latency").eval()
    return {k[0]: v for k, v in time_models(models, batch, args.reps, warmup=3).items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(Path.home() / ".cache" / "cifar10"))
    p.add_argument("--work", default=str(HERE / "work" / "vit"))
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    p.add_argument("--regime", choices=("pretrained", "scratch"), default="pretrained")
    p.add_argument("--epochs", type=int, default=10, help="E: dense training (scratch: and SVD training)")
    p.add_argument("--finetune-epochs", type=int, default=2, help="scratch: E_f")
    p.add_argument("--compress-epochs", type=int, default=2, help="pretrained: E_c")
    p.add_argument("--lr", type=float, default=2e-4, help="pretrained: peak lr of E_c (cosine)")
    p.add_argument("--target-at", type=float, default=0.17, help="pretrained: svd_training reaches the level here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--latency-batch", type=int, default=64, help="batch the latency export is chosen at")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    dense = run(work / "dense", config(args, "decompose.enabled=false"))
    state = work / "dense" / "model_state.pt"
    points, names = [], []
    for level in args.levels:
        budget, tag = LEVELS[level], level.rstrip("%")
        posthoc = ["decompose.init=svd", f"decompose.dense_checkpoint={state}", "epochs.train=0",
                   f"prune.macs_budget={budget}", "regularizer.target_macs=0", "prune.gradual=false"]
        if args.regime == "pretrained":
            start = ["decompose.init=svd", f"decompose.dense_checkpoint={state}", f"optim.lr={args.lr}",
                     f"optim.finetune_lr={args.lr}", "optim.schedule=cosine", "optim.warmup_fraction=0.0"]
            runs = {"posthoc_svd": config(args, *start, *posthoc, f"epochs.finetune={args.compress_epochs}"),
                    "svd_training": config(args, *start, f"epochs.train={args.compress_epochs}", "epochs.finetune=0",
                                           f"regularizer.target_macs={budget}",
                                           f"regularizer.target_at={args.target_at}")}
        else:
            runs = {"posthoc_svd": config(args, *posthoc),
                    "svd_training": config(args, f"regularizer.target_macs={budget}")}
        for method, cfg in runs.items():
            name = f"{method}_{tag}" if args.regime == "scratch" else f"pretrained_{method}_{tag}"
            s = run(work / name, cfg)
            names.append(name)
            points.append({"method": method, "level": level, "macs": s["macs"], "accuracy": s["accuracy"],
                           "accuracy_trained": s["accuracy_trained"], "accuracy_pruned": s["accuracy_pruned"],
                           "macs_ratio": dense["macs"] / s["macs"], "params": s["params"],
                           "budget_warning": s.get("budget_warning"), "train_seconds": s["train_seconds"]})
            print(f"== {method} {level}: {s['accuracy']:.2%} at {s['macs'] / 1e6:.2f}M MACs", flush=True)
    times = {b: latency(work, names, b, args) for b in (args.latency_batch, 1)}
    for point, name in zip(points, names):
        point["latency_ratio"] = times[args.latency_batch]["dense"] / times[args.latency_batch][name]
        point["latency_ratio_batch1"] = times[1]["dense"] / times[1][name]
        point["latency_ms"] = {str(b): 1e3 * t[name] for b, t in times.items()}
    result = {"dense": {"accuracy": dense["accuracy"], "macs": dense["macs"], "params": dense["params"],
                        "epochs": args.epochs, "latency_ms": {str(b): 1e3 * t["dense"] for b, t in times.items()}},
              "points": points,
              "budget": {"epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "config": "configs/cifar10_vit.yaml",
                         "latency": f"export(choose='latency') at batch {args.latency_batch}; {args.threads} threads"},
              "machine": (torch.cuda.get_device_name() if args.device == "cuda" else
                          f"{platform.machine()}, {args.threads} CPU threads") + f", torch {torch.__version__}",
              "date": datetime.date.today().isoformat(),
              "command": " ".join(["python benchmarks/vit_cifar10.py", *(argv if argv is not None else sys.argv[1:])])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vit_cifar10.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Dense ViT ({args.epochs} epochs): {100 * dense['accuracy']:.2f}%, {dense['macs'] / 1e6:.2f}M MACs.", "",
             "| level | method | top-1 | % of dense MACs | MACs ratio | latency ratio b64 | latency ratio b1 |",
             "|---|---|---|---|---|---|---|"]
    for pt in points:
        lines.append(f"| {pt['level']} | {pt['method']} | {100 * pt['accuracy']:.2f} | {100 / pt['macs_ratio']:.1f}% "
                     f"| {pt['macs_ratio']:.2f} | {pt['latency_ratio']:.2f} | {pt['latency_ratio_batch1']:.2f} |")
    (out / "vit_cifar10.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
