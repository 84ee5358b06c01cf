"""The tables and the plot of benchmarks/compare.py's result files, from its points."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

import torch

from compare_settings import LEVELS, METHODS, RESULT, SVD_METHODS, record_dir


def read_points(files) -> list[dict]:
    """The point JSON files of a record (its dense summaries and budget.json left out)."""
    return [json.loads(f.read_text()) for f in files if not f.name.startswith(("dense", "budget"))]


def mean_std(values: list[float]) -> str:
    """'mean ± std' in points of top-1 (the std only where there is more than one value)."""
    std = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{std}"


def start_of(point: dict) -> str:
    """What a point's compression starts from: the plain SVD of the model, its activation-aware
    (whitened) SVD, SVD training's own init from scratch, or '-' (the baselines' dense model)."""
    s = point.get("settings", {})
    if s.get("calibration"):
        plain = ", plain SVD once the ranks are final" if s.get("unwhiten") else ""
        return f"whitened SVD ({s.get('whiten', 'cholesky')}, {s['calibration']} batches{plain})"
    if point["method"] == "svd_training" and s.get("init", "svd") != "svd":
        return f"{s['init']} init"
    return "SVD" if point["method"] in ("svd_training", "posthoc_svd") else "-"


def _own(point: dict) -> dict:
    """A point's settings without what varies by seed or machine."""
    return {k: v for k, v in point.get("settings", {}).items() if k not in ("seed", "threads", "device", "compile")}


def summary_table(points: list[dict], dense: dict, regime: str, levels, methods) -> list[str]:
    """One row per level, method and start: test and validation mean ± std over seeds, n, MACs,
    and the accuracy right after the cut to the level (before fine-tuning; "(r)" where BatchNorm
    statistics were re-estimated after the cut)."""
    lines = [f"Dense ResNet-20 ({dense['epochs']} epochs, n={dense['n']}): test {100 * dense['accuracy']:.2f}%, "
             f"{dense['macs'] / 1e6:.2f}M MACs. Regime: {regime}.", "",
             "| level | method | start | n | test top-1 (mean ± std) | val top-1 (mean ± std) | % of dense MACs "
             "| before fine-tune |", "|---|---|---|---|---|---|---|---|"]
    for level in levels:
        for method in methods:
            mine = [p for p in points if p["level"] == level and p["method"] == method]
            for start in sorted({start_of(p) for p in mine}):
                ps = [p for p in mine if start_of(p) == start]
                mixed = {json.dumps(_own(p), sort_keys=True) for p in ps}
                if len(mixed) > 1:  # seeds of one row must share every setting but the seed
                    raise SystemExit(f"{method} at {level} ({start}) pools points of different settings: "
                                     f"{sorted(mixed)[:2]}; rerun them or move the odd ones away")
                before = statistics.mean(100 * p["accuracy_before_finetune"] for p in ps)
                mark = " (r)" if all(p["settings"].get("recalibrate") for p in ps) else ""
                lines.append(f"| {level} | {method} | {start} | {len(ps)} | {mean_std([100 * p['accuracy'] for p in ps])} "
                             f"| {mean_std([100 * p['val_accuracy'] for p in ps])} "
                             f"| {100 * statistics.mean(p['macs'] for p in ps) / dense['macs']:.1f}% | {before:.2f}{mark} |")
    if recal := sorted({p["settings"]["recalibrate"] for p in points if p.get("settings", {}).get("recalibrate")}):
        lines += ["", f"(r): BatchNorm statistics re-estimated on {' / '.join(map(str, recal))} training batches "
                      "right after the cut (no gradient); unmarked: the uncut model's statistics."]
    own = [f"{m} {label} {value}" for m in methods for key, label in (("lr", "lr"), ("rank_score", "rank score"))
           for value in sorted({p["settings"][key] for p in points if p["method"] == m and key in p.get("settings", {})})]
    if own:
        span = "E_c and E_f" if regime == "pretrained" else "E"
        lines += ["", f"Settings of a method's own, chosen on validation (peak lr for {span}; the budget's lr and "
                      "the energy rule for the rest): " + ", ".join(own) + "."]
    if any(p["method"] == "svd_training" and p["settings"].get("schedule") == "one" for p in points):
        lines += ["", "SVD training under one schedule has no separate fine-tuning: its budget is one train "
                      "stage that ends at the level, so its 'before fine-tune' is its final accuracy."]
    return lines


def stages_table(points: list[dict]) -> list[str]:
    """Budget-driven SVD training through its stages, one row per point: the MACs pruning would
    keep at keep_energy when training ends (against the level asked for), then test accuracy after
    training, right after pruning and after fine-tuning, and the final validation accuracy."""
    lines = ["| level | start | seed | MACs at keep_energy after training | after training | right after pruning "
             "| final (test) | final (val) |", "|---|---|---|---|---|---|---|---|"]
    ordered = sorted((p for p in points if p["method"] == "svd_training"),
                     key=lambda p: (-float(p["level"].rstrip("%")), start_of(p), p["seed"]))
    for p in ordered:
        at = p.get("macs_at_threshold_trained")
        lines.append(f"| {p['level']} | {start_of(p)} | {p['seed']} | "
                     f"{'-' if at is None else f'{100 * at:.1f}%'} | {100 * p['accuracy_trained']:.2f} "
                     f"| {100 * p['accuracy_before_finetune']:.2f} | {100 * p['accuracy']:.2f} "
                     f"| {100 * p['val_accuracy']:.2f} |")
    return lines


def plot(points: list[dict], dense: dict, path: Path, levels, methods) -> None:
    """Accuracy against MACs per method (mean ± std over seeds), the dense model as a star."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        by_level = [[p for p in points if p["method"] == method and p["level"] == lv] for lv in levels]
        by_level = [ps for ps in by_level if ps]
        if not by_level:
            continue
        macs = [statistics.mean(p["macs"] for p in ps) / 1e6 for ps in by_level]
        acc = [statistics.mean(100 * p["accuracy"] for p in ps) for ps in by_level]
        err = [statistics.stdev(100 * p["accuracy"] for p in ps) if len(ps) > 1 else 0.0 for ps in by_level]
        ax.errorbar(macs, acc, yerr=err, fmt="o-", capsize=3, label=method)
    ax.scatter([dense["macs"] / 1e6], [100 * dense["accuracy"]], marker="*", s=150, c="k", label="dense", zorder=5)
    ax.set_xlabel("whole-model MACs (M)")
    ax.set_ylabel("CIFAR-10 top-1 (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_points(args) -> list[dict]:
    return read_points(sorted(record_dir(args).glob("*.json")))


def dense_summaries(args) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(record_dir(args).glob("dense*.json"))]


def measured_on(points: list[dict], previous: Path) -> str:
    """The day the newest point was measured (a report rebuilt later keeps it); points from
    before points carried a date fall back to the date of the result file they made."""
    dates = [p["date"] for p in points if p.get("date")]
    if len(dates) < len(points) and previous.is_file():
        dates.append(json.loads(previous.read_text()).get("date") or "")
    return max(dates, default="") or datetime.date.today().isoformat()


def rank_allocation(points: list[dict]) -> str:
    """How the record's SVD-form points chose their ranks (the rule each point's settings name)."""
    loss = sorted({p["method"] for p in points if p.get("settings", {}).get("rank_score") == "loss"})
    rest = sorted({p["method"] for p in points if p["method"] in SVD_METHODS} - set(loss))
    rule = "energy" if not loss else "loss importance" if not rest else f"energy; loss importance for {', '.join(loss)}"
    return f"prune(macs_budget): per-layer lower convex hull of (MACs, score lost); score: {rule}"


def write_results(args) -> None:
    points, denses = load_points(args), dense_summaries(args)
    if not points:  # never replace results by an empty table
        raise SystemExit(f"no finished points in {record_dir(args)}; nothing written")
    if not denses:  # the tables compare against the dense model
        message = (f"{len(points)} points in {record_dir(args)}, but no dense model yet: result files not written "
                   "(a run with --methods posthoc_svd or filter_pruning_l1 trains it)")
        if args.report_only:
            raise SystemExit(message)
        print(message)
        return
    name = RESULT[args.regime]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mean = lambda xs: statistics.mean(xs)  # noqa: E731
    dense = {"accuracy": mean(d["accuracy"] for d in denses), "macs": denses[0]["macs"], "n": len(denses),
             "val_accuracy": mean(d.get("val_accuracy") or 0.0 for d in denses),
             "epochs": args.dense_epochs if args.regime == "pretrained" else args.train_epochs,
             "command": "python benchmarks/compare.py (its dense stage): svdtrain run configs/cifar10_resnet20.yaml "
                        f"decompose.enabled=false epochs.train=<epochs> val_size={args.val_size} seed=<seed>"}
    e_c = args.compress_epochs if args.regime == "pretrained" else args.train_epochs
    previous = out / f"{name}.json"
    result = {
        "regime": args.regime,
        "budget": {"model": "resnet20",
                   "dataset": f"CIFAR-10 ({50000 - args.val_size} train / {args.val_size} validation / 10k test)",
                   "compress_epochs": e_c, "finetune_epochs": args.finetune_epochs, "batch_size": 128,
                   "optimizer": "SGD nesterov 0.9, wd 5e-4 (not on s)",
                   "schedule": (f"cosine from {args.lr} (E_c)" if args.regime == "pretrained" else
                                "one-cycle peak 0.2 (E)") + f", cosine from {args.finetune_lr} (E_f)",
                   "augmentation": "pad-4 random crop + horizontal flip", "label_smoothing": 0.1,
                   "rank_allocation": rank_allocation(points)},
        "dense": dense,
        "points": [{k: p.get(k) for k in ("method", "level", "seed", "macs", "accuracy", "val_accuracy",
                                          "accuracy_trained", "accuracy_before_finetune", "macs_at_threshold_trained",
                                          "params", "settings", "date",
                                          "budget_warning", "seconds")} | {"start": start_of(p)} for p in points],
        "machine": (json.loads(previous.read_text()).get("machine") if getattr(args, "report_only", False)
                    and previous.is_file() else None)  # a rebuilt report keeps the machine its points ran on
        or (torch.cuda.get_device_name() if args.device == "cuda" else
            f"{platform.machine()}, {args.threads} CPU threads") + f", torch {torch.__version__}",
        "date": measured_on(points, previous),
        "commands": commands.read_text().splitlines() if (commands := record_dir(args) / "commands.txt").exists() else [],
    }
    if args.regime == "scratch" and previous.is_file():  # the fixed-strength comparison before this one
        old = json.loads(previous.read_text())
        earlier = old.get("earlier") if "regime" in old else {k: old.get(k) for k in ("budget", "dense", "points", "date")}
        if earlier:
            result["earlier"] = earlier
    table = summary_table(points, dense, args.regime, LEVELS, METHODS)  # first: it may refuse the points
    if any(p["method"] == "svd_training" for p in points):
        table += ["", "SVD training through its stages (test top-1, %):", "", *stages_table(points)]
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(table) + "\n")
    plot(points, dense, out / f"{name}.png", LEVELS, METHODS)
    print("\n".join(table))


def main(argv=None):
    p = argparse.ArgumentParser(description="Print the stages table of SVD-training points (JSON files or folders of them).")
    p.add_argument("paths", nargs="+", type=Path)
    args = p.parse_args(argv)
    files = [f for path in args.paths for f in (sorted(path.glob("*.json")) if path.is_dir() else [path])]
    print("\n".join(stages_table(read_points(files))))


if __name__ == "__main__":
    main()
