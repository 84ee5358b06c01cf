"""SVD training against post-hoc SVD, filter pruning (Torch-Pruning's sparse-training path and
one-shot L1) and TRP on CIFAR-10 ResNet-20, at equal budgets, per MACs level and seed.

Two regimes (--regime):
  pretrained  The regime most users are in: they own a trained model and want it smaller. One
              dense model is trained once (--dense-epochs, seed 0); every method then gets the
              same budget from it: E_c = --compress-epochs of compression-time training (cosine
              from --lr) + E_f = --finetune-epochs of fine-tuning (cosine from --finetune-lr).
              posthoc_svd and filter_pruning_l1, which have no compression-time training,
              fine-tune E_c + E_f. Results: compress_pretrained.{json,md,png}.
  scratch     Every method starts from a fresh init of its seed and gets E = --train-epochs
              of training (configs/cifar10_resnet20.yaml's one-cycle schedule) + E_f of
              fine-tuning; posthoc_svd and filter_pruning_l1 start from the seed's dense model
              trained E epochs (their E). Results: compare_cifar10.{json,md,png}; points
              of the earlier fixed-strength comparison stay there under "earlier".
Methods (the same augmentation, batch, optimizer family in both regimes):
  svd_training       its regime's shipped config, as a user runs it (configs/cifar10_resnet20.yaml
                     from scratch, configs/cifar10_resnet20_compress.yaml for a trained model) at
                     the point's level, seed and split: decompose (svd init from the trained model;
                     from scratch --svd-init),
                     budget-driven training to the level (the sparsity strength steered, values
                     masked along the schedule with --gradual), prune, fine-tune (orthogonality on)
  posthoc_svd        decompose the dense model, prune to the level, fine-tune (orthogonality on)
  filter_pruning     Torch-Pruning group-norm sparse training, prune to the level (L2 group
                     magnitude), fine-tune E_f
  filter_pruning_l1  one-shot global L1 filter pruning of the dense model, fine-tune
  trp                TRP training, prune to the level, fine-tune E_f (orthogonality on, as every
                     SVD-form model)
--rank-score loss ranks singular values by loss importance instead of energy share wherever
svd_training, posthoc_svd and trp cut to the level (prune.score). A method's own values, chosen
on the validation split: --method-lr METHOD=LR (peak lr of E_c and E_f; from scratch of E; the
budget's lr stays every other's) and --method-rank-score METHOD=RULE; its points record them.
A held-out validation split (--val-size of the training images) records val_accuracy for
choosing hyper-parameters; the test set only reports. Every finished point is one JSON file in
<out>/<result>_points/ (committed with the results; a point there is skipped, one of other
settings refused), every training phase resumes from its checkpoint under --work (one run
directory per point, budget and settings: tuning runs share a work directory and its dense
model), and --report-only rebuilds the result files from the points record alone.

    python benchmarks/compare.py --regime pretrained --levels 33% --seeds 0 1 2
    python benchmarks/compare.py --regime scratch --levels 50% 33% 25% --seeds 0
"""
from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

import svdtrain
from svdtrain.checkpoint import model_state, write_metrics
from svdtrain.config import load_config
from svdtrain.engine import evaluate, fit, task_loss, train_loader
from svdtrain.loader import BatchLoader
from svdtrain.models import build_model
from svdtrain.context import run_dataset
from svdtrain.train import Run

# benchmarks/ is on sys.path when run as a script
from compare_report import start_of, write_results
from compare_settings import (HERE, LEVELS, SVD_CONFIGS, budget_of, calibration_overrides, lr_overrides,
                              method_settings, parse_args, rank_score, record_dir, whitened)

CONFIG = HERE.parent / "configs" / "cifar10_resnet20.yaml"
DENSE_RUN = HERE / "results" / "pretrained_dense"  # the dense model the pretrained regime starts from
SHAPE = (1, 3, 32, 32)


def base(args, seed: int, *overrides: str, config: Path = CONFIG) -> dict:
    """The run config shared by every method (the scratch regime's training recipe; SVD
    training's: its regime's shipped config)."""
    machine = [f"val_size={args.val_size}", f"data_dir={args.data_dir}", f"threads={args.threads}",
               f"device={args.device}", *([f"compile={args.compile}"] if args.compile else [])]
    return load_config(config, [*machine, f"seed={seed}", "epochs.orth=0", "regularizer.target_macs=0", "prune.gradual=false",
                                f"epochs.finetune={args.finetune_epochs}", f"optim.finetune_lr={args.finetune_lr}",
                                *overrides])


def dense_dir(args, work: Path, seed: int) -> Path:
    return work / "dense" if args.regime == "pretrained" else work / f"dense_s{seed}"


def dense_config(args, seed: int) -> dict:
    """The dense model's run: in the pretrained regime one model (seed 0) for every seed."""
    if args.regime == "pretrained":
        return base(args, 0, "decompose.enabled=false", f"epochs.train={args.dense_epochs}")
    return base(args, seed, "decompose.enabled=false", f"epochs.train={args.train_epochs}")


def compress_config(args, seed: int, *overrides: str, config: Path = CONFIG) -> dict:
    """The compression-time recipe: pretrained, E_c epochs cosine from --lr; scratch, E epochs
    of the config's one-cycle schedule."""
    if args.regime == "pretrained":
        return base(args, seed, f"epochs.train={args.compress_epochs}", f"optim.lr={args.lr}", "optim.schedule=cosine",
                    "optim.warmup_fraction=0.0", *overrides, config=config)
    return base(args, seed, f"epochs.train={args.train_epochs}", *overrides, config=config)


def svd_training_config(args, work: Path, seed: int, level: float) -> dict:
    """SVD training's run: its regime's shipped config (SVD_CONFIGS) at the point's level, seed
    and split; at the default values every other key is the config's (tests/test_compare.py),
    and a value given on the command line (a tuning point) overrides it."""
    scratch = args.regime == "scratch"
    init = [f"decompose.init={args.svd_init}"] if scratch else [
        "decompose.init=svd", f"decompose.dense_checkpoint={dense_dir(args, work, seed) / 'model_state.pt'}"]
    cfg = compress_config(args, seed, *init, *lr_overrides(args, "svd_training"), f"regularizer.target_macs={level}",
                          f"regularizer.strength={args.strength}", f"regularizer.target_at={args.target_at}",
                          f"prune.gradual={str(args.gradual).lower()}", f"prune.score={rank_score(args, 'svd_training')}",
                          f"prune.recalibrate={args.recalibrate}",
                          *([] if args.svd_warmup else calibration_overrides(args, "svd_training")),
                          config=SVD_CONFIGS[args.regime])
    if args.svd_warmup:  # an svd init from the warmed-up dense model
        cfg = load_config(None, dense_warmup(args, work, seed) + calibration_overrides(args, "svd_training"), base=cfg)
    if args.svd_schedule == "one":  # the whole budget one train stage under one schedule (no restart)
        cfg = load_config(None, [f"epochs.train={cfg['epochs']['train'] + cfg['epochs']['finetune']}",
                                 "epochs.finetune=0"], base=cfg)
    return cfg


def dense_warmup(args, work: Path, seed: int) -> list[str]:
    """--svd-warmup K: the dense model trains the first K of the E epochs (the span [0, K/E] of
    the one-cycle schedule); the overrides by which SVD training goes on from its SVD over the
    rest of the same schedule, reaching the level at the same epoch as without the warm-up."""
    k, split = args.svd_warmup, args.svd_warmup / args.train_epochs
    dense = work / f"warmup{k}_s{seed}"
    Run(dense, base(args, seed, "decompose.enabled=false", f"epochs.train={k}", f"optim.schedule_span=[0.0,{split}]",
                    *lr_overrides(args, "svd_training")), quiet=True).execute()  # one schedule: one peak
    return ["decompose.init=svd", f"decompose.dense_checkpoint={dense / 'model_state.pt'}",
            f"epochs.train={args.train_epochs - k}", f"optim.schedule_span=[{split},1.0]",
            f"regularizer.target_at={(args.target_at - split) / (1 - split)}"]


def restore_dense(dense: Path, args) -> None:
    """The committed dense model (results/pretrained_dense: its run checkpoint, metrics and
    summary) seeds a fresh work directory when the dense settings asked for are its own, so
    every machine compresses the same trained model; model_state.pt is rewritten from it."""
    if (dense / "checkpoint.pt").exists() or not (DENSE_RUN / "checkpoint.pt").exists():
        return
    state = torch.load(DENSE_RUN / "checkpoint.pt", map_location="cpu", weights_only=True)
    if (state["config"]["epochs"]["train"], state["config"].get("val_size")) != (args.dense_epochs, args.val_size):
        return
    dense.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "summary.json", "checkpoint.pt"):
        shutil.copyfile(DENSE_RUN / name, dense / name)
    torch.save(state["model"], dense / "model_state.pt")


def point_file(args, method: str, level: str, seed: int) -> Path:
    """A point's file in the record; an activation-aware start is a point of its own (the plain
    start's stays beside it)."""
    start = f"_{args.whiten}{'_unwhitened' if args.unwhiten else ''}" if method in whitened(args) else ""
    return record_dir(args) / f"{method}{start}_{level.rstrip('%')}_s{seed}.json"


def accuracies(model, data, cfg) -> dict:
    """Test and validation accuracy of a model (any dense or SVD-form module)."""
    out, device = {}, next(model.parameters()).device
    for key, x, y in (("accuracy", data.x_test, data.y_test), ("val_accuracy", data.x_val, data.y_val)):
        out[key] = evaluate(model, BatchLoader(x, y, 1000, train=False, mean=data.mean, std=data.std, device=device))
    return out


def loss_scores(model, data, cfg) -> dict:
    """Loss importance of every singular value over the first prune.score_batches training
    batches, with the run's task loss (as the pipeline's prune stage scores them)."""
    loader = train_loader(data, cfg, next(model.parameters()).device)
    return svdtrain.loss_importance(model, loader, lambda out, y: task_loss(out, y, cfg), cfg["prune"]["score_batches"])


def example(model) -> torch.Tensor:
    return torch.zeros(SHAPE, device=next(model.parameters()).device)


def pipeline_point(out: Path, cfg: dict) -> dict:
    s = Run(out, cfg, quiet=True).execute()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = [r["macs_at_threshold"] for r in rows if r.get("stage") == "train" and "macs_at_threshold" in r]
    return {"macs_at_threshold_trained": trained[-1] / s["dense_macs"] if trained else None,  # before pruning
            "macs": s["macs"], "accuracy": s["accuracy"], "val_accuracy": s.get("val_accuracy"),
            "accuracy_trained": s["accuracy_trained"], "accuracy_before_finetune": s["accuracy_pruned"],
            "params": s["params"], "budget_warning": s.get("budget_warning"), "seconds": s["train_seconds"]}


def loop_point(out: Path, data, cfg, level: float, method: str, args, start: Path | None) -> dict:
    """The baselines that svdtrain's pipeline does not run, in the common fit() loop, from the
    dense model at `start` (None: a fresh init of the config's seed)."""
    from baselines import TRP, GroupSparsity, filter_prune  # benchmarks/baselines/
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])
    model = build_model("resnet20", 10)
    if start is not None:
        model.load_state_dict(torch.load(start, weights_only=True))
    if cfg["device"] == "cuda":
        model.cuda()
    e_c, e_f = cfg["epochs"]["train"], cfg["epochs"]["finetune"]
    trained, reg, rows = None, None, []
    if method == "filter_pruning_l1":
        filter_prune(model, example(model), level)
        if args.regime == "pretrained":
            e_f += e_c  # no compression-time training: all of the budget fine-tunes
    elif method == "filter_pruning":
        sparsity = GroupSparsity(model, example(model), reg=args.group_reg)
        rows = fit(model, data, cfg, e_c, stage="train", quiet=True, checkpoint=out / "train.pt",
                   on_backward=lambda m: sparsity.regularize())
        trained = accuracies(model, data, cfg)["accuracy"]
        filter_prune(model, example(model), level, p=2)
    else:  # trp
        trp = TRP(model, every=args.trp_every, keep_energy=args.trp_energy, nuclear=args.trp_nuclear)
        done = torch.load(out / "train.pt", weights_only=True)["epoch"] if (out / "train.pt").exists() else 0
        steps = [done * (len(data.x_train) // cfg["batch_size"])]  # truncations on the same steps after resume

        def after_step(m):
            steps[0] += 1
            trp.step(steps[0])
        rows = fit(model, data, cfg, e_c, stage="train", quiet=True, checkpoint=out / "train.pt",
                   on_backward=lambda m: trp.regularize(), on_step=after_step)
        trained = accuracies(model, data, cfg)["accuracy"]
        if rank_score(args, method) == "loss":  # convert at full rank, then cut as the SVD methods do
            trp.to_svd_model(keep_energy=1.0)
            svdtrain.prune(model, macs_budget=level, input_shape=SHAPE, scores=loss_scores(model, data, cfg))
        else:
            trp.to_svd_model(input_shape=SHAPE, macs_budget=level)
        reg = svdtrain.Regularizer(orth=cfg["regularizer"]["orth"], sparsity=None)
    before = accuracies(model, data, cfg)["accuracy"]
    rows += fit(model, data, cfg, e_f, stage="finetune", reg=reg, quiet=True, checkpoint=out / "finetune.pt")
    write_metrics(out / "metrics.jsonl", rows)  # as a pipeline run keeps them
    model.eval()
    torch.save(model_state(model), out / "model_state.pt")
    compact = svdtrain.export(model, input_shape=SHAPE) if any(svdtrain.svd_layers(model)) else model
    svdtrain.export_program(compact.cpu(), torch.zeros((2,) + SHAPE[1:]), out / "compact.pt2")
    return {"macs": svdtrain.count_macs(model, SHAPE), **accuracies(model, data, cfg),
            "accuracy_trained": trained, "accuracy_before_finetune": before,
            "params": svdtrain.count_params(model),
            "seconds": sum(r["seconds"] for r in rows)}  # training epochs, from the checkpoints: a resume keeps it


def check_budget(args) -> None:
    """The first run writes the record's budget to budget.json (a report writes nothing), and a run
    or report with another is refused, so that points of different budgets never meet in one table."""
    budget = budget_of(args)
    path = record_dir(args) / "budget.json"
    if not path.exists():
        if not args.report_only:
            path.write_text(json.dumps(budget, indent=1) + "\n")
    elif (recorded := json.loads(path.read_text())) != budget:
        diff = ", ".join(f"{k} {recorded.get(k)} (asked {v})" for k, v in budget.items() if recorded.get(k) != v)
        raise SystemExit(f"{path}: the record was made with another budget: {diff}; use another --out")


def run_dir(work: Path, point: Path, args, settings: dict) -> Path:
    """A point's run directory, keyed by its budget and settings: runs of other values share a
    work directory (and its dense model) without resuming each other's checkpoints (the loop
    baselines' checkpoints carry no config that a resume could check)."""
    key = json.dumps({"budget": budget_of(args), "settings": settings}, sort_keys=True)
    return work / f"{point.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def run_point(args, work: Path, data, method: str, level: str, seed: int) -> None:
    path = point_file(args, method, level, seed)
    settings = method_settings(args, method)
    if path.exists():  # done; a point of other settings is never silently taken for this one
        if json.loads(path.read_text()).get("settings", {}) != settings:
            raise SystemExit(f"{path} was made with other {method} settings; use another --out")
        return
    dense_state = dense_dir(args, work, seed) / "model_state.pt"
    budget = LEVELS[level]
    out = run_dir(work, path, args, settings)
    scratch = args.regime == "scratch"
    if method == "svd_training":
        point = pipeline_point(out, svd_training_config(args, work, seed, budget))
    elif method == "posthoc_svd":
        finetune = args.finetune_epochs + (0 if scratch else args.compress_epochs)
        cfg = compress_config(args, seed, *lr_overrides(args, method), "decompose.init=svd",
                              f"decompose.dense_checkpoint={dense_state}",
                              "epochs.train=0", f"epochs.finetune={finetune}", f"prune.macs_budget={budget}",
                              f"prune.score={rank_score(args, method)}", f"prune.recalibrate={args.recalibrate}",
                              *calibration_overrides(args, method))
        point = pipeline_point(out, cfg)
    else:
        from_dense = not scratch or method == "filter_pruning_l1"
        point = loop_point(out, data, compress_config(args, seed, *lr_overrides(args, method)), budget, method, args,
                           dense_state if from_dense else None)
    point.update(method=method, level=level, seed=seed, regime=args.regime, settings=settings,
                 start=start_of({"method": method, "settings": settings}), run_dir=str(out),
                 date=datetime.date.today().isoformat())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(point, indent=1) + "\n")
    print(f"== {method} {level} seed {seed}: test {point['accuracy']:.2%} val {point['val_accuracy']:.2%} "
          f"at {point['macs'] / 1e6:.2f}M MACs", flush=True)


def record_dense(args, work: Path, seed: int) -> None:
    """Keep the finished dense run's summary in the record (one dense model in the pretrained regime)."""
    name = "dense.json" if args.regime == "pretrained" else f"dense_s{seed}.json"
    summary = dense_dir(args, work, seed) / "summary.json"
    if summary.is_file() and not (record_dir(args) / name).exists():
        shutil.copyfile(summary, record_dir(args) / name)


def main(argv=None):
    args = parse_args(argv, __doc__)
    torch.set_num_threads(args.threads)
    work = Path(args.work or HERE / "work" / args.regime)
    work.mkdir(parents=True, exist_ok=True)
    record_dir(args).mkdir(parents=True, exist_ok=True)
    check_budget(args)
    if not args.report_only:
        with open(record_dir(args) / "commands.txt", "a") as f:
            f.write(" ".join(["python benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])]) + "\n")
        if args.regime == "pretrained":
            restore_dense(work / "dense", args)
        data = None
        # From scratch, only post-hoc SVD and L1 filter pruning start from the seed's dense model.
        needs_dense = args.regime == "pretrained" or {"posthoc_svd", "filter_pruning_l1"} & set(args.methods)
        for seed in args.seeds:
            if needs_dense:
                Run(dense_dir(args, work, seed), dense_config(args, seed), quiet=True).execute()
                record_dense(args, work, seed)
            if data is None:  # one split for every seed
                data = run_dataset(dense_config(args, 0))
            for level in args.levels:
                for method in args.methods:
                    run_point(args, work, data, method, level, seed)
    write_results(args)


if __name__ == "__main__":
    main()
