"""Latency of compact models of real size against their dense originals, on the backends
people deploy with (CPU).

Models nobody here wrote, built from their published configurations with random weights
(latency does not depend on the values) by Hugging Face `transformers`: ViT-B/16 at 224,
BERT-base at sequence 128, a Llama-style decoder of about 100M parameters (prefill of 512
tokens; one-token decode with a KV cache of 512), ResNet-50 at 224. Compact models:
`decompose(init="svd")`, `prune(macs_budget=level)`, `export()`. Backends: eager PyTorch (the
dense model on its own fused paths), `torch.compile` (inductor, each model compiled in its warm-up
run; `--backends inductor`) and ONNX Runtime (`export_onnx` of each; outputs checked against
PyTorch). Dense and compact are timed in one process, interleaved: per repetition one
run of each, after a warm-up; the median decides. MACs ratios are svdtrain's counts of the
timed model (equal to PyTorch's FLOP counter's on these models; tests/test_hf.py).

    python benchmarks/deploy.py --threads 2 --reps 5
Results: results/deploy_real.json (+ .md); points already there are kept (resumable).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import svdtrain

HERE = Path(__file__).resolve().parent
LEVELS = {"50%": 0.5, "33%": 1 / 3}


def build(name: str):
    """(model, inputs of batch b, what is timed) for a model name."""
    import transformers as T
    if name == "vit_b16":
        return T.ViTForImageClassification(T.ViTConfig(num_labels=1000)).eval(), \
            lambda b: (torch.randn(b, 3, 224, 224),)
    if name == "bert_base":
        return T.BertForSequenceClassification(T.BertConfig()).eval(), \
            lambda b: (torch.randint(0, 30000, (b, 128)),)
    if name == "llama_100m":
        cfg = T.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                            num_key_value_heads=12, vocab_size=32000, max_position_embeddings=1024)
        return T.LlamaForCausalLM(cfg).eval(), lambda b: (torch.randint(0, 32000, (b, 512)),)
    if name == "resnet50":
        return T.ResNetForImageClassification(T.ResNetConfig()).eval(), lambda b: (torch.randn(b, 3, 224, 224),)
    raise ValueError(name)


class Logits(torch.nn.Module):
    """The model's logits as one tensor (what ONNX export and timing take)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.kw = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}

    def forward(self, x):
        return self.model(x, **self.kw).logits


def decode_step(model, prompt):
    """A callable running one-token decode after `prompt` (its KV cache built once, cropped
    back after each run so every run sees the same cache length)."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
    cache, token, length = out.past_key_values, out.logits[:, -1:].argmax(-1), prompt.shape[1]

    def step():
        logits = model(token, past_key_values=cache, use_cache=True).logits
        cache.crop(length - cache.get_seq_length())  # drop the token just added
        return logits
    return step


def matmul_weights(model) -> int:
    """Elements of the weights of every Linear and Conv2d (embeddings are looked up, not read whole)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def interleaved(fns: dict, reps: int) -> dict:
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for f in fns.values():
            f()
        for _ in range(reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def compiled(model, backend: str):
    """The model as the backend runs it: eager as is, inductor through torch.compile (compiled on
    its first call, the warm-up of `interleaved`)."""
    return torch.compile(model) if backend == "inductor" else model


def ort_session(module, inputs, path):
    import onnxruntime as ort
    svdtrain.export_onnx(module, inputs, path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    return lambda *xs: s.run(None, {n: x.numpy() for n, x in zip(names, xs)})[0]


def latency_budget_point(name: str, dense, make_inputs, budget: float, batch: int, reps: int) -> dict:
    """`prune(latency_budget=budget)` on this machine at `batch` (eager), then the shipped model
    timed against the dense one, interleaved: the measured latency ratio against the budget."""
    x = make_inputs(batch)
    fwd = Logits(dense)
    svd = svdtrain.decompose(copy.deepcopy(dense), init="svd", example_inputs=make_inputs(1))
    t0 = time.perf_counter()
    svdtrain.prune(svd, latency_budget=budget, example_inputs=x)
    seconds = time.perf_counter() - t0
    compact = svdtrain.export(svd, example_inputs=x).eval()
    times = interleaved({"dense": lambda: fwd(*x), "compact": lambda: Logits(compact)(*x)}, reps)
    ratio = times["compact"] / times["dense"]
    return {"model": name, "phase": "prefill" if name == "llama_100m" else "forward", "backend": "eager",
            "batch": batch, "latency_budget": budget, "latency_ratio": round(ratio, 4),
            "within_10pct": abs(ratio - budget) <= 0.1 * budget, "prune_seconds": round(seconds, 1),
            "macs_ratio": round(svdtrain.count_macs(compact, example_inputs=x) /
                                svdtrain.count_macs(dense, example_inputs=x), 4),
            "dense_ms": round(1e3 * times["dense"], 2), "compact_ms": round(1e3 * times["compact"], 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit_b16", "bert_base", "llama_100m", "resnet50"])
    p.add_argument("--backends", nargs="+", default=["eager", "onnxruntime"],
                   choices=("eager", "inductor", "onnxruntime"))
    p.add_argument("--methods", nargs="+", default=["svd", "torch_pruning"], choices=("svd", "torch_pruning"))
    p.add_argument("--batches", nargs="*", type=int, help="only these batch sizes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results" / "deploy_real.json"))
    p.add_argument("--report-only", action="store_true", help="rebuild the Markdown from the JSON")
    p.add_argument("--latency-budgets", nargs="*", type=float, default=[],
                   help="instead of the MACs levels: prune(latency_budget=B) at batch --budget-batch, eager")
    p.add_argument("--budget-batch", type=int, default=8)
    args = p.parse_args(argv)
    if args.report_only:
        result = json.loads(Path(args.out).read_text())
        Path(args.out).with_suffix(".md").write_text(markdown(result))
        plot(result, Path(args.out).with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    logging.getLogger("svdtrain").setLevel(logging.ERROR)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"points": []}
    done = {(q["model"], q["backend"], q["batch"], q["phase"], q["method"]) for q in result["points"]}
    if args.latency_budgets:
        budgets = result.setdefault("latency_budget_points", [])
        for name in args.models:
            for b in args.latency_budgets:
                if any(q["model"] == name and q["latency_budget"] == b and q["batch"] == args.budget_batch
                       for q in budgets):
                    continue
                torch.manual_seed(0)
                dense, make_inputs = build(name)
                budgets.append(latency_budget_point(name, dense, make_inputs, b, args.budget_batch, args.reps))
                result["latency_budget_command"] = (f"python benchmarks/deploy.py --threads {args.threads} --reps "
                                                    f"{args.reps} --latency-budgets {' '.join(map(str, args.latency_budgets))}"
                                                    f" --budget-batch {args.budget_batch}")
                stamp(result, args)
                out.write_text(json.dumps(result, indent=1) + "\n")
                print(json.dumps(budgets[-1]), flush=True)
        out.with_suffix(".md").write_text(markdown(result))
        return
    batches = {"vit_b16": [1, 8], "bert_base": [1, 8], "llama_100m": [1, 8], "resnet50": [1, 8, 32]}
    for name in args.models:
        torch.manual_seed(0)
        dense, make_inputs = build(name)
        small = make_inputs(1)
        models = {"dense": dense}
        macs = {"dense": svdtrain.count_macs(dense, example_inputs=small)}
        for method in args.methods:
            for level, frac in LEVELS.items():
                models[method, level] = compact_model(method, name, dense, small, frac)
                macs[method, level] = svdtrain.count_macs(models[method, level], example_inputs=small)
        weights = {k: matmul_weights(m) for k, m in models.items()}  # what a decode step reads
        phases = ["prefill", "decode"] if name == "llama_100m" else ["forward"]
        for phase in phases:
            for batch in batches[name]:
                if args.batches and batch not in args.batches:
                    continue
                x = make_inputs(batch)
                for backend in args.backends:
                    todo = [m for m in args.methods if (name, backend, batch, phase, m) not in done]
                    if not todo or (phase == "decode" and backend != "eager"):
                        continue
                    fns, check = {}, {}
                    timed = {k: m for k, m in models.items() if k == "dense" or k[0] in todo}
                    with tempfile.TemporaryDirectory() as tmp:
                        for i, (key, m) in enumerate(timed.items()):
                            if phase == "decode":
                                fns[key] = decode_step(m, x[0][:, :512])
                            elif backend in ("eager", "inductor"):
                                fns[key] = (lambda m=compiled(m, backend): m(*x))
                            else:
                                run = ort_session(Logits(m), x, Path(tmp) / f"{i}.onnx")
                                with torch.no_grad():
                                    check[key] = float((torch.from_numpy(run(*x)) - Logits(m)(*x)).abs().max())
                                fns[key] = (lambda run=run: run(*x))
                        times = interleaved(fns, args.reps)
                    for method in todo:
                        for level in LEVELS:
                            key = (method, level)
                            m_ratio = macs[key] / macs["dense"]
                            l_ratio = times[key] / times["dense"]
                            result["points"].append({
                                "model": name, "phase": phase, "backend": backend, "batch": batch, "level": level,
                                "method": method, "macs_ratio": round(m_ratio, 4), "latency_ratio": round(l_ratio, 4),
                                "speedup": round(1 / l_ratio, 3), "macs_reduction": round(1 / m_ratio, 3),
                                "speedup_per_macs_reduction": round(m_ratio / l_ratio, 3),
                                "dense_ms": round(1e3 * times["dense"], 2), "compact_ms": round(1e3 * times[key], 2),
                                "max_abs_diff_onnx": check.get(key),
                                **({"weights_ratio": round(weights[key] / weights["dense"], 4),
                                    "speedup_per_weights_reduction": round(weights[key] / weights["dense"] / l_ratio, 3)}
                                   if phase == "decode" else {})})
                    stamp(result, args)
                    out.write_text(json.dumps(result, indent=1) + "\n")
                    print(json.dumps(result["points"][-1]), flush=True)
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))


def stamp(result: dict, args) -> None:
    """Machine, versions, date and the commands that made the points."""
    result.update(machine=f"{platform.machine()}, {args.threads} threads, no GPU was available for this run",
                  torch=torch.__version__, date=datetime.date.today().isoformat(),
                  command=f"python benchmarks/deploy.py --threads {args.threads} --reps {args.reps}")
    run = "python benchmarks/deploy.py " + " ".join(sys.argv[1:])
    if run not in result.setdefault("commands", []):
        result["commands"].append(run)


def compact_model(method: str, name: str, dense, small, frac: float):
    """The compact model of a method at a MACs fraction: svdtrain's (`decompose(init="svd")`,
    `prune(macs_budget=...)`, `export()`), or Torch-Pruning's channel pruning (tp_anchor.py)."""
    if method == "torch_pruning":
        from tp_anchor import torch_pruned  # benchmarks/ is on sys.path when run as a script
        return torch_pruned(name, dense, small, frac)[0].eval()
    svd = svdtrain.decompose(copy.deepcopy(dense), init="svd", example_inputs=small)
    svdtrain.prune(svd, macs_budget=frac, example_inputs=small)
    return svdtrain.export(svd, example_inputs=small).eval()


def best_of_each_side(points: list[dict]) -> list[dict]:
    """Per (model, phase, batch, level, method): the dense model on its fastest backend against
    the compact model on its fastest, as the deployment targets are stated; the dense times are
    those of the method's own runs (each timed interleaved with its compact models). Where the
    two sides' fastest backends differ, the ratio combines the timings of two runs (rows with
    dense_backend != compact_backend), not one interleaved pair."""
    dense = {}
    for q in points:
        key = (q["model"], q["phase"], q["batch"], q["method"])
        if q["dense_ms"] < dense.get(key, (float("inf"),))[0]:
            dense[key] = (q["dense_ms"], q["backend"])
    out = {}
    for q in points:
        key = (q["model"], q["phase"], q["batch"], q["level"], q["method"])
        row = out.setdefault(key, {"compact_ms": float("inf"), "macs_ratio": q["macs_ratio"]})
        if q["compact_ms"] < row["compact_ms"]:
            row.update(compact_ms=q["compact_ms"], compact_backend=q["backend"])
    rows = []
    for (model, phase, batch, level, method), r in out.items():
        d_ms, d_backend = dense[model, phase, batch, method]
        ratio = r["compact_ms"] / d_ms
        rows.append({"model": model, "phase": phase, "batch": batch, "level": level, "method": method, **r,
                     "dense_ms": d_ms, "dense_backend": d_backend,
                     "latency_ratio": ratio, "speedup_per_macs_reduction": r["macs_ratio"] / ratio})
    return sorted(rows, key=lambda r: (r["model"], r["phase"], r["batch"], r["level"] != "50%", r["method"]))


def plot(result: dict, path: Path) -> None:
    """Speed-up / MACs reduction of each method at each (model, phase, batch), each side on its
    fastest backend, one panel per level; the dashed line is 1 (speed-up equal to the MACs reduction)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = best_of_each_side(result["points"])
    cases = sorted({(r["model"], r["phase"], r["batch"]) for r in rows})
    methods = sorted({r["method"] for r in rows})
    fig, axes = plt.subplots(1, len(LEVELS), figsize=(11, 3.6), sharey=True)
    for ax, level in zip(axes, LEVELS):
        for i, method in enumerate(methods):
            got = {(r["model"], r["phase"], r["batch"]): r["speedup_per_macs_reduction"] for r in rows
                   if r["level"] == level and r["method"] == method}
            xs = [j + (i - (len(methods) - 1) / 2) * 0.38 for j in range(len(cases))]
            ax.bar(xs, [got.get(c, 0) for c in cases], width=0.38, label=method)
        ax.axhline(1.0, color="k", lw=0.7, ls="--")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{m} {p} b{b}" for m, p, b in cases], rotation=75, fontsize=7)
        ax.set_title(f"{level} of dense MACs", fontsize=9)
    axes[0].set_ylabel("speed-up / MACs reduction")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"CPU latency, each side on its fastest backend ({result['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = [f"Measured {result['date']}, {result['machine']}, torch {result['torch']}: `{result['command']}`.", "",
             "Each side on its fastest backend:", "",
             "| model | phase | batch | level | method | MACs ratio | dense ms (backend) | compact ms (backend) | speed-up / MACs reduction |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in best_of_each_side(result["points"]):
        lines.append(f"| {r['model']} | {r['phase']} | {r['batch']} | {r['level']} | {r['method']} | {r['macs_ratio']:.3f} | "
                     f"{r['dense_ms']:.1f} ({r['dense_backend']}) | {r['compact_ms']:.1f} ({r['compact_backend']}) | "
                     f"**{r['speedup_per_macs_reduction']:.2f}** |")
    decode = [q for q in result["points"] if "weights_ratio" in q]
    if decode:
        lines += ["", "Decode (one token per sequence, KV cache of 512, eager): speed-up against the reduction in "
                  "weights read per step:", "", "| batch | level | method | weights ratio | latency ratio (dense ms) | "
                  "speed-up / weights reduction |", "|---|---|---|---|---|---|"]
        lines += [f"| {q['batch']} | {q['level']} | {q['method']} | {q['weights_ratio']:.3f} | {q['latency_ratio']:.3f} "
                  f"({q['dense_ms']:.1f}) | **{q['speedup_per_weights_reduction']:.2f}** |"
                  for q in sorted(decode, key=lambda q: (q["batch"], q["level"] != "50%", q["method"]))]
    budgets = result.get("latency_budget_points", [])
    if budgets:
        lines += ["", "Latency budgets (`prune(latency_budget=B)`: per-layer times measured here, checked on the "
                  "whole model; eager; `deploy.py --latency-budgets B --budget-batch N`, the commands in the JSON): "
                  "measured latency ratio of the shipped model against the dense model as built, target within "
                  "+-10% of B:", "",
                  "| model | batch | budget | measured latency ratio (dense ms) | MACs ratio | within 10% | prune s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {q['model']} | {q['batch']} | {q['latency_budget']:.2f} | {q['latency_ratio']:.3f} "
                  f"({q['dense_ms']:.1f}) | {q['macs_ratio']:.3f} | {'met' if q['within_10pct'] else '**missed**'} | "
                  f"{q['prune_seconds']:.0f} |" for q in budgets]
    lines += ["", "Every backend:", "",
              "| model | phase | backend | batch | level | method | MACs ratio | latency ratio (dense ms) | speed-up / MACs reduction | ONNX max abs diff |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for q in result["points"]:
        diff = "-" if q["max_abs_diff_onnx"] is None else f"{q['max_abs_diff_onnx']:.1e}"
        lines.append(f"| {q['model']} | {q['phase']} | {q['backend']} | {q['batch']} | {q['level']} | {q['method']} | {q['macs_ratio']:.3f} "
                     f"| {q['latency_ratio']:.3f} ({q['dense_ms']:.1f}) | {q['speedup_per_macs_reduction']:.2f} | {diff} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    np.random.seed(0)
    main()
