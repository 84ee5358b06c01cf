"""report.md and its plots for a finished run."""
from __future__ import annotations

from pathlib import Path


def _fmt_macs(m) -> str:
    return "-" if m is None else f"{m / 1e6:.2f}M"


def _fmt_acc(a) -> str:
    return "-" if a is None else f"{100 * a:.2f}%"


def write_report(out: Path, summary: dict, metrics: list[dict], info: dict, cfg: dict) -> Path:
    """Write out/report.md with a results table and PNG plots; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    # 1. Accuracy and MACs-at-threshold through the stages.
    epochs = [m for m in metrics if "test_accuracy" in m]
    if epochs:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        xs = range(1, len(epochs) + 1)
        ax.plot(xs, [100 * m["test_accuracy"] for m in epochs], "o-", label="test accuracy (%)")
        ax.set_xlabel("epoch (all stages)")
        ax.set_ylabel("test accuracy (%)")
        for i, m in enumerate(epochs):
            if i == 0 or epochs[i - 1]["stage"] != m["stage"]:
                ax.axvline(i + 0.5, color="grey", lw=0.5)
                ax.text(i + 0.6, ax.get_ylim()[0], m["stage"], fontsize=8, va="bottom", rotation=90)  # no overlap
        macs = [(i + 1, m.get("macs_at_threshold", m.get("macs"))) for i, m in enumerate(epochs)]
        macs = [(x, v) for x, v in macs if v is not None]
        if macs:
            ax2 = ax.twinx()
            ax2.plot([x for x, _ in macs], [100 * v / summary["dense_macs"] for _, v in macs], "s--",
                     color="tab:red", label="MACs at threshold (% of dense)")
            ax2.set_ylabel("MACs (% of dense)", color="tab:red")
        ax.set_title("Accuracy and MACs through the stages")
        fig.tight_layout()
        fig.savefig(out / "stages.png", dpi=110)
        plt.close(fig)
        plots.append(("Accuracy and MACs through the stages", "stages.png"))
    # 2. Singular-value spectra per layer, before/after sparsity training.
    before, after = info.get("spectra_before"), info.get("spectra_after")
    if before and after:
        names = list(after)
        cols = 4
        rows = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for s, label in ((before[name], "before"), (after[name], "after")):
                top = max(s[0], 1e-30)
                ax.semilogy(range(1, len(s) + 1), [max(v / top, 1e-8) for v in s], label=label)
            k = summary["ranks"].get(name)
            if k:
                ax.axvline(k, color="k", lw=0.7, ls=":")
            ax.set_title(name, fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        axes[0][0].legend(fontsize=7)
        fig.suptitle("Singular values / largest, before and after sparsity training (dotted: kept rank)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "spectra.png", dpi=100)
        plt.close(fig)
        plots.append(("Singular-value spectra per layer", "spectra.png"))
    # 3. Budget-driven training: MACs at threshold and strength per epoch against the target.
    steered = [m for m in metrics if m.get("stage") == "train" and "strength" in m and "macs_at_threshold" in m]
    target = cfg.get("regularizer", {}).get("target_macs") or 0.0
    if steered and target:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        xs = [m["epoch"] for m in steered]
        ax.plot(xs, [100 * m["macs_at_threshold"] / summary["dense_macs"] for m in steered], "o-",
                label="MACs at keep_energy")
        ax.plot(xs, [100 * m["macs_schedule"] / summary["dense_macs"] for m in steered if "macs_schedule" in m],
                ":", color="grey", label="schedule")
        ax.axhline(100 * target, color="k", lw=0.8, ls="--", label="target")
        ax.set_xlabel("train epoch")
        ax.set_ylabel("% of dense MACs")
        ax2 = ax.twinx()
        ax2.semilogy(xs, [m["strength"] for m in steered], "s--", color="tab:red", label="strength")
        ax2.set_ylabel("sparsity strength", color="tab:red")
        ax.legend(fontsize=8, loc="upper right")
        ax.set_title("Budget-driven training")
        fig.tight_layout()
        fig.savefig(out / "budget.png", dpi=110)
        plt.close(fig)
        plots.append(("Budget-driven training", "budget.png"))
    # 4. Rank per layer.
    ranks = summary.get("ranks") or {}
    shapes = info.get("layer_shapes", {})
    if ranks:
        fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(ranks)), 3.2))
        names = list(ranks)
        full = [min(shapes.get(n, [0, 0])) for n in names]
        ax.bar(range(len(names)), full, color="lightgrey", label="full rank")
        ax.bar(range(len(names)), [ranks[n] for n in names], label="kept rank")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
        ax.legend(fontsize=8)
        ax.set_title("Rank per layer")
        fig.tight_layout()
        fig.savefig(out / "ranks.png", dpi=110)
        plt.close(fig)
        plots.append(("Rank per layer", "ranks.png"))

    d = summary
    lines = [
        f"# svdtrain run: {cfg['model']} on {cfg['dataset']}",
        "",
        "| stage | top-1 | MACs | % of dense MACs | params |",
        "|---|---|---|---|---|",
        f"| dense model | {_fmt_acc(d.get('dense_accuracy'))} | {_fmt_macs(d['dense_macs'])} | 100% | {d['dense_params']:,} |",
    ]
    if d.get("accuracy_trained") is not None:
        lines.append(f"| trained | {_fmt_acc(d['accuracy_trained'])} | - | - | - |")
    if d.get("accuracy_pruned") is not None:
        lines.append(f"| pruned, before fine-tuning | {_fmt_acc(d['accuracy_pruned'])} | {_fmt_macs(info.get('macs_pruned'))} "
                     f"| {100 * info.get('macs_pruned', 0) / d['dense_macs']:.1f}% | - |")
    lines.append(f"| final (exported) | {_fmt_acc(d['accuracy'])} | {_fmt_macs(d['macs'])} | {100 * d['macs_ratio']:.1f}% "
                 f"| {d['params']:,} |")
    lines += ["", "MACs are multiply-accumulates of one forward pass of one image (whole model).",
              f"Training time: {d['train_seconds']:.0f} s.", ""]
    if d.get("latency_budget"):
        lines += [f"Latency at batch {d['latency_batch']} on this machine (interleaved runs of the exported model "
                  f"and the dense one): {100 * d['latency_ratio']:.1f}% of dense, budget {100 * d['latency_budget']:.1f}%.",
                  ""]
    if info.get("budget_warning"):
        lines += [f"**Warning:** {info['budget_warning']}.", ""]
    if ranks:
        lines += ["Ranks kept: " + ", ".join(f"{n}={k}" for n, k in ranks.items()), ""]
    for title, fname in plots:
        lines += [f"## {title}", "", f"![{title}]({fname})", ""]
    lines += ["## Config", "", "```yaml", _yaml(cfg), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _yaml(cfg: dict) -> str:
    import yaml
    return yaml.safe_dump(cfg, sort_keys=False).rstrip()
