"""Gradual pruning under torch.compile: step time, eager against compiled, during the ramp (ranks
change at every step: the layers run at full width times the mask) and after it (fixed ranks,
the layers run at their active rank), and how many graphs the compiler built.

ResNet-20 in SVD form (random_scaled init), batch 128 of 32x32 random images (step time does
not depend on the values), SGD, orthogonality + Hoyer, a BudgetController with mask=True
updating every step toward 33% of dense MACs, reached halfway. Timed: forward, losses,
backward and the optimizer step; the controller's update (a profiled pass and the allocation)
runs between timed steps. The first step of each phase holds the compile and is reported
apart; the rest give the median.

    python benchmarks/compile_ramp.py --steps 24 --threads 2
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
import torch.nn.functional as F

import svdtrain
from svdtrain.models import build_model

HERE = Path(__file__).resolve().parent


def run(compiled: bool, steps: int, batch: int) -> dict:
    torch.manual_seed(0)
    torch._dynamo.reset()
    graphs = []

    def inductor(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    model = svdtrain.decompose(build_model("resnet20", num_classes=10), init="random_scaled").train()
    opt = torch.optim.SGD(svdtrain.param_groups(model, 5e-4), lr=0.05, momentum=0.9)
    reg = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=0.005)
    budget = svdtrain.BudgetController(model, reg, 0.33, (1, 3, 32, 32), total_steps=steps, every=1,
                                       target_at=0.5, mask=True, optimizer=opt)
    forward = torch.compile(model, backend=inductor) if compiled else model
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    phases = {"ramp": [], "after": []}
    for _ in range(steps):
        phase = "ramp" if next(svdtrain.svd_layers(model))[1].plan.masked else "after"
        t0 = time.perf_counter()
        loss = F.cross_entropy(forward(x), y) + reg(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        phases[phase].append(time.perf_counter() - t0)
        budget.step()
    macs = svdtrain.count_macs(model, (1, 3, 32, 32)) / svdtrain.count_macs(model, (1, 3, 32, 32), "dense")
    out = {"graphs": len(graphs), "macs_ratio_after": round(macs, 4)}
    for phase, times in phases.items():
        out[phase] = {"steps": len(times), "first_s": round(times[0], 3),
                      "median_s": round(statistics.median(times[1:]), 4)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "compile_ramp.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"eager": run(False, args.steps, args.batch), "compiled": run(True, args.steps, args.batch)}
    for phase in ("ramp", "after"):
        result[f"speedup_{phase}"] = round(result["eager"][phase]["median_s"] / result["compiled"][phase]["median_s"], 3)
    result.update(model="resnet20", batch=args.batch, steps=args.steps, threads=args.threads,
                  machine=f"{platform.machine()}, {torch.get_num_threads()} threads", torch=torch.__version__,
                  date=datetime.date.today().isoformat(),
                  command=f"python benchmarks/compile_ramp.py --steps {args.steps} --threads {args.threads}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
