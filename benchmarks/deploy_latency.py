"""Inference latency of the exported compact models against the dense model (CPU).

Reads the seed's points of `compare.py --regime scratch` and times, against the dense model, with fixed
threads (warm-up, then the median of repeated runs, all models interleaved within each
repetition so drift hits all alike), at batch 1 and batch 128:

  export "macs"     the compact.pt2 the comparison wrote (torch.export, loaded the way a
                    user would: `torch.export.load(path).module()`, no svdtrain needed):
                    each SVD layer as its factor pair or dense layer, whichever has fewer MACs;
  export "latency"  the same trained SVD-form model re-exported with
                    svdtrain.export(choose="latency"): per layer the fastest of dense, factor
                    pair and pair with its rank zero-padded to a multiple of 8, timed on this
                    machine at batch 128 (the dense fallback per layer, by measured time);

each in the default (NCHW) and the channels_last memory format (dense timed in the same
format). MACs ratios are those of the model actually timed.

    python benchmarks/deploy_latency.py --threads 2 --reps 30 --reps-b128 8
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import svdtrain
from compare_report import read_points  # benchmarks/ is on sys.path when run as a script
from svdtrain.models import build_model

HERE = Path(__file__).resolve().parent
SHAPE = (1, 3, 32, 32)
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def time_models(models: dict, batch: int, reps: int, warmup: int) -> dict:
    """Median seconds per forward of each (model, memory format) at `batch`."""
    x = torch.randn(batch, 3, 32, 32)
    inputs = {fmt: x.contiguous(memory_format=mf) for fmt, mf in FORMATS.items()}
    times = {k: [] for k in models}
    with torch.inference_mode():
        for i in range(warmup + reps):
            for key, m in models.items():
                xi = inputs[key[-1]]
                t0 = time.perf_counter()
                m(xi)
                if i >= warmup:
                    times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def label(point: dict) -> str:
    return point["method"]


def load_state(path: Path) -> dict:
    # fit() checkpoints written before the RNG state became plain tensors hold numpy arrays;
    # allow exactly those types (these are this benchmark's own files).
    with torch.serialization.safe_globals([np._core.multiarray._reconstruct, np.ndarray, np.dtype,
                                           np.dtypes.UInt32DType]):
        return torch.load(path, map_location="cpu", weights_only=True)


def svd_form(point: dict):
    """The point's trained SVD-form model, or None when the point is a plain model."""
    run_dir = Path(point["run_dir"])
    if (run_dir / "model_state.pt").is_file():
        state = load_state(run_dir / "model_state.pt")
    elif (run_dir / "finetune.pt").is_file():
        state = load_state(run_dir / "finetune.pt")["model"]
    else:
        return None
    if not any(k.endswith(".active") for k in state):
        return None
    model = svdtrain.decompose(build_model("resnet20", 10), mode="channel", init="random")
    model.load_state_dict(state)  # restores the pruning masks too
    return model.eval()


def runs(specs: list[str], seed: int) -> list[dict]:
    """Points for named run directories: NAME=DIR, DIR holding compact.pt2 and summary.json."""
    points = []
    for spec in specs:
        name, _, run_dir = spec.partition("=")
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        if not (Path(run_dir) / "compact.pt2").is_file():
            raise SystemExit(f"{run_dir}: no compact.pt2 (an unfinished run?)")
        points.append({"method": name, "level": f"{100 * summary['macs'] / summary['dense_macs']:.0f}%", "seed": seed,
                       "run_dir": run_dir, "macs": summary["macs"], "accuracy": summary["accuracy"]})
    return points


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(HERE / "work" / "scratch"), help="compare.py's work directory (its dense_s<seed>)")
    p.add_argument("--record", default=str(HERE / "results" / "compare_cifar10_points"),
                   help="compare.py's record of points, whose run directories (under --work) are timed")
    p.add_argument("--seed", type=int, default=0, help="whose points to time")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30, help="repetitions at batch 1")
    p.add_argument("--reps-b128", type=int, default=10, help="repetitions at batch 128")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", nargs="+", metavar="NAME=DIR", help="time these run directories (svdtrain run or "
                   "compare.py points: compact.pt2, summary.json) instead of --record's points")
    p.add_argument("--dense", help="with --runs: the dense run directory (its compact.pt2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense_run = Path(args.dense) if args.dense else Path(args.work) / f"dense_s{args.seed}"
    if not (dense_run / "compact.pt2").is_file():
        raise SystemExit(f"no dense model in {dense_run}: run benchmarks/compare.py --regime scratch first")
    dense = {"macs": json.loads((dense_run / "summary.json").read_text())["macs"], "compact": str(dense_run / "compact.pt2")}
    points = runs(args.runs, args.seed) if args.runs else [
        pt for pt in read_points(sorted(Path(args.record).glob("*.json")))
        if pt["seed"] == args.seed and (Path(pt["run_dir"]) / "compact.pt2").is_file()]
    for pt in points:
        pt["compact"] = str(Path(pt["run_dir"]) / "compact.pt2")

    # (name, export) -> plain model; name is method + Hoyer tag + level
    # MACs of the .pt2 exports are their points' (export "macs" builds exactly what
    # count_macs(cost="deploy") counts); the latency exports are counted as built.
    plain, macs = {}, {("dense", "-"): dense["macs"]}
    plain["dense", "-"] = torch.export.load(dense["compact"]).module()
    rows = []
    tmp = tempfile.mkdtemp(prefix="svdtrain-latency-")
    for pt in points:
        name = f"{label(pt)} {pt['level']}"
        rows.append((name, pt))
        plain[name, "macs"] = torch.export.load(pt["compact"]).module()
        macs[name, "macs"] = pt["macs"]
        model = svd_form(pt)
        if model is not None:
            for fmt in FORMATS:
                key = (name, f"latency/{fmt}")
                compact = svdtrain.export(model, input_shape=(128,) + SHAPE[1:], choose="latency",
                                          channels_last=fmt != "nchw")
                macs[key] = svdtrain.count_macs(compact, SHAPE)
                # shipped and loaded like the .pt2 files above, so both run the same way
                path = Path(tmp) / f"{len(plain)}.pt2"
                svdtrain.export_program(compact, torch.zeros((2,) + SHAPE[1:]), path)
                plain[key] = torch.export.load(str(path)).module()
    models = {}
    for (name, export), m in plain.items():
        for fmt, mf in FORMATS.items():
            if export.startswith("latency/") and export != f"latency/{fmt}":
                continue  # each latency export is timed in the format it was chosen for
            models[name, export, fmt] = copy.deepcopy(m).to(memory_format=mf)
    b1 = time_models(models, 1, args.reps, args.warmup)
    b128 = time_models(models, 128, args.reps_b128, args.warmup)
    shutil.rmtree(tmp, ignore_errors=True)

    variants = []
    for name, pt in rows:
        for (n, export, fmt) in models:
            if n != name:
                continue
            d = ("dense", "-", fmt)
            key = (name, export, fmt)
            variants.append({"method": pt["method"], "label": label(pt), "level": pt["level"], "run_dir": pt["run_dir"],
                             "accuracy": pt.get("accuracy"),
                             "seed": pt["seed"], "settings": pt.get("settings"),
                             "export": export.split("/")[0], "memory_format": fmt,
                             "macs": macs[name, export], "macs_ratio": macs["dense", "-"] / macs[name, export],
                             "latency_ratio_b1": b1[d] / b1[key], "latency_ratio_b128": b128[d] / b128[key],
                             "latency_ms_b1": 1e3 * b1[key], "latency_ms_b128": 1e3 * b128[key]})
    # Headline per point: the export and format a user would ship, i.e. the fastest at batch 128.
    # Its speed-ups are taken against the fastest dense format, so a format that is merely
    # slow for dense cannot flatter a point.
    headline = {}
    for v in variants:
        k = (v["label"], v["level"])
        if k not in headline or v["latency_ms_b128"] < headline[k]["latency_ms_b128"]:
            headline[k] = v
    best_dense = {b: min(t["dense", "-", f] for f in FORMATS) for b, t in (("b1", b1), ("b128", b128))}
    points_out = [{**v, "latency_ratio_b1": best_dense["b1"] / (v["latency_ms_b1"] / 1e3),
                   "latency_ratio_b128": best_dense["b128"] / (v["latency_ms_b128"] / 1e3),
                   "versus": "the fastest dense format"} for v in headline.values()]
    result = {"dense": {"macs": macs["dense", "-"],
                        **{f"latency_ms_b1_{f}": 1e3 * b1["dense", "-", f] for f in FORMATS},
                        **{f"latency_ms_b128_{f}": 1e3 * b128["dense", "-", f] for f in FORMATS}},
              "points": points_out, "variants": variants,
              "threads": args.threads, "reps": {"b1": args.reps, "b128": args.reps_b128},
              "machine": f"{platform.machine()}, {args.threads} CPU threads, torch {torch.__version__}",
              "date": datetime.date.today().isoformat(),
              "command": f"python benchmarks/deploy_latency.py --threads {args.threads} --reps {args.reps} "
                         f"--reps-b128 {args.reps_b128}" + (f" --dense {args.dense} --runs {' '.join(args.runs)}"
                                                             if args.runs else "")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["Latency speed-up = dense latency / compact latency, dense timed in the same memory format.",
             f"Dense: batch 1 {result['dense']['latency_ms_b1_nchw']:.2f} ms (NCHW) / "
             f"{result['dense']['latency_ms_b1_channels_last']:.2f} ms (channels_last); batch 128 "
             f"{result['dense']['latency_ms_b128_nchw']:.0f} ms / {result['dense']['latency_ms_b128_channels_last']:.0f} ms.",
             "",
             "| method | level | export | memory format | MACs speed-up | batch 1 | batch 128 | b128 speed-up / MACs speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for v in sorted(variants, key=lambda v: (v["label"], v["level"], v["export"], v["memory_format"])):
        ratio = f"{v['latency_ratio_b128'] / v['macs_ratio']:.2f}"
        if headline[v["label"], v["level"]] is v:
            ratio = f"**{ratio}**"
        lines.append(f"| {v['label']} | {v['level']} | {v['export']} | {v['memory_format']} | {v['macs_ratio']:.2f}x "
                     f"| {v['latency_ratio_b1']:.2f}x ({v['latency_ms_b1']:.2f} ms) "
                     f"| {v['latency_ratio_b128']:.2f}x ({v['latency_ms_b128']:.0f} ms) | {ratio} |")
    lines.append("")
    lines.append("** = the point's fastest variant at batch 128 (the `points` entries of deploy_latency.json, "
                 "whose speed-ups are against the fastest dense format).")
    (out / "deploy_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
