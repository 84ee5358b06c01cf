"""The `svdtrain` command: a thin layer over svdtrain.train.Run."""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

from .config import ConfigError, load_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped inside the package
STAGE_COMMANDS = ("train", "prune", "finetune", "export", "report")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svdtrain", description="Learn low-rank networks by SVD training.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, config: bool, out_required: bool):
        if config:
            sp.add_argument("config", help="YAML config file")
        sp.add_argument("--out", required=out_required, help="run directory (resumes if it holds a run)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.1")

    common(sub.add_parser("run", help="all stages: train, prune, fine-tune, export, report"), True, False)
    common(sub.add_parser("train", help="stages orth + train"), True, True)
    for name, text in [("prune", "prune singular values of a trained run"),
                       ("finetune", "fine-tune a pruned run at fixed ranks"),
                       ("export", "write compact.pt2, model_state.pt, ranks.json"),
                       ("report", "write summary.json, report.md and plots")]:
        common(sub.add_parser(name, help=text), False, True)
    ev = sub.add_parser("evaluate", help="test accuracy of a run's model and of its compact.pt2")
    ev.add_argument("--out", required=True)
    demo = sub.add_parser("demo", help="the whole pipeline on the bundled digits set (no download)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quiet", action="store_true")
    dl = sub.add_parser("download", help="download a dataset (needs internet)")
    dl.add_argument("dataset", choices=["cifar10", "cifar100"])
    dl.add_argument("--data-dir", default="data")
    return p


def _find_config(name: str) -> Path:
    """A config path, or the name of a shipped one (`cifar10_resnet20` or `digits.yaml`)."""
    path = Path(name)
    if not path.exists():
        for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    return path


def _result_line(summary: dict, out: Path) -> str:
    return (f"svdtrain: top-1 {100 * summary['accuracy']:.2f}% at {100 * summary['macs_ratio']:.1f}% of dense MACs "
            f"({summary['macs'] / 1e6:.3f}M of {summary['dense_macs'] / 1e6:.3f}M), params {summary['params']:,} "
            f"of {summary['dense_params']:,} -> report: {out / 'report.md'}")


def main(argv=None) -> int:
    parser = _parser()
    # Overrides may come after options (`run cfg.yaml --out d optim.lr=0.1`), which a
    # nargs="*" positional alone does not accept: collect the leftovers as overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return _dispatch(args)
    except ImportError as err:  # the extras' own hint only where one of them is missing
        cli_extra = (err.name or "").split(".")[0] in ("tqdm", "yaml", "matplotlib", "sklearn", "PIL")
        hint = "; install the command-line extras: pip install 'svdtrain[cli]'" if cli_extra else ""
        print(f"svdtrain: error: {err}{hint}", file=sys.stderr)
        return 2
    except (ConfigError, OSError, ValueError, RuntimeError, TypeError, pickle.UnpicklingError, EOFError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"svdtrain: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdtrain: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _dispatch(args) -> int:
    from .train import CHECKPOINT, Run, RunError

    if args.command == "download":
        from .data import download_cifar
        print(download_cifar(args.dataset, args.data_dir))
        return 0
    if args.command == "evaluate":
        return _evaluate(Path(args.out))
    if args.command == "demo":
        args.config, args.overrides, until = str(CONFIG_DIR / "digits.yaml"), [], "report"
    elif args.command == "run":
        until = "report"
    else:
        until = args.command
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    if args.command in ("run", "train", "demo"):
        cfg = load_config(_find_config(args.config), args.overrides)
    else:  # later stages: the run's own config, plus overrides for stages not yet run
        if not (out / CHECKPOINT).exists():
            raise RunError(f"no run in {out}; start one with `svdtrain train CONFIG --out {out}`")
        cfg = load_config(None, args.overrides, base=Run(out).cfg) if args.overrides else None
    run = Run(out, cfg, quiet=args.quiet, restart=args.command in ("run", "train", "demo"))
    if args.command == "report" and "report" in run.state["done"]:
        run.state["done"].remove("report")  # a finished run's report is rebuilt on request
    if args.command in STAGE_COMMANDS[1:]:
        run.require_before(until)
    summary = run.execute(until)
    if run.rank == 0:
        if summary is not None:
            print(_result_line(summary, out))
        else:
            print(f"svdtrain: {until} done in {out}")
    return 0


def _evaluate(out: Path) -> int:
    import torch

    from .context import run_dataset
    from .engine import evaluate
    from .loader import BatchLoader
    from .train import Run, load_run_model

    run = Run(out)
    cfg = run.cfg
    data = run_dataset(cfg)
    loader = BatchLoader(data.x_test, data.y_test, cfg["eval_batch_size"], train=False,
                         mean=data.mean, std=data.std)
    result = {}
    if (out / "model_state.pt").exists():
        result["model_accuracy"] = evaluate(load_run_model(out), loader)
    if (out / "compact.pt2").exists():
        compact = torch.export.load(str(out / "compact.pt2")).module()
        result["compact_accuracy"] = evaluate(compact, loader)
    if not result:
        raise RuntimeError(f"{out} has no exported model yet; run `svdtrain export --out {out}`")
    print(json.dumps(result))
    return 0
