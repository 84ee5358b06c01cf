"""Language-model benchmark: a byte-level Llama-style decoder trained on pycode
(the Python standard library's sources), compressed to 60% / 40% of the parameters of its
decomposable layers (every nn.Linear inside the decoder layers; embeddings and lm_head stay dense and
are not counted) by post-hoc truncated SVD (`svd`), ASVD-style scaling (`asvd`), SVD-LLM-style
whitening (`svdllm`), SVD training (`svd_training`: the budget controller with gradual masks over the
fine-tune steps, from the whitened start) and torchao's PAT (`torchao_pat`: nuclear-norm proximal
steps, then its per-matrix rank budget held while healing). Each post-hoc cut without fine-tuning and
with --finetune-steps of AdamW fine-tuning (same steps, learning rate, schedule and data for every
method); the two training methods have only the fine-tuned point. Tune on val, report test.

    python benchmarks/lm.py                      # dense (checkpointed; rerun resumes), then every point
    python benchmarks/lm.py --report-only        # rebuild lm_pycode.md from lm_pycode.json
    python benchmarks/lm.py --finetune-seed 1 --methods svdllm svd_training --levels 60
                                                 # another seed's points beside (same dense model)
    (torchao_pat needs `pip install torchao`; without it the point records why it was skipped)

Cost at 1 thread on a 2-core x86 CPU busy with other runs: a dense step 4.9 s at the defaults (6 x 256,
4 heads, MLP 688; 3000 steps: ~4 h), 10.7 s at width 384 (6 heads, MLP 1024). At width 384 a val +
test evaluation took ~9 min per model, a calibrated decomposition ~100 s, a fine-tune step 4.0 s (a
cut SVD form), ~5 s (SVD training), ~6.5 s (PAT: an SVD per matrix per step).

Budget: prune(macs_budget=b) cuts whole-model MACs; b is set so that the decomposable layers' MACs
(= their parameters per token) land at the level, and each point records params_ratio (deployed
parameters of the decomposable layers / dense, by the layers' plans, as export ships them) and
macs_ratio (whole-model MACs / dense, lm_head and attention products included). Points already in
the JSON are skipped (a point recorded as skipped is tried again); a changed setting is refused. The
dense model in --work is refused only for a change of its own settings (width, steps, lr...): another
compression setting (e.g. --orth-probes 0) runs with another --out beside the same dense model.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_data as D  # noqa: E402
from lm_report import METHODS, report  # noqa: E402
import svdtrain  # noqa: E402

WHITEN = {"svd": None, "asvd": "diag", "svdllm": "cholesky", "svd_training": "cholesky"}
TRAINING = ("svd_training", "torchao_pat")  # no point without fine-tuning
RESULTS = Path(__file__).resolve().parent / "results"
# Settings a resumed run must share with the JSON it extends (methods, levels and steps of
# fine-tuning only add points).
SHARED = ("layers", "hidden", "heads", "intermediate", "seq", "batch", "dense_steps", "lr", "weight_decay",
          "finetune_lr", "calib_batches", "max_eval_windows", "strength", "orth_probes", "pat_lambda", "seed")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data-dir", default=str(D.DATA_DIR))
    a("--out", default=str(RESULTS / "lm_pycode.json"), help="result JSON (the .md beside it)")
    a("--work", default=str(Path(__file__).resolve().parent / "work" / "lm"), help="checkpoints, dense model")
    a("--layers", type=int, default=6)
    a("--hidden", type=int, default=256)
    a("--heads", type=int, default=4)
    a("--intermediate", type=int, default=688)
    a("--seq", type=int, default=256)
    a("--batch", type=int, default=16)
    a("--dense-steps", type=int, default=3000)
    a("--lr", type=float, default=1e-3)
    a("--weight-decay", type=float, default=0.1)
    a("--ckpt-every", type=int, default=200, help="dense checkpoint interval (steps)")
    a("--finetune-steps", type=int, default=300)
    a("--finetune-lr", type=float, default=3e-4)
    a("--levels", type=int, nargs="+", default=[60, 40], help="percent of the decomposable parameters")
    a("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    a("--calib-batches", type=int, default=16, help="training batches for whitening")
    a("--strength", type=float, default=1e-3, help="svd_training: Hoyer strength at the start")
    a("--orth-probes", type=int, default=8, help="svd_training: random probes of the orthogonality term")
    a("--pat-lambda", type=float, default=1.0, help="torchao_pat: ProxNuclearNorm's reg_lambda")
    a("--max-eval-windows", type=int, default=0, help="0: every window of val and test")
    a("--eval-batch", type=int, default=32)
    a("--seed", type=int, default=0, help="the dense model's seed")
    a("--finetune-seed", type=int, default=None,
      help="seed of everything after the dense model (calibration batches, fine-tune batches, probes); "
           "default --seed. Another value adds points beside the others' in the same JSON")
    a("--threads", type=int, default=2)
    a("--device", default="cpu")
    a("--report-only", action="store_true")
    a("--stop-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: stop dense training there
    args = p.parse_args(argv)
    if args.finetune_seed is None:
        args.finetune_seed = args.seed
    return args


DENSE = ("layers", "hidden", "heads", "intermediate", "seq", "batch", "dense_steps", "lr", "weight_decay",
         "seed")  # what the dense model depends on


def settings(args, keys=SHARED) -> dict:
    return {k: getattr(args, k) for k in keys}


def new_model(args):
    torch.manual_seed(args.seed)
    return D.build_model(args.layers, args.hidden, args.heads, args.intermediate, args.seq).to(args.device)


def adamw(model, lr, args, groups=None):
    return torch.optim.AdamW(groups or D.param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))


def dense_stage(args, data) -> torch.nn.Module:
    """Train the dense model (or load it); checkpoint every --ckpt-every steps and resume from there."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    final, ckpt = work / "dense.pt", work / "dense_ckpt.pt"
    model = new_model(args)
    if final.exists():
        state = torch.load(final, map_location=args.device)
        check_settings(state["settings"], settings(args, DENSE), final)
        model.load_state_dict(state["model"])
        return model
    opt, gen, start = adamw(model, args.lr, args), torch.Generator().manual_seed(args.seed), 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=args.device, weights_only=False)
        check_settings(state["settings"], settings(args, DENSE), ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["step"]
        print(f"dense: resuming at step {start}")

    def save(step):
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                    "settings": settings(args)}, tmp)
        tmp.replace(ckpt)
        print(f"dense: step {step} checkpointed", flush=True)
        if args.stop_after and step >= args.stop_after:
            raise SystemExit(f"dense: stopped after step {step} (--stop-after)")

    t0 = time.time()
    D.train(model, opt, data["train"], args.dense_steps, batch=args.batch, seq=args.seq, gen=gen, start=start,
            warmup=min(200, args.dense_steps // 10 + 1), save=save, every=args.ckpt_every, stage="dense")
    print(f"dense: {args.dense_steps - start} steps in {time.time() - t0:.0f} s")
    torch.save({"model": model.state_dict(), "settings": settings(args)}, final)
    return model


def check_settings(saved: dict, now: dict, where) -> None:
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        raise SystemExit(f"{where} was made with other settings {diff} (saved, now): use another --out/--work")


def ids_for(args):
    """The MACs example: one window of --seq tokens."""
    return (torch.zeros(1, args.seq, dtype=torch.long, device=args.device),)


def budget(dense, level: float, ids) -> float:
    """Whole-model MACs fraction b with the decomposable layers at `level` of theirs (a Linear's MACs per
    token are its parameters) and everything else (lm_head, attention products) unchanged."""
    total = svdtrain.count_macs(dense, example_inputs=ids)
    layers = ids[0].numel() * sum(m.weight.numel() for _, m in D.decomposable(dense))
    return 1.0 - (1.0 - level) * layers / total


def decompose(dense, method: str, calib, ids):
    """A copy of `dense` with its decomposable layers in SVD form, as `method` starts (exact)."""
    model = copy.deepcopy(dense)
    names = {n for n, _ in D.decomposable(model)}
    if WHITEN[method] is None:
        return svdtrain.decompose(model, init="svd", skip=lambda n, m: n not in names, example_inputs=ids)
    return svdtrain.decompose(model, init="svd", skip=lambda n, m: n not in names, example_inputs=ids,
                              calibration=calib, whiten=WHITEN[method])


def start_gap(dense, method: str, calib, windows, ids, batch: int = 32) -> float:
    """Relative change of perplexity on `windows` from the dense model to `method`'s uncut start
    (the decomposition must be exact: ~1e-8 measured)."""
    ref = D.evaluate(dense, windows, batch)
    got = D.evaluate(decompose(dense, method, calib, ids), windows, batch)
    return abs(math.exp(got - ref) - 1.0)


def ratios(model, dense_macs: int, dense_params: int, ids) -> tuple[float, float]:
    """(deployed parameters of the SVD layers / their dense parameters, whole-model MACs / dense)."""
    macs = svdtrain.count_macs(model, example_inputs=ids)  # also records each plan's calls
    params = sum(layer.plan.params() for _, layer in svdtrain.svd_layers(model))
    return params / dense_params, macs / dense_macs


def pat_ranks(shapes: dict, level: float) -> dict:
    """PAT's per-matrix rank budget: the same fraction of each matrix (k (m + n) <= level m n, rounded
    down), then one more rank at a time, matrix by matrix, while the total stays within level."""
    keep = {n: max(1, min(min(s), int(level * s[0] * s[1] / sum(s)))) for n, s in shapes.items()}
    spare = level * sum(s[0] * s[1] for s in shapes.values()) - sum(keep[n] * sum(s) for n, s in shapes.items())
    grown = True
    while grown:
        grown = False
        for n, s in shapes.items():
            if keep[n] < min(s) and sum(s) <= spare:
                keep[n], spare, grown = keep[n] + 1, spare - sum(s), True
    return keep


def pat(dense, level: float, args, data, ids):
    """torchao PAT: the decoder's weights under PruneOptimizer(AdamW) with SVDGrouper. First half of
    the steps: ProxNuclearNorm (singular values soft-thresholded by reg_lambda x the summed learning
    rate); second half (healing): MinRankConstraint, each matrix's rank held at its budget
    (pat_ranks). Returns (the trained model in SVD form at those ranks, settings)."""
    from torchao.prototype.pat import PruneOptimizer
    model = copy.deepcopy(dense)
    layers, groups = D.decomposable(model), []
    keep = pat_ranks({n: tuple(lin.weight.shape) for n, lin in layers}, level)
    for name, lin in layers:
        r = min(lin.weight.shape)
        groups.append({"params": [lin.weight], "weight_decay": args.weight_decay, "group_type": "SVDGrouper",
                       "prox_type": "ProxNuclearNorm", "reg_lambda": args.pat_lambda,
                       "min_sparsity": (r - keep[name] - 0.5) / r, "prox_through_heal": True})
    ours = {id(lin.weight) for _, lin in layers}
    rest = [p for p in model.parameters() if id(p) not in ours]
    groups += [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": args.weight_decay},
               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    heal = max(1, args.finetune_steps // 2)
    opt = PruneOptimizer(adamw(model, args.finetune_lr, args, groups), warmup_steps=0, healing_start_step=heal)

    def after(done):
        if done == heal:  # from here on the rank budget is enforced after every step
            for g in opt.regularized_param_groups():
                g["prox_type"] = "MinRankConstraint"
    finetune(model, opt, args, data, after_step=after, stage="torchao_pat")
    svd = decompose(model, "svd", None, ids)
    # What the rank cut below drops: PAT's last prox step left those values at zero (float error).
    dropped = max(float(layer.s.detach().double().pow(2)[keep[n]:].sum() / layer.s.detach().double().pow(2).sum())
                  for n, layer in svdtrain.svd_layers(svd))
    svdtrain.set_ranks(svd, keep)
    return svd, {"prox": "ProxNuclearNorm, then MinRankConstraint (healing)", "heal_at": heal,
                 "reg_lambda": args.pat_lambda, "energy_dropped_at_export": dropped}


def finetune(model, opt, args, data, stage, extra_loss=None, after_step=None):
    gen = torch.Generator().manual_seed(args.finetune_seed + 1)  # the same batches for every method
    return D.train(model, opt, data["train"], args.finetune_steps, batch=args.batch, seq=args.seq, gen=gen,
                   warmup=min(20, args.finetune_steps // 10 + 1), extra_loss=extra_loss, after_step=after_step,
                   stage=stage)


def run_method(method, level, dense, args, data, calib, ids, dense_macs, dense_params, wanted):
    """Yield the method's points at `level` that are in `wanted` (finetune_steps values)."""
    b, t0 = budget(dense, level, ids), time.time()
    torch.manual_seed(args.finetune_seed)  # the orthogonality term's probes: a point does not depend on what ran before
    extra = {}
    if method == "torchao_pat":
        if args.finetune_steps < 2:
            raise SystemExit("torchao_pat needs --finetune-steps >= 2")
        try:
            model, extra = pat(dense, level, args, data, ids)
        except Exception as e:  # a prototype on a CPU wheel: say why it did not run
            yield {"skipped": f"{type(e).__name__}: {e}"}
            return
    elif method == "svd_training":
        model = decompose(dense, method, calib, ids)
        reg = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=args.strength, orth_probes=args.orth_probes)
        opt = adamw(model, args.finetune_lr, args)
        ctrl = svdtrain.BudgetController(model, reg, target_macs=b, input_shape=None, example_inputs=ids,
                                         total_steps=args.finetune_steps, mask=True, optimizer=opt)
        finetune(model, opt, args, data, method, extra_loss=reg, after_step=lambda done: ctrl.step())
        svdtrain.prune(model, macs_budget=b, example_inputs=ids)  # a no-op where the controller met it
        extra = {"final_strength": reg.strength, "controller": ctrl.report() or "target reached"}
    else:
        model = decompose(dense, method, calib, ids)
        svdtrain.prune(model, macs_budget=b, example_inputs=ids)
        if 0 in wanted:
            yield point(model, 0, b, dense_macs, dense_params, ids, args, data, t0, extra)
        if args.finetune_steps not in wanted:
            return
        t0 = time.time()
        finetune(model, adamw(model, args.finetune_lr, args), args, data, method)
    yield point(model, args.finetune_steps, b, dense_macs, dense_params, ids, args, data, t0, extra)


def point(model, steps, b, dense_macs, dense_params, ids, args, data, t0, extra) -> dict:
    params_ratio, macs_ratio = ratios(model, dense_macs, dense_params, ids)
    val, test = (D.evaluate(model, data[s], args.eval_batch) for s in ("val_w", "test_w"))
    return {"finetune_steps": steps, "params_ratio": round(params_ratio, 5), "macs_ratio": round(macs_ratio, 5),
            "macs_budget": round(b, 5), "val_ppl": D.metrics(val)[0], "test_ppl": D.metrics(test)[0],
            "test_bpb": D.metrics(test)[1], "seconds": round(time.time() - t0, 1), **extra}


def key(p: dict) -> tuple:
    return p["method"], p["level"], p["finetune_steps"], p["seed"]


def write(result: dict, out: Path) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    out.with_suffix(".md").write_text(report(result))


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "cpu"
    return f"{platform.machine()} {cpu}"


def main(argv=None):
    args = parse(argv)
    out = Path(args.out)
    if args.report_only:
        out.with_suffix(".md").write_text(report(json.loads(out.read_text())))
        print(f"wrote {out.with_suffix('.md')}")
        return
    torch.set_num_threads(args.threads)
    import transformers
    result = json.loads(out.read_text()) if out.exists() else None
    if result is not None:
        check_settings(result["settings"], settings(args), out)
    try:
        data = {s: D.load_split(args.data_dir, s) for s in D.SPLITS}
        D.check_splits(data, args.seq)
    except (OSError, ValueError) as err:
        raise SystemExit(f"lm.py: {err}") from None
    data["val_w"], data["test_w"] = (D.eval_windows(data[s], args.seq, args.max_eval_windows) for s in ("val", "test"))
    dense = dense_stage(args, data)
    ids = ids_for(args)
    layers = D.decomposable(dense)
    dense_params = sum(m.weight.numel() for _, m in layers)
    dense_macs = svdtrain.count_macs(dense, example_inputs=ids)
    gen = torch.Generator().manual_seed(args.finetune_seed + 2)
    calib = [D.train_batch(data["train"], args.batch, args.seq, gen)[0].to(args.device) for _ in range(args.calib_batches)]
    if result is None:
        val, test = (D.evaluate(dense, data[s], args.eval_batch) for s in ("val_w", "test_w"))
        result = {"dense": {"val_ppl": D.metrics(val)[0], "test_ppl": D.metrics(test)[0], "bpb": D.metrics(test)[1],
                            "params": sum(p.numel() for p in dense.parameters()), "decomposable_params": dense_params,
                            "steps": args.dense_steps},
                  "points": [], "settings": {**settings(args), "finetune_steps_run": []},
                  "start_gap": {m: start_gap(dense, m, calib, D.eval_windows(data["val"], args.seq, 64), ids)
                                for m in ("svd", "asvd", "svdllm")}}
    if args.finetune_steps not in result["settings"]["finetune_steps_run"]:
        result["settings"]["finetune_steps_run"].append(args.finetune_steps)
    command = "python benchmarks/lm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    old = result.pop("command", None)  # files written before "commands" kept only the latest
    commands = result.get("commands") or ([old] if old else [])
    result.update({"machine": f"{machine()}, {args.threads} thread{'s' * (args.threads != 1)}, {args.device}",
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "date": datetime.date.today().isoformat(),
                   "commands": commands + [command] * (command not in commands)})
    write(result, out)
    have = {key(p) for p in result["points"] if "skipped" not in p}
    for level in (lv / 100 for lv in args.levels):
        for method in args.methods:
            steps = [args.finetune_steps] if method in TRAINING else [0, args.finetune_steps]
            wanted = [s for s in steps if (method, level, s, args.finetune_seed) not in have]
            if not wanted:
                continue
            for p in run_method(method, level, dense, args, data, calib, ids, dense_macs, dense_params, wanted):
                p = {"method": method, "level": level, "finetune_steps": p.get("finetune_steps", wanted[-1]),
                     "seed": args.finetune_seed, **p}
                result["points"] = [q for q in result["points"] if key(q) != key(p)]  # a skipped one is tried again
                result["points"].append(p)
                write(result, out)
                print(json.dumps(p), flush=True)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
