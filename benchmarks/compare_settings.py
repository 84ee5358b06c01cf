"""What a comparison point is made with: the command line of benchmarks/compare.py with each
regime's defaults, a method's own values chosen on validation, the settings a point records and
the budget a record shares."""
from __future__ import annotations

import argparse
from pathlib import Path

from svdtrain.config import load_config

HERE = Path(__file__).resolve().parent
# Each regime's SVD-training recipe, chosen on validation, is its shipped config: the points are
# built from it (plus the level, seed, split and the run's machine keys), and the values below
# that default to None are read from it.
SVD_CONFIGS = {"scratch": HERE.parent / "configs" / "cifar10_resnet20.yaml",
               "pretrained": HERE.parent / "configs" / "cifar10_resnet20_compress.yaml"}
POINT_KEYS = {"seed", "val_size", "data_dir", "threads", "device", "compile", "regularizer.target_macs",
              "decompose.dense_checkpoint"}  # what a point sets on top of its shipped config
LEVELS = {"50%": 0.50, "33%": 0.33, "25%": 0.25}
METHODS = ("svd_training", "posthoc_svd", "filter_pruning", "filter_pruning_l1", "trp")
SVD_METHODS = ("svd_training", "posthoc_svd", "trp")  # the ones that cut singular values to the level
RESULT = {"pretrained": "compress_pretrained", "scratch": "compare_cifar10"}


def record_dir(args) -> Path:
    """The comparison's committed record beside its result files: one JSON per finished point,
    the dense models' summaries and the commands. Any machine resumes the seeds and levels
    still missing from it, and --report-only rebuilds the result files from it alone."""
    return Path(args.out) / f"{RESULT[args.regime]}_points"


def per_method(pairs: list[str], flag: str, parse, methods=METHODS) -> dict:
    """METHOD=VALUE pairs as {method: parse(VALUE)}; a malformed pair (parse gives None) is a
    one-line error."""
    out = {}
    for pair in pairs:
        method, _, raw = pair.partition("=")
        out[method] = parse(raw)
        if method not in methods or out[method] is None:
            raise SystemExit(f"{flag} {pair}: expected METHOD=VALUE with METHOD one of {', '.join(methods)}")
    return out


def positive_float(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value > 0 else None


def rank_score(args, method: str) -> str:
    """How a method ranks singular values where it cuts to the level: --method-rank-score, else --rank-score."""
    return args.method_rank_score.get(method, args.rank_score)


def lr_overrides(args, method: str) -> list[str]:
    """A method's own peak learning rate (--method-lr): from a trained model for E_c and E_f; from
    scratch the one-cycle's peak over E (fine-tuning keeps --finetune-lr, as the dense model's)."""
    lr = args.method_lr.get(method)
    if lr is None:
        return []
    return [f"optim.lr={lr}"] + ([f"optim.finetune_lr={lr}"] if args.regime == "pretrained" else [])


def method_settings(args, method: str) -> dict:
    """The hyper-parameters of a method that a point records (and a rerun must match)."""
    own = {"svd_training": {"strength": args.strength, "target_at": args.target_at, "gradual": args.gradual,
                            "schedule": args.svd_schedule,
                            "init": args.svd_init if args.regime == "scratch" and not args.svd_warmup else "svd",
                            **({"warmup": args.svd_warmup} if args.svd_warmup else {})},
           "filter_pruning": {"group_reg": args.group_reg},
           "trp": {"every": args.trp_every, "energy": args.trp_energy, "nuclear": args.trp_nuclear}}.get(method, {})
    if method in SVD_METHODS and (rule := rank_score(args, method)) != "energy":  # earlier points: energy, unrecorded
        own["rank_score"] = rule
    if method in args.method_lr:
        own["lr"] = args.method_lr[method]
    if method in ("svd_training", "posthoc_svd") and args.recalibrate:
        own["recalibrate"] = args.recalibrate
    if method in whitened(args):
        own.update(calibration=args.calibration, whiten=args.whiten)
        if args.orth_metric != "activation":  # earlier points: activation, unrecorded
            own["orth_metric"] = args.orth_metric
        if args.unwhiten:
            own["unwhiten"] = True
    return own


def whitened(args) -> tuple[str, ...]:
    """The methods whose SVD start is activation-aware (--calibration): those that decompose a
    trained model (from scratch SVD training starts from its own init, unless warmed up)."""
    if not args.calibration:
        return ()
    return ("svd_training", "posthoc_svd") if args.regime == "pretrained" or args.svd_warmup else ("posthoc_svd",)


def calibration_overrides(args, method: str) -> list[str]:
    return [f"decompose.calibration={args.calibration}", f"decompose.whiten={args.whiten}",
            f"decompose.orth_metric={args.orth_metric}", f"prune.unwhiten={str(args.unwhiten).lower()}"] \
        if method in whitened(args) else []


def budget_of(args) -> dict:
    """The budget every point of a record shares: epochs, learning rates, validation split."""
    return {"regime": args.regime, "val_size": args.val_size, "finetune_epochs": args.finetune_epochs,
            "finetune_lr": args.finetune_lr,
            **({"dense_epochs": args.dense_epochs, "compress_epochs": args.compress_epochs, "lr": args.lr}
               if args.regime == "pretrained" else {"train_epochs": args.train_epochs})}


def recipe_defaults(args) -> None:
    """Fill the values left None from the regime's shipped config (SVD_CONFIGS): from scratch
    the budget (E, E_f, fine-tuning lr) and SVD training's recipe; for a trained model SVD
    training's recipe (its schedule over E_c + E_f, and its own lr where it is not the budget's)."""
    cfg = load_config(SVD_CONFIGS[args.regime], ["decompose.dense_checkpoint=(each point's)"])
    r, scratch = cfg["regularizer"], args.regime == "scratch"
    for name, value in (("train_epochs", cfg["epochs"]["train"] if scratch else 10),
                        ("finetune_epochs", cfg["epochs"]["finetune"] if scratch else 2),
                        ("finetune_lr", cfg["optim"]["finetune_lr"] if scratch else 0.02),
                        ("strength", r["strength"]), ("target_at", r["target_at"]),
                        ("gradual", cfg["prune"]["gradual"]), ("svd_init", cfg["decompose"]["init"]),
                        ("svd_schedule", "split" if cfg["epochs"]["finetune"] else "one")):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not scratch and cfg["optim"]["lr"] != args.lr:  # from scratch every method trains the config's lr
        args.method_lr.setdefault("svd_training", cfg["optim"]["lr"])


def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    """The command line, with each regime's defaults filled in."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=tuple(RESULT), default="pretrained")
    p.add_argument("--data-dir", default=str(Path.home() / ".cache" / "cifar10"))
    p.add_argument("--work", default=None, help="run directories (default: work/<regime>)")
    p.add_argument("--out", default=str(HERE / "results"),
                   help="result files, and beside them the record of finished points (<result>_points/)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--levels", nargs="+", default=["33%"], choices=list(LEVELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--dense-epochs", type=int, default=20, help="pretrained: the dense model's training")
    p.add_argument("--compress-epochs", type=int, default=4, help="pretrained: E_c")
    p.add_argument("--train-epochs", type=int, default=None, help="scratch: E (default: the scratch config's)")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="E_f (default: from scratch the config's; for a trained model 2)")
    p.add_argument("--lr", type=float, default=0.02, help="pretrained: peak lr of E_c (cosine)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="default: from scratch the config's; for a trained model 0.02")
    p.add_argument("--method-lr", nargs="+", default=[], metavar="METHOD=LR",
                   help="a method's own peak lr (chosen on validation): from a trained model of E_c and E_f, "
                        "from scratch of E, e.g. svd_training=0.05")
    p.add_argument("--strength", type=float, default=None, help="SVD training: the sparsity strength to start from")
    p.add_argument("--target-at", type=float, default=None,
                   help="SVD training: where in its training the level is reached")
    p.add_argument("--gradual", action=argparse.BooleanOptionalAction, default=None,
                   help="SVD training: mask values along the schedule (prune.gradual)")
    p.add_argument("--svd-schedule", choices=("split", "one"), default=None,
                   help="SVD training: train + fine-tune (split), or both as one train stage under one schedule "
                        "(one; --target-at is then a fraction of all of it); default: one where the config "
                        "fine-tunes 0 epochs")
    p.add_argument("--svd-init", choices=("dense_init", "random", "random_scaled"), default=None,
                   help="scratch: SVD training's init (the init study compares them on the validation split)")
    p.add_argument("--svd-warmup", type=int, default=0, metavar="K",
                   help="scratch: SVD training's first K of the E epochs train the dense model; the rest of the "
                        "same schedule trains the SVD form of it (decompose.init svd)")
    p.add_argument("--group-reg", type=float, default=None,
                   help="filter_pruning: group-norm weight (default: from scratch 1e-4, chosen on validation; "
                        "for a trained model 5e-4, Torch-Pruning's CIFAR default)")
    p.add_argument("--recalibrate", type=int, default=0,
                   help="svd_training, posthoc_svd: re-estimate BatchNorm statistics on this many training "
                        "batches after the cut (prune.recalibrate)")
    p.add_argument("--calibration", type=int, default=0, metavar="N",
                   help="svd_training and posthoc_svd from a trained model: an activation-aware SVD start, "
                        "whitened on N training batches (decompose.calibration)")
    p.add_argument("--whiten", choices=("cholesky", "diag"), default="cholesky",
                   help="with --calibration: SVD-LLM's Cholesky whitening or ASVD's diagonal scaling")
    p.add_argument("--orth-metric", choices=("activation", "plain"), default="activation",
                   help="with --calibration: the orthogonality term on the whitened V in the activation metric "
                        "(V^T C V = I) or plain (V^T V = I)")
    p.add_argument("--unwhiten", action="store_true",
                   help="with --calibration: once the ranks are final, re-factor the whitened layers as plain SVDs "
                        "(prune.unwhiten)")
    p.add_argument("--rank-score", choices=("energy", "loss"), default="energy",
                   help="svd_training, posthoc_svd and trp: rank singular values by energy share or loss importance")
    p.add_argument("--method-rank-score", nargs="+", default=[], metavar="METHOD=RULE",
                   help="a method's own rule (energy or loss), chosen on validation, e.g. posthoc_svd=loss")
    p.add_argument("--trp-every", type=int, default=20)
    p.add_argument("--trp-energy", type=float, default=0.98)
    p.add_argument("--trp-nuclear", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", choices=("inductor",), default=None,
                   help="train the pipeline's runs compiled (the config's compile key; faster, same recipe)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    args.method_lr = per_method(args.method_lr, "--method-lr", positive_float)
    args.method_rank_score = per_method(args.method_rank_score, "--method-rank-score",
                                        lambda raw: raw if raw in ("energy", "loss") else None, SVD_METHODS)
    scratch = args.regime == "scratch"
    if args.group_reg is None:  # chosen on the scratch validation split; Torch-Pruning's CIFAR default
        args.group_reg = 1e-4 if scratch else 5e-4
    recipe_defaults(args)
    if scratch and (inert := sorted(set(args.method_lr) & {"posthoc_svd", "filter_pruning_l1"})):
        raise SystemExit(f"--method-lr {inert[0]}: from scratch it trains no E of its own (it starts from the "
                         "seed's dense model); its fine-tuning takes --finetune-lr")
    if args.svd_warmup and not (scratch and 0 < args.svd_warmup < args.target_at * args.train_epochs):
        raise SystemExit("--svd-warmup K: from scratch only, with 0 < K < --target-at x --train-epochs "
                         "(the level is reached after the warm-up)")
    return args
