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

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import config as config_mod
from .checkpoint import atomic_save, file_digest, set_rng_state, write_metrics
from .data import load_dataset
from .decompose import decompose
from .distributed import setup_distributed
from .engine import STAGES, RunError, evaluate
from .layers import svd_layers, unwrap
from .loader import BatchLoader
from .macs import count_macs, count_params
from .models import build_model
from .stages import Stages

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
        init = "svd" if d["init"] in ("svd", "dense_init") else d["init"]
        decompose(model, mode=d["mode"], init=init if fresh else "random", skip=d["skip"] or None,
                  input_shape=input_shape(data) if fresh else None)
    return model


class Run(Stages):
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
        # The dense checkpoint is named by path; the run is tied to its content, so the same
        # bytes at another path (a moved or copied work directory) is no change.
        key = "decompose.dense_checkpoint"
        if key in changed:  # runs from before the digest was recorded: read the old path's file
            was = (state["info"].get("dense_checkpoint_sha256")
                   or file_digest(config_mod.flatten(state["config"]).get(key, "")))
            if was is not None and file_digest(cfg["decompose"]["dense_checkpoint"]) == was:
                changed.remove(key)
        done = set(state["done"]) | ({state["stage"]} if state["epoch"] else set())
        locked = [k for k in changed if config_mod.key_stage(k) in done
                  and (config_mod.read_by(k, state["config"]) or config_mod.read_by(k, cfg))]
        if locked:
            raise RunError(f"the run already passed the stage that uses {', '.join(locked)}; "
                           "these cannot change on resume (use a new --out)")
        state["config"] = cfg

    def save(self) -> None:
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_save(self.state, self.out / CHECKPOINT)
        write_metrics(self.out / "metrics.jsonl", self.state["metrics"])

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
            if cfg["decompose"]["enabled"] and cfg["decompose"]["init"] == "svd":
                info["dense_checkpoint_sha256"] = file_digest(cfg["decompose"]["dense_checkpoint"])
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
        """The module a training stage calls: the model, in DDP across ranks, compiled if asked."""
        model = self.model
        if self.world > 1:
            # Buffers (BatchNorm statistics, pruning masks) are synced from rank 0 after every
            # epoch instead of on every forward.
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.cuda else None, broadcast_buffers=False)
        return torch.compile(model, backend=self.cfg["compile"]) if self.cfg["compile"] else model

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
