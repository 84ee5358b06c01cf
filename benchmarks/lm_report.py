"""The language-model benchmark's report (benchmarks/lm.py): the table of points and the targets at 60%,
means over seeds where a point has more than one."""
from __future__ import annotations

METHODS = ("svd", "asvd", "svdllm", "svd_training", "torchao_pat")


def report(r: dict) -> str:
    d = r["dense"]
    lines = ["# Byte-level LM on pycode: compression of the decoder's Linear layers", "",
             f"{r['machine']}, torch {r['torch']}, transformers {r['transformers']}, {r['date']}. Commands (each "
             "adds its points to the same file): " + "; ".join(f"`{c}`" for c in r.get("commands", [r.get("command")])), "",
             f"Dense: {d['params']:,} parameters ({d['decomposable_params']:,} decomposable), {d['steps']} steps: "
             f"val ppl {d['val_ppl']:.4f}, test ppl {d['test_ppl']:.4f}, {d['bpb']:.4f} bits per byte (test).", "",
             "params: deployed parameters of the decomposable layers / dense; MACs: whole model / dense "
             "(lm_head and attention products included). Perplexity per byte.", "",
             "| method | level | fine-tune steps | seed | params | MACs | val ppl | test ppl | test bits/byte |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(r["points"], key=lambda p: (-p["level"], p["finetune_steps"], METHODS.index(p["method"]), p["seed"])):
        head = f"| {p['method']} | {p['level']:.0%} | {p['finetune_steps']} | {p['seed']} |"
        if "skipped" in p:
            lines.append(f"{head} skipped: {p['skipped']} |||||")
        else:
            lines.append(f"{head} {p['params_ratio']:.3f} | {p['macs_ratio']:.3f} | {p['val_ppl']:.4f} | "
                         f"{p['test_ppl']:.4f} | {p['test_bpb']:.4f} |")
    lines += ["", "Exact starts (relative perplexity change before any cut, val): "
              + ", ".join(f"{k} {v:.1e}" for k, v in r.get("start_gap", {}).items()), ""]
    lines += targets(r)
    return "\n".join(lines) + "\n"


def mean_std(xs: list) -> str:
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{m:.4f} +- {sd:.4f} (n={len(xs)})" if len(xs) > 1 else f"{m:.4f}"


def targets(r: dict) -> list[str]:
    """The targets at 60% (benchmarks/README.md), where the points exist; means over seeds."""
    test = {}
    for p in r["points"]:
        if "skipped" not in p:
            test.setdefault((p["method"], p["level"], p["finetune_steps"]), []).append(p["test_ppl"])
    mean = {k: sum(v) / len(v) for k, v in test.items()}
    out, ft = [], r["settings"].get("finetune_steps_run", [])
    for steps in ft:
        ours = ("svd_training", 0.6, steps)
        others = [k for k in test if k[1:] == (0.6, steps) and k != ours]
        if ours in test and others:
            best = min(others, key=mean.get)
            verdict = "met" if mean[ours] <= mean[best] else "missed"
            out.append(f"- Target, 60% with {steps} fine-tune steps: SVD training's test ppl <= every other method's: "
                       f"**{verdict}** ({mean_std(test[ours])} vs {best[0]} {mean_std(test[best])}).")
    cut = test.get(("svdllm", 0.6, 0))
    if cut:
        ratio = mean[("svdllm", 0.6, 0)] / r["dense"]["test_ppl"]
        out.append(f"- Target, whitened cut (svdllm) at 60% without fine-tuning within 15% of dense perplexity: "
                   f"**{'met' if ratio <= 1.15 else 'missed'}** ({ratio - 1:+.1%}).")
    return out
