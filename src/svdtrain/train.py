"""The SVD-training pipeline: train -> prune -> fine-tune -> export -> report, resumable.

A run lives in one output directory. `checkpoint.pt` (written atomically after every
epoch) holds the model, optimizer, scheduler, RNG states, metrics and the stage reached,
so rerunning the same command resumes where a killed run stopped, with the same result.

Stages, in order:
  orth      train with the orthogonality term only (epochs.orth; often 0)
  train     train with orthogonality + sparsity (dense runs: plain training)
  prune     remove singular values by energy (prune.keep_energy) or to a MACs budget
  finetune  ranks fixed, sparsity off, orthogonality on
  export    compact.pt2 (torch.export, loads without svdtrain), model_state.pt, ranks.json
  report    summary.json, report.md and plots
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import config as config_mod
from .budget import BudgetController, budget_warning, macs_at_energy
from .checkpoint import atomic_save, atomic_write_text, rng_state, set_rng_state
from .data import load_dataset
from .loader import BatchLoader
from .decompose import decompose
from .distributed import replica_spread, setup_distributed, spread
from .engine import STAGES, RunError, evaluate, make_optimizer, train_epoch
from .export import export, export_program
from .layers import svd_layers, unwrap
from .losses import Regularizer
from .macs import count_macs, count_params, profile
from .models import build_model
from .prune import prune, ranks

log = logging.getLogger("svdtrain")

TRAIN_STAGES = ("orth", "train", "finetune")
CHECKPOINT = "checkpoint.pt"
FORMAT = "svdtrain-run"


def run_dataset(cfg: dict):
    """The dataset a run config names (errors as one-line RunErrors)."""
    kw = {"image_size": cfg["image_size"]} if cfg["dataset"] == "folder" else {}
    try:
        data = load_dataset(cfg["dataset"], cfg["data_dir"], **kw)
        return data.with_validation(cfg["val_size"]) if cfg.get("val_size") else data
    except (FileNotFoundError, ValueError) as err:
        raise RunError(str(err).splitlines()[0]) from None


def input_shape(data) -> tuple[int, int, int, int]:
    return (1, data.in_channels, data.image_size, data.image_size)


def build_run_model(cfg: dict, data, fresh: bool = True) -> nn.Module:
    """The model of a run, in SVD form unless decompose.enabled is false. fresh=False: the
    caller loads the run's own weights next, so init: svd need not read the dense checkpoint."""
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["model"], num_classes=data.num_classes, in_channels=data.in_channels)
    d = cfg["decompose"]
    if d["enabled"]:
        if d["init"] == "svd" and fresh:
            path = Path(d["dense_checkpoint"])
            if not path.is_file():
                raise RunError(f"decompose.dense_checkpoint not found: {path}")
            state = torch.load(path, map_location="cpu", weights_only=True)
            try:
                model.load_state_dict(state)
            except RuntimeError as err:
                raise RunError(f"{path} does not fit model {cfg['model']}: "
                               f"{str(err).splitlines()[0]}") from None
        # dense_init: the SVD of the freshly initialised dense weights, i.e. the dense model's
        # own starting point in SVD form (singular values spread like a Kaiming init's).
        init = "svd" if d["init"] in ("svd", "dense_init") else "random"
        decompose(model, mode=d["mode"], init=init if fresh else "random", skip=d["skip"] or None)
    return model


def _sparsity(cfg: dict, stage: str) -> tuple[str | None, float]:
    r = cfg["regularizer"]
    if stage != "train" or r["sparsity"] == "none":
        return None, 0.0
    return r["sparsity"], r["strength"]


# ----------------------------------------------------------------------------- the run
class Run:
    """One pipeline run in `out_dir`; create with a config, or resume what is there."""

    def __init__(self, out_dir, cfg: dict | None = None, quiet: bool = False, log=print):
        self.out = Path(out_dir)
        self.quiet, self.log = quiet, log
        self.rank, self.world, self.device = 0, 1, torch.device("cpu")
        if cfg is not None or (self.out / CHECKPOINT).exists():
            device = cfg["device"] if cfg is not None else "auto"
            self.rank, self.world, self.device = setup_distributed(device)
        self.state = self._load_or_create(cfg)
        if self.world > 1:
            dist.barrier()  # every rank has read the run dir before rank 0 writes to it
        self.cfg = self.state["config"]

    # ----- checkpoint -----
    def _load_or_create(self, cfg):
        path = self.out / CHECKPOINT
        if path.exists():
            try:
                # weights_only: a foreign file in --out must not run code when read
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:
                raise RunError(f"{path} is not a readable checkpoint ({type(err).__name__}); "
                               "it was left untouched: move it away or use another --out") from None
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise RunError(f"{path} is not an svdtrain run checkpoint; it was left untouched")
            state["config"] = config_mod.with_defaults(state["config"])  # keys added since it was written
            if cfg is not None:
                self._merge_config(state, cfg)
            return state
        if cfg is None:
            raise RunError(f"no run in {self.out} (no {CHECKPOINT}); start one with `svdtrain run CONFIG --out {self.out}`")
        if self.out.exists() and not self.out.is_dir():
            raise RunError(f"--out {self.out} is a file, not a directory")
        # A kill during the very first checkpoint write leaves only our temp files.
        if self.out.exists() and any(not p.name.endswith((".tmp", ".tmp.pt2")) for p in self.out.iterdir()):
            raise RunError(f"{self.out} is not empty and holds no svdtrain run; choose a new --out")
        return {"format": FORMAT, "version": 1, "config": cfg, "stage": STAGES[0], "epoch": 0,
                "step": 0, "done": [], "model": None, "optimizer": None, "rng": None,
                "metrics": [], "info": {}}

    @staticmethod
    def _merge_config(state, cfg):
        changed = config_mod.diff(state["config"], cfg)
        done = set(state["done"]) | ({state["stage"]} if state["epoch"] else set())
        locked = [k for k in changed if config_mod.key_stage(k) in done]
        if locked:
            raise RunError(f"the run already passed the stage that uses {', '.join(locked)}; "
                           "these cannot change on resume (use a new --out)")
        state["config"] = cfg

    def save(self) -> None:
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_save(self.state, self.out / CHECKPOINT)
        lines = "".join(json.dumps(m) + "\n" for m in self.state["metrics"])
        atomic_write_text(self.out / "metrics.jsonl", lines)

    # ----- setup -----
    def _setup(self):
        cfg = self.cfg
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        self.rank, self.world, self.device = setup_distributed(cfg["device"])  # a resumed run's device
        self.cuda = self.device.type == "cuda"
        self.data = run_dataset(cfg)
        self.shape = input_shape(self.data)
        fresh = self.state["model"] is None
        model = build_run_model(cfg, self.data, fresh=fresh)
        if fresh:
            info = self.state["info"]
            info["dense_macs"] = count_macs(model, self.shape, cost="dense")
            info["dense_params"] = count_params(model, cost="dense")
            info["layer_shapes"] = {n: [l.rows, l.cols] for n, l in svd_layers(model)}
        else:
            model.load_state_dict(self.state["model"])
        self.model = model.to(self.device)
        if self.cuda and cfg["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.is_svd = any(True for _ in svd_layers(self.model))
        d = self.data
        common = dict(mean=d.mean, std=d.std, rank=self.rank, world_size=self.world, device=self.device,
                      channels_last=self.cuda and cfg["channels_last"])
        self.train_loader = BatchLoader(d.x_train, d.y_train, cfg["batch_size"], train=True,
                                        augment=cfg["augment"], seed=cfg["seed"], **common)
        self.test_loader = BatchLoader(d.x_test, d.y_test, cfg["eval_batch_size"], train=False, **common)
        self.val_loader = (None if d.x_val is None else
                           BatchLoader(d.x_val, d.y_val, cfg["eval_batch_size"], train=False, **common))
        if len(self.train_loader) == 0:
            raise RunError(f"batch_size {cfg['batch_size']} is larger than the {len(d.x_train)} training images "
                           f"(per process); lower batch_size")
        if fresh and cfg["decompose"]["enabled"] and cfg["decompose"]["init"] == "svd":
            # svd init computes exactly what the dense checkpoint computes: its accuracy now
            # is the dense model's.
            self.state["info"]["dense_accuracy"] = evaluate(self.model, self.test_loader, self.world)
        if self.state["rng"] is None:
            torch.manual_seed(cfg["seed"])
            np.random.seed(cfg["seed"])
            random.seed(cfg["seed"])
        else:
            set_rng_state(self.state["rng"])

    def _ddp(self):
        if self.world == 1:
            return self.model
        # Buffers (BatchNorm statistics, pruning masks) are synced from rank 0 after every
        # epoch instead of on every forward.
        return nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.cuda else None, broadcast_buffers=False)

    # ----- stages -----
    def require_before(self, stage: str) -> None:
        """A stage command runs only once the stages before it are done."""
        missing = [s for s in STAGES[: STAGES.index(stage)] if s not in self.state["done"]]
        if missing:
            raise RunError(f"stage '{stage}' needs '{missing[0]}' first (or `svdtrain run` for all stages)")
        if stage in self.state["done"]:
            raise RunError(f"stage '{stage}' is already done in {self.out}")

    def execute(self, until: str = "report") -> dict | None:
        """Run every stage not done yet, up to and including `until`."""
        self._setup()
        last = STAGES.index(until)
        for stage in STAGES[: last + 1]:
            if stage in self.state["done"]:
                continue
            if self.state["stage"] != stage:
                self.state.update(stage=stage, epoch=0, optimizer=None)
            getattr(self, f"_stage_{stage}")()
            self.state["done"].append(stage)
            self.state.update(epoch=0, optimizer=None)
            self.state["model"] = unwrap(self.model).state_dict()
            self.save()
        if self.world > 1:
            dist.barrier()
        return self.state["info"].get("summary")

    def _epochs(self, stage):
        if not self.is_svd and stage in ("orth", "finetune"):
            return 0  # a dense run only trains
        return self.cfg["epochs"][stage]

    def _stage_orth(self):
        self._train_stage("orth")

    def _stage_train(self):
        if self.is_svd and "spectra_before" not in self.state["info"]:
            self.state["info"]["spectra_before"] = spectra(self.model)
        self._train_stage("train")
        if self.is_svd:
            self.state["info"]["spectra_after"] = spectra(self.model)
            self._check_budget()
        self._record_accuracy("accuracy_trained")

    def _train_stage(self, stage):
        epochs = self._epochs(stage)
        if epochs == 0:
            return
        cfg = self.cfg
        ddp = self._ddp()
        sparsity, strength = _sparsity(cfg, stage)
        reg = Regularizer(orth=cfg["regularizer"]["orth"] if self.is_svd else 0.0,
                          sparsity=sparsity if self.is_svd else None, strength=strength)
        opt, sched = make_optimizer(self.model, cfg, stage, epochs * len(self.train_loader))
        budget = self._budget(reg, opt, epochs * len(self.train_loader)) if sparsity and self.is_svd else None
        if self.state["optimizer"] is not None:
            opt.load_state_dict(self.state["optimizer"]["opt"])
            sched.load_state_dict(self.state["optimizer"]["sched"])
            if budget is not None:
                budget.load_state_dict(self.state["optimizer"]["budget"])

        def on_step(model):
            self.state["step"] += 1
            if budget is not None:
                budget.step()
        stage_seed = STAGES.index(stage) * 10_000
        for epoch in range(self.state["epoch"], epochs):
            t0 = time.perf_counter()
            self.train_loader.set_epoch(stage_seed + epoch)
            stats = train_epoch(ddp, self.train_loader, opt, sched, reg, cfg, self.device,
                                desc=f"{stage} {epoch + 1}/{epochs}", quiet=self.quiet or self.rank != 0,
                                world=self.world, where=f"stage '{stage}', epoch {epoch + 1}",
                                on_step=on_step)
            if self.world > 1:
                # BatchNorm statistics drift apart per rank after DDP's last broadcast: take
                # rank 0's, so every rank evaluates (and rank 0 saves) the same model.
                for buf in unwrap(self.model).buffers():
                    dist.broadcast(buf, src=0)
            stats.update(self.accuracies())
            if self.world > 1:
                stats["world_size"] = self.world
                stats["replica_spread"] = replica_spread(self.model)
            stats.update(stage=stage, epoch=epoch + 1, lr=opt.param_groups[0]["lr"],
                         seconds=round(time.perf_counter() - t0, 3), **self._rank_stats())
            if sparsity and self.is_svd:
                stats["strength"] = reg.strength
            if budget is not None:
                stats["macs_schedule"] = budget.schedule() * self.state["info"]["dense_macs"]
                if self.world > 1:  # the controller reads only synced parameters: ranks must agree
                    stats["strength_spread"] = spread(reg.strength, self.device)
            self.state["metrics"].append(stats)
            self.state.update(epoch=epoch + 1, model=unwrap(self.model).state_dict(),
                              optimizer={"opt": opt.state_dict(), "sched": sched.state_dict(),
                                         "budget": budget.state_dict() if budget is not None else None},
                              rng=rng_state())
            self.save()
            if not self.quiet and self.rank == 0:
                self.log(f"[{stage} {epoch + 1}/{epochs}] loss {stats['task_loss']:.3f} "
                         f"train {stats['train_accuracy']:.2%} test {stats['test_accuracy']:.2%} "
                         f"{stats['seconds']:.0f}s")

    def accuracies(self) -> dict:
        """test_accuracy, and val_accuracy when the run holds out a validation split."""
        out = {"test_accuracy": evaluate(self.model, self.test_loader, self.world)}
        if self.val_loader is not None:
            out["val_accuracy"] = evaluate(self.model, self.val_loader, self.world)
        return out

    def _record_accuracy(self, key: str) -> None:
        """info[key] = test accuracy now; info['val_' + key] = validation accuracy if held out."""
        acc = self.accuracies()
        self.state["info"][key] = acc["test_accuracy"]
        if "val_accuracy" in acc:
            self.state["info"]["val_" + key] = acc["val_accuracy"]

    def _budget(self, reg: Regularizer, opt, total_steps: int) -> BudgetController | None:
        r, p = self.cfg["regularizer"], self.cfg["prune"]
        if not r["target_macs"]:
            return None
        return BudgetController(self.model, reg, r["target_macs"], self.shape, total_steps,
                                target_at=r["target_at"], keep_energy=p["keep_energy"],
                                mask=p["gradual"], optimizer=opt)

    def _rank_stats(self) -> dict:
        """Mean rank and deploy MACs if pruned now at prune.keep_energy (SVD runs only)."""
        if not self.is_svd:
            return {}
        if not hasattr(self, "_profile"):
            self._profile = profile(self.model, self.shape)
        total, rank_list = macs_at_energy(self._profile, self.cfg["prune"]["keep_energy"])
        return {"mean_rank": sum(rank_list) / len(rank_list), "macs_at_threshold": total}

    def _check_budget(self):
        """After a budget-driven train stage: warn (log + report) if the target was missed."""
        r, info = self.cfg["regularizer"], self.state["info"]
        last = next((m for m in reversed(self.state["metrics"]) if m.get("stage") == "train"), None)
        if not r["target_macs"] or last is None or "macs_at_threshold" not in last:
            return
        warning = budget_warning(last["macs_at_threshold"] / info["dense_macs"], r["target_macs"],
                                 self.cfg["prune"]["keep_energy"])
        if warning:
            info["budget_warning"] = warning
            log.warning("svdtrain: %s", info["budget_warning"])
            if not self.quiet and self.rank == 0:
                self.log(f"WARNING: {info['budget_warning']}")

    def _stage_prune(self):
        info = self.state["info"]
        if not self.is_svd:
            return
        p = self.cfg["prune"]
        budget = p["macs_budget"] or self.cfg["regularizer"]["target_macs"]
        if budget > 0:
            info["ranks"] = prune(self.model, macs_budget=budget, input_shape=self.shape)
        else:
            info["ranks"] = prune(self.model, keep_energy=p["keep_energy"])
        self._record_accuracy("accuracy_pruned")
        info["macs_pruned"] = count_macs(self.model, self.shape)
        self.state["metrics"].append({"stage": "prune", "epoch": 0, "test_accuracy": info["accuracy_pruned"],
                                      **({"val_accuracy": info["val_accuracy_pruned"]} if "val_accuracy_pruned" in info else {}),
                                      "macs": info["macs_pruned"], "mean_rank": _mean(info["ranks"])})
        if not self.quiet and self.rank == 0:
            self.log(f"[prune] ranks {list(info['ranks'].values())} -> test {info['accuracy_pruned']:.2%}, "
                     f"MACs {info['macs_pruned'] / info['dense_macs']:.1%} of dense")

    def _stage_finetune(self):
        self._train_stage("finetune")

    def _stage_export(self):
        info = self.state["info"]
        self._record_accuracy("accuracy")
        info["macs"] = count_macs(self.model, self.shape)
        info["params"] = count_params(self.model)
        if self.rank != 0:
            return
        model = unwrap(self.model).eval()
        atomic_save({k: v.cpu() for k, v in model.state_dict().items()}, self.out / "model_state.pt")
        atomic_write_text(self.out / "ranks.json", json.dumps(ranks(model), indent=1) + "\n")
        ex = self.cfg["export"]
        # Timed (choose=latency) on the run's own device, then moved to the CPU to be saved.
        compact = export(model, input_shape=(ex["batch"],) + tuple(self.shape[1:]), choose=ex["choose"],
                         channels_last=ex["channels_last"])
        compact = compact.to("cpu", memory_format=torch.contiguous_format).eval()
        # What ships: a latency export may keep a layer dense or pad its rank.
        info["macs"], info["params"] = count_macs(compact, self.shape), count_params(compact)
        example = torch.zeros((2,) + self.shape[1:])
        tmp = self.out / "compact.tmp.pt2"
        export_program(compact, example, tmp, dynamic_batch=True)
        os.replace(tmp, self.out / "compact.pt2")

    def _stage_report(self):
        info = self.state["info"]
        summary = {
            "accuracy": info["accuracy"],
            "dense_accuracy": info.get("dense_accuracy"),
            "accuracy_trained": info.get("accuracy_trained"),
            "accuracy_pruned": info.get("accuracy_pruned"),
            **{k: info[k] for k in ("val_accuracy", "val_accuracy_trained", "val_accuracy_pruned") if k in info},
            "macs": info["macs"], "dense_macs": info["dense_macs"],
            "macs_ratio": info["macs"] / info["dense_macs"],
            "params": info["params"], "dense_params": info["dense_params"],
            "ranks": info.get("ranks", {}),
            "keep_energy": self.cfg["prune"]["keep_energy"] if self.is_svd else None,
            "macs_budget": self.cfg["prune"]["macs_budget"] or self.cfg["regularizer"]["target_macs"] or None,
            "budget_warning": info.get("budget_warning"),
            "model": self.cfg["model"], "dataset": self.cfg["dataset"],
            "train_seconds": sum(m.get("seconds", 0.0) for m in self.state["metrics"]),
        }
        info["summary"] = summary
        if self.rank != 0:
            return
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        from .report import write_report
        write_report(self.out, summary, self.state["metrics"], info, self.cfg)


def _mean(d: dict) -> float:
    return sum(d.values()) / max(1, len(d))


def spectra(model: nn.Module) -> dict[str, list[float]]:
    """Active singular values of each SVD layer, descending."""
    return {n: sorted(l.s.detach()[l.active].abs().cpu().tolist(), reverse=True)
            for n, l in svd_layers(model)}


def fork_run(src, dst) -> Path:
    """Start a new run in `dst` from the state of the run in `src` (e.g. one trained run pruned
    to several budgets): its checkpoint and metrics are copied; later stages then run in `dst`
    with their own config keys. A `dst` that already holds a run is kept as it is."""
    src, dst = Path(src), Path(dst)
    if (dst / CHECKPOINT).exists():
        return dst
    if not (src / CHECKPOINT).exists():
        raise RunError(f"no run to fork in {src}")
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", CHECKPOINT):  # the checkpoint last: its presence marks a run
        if (src / name).exists():
            tmp = dst / (name + ".tmp")
            tmp.write_bytes((src / name).read_bytes())
            os.replace(tmp, dst / name)
    return dst


def load_run_model(out_dir) -> nn.Module:
    """Rebuild a finished run's SVD-form model from its config and model_state.pt."""
    out = Path(out_dir)
    state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    cfg = state["config"]
    model = build_run_model(cfg, run_dataset(cfg), fresh=False)
    model.load_state_dict(torch.load(out / "model_state.pt", map_location="cpu", weights_only=True))
    return model.eval()
