"""The method at the reference's length on CIFAR-10 ResNet-20 (configs/cifar10_resnet20_full.yaml:
20 orthogonality-only + 164 + 60 epochs, 28% of the dense MACs), against the two anchors of
equal length trained here and the published full-length figures.

Three runs and a diagnostic one, each resumable (rerun the same command after a stop) and independent but for the
post-hoc one, which starts from the dense model:
  dense         the same recipe, plain layers, 184 epochs (orth + train) in one cosine schedule
  svd_training  the full config as shipped (decompose.mode from --mode)
  posthoc_svd   SVD of the dense model, cut to the same MACs by loss importance (the rule
                chosen on validation for post-hoc SVD of a trained model), BatchNorm
                re-estimated on 16 batches, the same 60 fine-tuning epochs: 184 + 60 in all
  posthoc_svd_at_svd_ranks  the same, but each layer cut to the rank SVD training ended with
                (its ranks.json): separates the allocation from the weights it trained

    python benchmarks/paper_length.py --run dense --threads 1      # one core each, in parallel
    python benchmarks/paper_length.py --run svd_training --threads 1
    python benchmarks/paper_length.py --run posthoc_svd --threads 1   # after dense
    python benchmarks/paper_length.py --run posthoc_svd_at_svd_ranks   # after dense and svd_training
    python benchmarks/paper_length.py --report-only
    python benchmarks/paper_length.py --save-progress   # before a machine goes away
Result: results/paper_length.json (+ .md): every finished run's summary; the test set only reports.
A run takes several sessions of a 2-core CPU: --save-progress copies each run's checkpoint and
metrics to results/paper_length_progress/<run>/ (committed), and --run restores from there when
its work directory has none, so another machine goes on where the last one stopped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
from pathlib import Path

import torch

from svdtrain.config import load_config
from svdtrain.train import Run

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "cifar10_resnet20_full.yaml"
METHODS = ("dense", "svd_training", "posthoc_svd", "posthoc_svd_at_svd_ranks")
PROGRESS = HERE / "results" / "paper_length_progress"
KEPT = ("checkpoint.pt", "metrics.jsonl", "summary.json", "ranks.json")  # what a run resumes from and reports


def save_progress(work: Path) -> None:
    for method in METHODS:
        run = work / method
        if (run / "checkpoint.pt").is_file():
            (PROGRESS / method).mkdir(parents=True, exist_ok=True)
            for name in KEPT:
                if (run / name).is_file():
                    shutil.copyfile(run / name, PROGRESS / method / name)
            print(f"saved {run} -> {PROGRESS / method}")


def restore_progress(run: Path) -> None:
    saved = PROGRESS / run.name
    if (run / "checkpoint.pt").exists() or not (saved / "checkpoint.pt").is_file():
        return
    run.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        if (saved / name).is_file():
            shutil.copyfile(saved / name, run / name)
    print(f"restored {run} from {saved}")
# Published full-length anchors, ResNet-20 on CIFAR-10 (../shared/docs/METHOD.md): FLOPs reduction, top-1.
ANCHORS = [
    ("TRP, channel (its authors' README)", "2.17x", "91.74 -> 90.50"),
    ("TRP, spatial (its authors' README)", "2.84x", "91.74 -> 90.62"),
    ("SVD training, channel + Hoyer (a public re-run of the reference code)", "2.18x", "91.00 -> 91.17"),
    ("LC rank selection (CVPR 2020)", "2.3x / 3.0x", "about -1.1 / -1.5 points"),
]
# SVD training's targets: TRP spatial's accuracy, at 28% of the dense MACs (stated as "3.6x
# fewer": 1 / 0.28 = 3.57x), within 1 point of the dense model of the same length.
TARGETS = {"accuracy": 0.9062, "macs": 0.28, "drop": 0.01}


def config(method: str, args) -> dict:
    common = [f"data_dir={args.data_dir}", f"threads={args.threads}", f"device={args.device}", f"seed={args.seed}"]
    full = load_config(CONFIG, common)
    e = full["epochs"]
    if method == "dense":
        return load_config(CONFIG, common + ["decompose.enabled=false", "epochs.orth=0",
                                             f"epochs.train={e['orth'] + e['train']}"])
    if method == "svd_training":
        return load_config(CONFIG, common + [f"decompose.mode={args.mode}"])
    dense = Path(args.work) / "dense" / "checkpoint.pt"
    ranks = [f"prune.ranks={Path(args.work) / 'svd_training' / 'ranks.json'}", f"decompose.mode={args.mode}"] \
        if method == "posthoc_svd_at_svd_ranks" else []  # SVD training's ranks, in its mode
    return load_config(CONFIG, common + ["decompose.init=svd", f"decompose.dense_checkpoint={dense}",
                                         "epochs.orth=0", "epochs.train=0", "prune.score=loss",
                                         "prune.recalibrate=16", *ranks])


def point(method: str, args) -> dict | None:
    summary = Path(args.work) / method / "summary.json"
    if not summary.is_file():
        return None
    s = json.loads(summary.read_text())
    ckpt = Path(args.work) / method / "checkpoint.pt"  # the run's own config, not this command line's
    cfg = torch.load(ckpt, map_location="cpu", weights_only=True)["config"] if ckpt.is_file() \
        else config(method, args)
    epochs = {"orth": 0, "train": cfg["epochs"]["orth"] + cfg["epochs"]["train"], "finetune": 0} \
        if method == "dense" else dict(cfg["epochs"])
    if method.startswith("posthoc_svd"):  # the dense model's epochs are its training
        epochs["train"] = config("dense", args)["epochs"]["train"]
    ratio = s["macs"] / s["dense_macs"]
    return {"method": method, "epochs": epochs, "macs_ratio": ratio, "macs_reduction": 1 / ratio,
            "accuracy": s["accuracy"], "val_accuracy": s.get("val_accuracy"), "seed": args.seed,
            "hours": s["train_seconds"] / 3600 if s.get("train_seconds") is not None else None,
            "mode": cfg["decompose"]["mode"] if method == "svd_training" else None}


def report(args) -> None:
    points = [p for m in METHODS if (p := point(m, args))]
    if not points:
        raise SystemExit(f"no finished run under {args.work}; nothing written")
    dense = next((p["accuracy"] for p in points if p["method"] == "dense"), None)
    for p in points:
        p["dense_accuracy"] = dense
    out = Path(args.out)
    result = {"points": points, "config": str(CONFIG.relative_to(HERE.parent)),
              "machine": f"{platform.machine()}, {args.threads} CPU thread(s) per run, torch {torch.__version__}",
              "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/paper_length.py --run {dense,svd_training,posthoc_svd,posthoc_svd_at_svd_ranks} "
                         f"--threads {args.threads} --mode {args.mode}"}
    svd = next((p for p in points if p["method"] == "svd_training"), None)
    if svd is not None:
        result["targets"] = verdicts(svd, dense)
    out.write_text(json.dumps(result, indent=1) + "\n")
    rows = ["| method | epochs (orth + train + fine-tune) | MACs | test top-1 | val top-1 | drop vs dense | hours of epochs |",
            "|---|---|---|---|---|---|---|"]
    for p in points:
        e = p["epochs"]
        drop = f"{(dense - p['accuracy']) * 100:+.2f}" if dense is not None and p["method"] != "dense" else "-"
        hours = f"{p['hours']:.1f}" if p.get("hours") is not None else "-"
        rows.append(f"| {p['method']} | {e['orth']} + {e['train']} + {e['finetune']} | {p['macs_ratio']:.1%} "
                    f"({p['macs_reduction']:.2f}x fewer) | {p['accuracy']:.2%} | {p['val_accuracy']:.2%} | {drop} | {hours} |")
    if svd is not None:
        rows += ["", "SVD training's targets:", ""] + [f"- {v}" for v in result["targets"]]
    rows += ["", "Published at full length:", "", "| method | fewer FLOPs | dense -> compressed top-1 |", "|---|---|---|"]
    rows += [f"| {name} | {x} | {acc} |" for name, x, acc in ANCHORS]
    out.with_suffix(".md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def verdicts(svd: dict, dense: float | None) -> list[str]:
    """Each target of SVD training: met or missed, and by how much."""
    def say(ok: bool, margin: str) -> str:
        return ("met" if ok else "**missed**") + f" ({margin})"
    acc, red = svd["accuracy"], svd["macs_reduction"]
    out = [f"test top-1 >= {TARGETS['accuracy']:.2%} (TRP spatial at 2.84x): "
           + say(acc >= TARGETS["accuracy"], f"{(acc - TARGETS['accuracy']) * 100:+.2f} points"),
           f"<= {TARGETS['macs']:.0%} of dense MACs (stated as 3.6x fewer; 1/{TARGETS['macs']} = "
           f"{1 / TARGETS['macs']:.2f}x): " + say(svd["macs_ratio"] <= TARGETS["macs"], f"{svd['macs_ratio']:.2%}, {red:.2f}x")]
    if dense is not None:
        drop = dense - acc
        out.append(f"within {TARGETS['drop'] * 100:.1f} point of dense ({dense:.2%}): "
                   + say(drop <= TARGETS["drop"], f"drop {drop * 100:.2f} points"))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", choices=METHODS)
    p.add_argument("--mode", choices=("channel", "spatial"), default="channel", help="svd_training's decompose.mode")
    p.add_argument("--data-dir", default=str(Path.home() / ".cache" / "cifar10"))
    p.add_argument("--work", default=str(HERE / "work" / "paper_length"))
    p.add_argument("--out", default=str(HERE / "results" / "paper_length.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--save-progress", action="store_true", help="copy every run's checkpoint to " + str(PROGRESS))
    args = p.parse_args(argv)
    if args.save_progress:
        save_progress(Path(args.work))
        return
    if args.run and not args.report_only:
        restore_progress(Path(args.work) / args.run)
        if args.run.startswith("posthoc_svd") and not (Path(args.work) / "dense" / "summary.json").is_file():
            raise SystemExit(f"{args.run} starts from the finished dense run: run --run dense first")
        if args.run == "posthoc_svd_at_svd_ranks" and not (Path(args.work) / "svd_training" / "ranks.json").is_file():
            raise SystemExit(f"{args.run} takes SVD training's ranks: run --run svd_training first")
        torch.set_num_threads(args.threads)
        Run(Path(args.work) / args.run, config(args.run, args), quiet=True).execute()
    report(args)


if __name__ == "__main__":
    sys.exit(main())
