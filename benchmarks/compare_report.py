"""The tables and the plot of benchmarks/compare.py's result files, from its points."""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_points(files) -> list[dict]:
    """The point JSON files of a record (its dense summaries and budget.json left out)."""
    return [json.loads(f.read_text()) for f in files if not f.name.startswith(("dense", "budget"))]


def mean_std(values: list[float]) -> str:
    """'mean ± std' in points of top-1 (the std only where there is more than one value)."""
    std = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{std}"


def summary_table(points: list[dict], dense: dict, regime: str, levels, methods) -> list[str]:
    """One row per level and method: test and validation mean ± std over seeds, n, MACs, and the
    accuracy right after the cut to the level (before fine-tuning)."""
    lines = [f"Dense ResNet-20 ({dense['epochs']} epochs, n={dense['n']}): test {100 * dense['accuracy']:.2f}%, "
             f"{dense['macs'] / 1e6:.2f}M MACs. Regime: {regime}.", "",
             "| level | method | n | test top-1 (mean ± std) | val top-1 (mean ± std) | % of dense MACs | before fine-tune |",
             "|---|---|---|---|---|---|---|"]
    for level in levels:
        for method in methods:
            ps = [p for p in points if p["level"] == level and p["method"] == method]
            if not ps:
                continue
            before = statistics.mean(100 * p["accuracy_before_finetune"] for p in ps)
            lines.append(f"| {level} | {method} | {len(ps)} | {mean_std([100 * p['accuracy'] for p in ps])} "
                         f"| {mean_std([100 * p['val_accuracy'] for p in ps])} "
                         f"| {100 * statistics.mean(p['macs'] for p in ps) / dense['macs']:.1f}% | {before:.2f} |")
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
    lines = ["| level | init | seed | MACs at keep_energy after training | after training | right after pruning "
             "| final (test) | final (val) |", "|---|---|---|---|---|---|---|---|"]
    ordered = sorted((p for p in points if p["method"] == "svd_training"),
                     key=lambda p: (-float(p["level"].rstrip("%")), p["settings"]["init"], p["seed"]))
    for p in ordered:
        at = p.get("macs_at_threshold_trained")
        lines.append(f"| {p['level']} | {p['settings']['init']} | {p['seed']} | "
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Print the stages table of SVD-training points (JSON files or folders of them).")
    p.add_argument("paths", nargs="+", type=Path)
    args = p.parse_args(argv)
    files = [f for path in args.paths for f in (sorted(path.glob("*.json")) if path.is_dir() else [path])]
    print("\n".join(stages_table(read_points(files))))


if __name__ == "__main__":
    main()
