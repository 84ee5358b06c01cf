"""The SVD-training pipeline: train -> prune -> fine-tune -> export -> report, resumable.

A run lives in one output directory. `checkpoint.pt` (written atomically after every
epoch) holds the model, optimizer, scheduler, RNG states, metrics and the stage reached,
so rerunning the same command resumes where a killed run stopped, with the same result.
`Run` (this file) owns the directory, the checkpoint and the order of the stages;
context.setup builds what the stages work on, stages.py holds the stage bodies, and their
training epochs run in engine.train_phase, the loop `engine.fit` runs for any other model.

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
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import config as config_mod
from .checkpoint import atomic_save, file_digest, model_state, new_training_state, write_metrics
from .context import build_run_model, run_dataset, setup
from .distributed import setup_distributed
from .engine import STAGES, RunError
from .stages import STAGE_BODIES

CHECKPOINT = "checkpoint.pt"
FORMAT = "svdtrain-run"


class Run:
    """One pipeline run in `out_dir`; create with a config, or resume what is there. Its
    checkpoint is a training state (checkpoint.py) with the run's fields: config, stage (the
    one in progress), done (stages finished), step (optimizer steps so far) and info (what
    the stages measured)."""

    def __init__(self, out_dir, cfg: dict | None = None, quiet: bool = False, log=print, restart: bool = False):
        """restart: a run that has neither trained a step nor cut (it failed at its start)
        begins again with `cfg` (the `run` / `train` commands), instead of merging it."""
        self.out = Path(out_dir)
        self.quiet, self.log, self.restart = quiet, log, restart
        self.rank, self.world, self.device = 0, 1, torch.device("cpu")
        if cfg is not None:
            self.rank, self.world, self.device = setup_distributed(cfg["device"])
            self.state = self._load_or_create(cfg)
        else:  # a later stage's command: a cpu run stays on cpu (under torchrun: gloo), else auto
            self.state = self._load_or_create(None)
            saved = self.state["config"]["device"]
            self.rank, self.world, self.device = setup_distributed("cpu" if saved == "cpu" else "auto")
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
            if cfg is not None and self.restart and self._untouched(state):
                # nothing trained or cut yet (a run that failed at its start): begin with the new config
                return new_training_state(FORMAT, 1, config=cfg, stage=STAGES[0], step=0, done=[], info={})
            if cfg is not None:
                self._merge_config(state, cfg)
            return state
        if cfg is None:
            raise RunError(f"no run in {self.out} (no {CHECKPOINT}); start one with `svdtrain run CONFIG --out {self.out}`")
        if self.out.exists() and not self.out.is_dir():
            raise RunError(f"--out {self.out} is a file, not a directory")
        # A kill during the very first checkpoint write leaves only its temp file.
        if self.out.exists() and any(p.name != CHECKPOINT + ".tmp" for p in self.out.iterdir()):
            raise RunError(f"{self.out} is not empty and holds no svdtrain run; choose a new --out")
        try:  # now, not after the first epoch
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunError(f"cannot create --out {self.out}: {err.strerror}") from None
        return new_training_state(FORMAT, 1, config=cfg, stage=STAGES[0], step=0, done=[], info={})

    @staticmethod
    def _untouched(state) -> bool:
        """No optimizer step taken and no stage that changes the model done (only stages of
        zero epochs, e.g. orth with epochs.orth=0)."""
        return state["step"] == 0 and state["epoch"] == 0 and not set(state["done"]) - {"orth", "train"}

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
        def first(k):  # what either config reads it in: the earlier stage
            stages = [s for s in (config_mod.key_stage(k, state["config"]), config_mod.key_stage(k, cfg)) if s]
            return min(stages, key=STAGES.index) if stages else None
        locked = [k for k in changed if first(k) in done
                  and (config_mod.read_by(k, state["config"]) or config_mod.read_by(k, cfg))]
        if locked:
            read = ", ".join(f"{k} ({first(k)})" for k in locked)
            raise RunError(f"the run already passed the stage that uses {read}; "
                           "these cannot change on resume (use a new --out)")
        state["config"] = cfg

    def save(self) -> None:
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_save(self.state, self.out / CHECKPOINT)
        write_metrics(self.out / "metrics.jsonl", self.state["metrics"])

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
        ctx = setup(self.cfg, self.state, self.out, self.save, quiet=self.quiet, log=self.log)
        self.rank, self.world, self.device = ctx.rank, ctx.world, ctx.device
        last = STAGES.index(until)
        for stage in STAGES[: last + 1]:
            if stage in self.state["done"]:
                continue
            if self.state["stage"] != stage:
                self.state.update(stage=stage, epoch=0, optimizer=None)
            STAGE_BODIES[stage](ctx)
            self.state["done"].append(stage)
            self.state.update(epoch=0, optimizer=None, model=model_state(ctx.model))
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
    ours = {"metrics.jsonl", "metrics.jsonl.tmp", CHECKPOINT + ".tmp"}  # what a killed fork leaves
    if dst.is_dir() and any(p.name not in ours for p in dst.iterdir()):
        raise RunError(f"{dst} is not empty and holds no svdtrain run; choose a new folder")
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
