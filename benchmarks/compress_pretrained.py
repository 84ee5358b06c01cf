"""Compress a trained CIFAR-10 ResNet-20 at equal budget: SVD training against post-hoc SVD,
filter pruning (Torch-Pruning's sparse-training path and one-shot L1) and TRP.

The regime most users are in: they own a trained model and want it smaller. One dense model
is trained once (`--dense-epochs`, on 45k images: 5k are held out as a validation split for
choosing hyper-parameters; the test set only reports). Every method then gets the same
compression budget from it: E_c epochs of compression-time training (cosine from --lr) +
E_f epochs of fine-tuning (cosine from --finetune-lr), batch 128, the same augmentation:
  svd_training       decompose (svd init), budget-driven training to the level (the sparsity
                     strength steered, values masked along the schedule with --gradual),
                     prune to the level, fine-tune E_f (orthogonality on)
  posthoc_svd        decompose, prune to the level, fine-tune E_c + E_f (orthogonality on)
  filter_pruning     Torch-Pruning group-norm sparse training E_c, prune to the level (L2
                     group magnitude), fine-tune E_f
  filter_pruning_l1  one-shot global L1 filter pruning to the level, fine-tune E_c + E_f
  trp                TRP training E_c from the trained weights, prune to the level,
                     fine-tune E_f (orthogonality on, as every SVD-form model)
Every point is one JSON file under --work (skipped once done); every training phase resumes
from its checkpoint, so the script can be killed and rerun.

    python benchmarks/compress_pretrained.py --data-dir ~/.cache/cifar10 --levels 33% --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

import svdtrain
from svdtrain.config import load_config
from svdtrain.engine import fit
from svdtrain.models import build_model
from svdtrain.train import Run, run_dataset

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "cifar10_resnet20.yaml"
DENSE_RUN = HERE / "results" / "pretrained_dense"  # the dense model every point starts from
LEVELS = {"50%": 0.50, "33%": 0.33, "25%": 0.25}
METHODS = ("svd_training", "posthoc_svd", "filter_pruning", "filter_pruning_l1", "trp")
SHAPE = (1, 3, 32, 32)


def dense_config(args) -> dict:
    return load_config(CONFIG, ["decompose.enabled=false", "regularizer.target_macs=0", f"epochs.train={args.dense_epochs}",
                                f"val_size={args.val_size}", f"data_dir={args.data_dir}",
                                f"threads={args.threads}", f"device={args.device}", "seed=0"])


def compress_config(args, seed: int, dense_state: Path, *overrides: str) -> dict:
    """The shared recipe: compression phase cosine from --lr, fine-tuning cosine from --finetune-lr."""
    return load_config(CONFIG, [
        f"val_size={args.val_size}", f"data_dir={args.data_dir}", f"threads={args.threads}", f"device={args.device}",
        f"seed={seed}", "decompose.init=svd", f"decompose.dense_checkpoint={dense_state}", "epochs.orth=0",
        f"epochs.train={args.compress_epochs}", f"epochs.finetune={args.finetune_epochs}",
        f"optim.lr={args.lr}", "optim.schedule=cosine", "optim.warmup_fraction=0.0",
        f"optim.finetune_lr={args.finetune_lr}", "regularizer.target_macs=0", *overrides])


def restore_dense(dense: Path, args) -> None:
    """The committed dense model (results/pretrained_dense: its run checkpoint, metrics and
    summary) seeds a fresh work directory when the dense settings asked for are its own, so
    every machine compresses the same trained model; model_state.pt is rewritten from it."""
    if (dense / "checkpoint.pt").exists() or not (DENSE_RUN / "checkpoint.pt").exists():
        return
    state = torch.load(DENSE_RUN / "checkpoint.pt", map_location="cpu", weights_only=True)
    if (state["config"]["epochs"]["train"], state["config"].get("val_size")) != (args.dense_epochs, args.val_size):
        return
    dense.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "summary.json", "checkpoint.pt"):
        shutil.copyfile(DENSE_RUN / name, dense / name)
    torch.save(state["model"], dense / "model_state.pt")


def point_file(work: Path, method: str, level: str, seed: int) -> Path:
    return work / "points" / f"{method}_{level.rstrip('%')}_s{seed}.json"


def accuracies(model, data, cfg) -> dict:
    """Test and validation accuracy of a model (any dense or SVD-form module)."""
    from svdtrain.loader import BatchLoader
    from svdtrain.engine import evaluate
    out, device = {}, next(model.parameters()).device
    for key, x, y in (("accuracy", data.x_test, data.y_test), ("val_accuracy", data.x_val, data.y_val)):
        out[key] = evaluate(model, BatchLoader(x, y, 1000, train=False, mean=data.mean, std=data.std, device=device))
    return out


def example(model) -> torch.Tensor:
    return torch.zeros(SHAPE, device=next(model.parameters()).device)


def pipeline_point(out: Path, cfg: dict) -> dict:
    s = Run(out, cfg, quiet=True).execute()
    return {"macs": s["macs"], "accuracy": s["accuracy"], "val_accuracy": s.get("val_accuracy"),
            "accuracy_trained": s["accuracy_trained"], "accuracy_before_finetune": s["accuracy_pruned"],
            "params": s["params"], "budget_warning": s.get("budget_warning"), "seconds": s["train_seconds"]}


def loop_point(out: Path, data, cfg, level: float, method: str, args) -> dict:
    """The baselines that svdtrain's pipeline does not run: in the common fit() loop."""
    from svdtrain.baselines import TRP, GroupSparsity, filter_prune
    out.mkdir(parents=True, exist_ok=True)
    model = build_model("resnet20", 10)
    model.load_state_dict(torch.load(cfg["decompose"]["dense_checkpoint"], weights_only=True))
    if cfg["device"] == "cuda":
        model.cuda()
    e_c, e_f = cfg["epochs"]["train"], cfg["epochs"]["finetune"]
    t0, trained, reg = time.perf_counter(), None, None
    if method == "filter_pruning_l1":
        filter_prune(model, example(model), level)
        e_f += e_c
    elif method == "filter_pruning":
        sparsity = GroupSparsity(model, example(model), reg=args.group_reg)
        fit(model, data, cfg, e_c, stage="train", quiet=True, checkpoint=out / "train.pt",
            on_backward=lambda m: sparsity.regularize())
        trained = accuracies(model, data, cfg)["accuracy"]
        filter_prune(model, example(model), level, p=2)
    else:  # trp
        trp = TRP(model, every=args.trp_every, keep_energy=args.trp_energy, nuclear=args.trp_nuclear)
        done = torch.load(out / "train.pt", weights_only=True)["epoch"] if (out / "train.pt").exists() else 0
        steps = [done * (len(data.x_train) // cfg["batch_size"])]  # truncations on the same steps after resume

        def after_step(m):
            steps[0] += 1
            trp.step(steps[0])
        fit(model, data, cfg, e_c, stage="train", quiet=True, checkpoint=out / "train.pt",
            on_backward=lambda m: trp.regularize(), on_step=after_step)
        trained = accuracies(model, data, cfg)["accuracy"]
        trp.to_svd_model(input_shape=SHAPE, macs_budget=level)
        reg = svdtrain.Regularizer(orth=cfg["regularizer"]["orth"], sparsity=None)
    before = accuracies(model, data, cfg)["accuracy"]
    fit(model, data, cfg, e_f, stage="finetune", reg=reg, quiet=True, checkpoint=out / "finetune.pt")
    model.eval()
    return {"macs": svdtrain.count_macs(model, SHAPE), **accuracies(model, data, cfg),
            "accuracy_trained": trained, "accuracy_before_finetune": before,
            "params": svdtrain.count_params(model), "seconds": time.perf_counter() - t0}


def run_point(args, work: Path, data, method: str, level: str, seed: int) -> None:
    path = point_file(work, method, level, seed)
    if path.exists():
        return
    dense_state = work / "dense" / "model_state.pt"
    budget, e_c, e_f = LEVELS[level], args.compress_epochs, args.finetune_epochs
    out = work / f"{method}_{level.rstrip('%')}_s{seed}"
    settings = {}
    if method == "svd_training":
        settings = {"strength": args.strength, "target_at": args.target_at, "gradual": args.gradual,
                    "schedule": args.svd_schedule}
        # "one": the whole budget is one train stage under one cosine (no restart at fine-tuning);
        # with gradual masking the prune stage then has nothing left to cut.
        split = [f"epochs.train={e_c + e_f}", "epochs.finetune=0"] if args.svd_schedule == "one" else []
        cfg = compress_config(args, seed, dense_state, *split, f"regularizer.target_macs={budget}",
                              f"regularizer.strength={args.strength}", f"regularizer.target_at={args.target_at}",
                              f"prune.gradual={str(args.gradual).lower()}")
        point = pipeline_point(out, cfg)
    elif method == "posthoc_svd":
        cfg = compress_config(args, seed, dense_state, "epochs.train=0", f"epochs.finetune={e_c + e_f}",
                              f"prune.macs_budget={budget}")
        point = pipeline_point(out, cfg)
    else:
        if method == "filter_pruning":
            settings = {"group_reg": args.group_reg}
        if method == "trp":
            settings = {"every": args.trp_every, "energy": args.trp_energy, "nuclear": args.trp_nuclear}
        cfg = compress_config(args, seed, dense_state)
        point = loop_point(out, data, cfg, budget, method, args)
    point.update(method=method, level=level, seed=seed, settings=settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(point, indent=1) + "\n")
    print(f"== {method} {level} seed {seed}: test {point['accuracy']:.2%} val {point['val_accuracy']:.2%} "
          f"at {point['macs'] / 1e6:.2f}M MACs", flush=True)


def write_results(args, work: Path) -> None:
    points = [json.loads(p.read_text()) for p in sorted((work / "points").glob("*.json"))]
    if not points or not (work / "dense" / "summary.json").is_file():  # never replace results by an empty table
        raise SystemExit(f"no finished points under {work}; nothing written")
    summary = json.loads((work / "dense" / "summary.json").read_text())
    dense = {"accuracy": summary["accuracy"], "val_accuracy": summary.get("val_accuracy"), "macs": summary["macs"],
             "epochs": args.dense_epochs, "command": "python benchmarks/compress_pretrained.py (its dense stage): "
             f"svdtrain run configs/cifar10_resnet20.yaml decompose.enabled=false epochs.train={args.dense_epochs} "
             f"val_size={args.val_size} seed=0"}
    result = {
        "budget": {"model": "resnet20", "dataset": "CIFAR-10 (45k train / 5k validation / 10k test)",
                   "compress_epochs": args.compress_epochs, "finetune_epochs": args.finetune_epochs,
                   "batch_size": 128, "optimizer": "SGD nesterov 0.9, wd 5e-4 (not on s)",
                   "schedule": f"cosine from {args.lr} (E_c), cosine from {args.finetune_lr} (E_f)",
                   "augmentation": "pad-4 random crop + horizontal flip", "label_smoothing": 0.1},
        "dense": dense,
        "points": [{k: p.get(k) for k in ("method", "level", "seed", "macs", "accuracy", "val_accuracy",
                                          "accuracy_trained", "accuracy_before_finetune", "params", "settings",
                                          "budget_warning", "seconds")} for p in points],
        "machine": (torch.cuda.get_device_name() if args.device == "cuda" else
                    f"{platform.machine()}, {args.threads} CPU threads") + f", torch {torch.__version__}",
        "date": datetime.date.today().isoformat(),
        "commands": (work / "commands.txt").read_text().splitlines() if (work / "commands.txt").exists() else [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compress_pretrained.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Dense ResNet-20 ({args.dense_epochs} epochs): test {100 * dense['accuracy']:.2f}%, "
             f"{dense['macs'] / 1e6:.2f}M MACs. Budget per method: {args.compress_epochs} + {args.finetune_epochs} epochs.",
             "", "| level | method | n | test top-1 (mean ± std) | val top-1 | % of dense MACs | before fine-tune |",
             "|---|---|---|---|---|---|---|"]
    for level in LEVELS:
        for method in METHODS:
            ps = [p for p in points if p["level"] == level and p["method"] == method]
            if not ps:
                continue
            acc = [100 * p["accuracy"] for p in ps]
            val = [100 * p["val_accuracy"] for p in ps]
            std = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
            before = statistics.mean(100 * p["accuracy_before_finetune"] for p in ps)
            lines.append(f"| {level} | {method} | {len(ps)} | {statistics.mean(acc):.2f}{std} | {statistics.mean(val):.2f} "
                         f"| {100 * statistics.mean(p['macs'] for p in ps) / dense['macs']:.1f}% | {before:.2f} |")
    (out / "compress_pretrained.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(Path.home() / ".cache" / "cifar10"))
    p.add_argument("--work", default=str(HERE / "work" / "pretrained"))
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--levels", nargs="+", default=["33%"], choices=list(LEVELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--dense-epochs", type=int, default=20)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--compress-epochs", type=int, default=4, help="E_c")
    p.add_argument("--finetune-epochs", type=int, default=2, help="E_f")
    p.add_argument("--lr", type=float, default=0.02, help="peak lr of the compression phase (cosine)")
    p.add_argument("--finetune-lr", type=float, default=0.02)
    p.add_argument("--strength", type=float, default=0.005, help="SVD training: the sparsity strength to start from")
    p.add_argument("--target-at", type=float, default=0.5, help="SVD training: where in E_c the level is reached")
    p.add_argument("--svd-schedule", choices=("split", "one"), default="split",
                   help="SVD training: E_c train + E_f fine-tune (split), or E_c + E_f epochs of one train "
                        "stage under one cosine (one; --target-at is then a fraction of all of them)")
    p.add_argument("--gradual", action=argparse.BooleanOptionalAction, default=True,
                   help="SVD training: mask values along the schedule (prune.gradual)")
    p.add_argument("--group-reg", type=float, default=5e-4, help="filter_pruning: group-norm weight")
    p.add_argument("--trp-every", type=int, default=20)
    p.add_argument("--trp-energy", type=float, default=0.98)
    p.add_argument("--trp-nuclear", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        with open(work / "commands.txt", "a") as f:
            f.write(" ".join(["python benchmarks/compress_pretrained.py", *(argv if argv is not None else sys.argv[1:])]) + "\n")
        restore_dense(work / "dense", args)
        Run(work / "dense", dense_config(args), quiet=True).execute()
        data = run_dataset(compress_config(args, 0, work / "dense" / "model_state.pt"))
        for seed in args.seeds:
            for level in args.levels:
                for method in args.methods:
                    run_point(args, work, data, method, level, seed)
    write_results(args, work)


if __name__ == "__main__":
    main()
