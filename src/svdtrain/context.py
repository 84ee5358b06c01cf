"""What a pipeline run's stages work on: the config, the run's state, the model on its device,
the data loaders and the process group, built from a run config by `setup`."""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .checkpoint import file_digest, set_rng_state
from .data import load_dataset
from .decompose import decompose
from .distributed import setup_distributed
from .engine import RunError, evaluate
from .layers import svd_layers
from .loader import BatchLoader
from .macs import count_macs, count_params
from .models import build_model
from .prune import check_rank_config

log = logging.getLogger("svdtrain")


def run_dataset(cfg: dict):
    """The dataset a run config names (errors as one-line RunErrors)."""
    kw = {"image_size": cfg["image_size"]} if cfg["dataset"] == "folder" else {}
    try:
        data = load_dataset(cfg["dataset"], cfg["data_dir"], **kw)
        if not cfg.get("val_size"):
            return data
        return data.with_validation(cfg["val_size"], stratified=cfg.get("val_split") == "stratified")
    except (FileNotFoundError, ValueError) as err:
        raise RunError(str(err).splitlines()[0]) from None


def data_fingerprint(data) -> dict:
    """What identifies a run's data across resumes (data_dir may move): the split sizes and a
    digest of the first and last 16 images of each split."""
    digest = hashlib.sha256()
    for x in (data.x_train, data.x_test):
        for part in (x[:16], x[-16:]):
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
    return {"train": len(data.x_train), "test": len(data.x_test), "sha256": digest.hexdigest()}


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
            if not isinstance(state, dict):
                raise RunError(f"decompose.dense_checkpoint {path} holds a {type(state).__name__}, "
                               "not a state_dict (or a dense run's checkpoint.pt)")
            if isinstance(state.get("model"), dict) and "config" in state:  # a dense run's checkpoint.pt
                state = state["model"]
            try:
                model.load_state_dict(state)
            except RuntimeError as err:
                raise RunError(f"{path} does not fit model {cfg['model']}: "
                               f"{str(err).splitlines()[0]}") from None
        # dense_init: the SVD of the freshly initialised dense weights, i.e. the dense model's
        # own starting point in SVD form (singular values spread like a Kaiming init's).
        init = "svd" if d["init"] in ("svd", "dense_init") else d["init"]
        decompose(model, mode=d["mode"], init=init if fresh else "random", skip=d["skip"] or None,
                  input_shape=input_shape(data) if fresh else None,
                  calibration=calibration_batches(cfg, data) if fresh and d["calibration"] else None,
                  whiten=d["whiten"])
        if d["orth_metric"] == "plain":  # orthogonality of V itself, not in the activation metric
            for _, layer in svd_layers(model):
                layer.set_metric(None)
        if cfg["prune"]["ranks"] and fresh:  # a bad file is refused before training, not after it
            read_rank_file(cfg["prune"]["ranks"], model, quiet=True)
    return model


def read_rank_file(path, model: nn.Module, quiet: bool = False) -> dict:
    """prune.ranks: the {layer name: rank} of a JSON file, checked against `model` (errors as
    one-line RunErrors); the SVD layers it does not name are logged (they keep their ranks)."""
    try:
        config = json.loads(Path(path).read_text())
        check_rank_config(model, config)
    except (OSError, ValueError) as err:
        raise RunError(f"prune.ranks {path}: {str(err).splitlines()[0]}") from None
    left = [name for name, _ in svd_layers(model) if name not in config]
    if left and not quiet:
        log.warning("svdtrain: prune.ranks names %d of the %d SVD layers; %s and the others it does not name "
                    "keep their ranks", len(config), len(config) + len(left), left[0])
    return config


def calibration_batches(cfg: dict, data):
    """The first decompose.calibration training batches of the run's seed (augmented as in
    training; the same on every DDP rank), for an activation-aware init."""
    loader = BatchLoader(data.x_train, data.y_train, cfg["batch_size"], train=True, augment=cfg["augment"],
                         seed=cfg["seed"], mean=data.mean, std=data.std)
    return itertools.islice((x for x, _ in loader), cfg["decompose"]["calibration"])


@dataclass
class RunContext:
    """A run's stages read and write through this: `state` is the run checkpoint (stages
    record info and metrics in it), save() writes it (rank 0 only), `out` the run directory."""
    cfg: dict
    state: dict
    out: Path
    save: Callable[[], None]
    model: nn.Module
    data: object
    shape: tuple[int, int, int, int]
    train_loader: BatchLoader
    test_loader: BatchLoader
    val_loader: BatchLoader | None
    device: torch.device
    is_svd: bool  # the model has SVD-form layers (else a dense run: it only trains)
    rank: int = 0
    world: int = 1
    quiet: bool = False
    log: Callable = print
    cache: dict = field(default_factory=dict)  # values computed once per process (MACs profile)

    @property
    def verbose(self) -> bool:
        """Progress lines are printed by rank 0 of a run not asked to be quiet."""
        return not self.quiet and self.rank == 0

    def training_module(self) -> nn.Module:
        """The module a training stage calls: the model, in DDP across ranks, compiled if asked."""
        model = self.model
        if self.world > 1:
            # Buffers (BatchNorm statistics, pruning masks) are synced from rank 0 after every
            # epoch instead of on every forward.
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        # dynamic=False: every compile specializes to the model's ranks. Otherwise a second run in one
        # process (other ranks, same forward code) gets symbolic sizes for the kept values' index,
        # which inductor cannot always lower (tests/test_pipeline.py).
        return torch.compile(model, backend=self.cfg["compile"], dynamic=False) if self.cfg["compile"] else model


def setup(cfg: dict, state: dict, out: Path, save: Callable[[], None], quiet: bool = False,
          log=print) -> RunContext:
    """Join the process group, load the data, build the model (a fresh one, recording the dense
    model's MACs, params and layer shapes in state["info"]; or the state's weights), the
    loaders, and seed the RNGs (or restore the state's)."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    rank, world, device = setup_distributed(cfg["device"])  # a resumed run's device
    cuda = device.type == "cuda"
    data = run_dataset(cfg)
    shape = input_shape(data)
    fresh = state["model"] is None
    svd_init = cfg["decompose"]["enabled"] and cfg["decompose"]["init"] == "svd"
    model = build_run_model(cfg, data, fresh=fresh)
    if fresh:
        info = state["info"]
        info["dense_macs"] = count_macs(model, shape, cost="dense")
        info["dense_params"] = count_params(model, cost="dense")
        info["layer_shapes"] = {n: [l.rows, l.cols] for n, l in svd_layers(model)}
        info["data_fingerprint"] = data_fingerprint(data)
        if svd_init:
            info["dense_checkpoint_sha256"] = file_digest(cfg["decompose"]["dense_checkpoint"])
    else:
        was, now = state["info"].get("data_fingerprint"), data_fingerprint(data)
        if was is not None and was != now:  # runs from before the fingerprint: not checked
            raise RunError(f"data_dir {cfg['data_dir']} holds other data than the run started with "
                           f"({now['train']} training / {now['test']} test images, was {was['train']} / {was['test']}, "
                           "or other images); use the same data or a new --out")
        model.load_state_dict(state["model"])
    model = model.to(device)
    channels_last = cuda and cfg["channels_last"]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    common = dict(mean=data.mean, std=data.std, rank=rank, world_size=world, device=device,
                  channels_last=channels_last)
    train_loader = BatchLoader(data.x_train, data.y_train, cfg["batch_size"], train=True,
                               augment=cfg["augment"], seed=cfg["seed"], **common)
    test_loader = BatchLoader(data.x_test, data.y_test, cfg["eval_batch_size"], train=False, **common)
    val_loader = (None if data.x_val is None else
                  BatchLoader(data.x_val, data.y_val, cfg["eval_batch_size"], train=False, **common))
    if len(train_loader) == 0:
        raise RunError(f"batch_size {cfg['batch_size']} is larger than the {len(data.x_train)} training images "
                       f"(per process); lower batch_size")
    if fresh and svd_init:
        # svd init computes exactly what the dense checkpoint computes: its accuracy now
        # is the dense model's.
        state["info"]["dense_accuracy"] = evaluate(model, test_loader, world)
    if state["rng"] is None:
        torch.manual_seed(cfg["seed"])
        np.random.seed(cfg["seed"])
        random.seed(cfg["seed"])
    else:
        set_rng_state(state["rng"])
    return RunContext(cfg=cfg, state=state, out=out, save=save, model=model, data=data, shape=shape,
                      train_loader=train_loader, test_loader=test_loader, val_loader=val_loader,
                      device=device, is_svd=any(True for _ in svd_layers(model)), rank=rank, world=world,
                      quiet=quiet, log=log)
