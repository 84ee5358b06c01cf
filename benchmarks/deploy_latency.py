"""Inference latency of the exported compact models against the dense model (CPU).

Reads the points of compare_cifar10.py (each has a compact.pt2 made by torch.export), loads
every program the way a user would (`torch.export.load(path).module()`, no svdtrain needed),
and times batch 1 and batch 128 with fixed threads: warm-up, then the median of repeated
runs, models interleaved within each repetition so drift hits all alike.

    python benchmarks/deploy_latency.py --threads 2 --reps 30
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def time_models(models: dict, batch: int, reps: int, warmup: int) -> dict:
    x = torch.randn(batch, 3, 32, 32)
    times = {k: [] for k in models}
    with torch.inference_mode():
        for i in range(warmup + reps):
            for key, m in models.items():
                t0 = time.perf_counter()
                m(x)
                if i >= warmup:
                    times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(HERE / "work" / "compare"))
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--reps-b128", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    points = [json.loads(f.read_text()) for f in sorted((Path(args.work) / "points").glob("*.json"))]
    dense = next((pt for pt in points if pt["method"] == "dense"), None)
    if dense is None:
        raise SystemExit(f"no dense point in {args.work}: run benchmarks/compare_cifar10.py first")
    points = [pt for pt in points if pt["method"] != "dense" and Path(pt.get("compact", "")).is_file()]
    models = {"dense": torch.export.load(dense["compact"]).module()}
    for pt in points:
        models[(pt["method"], pt["level"])] = torch.export.load(pt["compact"]).module()
    b1 = time_models(models, 1, args.reps, args.warmup)
    b128 = time_models(models, 128, args.reps_b128, args.warmup)
    rows = []
    for pt in points:
        key = (pt["method"], pt["level"])
        rows.append({"method": pt["method"], "level": pt["level"], "macs": pt["macs"],
                     "macs_ratio": dense["macs"] / pt["macs"],
                     "latency_ratio_b1": b1["dense"] / b1[key], "latency_ratio_b128": b128["dense"] / b128[key],
                     "latency_ms_b1": 1e3 * b1[key], "latency_ms_b128": 1e3 * b128[key]})
    result = {"dense": {"macs": dense["macs"], "latency_ms_b1": 1e3 * b1["dense"], "latency_ms_b128": 1e3 * b128["dense"]},
              "points": rows, "threads": args.threads, "reps": {"b1": args.reps, "b128": args.reps_b128},
              "machine": f"{platform.machine()}, {args.threads} CPU threads, torch {torch.__version__}",
              "date": datetime.date.today().isoformat(),
              "command": f"python benchmarks/deploy_latency.py --threads {args.threads} --reps {args.reps}"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| method | level | MACs speed-up | latency speed-up, batch 1 | batch 128 | b128 speed-up / MACs speed-up |",
             "|---|---|---|---|---|---|",
             f"| dense | 100% | 1.00x | 1.00x ({1e3 * b1['dense']:.2f} ms) | 1.00x ({1e3 * b128['dense']:.0f} ms) | - |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['level']} | {r['macs_ratio']:.2f}x | {r['latency_ratio_b1']:.2f}x "
                     f"({r['latency_ms_b1']:.2f} ms) | {r['latency_ratio_b128']:.2f}x ({r['latency_ms_b128']:.0f} ms) "
                     f"| {r['latency_ratio_b128'] / r['macs_ratio']:.2f} |")
    (out / "deploy_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
