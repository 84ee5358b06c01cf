"""Crash-safe files, RNG state and the training state: what lets a killed run resume to the
identical result.

A training state is a dict with the keys `format`, `version`, `epoch` (epochs done in the
current phase), `metrics` (one dict per epoch), `model` (state_dict on the CPU), `optimizer`
({"opt": ..., "sched": ..., other stepped parts such as "budget"}, or None before the phase's
first epoch) and `rng`. `engine.fit` writes one as its checkpoint file; a pipeline run's
checkpoint is one with the run's own fields added (config, stage, done, info, step)."""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch


def file_digest(path: str | Path) -> str | None:
    """SHA-256 of a file's bytes (None if it is not a file): a run recognises its dense
    checkpoint by content, so a copy at another path resumes it."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


TRAIN_FORMAT = "svdtrain-train"


def new_training_state(format: str = TRAIN_FORMAT, version: int = 1, **fields) -> dict:
    """A training state before its first epoch; `fields` adds a caller's own keys."""
    return {"format": format, "version": version, "epoch": 0, "metrics": [], "model": None,
            "optimizer": None, "rng": None, **fields}


def model_state(model) -> dict:
    """A model's state_dict detached on the CPU; non-tensor entries (a layer's extra state) as
    they are."""
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}


def save_training_state(state: dict, model, epoch: int, **parts) -> None:
    """Record a phase's progress in `state` after `epoch` epochs: the model's weights, the
    state_dict of each stepped part (optimizer, scheduler, ...; None for a part that is None)
    under state["optimizer"], and the RNG states."""
    state.update(epoch=epoch, model=model_state(model), rng=rng_state(),
                 optimizer={k: None if p is None else p.state_dict() for k, p in parts.items()})


def load_training_state(state: dict, model, **parts) -> None:
    """Resume what save_training_state recorded: the model's weights, each part that is not
    None, the RNG states."""
    model.load_state_dict(state["model"])
    for name, part in parts.items():
        if part is not None:
            part.load_state_dict(state["optimizer"][name])
    set_rng_state(state["rng"])


def rng_state() -> dict:
    """RNG states as tensors and plain values, so checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            # this process's device only: get_rng_state_all would open a context on every GPU
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file, then rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Per-epoch metrics as JSON lines (metrics.jsonl), written atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
