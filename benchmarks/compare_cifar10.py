"""SVD training against dense, post-hoc SVD, filter pruning and TRP on real CIFAR-10.

One fixed budget for every method (stated in the output): CIFAR ResNet-20, the same
augmentation, optimizer, schedule and seed; each compressed point is fine-tuned for the same
number of epochs. Methods and points:
  dense           trained for `train_epochs`
  svd_training    trained in SVD form (orthogonality + Hoyer) for `train_epochs`, then pruned
                  to each MACs level with svdtrain.prune(macs_budget=...) and fine-tuned
  posthoc_svd     the dense model, decomposed with `svd` init, pruned to each level, fine-tuned
  filter_pruning  the dense model, Torch-Pruning global L1 filter pruning to each level, fine-tuned
  trp             TRP training (dense + periodic SVD truncation + nuclear norm) for
                  `train_epochs`, then converted to SVD form, pruned to each level, fine-tuned
Every point is one JSON file under --work; finished points are skipped, training runs resume
from their checkpoints, so the script can be killed and rerun.

    python benchmarks/compare_cifar10.py --data-dir ~/.cache/cifar10   # ~2 h on 2 CPU cores
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

import svdtrain
from svdtrain.config import load_config
from svdtrain.data import load_dataset
from svdtrain.engine import evaluate, fit
from svdtrain.loader import BatchLoader
from svdtrain.models import build_model
from svdtrain.train import Run, fork_run

HERE = Path(__file__).resolve().parent
LEVELS = {"50%": 0.50, "33%": 0.33, "25%": 0.25}
SHAPE = (1, 3, 32, 32)


def base_config(args) -> dict:
    return load_config(None, [
        "model=resnet20", "dataset=cifar10", f"data_dir={args.data_dir}", f"seed={args.seed}",
        f"batch_size={args.batch}", "label_smoothing=0.1", f"threads={args.threads}", "device=cpu",
        "optim.name=sgd", f"optim.lr={args.lr}", "optim.schedule=onecycle", "optim.weight_decay=5e-4",
        f"optim.finetune_lr={args.finetune_lr}", f"epochs.train={args.train_epochs}",
        f"epochs.finetune={args.finetune_epochs}", "epochs.orth=0",
        "regularizer.sparsity=hoyer", f"regularizer.strength={args.hoyer}", "regularizer.orth=1.0",
    ])


def with_(cfg: dict, *overrides: str) -> dict:
    return load_config(None, overrides, base=cfg)


def point_path(work: Path, method: str, level: str) -> Path:
    return work / "points" / f"{method}_{level.rstrip('%')}.json"


def load_points(work: Path) -> list[dict]:
    """Every finished point. The first comparison's SVD-training points predate the
    hoyer/init fields: they were made with Hoyer 0.01 and random init."""
    points = [json.loads(p.read_text()) for p in sorted((work / "points").glob("*.json"))]
    for p in points:
        p.setdefault("seed", 0)  # every point before seeds were recorded ran with --seed 0
        if p["method"] == "svd_training":
            p.setdefault("hoyer", 0.01)
            p.setdefault("init", "random")
    return points


def save_point(work: Path, point: dict, name: str | None = None) -> None:
    path = point_path(work, name or point["method"], point["level"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(point, indent=1) + "\n")
    print(f"== {point['method']} {point['level']}: {100 * point['accuracy']:.2f}% at "
          f"{100 * point['macs'] / point['dense_macs']:.1f}% MACs", flush=True)


def run_pipeline(out: Path, cfg: dict, until="report") -> dict:
    return Run(out, cfg, quiet=True).execute(until)


def pipeline_point(work, method, level, out, cfg, seconds_before=0.0):
    summary = run_pipeline(out, cfg)
    return {"method": method, "level": level, "macs": summary["macs"], "dense_macs": summary["dense_macs"],
            "accuracy": summary["accuracy"], "accuracy_before_finetune": summary["accuracy_pruned"],
            "params": summary["params"], "ranks": summary["ranks"], "compact": str(out / "compact.pt2"),
            "train_seconds": seconds_before, "run_seconds": summary["train_seconds"], "seed": cfg["seed"]}


def finetune_point(work, method, level, model, data, cfg, reg=None, train_seconds=0.0):
    """Fine-tune an already compressed model with the common recipe; export; record."""
    out = work / f"{method}_{level.rstrip('%')}"
    out.mkdir(parents=True, exist_ok=True)
    test = BatchLoader(data.x_test, data.y_test, 1000, train=False, mean=data.mean, std=data.std)
    before = evaluate(model, test)
    t0 = time.perf_counter()
    fit(model, data, cfg, cfg["epochs"]["finetune"], stage="finetune", reg=reg, quiet=True,
        checkpoint=out / "finetune.pt")
    seconds = time.perf_counter() - t0
    model.eval()
    if any(svdtrain.svd_layers(model)):  # the SVD-form state, for re-exports (deploy_latency.py)
        torch.save(model.state_dict(), out / "model_state.pt")
    compact = svdtrain.export(model, input_shape=SHAPE) if any(svdtrain.svd_layers(model)) else model
    svdtrain.export_program(compact.eval(), torch.zeros(2, 3, 32, 32), out / "compact.pt2")
    return {"method": method, "level": level, "macs": svdtrain.count_macs(model, SHAPE),
            "dense_macs": svdtrain.count_macs(build_model("resnet20", 10), SHAPE),
            "accuracy": evaluate(model, test), "accuracy_before_finetune": before,
            "params": svdtrain.count_params(model), "compact": str(out / "compact.pt2"),
            "train_seconds": train_seconds, "finetune_seconds": seconds, "seed": cfg["seed"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(Path.home() / ".cache" / "cifar10"))
    p.add_argument("--work", default=str(HERE / "work" / "compare"), help="run directories and point files")
    p.add_argument("--out", default=str(HERE / "results"), help="where the JSON/PNG/Markdown results go")
    p.add_argument("--methods", nargs="+",
                   default=["dense", "svd_training", "posthoc_svd", "filter_pruning", "trp"])
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--finetune-lr", type=float, default=0.02)
    p.add_argument("--hoyer", type=float, default=0.01, help="SVD training's Hoyer strength (one run, 3 levels)")
    p.add_argument("--hoyer-levels", default="",
                   help="one Hoyer strength per level (of --levels), e.g. 0.003,0.005,0.01: a run each")
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS),
                   help="the MACs levels to produce (default all)")
    p.add_argument("--svd-init", default="random", choices=("random", "dense_init"),
                   help="SVD training's from-scratch init (decompose.init); non-default tags the run dirs")
    p.add_argument("--trp-every", type=int, default=20, help="TRP's m (steps between truncations)")
    p.add_argument("--trp-energy", type=float, default=0.98, help="TRP's truncation energy threshold")
    p.add_argument("--trp-nuclear", type=float, default=3e-4, help="TRP's nuclear-norm weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report-only", action="store_true", help="only rebuild the results from finished points")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = base_config(args)
    if not args.report_only:  # the results name every command that produced points
        with open(work / "commands.txt", "a") as f:
            f.write(" ".join(["python benchmarks/compare_cifar10.py", *(argv if argv is not None else sys.argv[1:])]) + "\n")
        data = load_dataset("cifar10", args.data_dir)
        run_methods(args, work, cfg, data)
    write_results(args, work, cfg)


def run_methods(args, work, cfg, data):
    levels = {lv: LEVELS[lv] for lv in args.levels}
    dense_dir = work / "dense"
    dense_cfg = with_(cfg, "decompose.enabled=false")
    if "dense" in args.methods or any(m in args.methods for m in ("posthoc_svd", "filter_pruning")):
        s = run_pipeline(dense_dir, dense_cfg)
        dense = {"method": "dense", "level": "100%", "macs": s["macs"], "dense_macs": s["dense_macs"],
                 "accuracy": s["accuracy"], "params": s["params"], "compact": str(dense_dir / "compact.pt2"),
                 "train_seconds": s["train_seconds"]}
        if not point_path(work, "dense", "100%").exists():
            save_point(work, dense)
    todo = lambda m, lv: m in args.methods and not point_path(work, m, lv).exists()  # noqa: E731

    # One SVD-training run per Hoyer strength; each run is pruned to the levels it serves
    # (--hoyer: all three levels from one run; --hoyer-levels: one strength per level).
    strengths = ([args.hoyer] * len(levels) if not args.hoyer_levels
                 else [float(v) for v in args.hoyer_levels.split(",")])
    if len(strengths) != len(levels):
        raise SystemExit(f"--hoyer-levels needs one strength per level ({', '.join(levels)})")
    svd_cfg = with_(cfg, f"decompose.init={args.svd_init}")
    for (level, budget), hoyer in zip(levels.items(), strengths):
        # 0.01 with random init: the first published run's dirs
        tag = ("" if hoyer == 0.01 else f"_h{hoyer:g}") + ("" if args.svd_init == "random" else f"_{args.svd_init}")
        method = "svd_training"
        if not ("svd_training" in args.methods and not point_path(work, method + tag, level).exists()):
            continue
        trained = work / f"svd_training{tag}"
        run_pipeline(trained, with_(svd_cfg, f"regularizer.strength={hoyer}"), until="train")
        out = work / f"svd_training{tag}_{level.rstrip('%')}"
        fork_run(trained, out)
        pt = pipeline_point(work, method, level, out,
                            with_(svd_cfg, f"regularizer.strength={hoyer}", f"prune.macs_budget={budget}"))
        pt["hoyer"], pt["init"] = hoyer, args.svd_init
        save_point(work, pt, name=method + tag)

    for level, budget in levels.items():
        if todo("posthoc_svd", level):
            out = work / f"posthoc_svd_{level.rstrip('%')}"
            pc = with_(cfg, "decompose.init=svd", f"decompose.dense_checkpoint={dense_dir / 'model_state.pt'}",
                       "epochs.train=0", f"prune.macs_budget={budget}")
            save_point(work, pipeline_point(work, "posthoc_svd", level, out, pc))

    for level, budget in levels.items():
        if todo("filter_pruning", level):
            from svdtrain.baselines import filter_prune
            model = build_model("resnet20", 10)
            model.load_state_dict(torch.load(dense_dir / "model_state.pt", weights_only=True))
            model = filter_prune(model, torch.zeros(SHAPE), budget)
            save_point(work, finetune_point(work, "filter_pruning", level, model, data, cfg))

    if any(todo("trp", lv) for lv in levels):
        from svdtrain.baselines import TRP
        trp_dir = work / "trp"
        trp_dir.mkdir(parents=True, exist_ok=True)
        model = build_model("resnet20", 10)
        trp = TRP(model, every=args.trp_every, keep_energy=args.trp_energy, nuclear=args.trp_nuclear)
        # On resume, continue TRP's step count where the checkpointed epochs left it, so the
        # truncations fall on the same steps as in an uninterrupted run.
        done = torch.load(trp_dir / "train.pt", weights_only=True)["epoch"] if (trp_dir / "train.pt").exists() else 0
        steps = [done * (len(data.x_train) // cfg["batch_size"])]

        def after_step(m):
            steps[0] += 1
            trp.step(steps[0])

        t0 = time.perf_counter()
        fit(model, data, with_(cfg, "decompose.enabled=false"), args.train_epochs, stage="train", quiet=True,
            checkpoint=trp_dir / "train.pt", on_backward=lambda m: trp.regularize(), on_step=after_step)
        train_seconds = time.perf_counter() - t0
        for level, budget in levels.items():
            if not todo("trp", level):
                continue
            m = copy.deepcopy(model)
            t = TRP(m, every=args.trp_every, keep_energy=args.trp_energy, nuclear=args.trp_nuclear)
            t.to_svd_model(input_shape=SHAPE, macs_budget=budget)
            save_point(work, finetune_point(work, "trp", level, m, data, cfg, train_seconds=train_seconds))


def write_results(args, work: Path, cfg: dict):
    points = load_points(work) if (work / "points").is_dir() else []
    if not points:  # never replace committed results by an empty table
        raise SystemExit(f"no finished points under {work}; nothing written")
    dense = next((p for p in points if p["method"] == "dense"), None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = {"model": "resnet20", "dataset": "CIFAR-10 (50k train / 10k test)",
              "train_epochs": args.train_epochs, "finetune_epochs": args.finetune_epochs,
              "batch_size": args.batch, "optimizer": "SGD nesterov 0.9, wd 5e-4 (not on s)",
              "schedule": f"one-cycle peak {args.lr}; fine-tune cosine from {args.finetune_lr}",
              "augmentation": "pad-4 random crop + horizontal flip", "label_smoothing": 0.1, "seed": args.seed,
              "trp": f"m={args.trp_every}, energy {args.trp_energy}, nuclear {args.trp_nuclear}, channel"}
    rows = [p for p in points if p["method"] != "dense"]
    svd = [p for p in rows if p["method"] == "svd_training"]
    # SVD-training series: one run pruned to every level (a strength that covers all levels)
    # or one strength per level (--hoyer-levels). The headline "svd_training" is the random-init
    # per-level sweep where there is one, else the random-init single run; every other series
    # is named "svd_training_h<strength>[_<init>]".
    series = lambda p: (p["hoyer"], p["init"])  # noqa: E731
    single = {k for k in map(series, svd) if {p["level"] for p in svd if series(p) == k} == set(LEVELS)}
    headline = [p for p in svd if p["init"] == "random" and series(p) not in single] or \
               [p for p in svd if p["init"] == "random" and series(p) == min(single, default=None)]
    for p in svd:
        p["series"] = ("one run" if series(p) in single else "per level") + \
            ("" if p["init"] == "random" else f", init={p['init']}")
        if not any(p is h for h in headline):
            p["method"] = f"svd_training_h{p['hoyer']:g}" + ("" if p["init"] == "random" else f"_{p['init']}")
    budget["svd_training"] = (
        "channel, random init, orthogonality 1.0 + Hoyer "
        + ", ".join(f"{p['hoyer']:g} ({p['level']})" for lv in LEVELS for p in headline if p["level"] == lv)
        + ", pruned to the MACs level; svd_training_h*: other strengths/inits (see series)")
    result = {"budget": budget,
              "dense": {"accuracy": dense["accuracy"], "macs": dense["macs"]} if dense else None,
              "points": [{k: p[k] for k in ("method", "level", "macs", "accuracy", "accuracy_before_finetune",
                                            "params", "hoyer", "init", "series", "seed") if k in p} for p in rows],
              "machine": f"{platform.machine()}, {args.threads} CPU threads, torch {torch.__version__}",
              "date": datetime.date.today().isoformat(),
              "commands": (work / "commands.txt").read_text().splitlines() if (work / "commands.txt").exists() else []}
    (out / "compare_cifar10.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| method | level | whole-model MACs | % of dense | top-1 | before fine-tune | Δ vs dense |",
             "|---|---|---|---|---|---|---|"]
    if dense:
        lines.append(f"| dense | 100% | {dense['macs'] / 1e6:.2f}M | 100% | {100 * dense['accuracy']:.2f}% | - | - |")
    for lv in LEVELS:
        for p in sorted((p for p in rows if p["level"] == lv), key=lambda p: -p["accuracy"]):
            delta = f"{100 * (p['accuracy'] - dense['accuracy']):+.2f}" if dense else "-"
            label = f"{p['method']} (Hoyer {p['hoyer']:g}, {p['series']})" if "series" in p else p["method"]
            lines.append(f"| {label} | {lv} | {p['macs'] / 1e6:.2f}M | {100 * p['macs'] / p['dense_macs']:.1f}% "
                         f"| {100 * p['accuracy']:.2f}% | {100 * p.get('accuracy_before_finetune', float('nan')):.2f}% "
                         f"| {delta} |")
    (out / "compare_cifar10.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({p["method"] for p in rows}):
        pts = sorted((p for p in rows if p["method"] == method), key=lambda p: p["macs"])
        if "series" in pts[0]:
            strengths = "/".join(dict.fromkeys(f"{p['hoyer']:g}" for p in pts))
            label = f"{method} (Hoyer {strengths}, {pts[0]['series']})"
        else:
            label = method
        ax.plot([p["macs"] / 1e6 for p in pts], [100 * p["accuracy"] for p in pts], "o-", label=label)
    if dense:
        ax.scatter([dense["macs"] / 1e6], [100 * dense["accuracy"]], marker="*", s=150, c="k", label="dense", zorder=5)
    ax.set_xlabel("whole-model MACs (M)")
    ax.set_ylabel("CIFAR-10 top-1 (%)")
    ax.set_title(f"ResNet-20, {args.train_epochs}+{args.finetune_epochs} epochs, CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare_cifar10.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
