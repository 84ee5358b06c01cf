"""Seconds per training step, as ratios to dense training, measured in one process.

Methods (same model, batch, optimizer; repetitions alternate so drift hits all alike):
  dense               plain model, cross-entropy, SGD step
  svd_training        svdtrain's forward path (auto: rebuild W and run one dense op at
                      high rank), + orthogonality + Hoyer loss
  svd_form / svd_orth  SVD form with no regularizer / with the orthogonality term only
  <svd method>+probesK the orthogonality term estimated with K random probes (orth_probes)
  reference_two_conv  the reference code's path: two convolutions per layer at full rank
  trp                 TRP: dense steps + nuclear-norm subgradient, and every m steps an
                      SVD truncation of every weight (its cost averaged over m steps)
  <method>+compile    dense or svd_training with the loss (forward + regularizer) under
                      torch.compile (inductor; compile time falls in the warm-up steps)

    python benchmarks/train_cost.py --models resnet20 resnet56 --batch 128 --reps 20
    python benchmarks/train_cost.py --models llama_4x384 --batch 8 --methods dense svd_form svd_training \
        svd_training+probes8 --out benchmarks/results/train_cost_decoder.json   # AdamW, 8 x 256 tokens
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


DECODER = "llama_4x384"  # a Llama-style decoder from a transformers config: 4 layers, width 384


def build_decoder() -> torch.nn.Module:
    import transformers as T  # pip install svdtrain[hf]
    cfg = T.LlamaConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                        num_key_value_heads=6, vocab_size=8192, max_position_embeddings=512)
    return T.LlamaForCausalLM(cfg)


def make_step(model, extra_loss=None, after_backward=None, after_step=None, compile=False):
    decoder = not isinstance(model, torch.nn.Sequential) and hasattr(model, "config")
    if decoder:  # transformers' usual optimizer
        opt = torch.optim.AdamW(svdtrain.param_groups(model, 0.01), lr=3e-4)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    count = [0]

    def loss_of(x, y):
        loss = model(input_ids=x, labels=y).loss if decoder else F.cross_entropy(model(x), y)
        return loss + extra_loss(model) if extra_loss is not None else loss
    loss_fn = torch.compile(loss_of) if compile else loss_of

    def step(x, y):
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        count[0] += 1
        if after_step is not None:
            after_step(model, count[0])
    return step


def build_steps(name: str, methods: list[str], trp_every: int):
    """One training step per method, each on its own copy of one initial model; returns
    ({method: step(x, y)}, {method: its model})."""
    steps, models = {}, {}
    build = build_decoder if name == DECODER else (lambda: build_model(name, num_classes=10))
    base = build()
    for method in methods:
        model = models[method] = build()
        model.load_state_dict(base.state_dict())
        model.train()
        kind, compiled = method.removesuffix("+compile"), method.endswith("+compile")
        kind, _, probes = kind.partition("+probes")
        if kind == "dense":
            steps[method] = make_step(model, compile=compiled)
        elif kind in ("svd_form", "svd_orth", "svd_training", "reference_two_conv"):
            svdtrain.decompose(model, init="random" if name != DECODER else "svd")
            if kind == "reference_two_conv":
                for _, layer in svdtrain.svd_layers(model):
                    layer.forward_path = "factored"
            reg = svdtrain.Regularizer(orth=0.0 if kind == "svd_form" else 1.0,
                                       sparsity=None if kind != "svd_training" else "hoyer",
                                       strength=0.01, orth_probes=int(probes or 0))
            steps[method] = make_step(model, reg, compile=compiled)
        elif method == "trp":
            from baselines import TRP  # benchmarks/ is on sys.path when run as a script
            trp = TRP(model, every=trp_every, keep_energy=0.98, nuclear=3e-4)
            steps[method] = make_step(model, after_backward=trp.regularize, after_step=lambda m, i: trp.step(i))
        else:
            raise SystemExit(f"unknown method {method!r}")
    return steps, models


def measure(name, methods, batch, reps, warmup, trp_every, tokens=256):
    steps, _ = build_steps(name, methods, trp_every)
    if name == DECODER:
        x = y = torch.randint(0, 8192, (batch, tokens))
    else:
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    times = {m: [] for m in methods}
    for i in range(warmup + reps):
        for m in methods:  # alternate methods within each repetition
            t0 = time.perf_counter()
            steps[m](x, y)
            if i >= warmup:
                times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    # TRP's periodic SVD falls on one step in `trp_every`: use its mean, not its median.
    if "trp" in times:
        med["trp"] = statistics.fmean(times["trp"])
    return {
        "model": name,
        "seconds_per_step": med,
        "ratios": {m: med[m] / med["dense"] for m in methods if m != "dense"},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--methods", nargs="+", default=["dense", "svd_training", "reference_two_conv", "trp"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--trp-every", type=int, default=20, help="TRP's m: steps between SVD truncations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_cost.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for name in args.models:
        r = measure(name, args.methods, args.batch, args.reps, args.warmup, args.trp_every)
        print(json.dumps(r))
        results.append(r)
    out = dict(results[0])  # the first model's figures at top level (external checks read them)
    out.update({
        "per_model": results,
        "batch": args.batch, "reps": args.reps, "threads": args.threads, "trp_every": args.trp_every,
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/train_cost.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
    })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
