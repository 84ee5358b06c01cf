"""The training engine shared by the pipeline and the benchmarks: optimizer and schedule,
one epoch of `task loss + reg(model)`, evaluation, `train_phase` (the one resumable training
loop) and `fit` (that loop for any model, with its training state in one file)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import (TRAIN_FORMAT, atomic_save, load_training_state, new_training_state,
                         save_training_state)
from .loader import BatchLoader
from .losses import param_groups

STAGES = ("orth", "train", "prune", "finetune", "export", "report")


def stage_epoch(stage: str, epoch: int = 0) -> int:
    """The data loader's epoch number for `epoch` of `stage`: each stage its own data order,
    the same on resume and in a new process."""
    return STAGES.index(stage) * 10_000 + epoch


class RunError(RuntimeError):
    """A run cannot go on; the message is one line meant for the user."""


def make_optimizer(model: nn.Module, cfg: dict, stage: str, total_steps: int):
    """(optimizer, per-step LambdaLR scheduler) of a stage; no weight decay on s."""
    o = cfg["optim"]
    lr = o["finetune_lr"] if stage == "finetune" else o["lr"]
    groups = param_groups(model, o["weight_decay"])
    if o["name"] == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=o["momentum"], nesterov=o["nesterov"] and o["momentum"] > 0)
    elif o["name"] == "adamw":  # decoupled weight decay: the usual choice for transformers
        opt = torch.optim.AdamW(groups, lr=lr)
    else:
        opt = torch.optim.Adam(groups, lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(cfg, stage, i, total_steps))


def lr_factor(cfg: dict, stage: str, step: int, total: int) -> float:
    """Multiplier of the stage's base lr at `step` of `total` (fine-tuning: cosine)."""
    o = cfg["optim"]
    t = step / max(1, total)
    if stage != "finetune":  # this stage's share of a longer schedule (optim.schedule_span)
        start, end = o["schedule_span"]
        t = start + (end - start) * t
    kind = "cosine" if stage == "finetune" else o["schedule"]
    warm = 0.0 if stage == "finetune" else o["warmup_fraction"]
    if kind == "constant":
        return 1.0
    if kind == "step":
        return o["step_gamma"] ** sum(t >= m for m in o["step_milestones"])
    if t < warm:  # linear warm-up from 1/25 of the peak, as one-cycle does
        return 0.04 + 0.96 * t / warm
    u = (t - warm) / max(1e-12, 1.0 - warm)
    return 1.0 - u if kind == "onecycle" else 0.5 * (1.0 + math.cos(math.pi * u))


def evaluate(model: nn.Module, loader: BatchLoader, world: int = 1) -> float:
    """Top-1 accuracy (0..1) on the loader's data, summed over all ranks."""
    try:
        model.eval()
    except NotImplementedError:
        pass  # a torch.export program's module is fixed in eval mode already
    correct = torch.zeros(2, dtype=torch.float64, device=loader.device)
    with torch.no_grad():
        for x, y in loader:
            correct[0] += (model(x).argmax(1) == y).sum()
            correct[1] += y.numel()
    if world > 1:
        dist.all_reduce(correct)
    return float(correct[0] / correct[1].clamp_min(1))


def task_loss(out: torch.Tensor, y: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The run's task loss: cross-entropy in float32 with the config's label smoothing."""
    return F.cross_entropy(out.float(), y, label_smoothing=cfg["label_smoothing"])


def train_loader(data, cfg: dict, device) -> BatchLoader:
    """The single-process training stream of a run: augmented, shuffled by (seed, epoch)."""
    return BatchLoader(data.x_train, data.y_train, cfg["batch_size"], train=True, augment=cfg["augment"],
                       seed=cfg["seed"], mean=data.mean, std=data.std, device=device)


def train_epoch(model, loader, opt, sched, reg, cfg: dict, device, *, desc="train", quiet=False, world=1,
                where="training", on_backward=None, on_step=None) -> dict:
    """One epoch of `task loss + reg(model)`; returns mean task loss, train accuracy and the
    mean of each regularizer term. on_backward(model) runs between backward() and step()
    (e.g. TRP's nuclear-norm subgradient), on_step(model) after each step."""
    from tqdm.auto import tqdm

    model.train()
    cuda = torch.device(device).type == "cuda"
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss * n, correct, n, steps
    reg_sums: dict[str, torch.Tensor] = {}
    bar = tqdm(loader, desc=desc, leave=False, disable=quiet)
    for i, (x, y) in enumerate(bar):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg["amp"] and _bf16_ok()):
            out = model(x)
            task = task_loss(out, y, cfg)
        loss = task + reg(model) if reg is not None else task
        finite = torch.isfinite(loss.detach()).float()
        if world > 1:  # every rank must stop together, or the others hang in the next allreduce
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            raise RunError(f"non-finite loss in {where}, step {i + 1}; the last good checkpoint is kept")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if on_backward is not None:
            on_backward(model)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(model)
        n = y.numel()
        sums += torch.stack([task.detach().double() * n, (out.argmax(1) == y).sum().double(),
                             sums.new_tensor(n), sums.new_tensor(1.0)])
        for k, v in (reg.last.items() if reg is not None else ()):
            reg_sums[k] = reg_sums.get(k, 0.0) + v.double()
        if i % 20 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{task.item():.3f}")
    if world > 1:
        dist.all_reduce(sums)
        sums[3] /= world
    stats = {"task_loss": float(sums[0] / sums[2]), "train_accuracy": float(sums[1] / sums[2])}
    stats.update({k: float(v / sums[3]) for k, v in reg_sums.items()})
    return stats


def _bf16_ok() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def train_phase(model, loader, opt, sched, reg, cfg: dict, device, *, stage: str, epochs: int, state: dict,
                save, accuracies, parts: dict | None = None, forward=None, world: int = 1, quiet: bool = False,
                on_backward=None, on_step=None, extra_stats=None, log=print) -> None:
    """The training loop of every phase (the pipeline's training stages, `fit`). `state` is a
    training state (checkpoint.py): when it holds this phase's progress (state["optimizer"]
    set), the model, opt, sched, the other stepped `parts` ({name: object with state_dict})
    and the RNG resume from it. Then per epoch from state["epoch"]: one `train_epoch` of
    `forward` (the module training calls: the model in DDP or compiled; default the model)
    on the stage's own shuffle order; accuracies() (test, validation), the lr at the epoch's
    end (where the next epoch starts: 0 after a schedule's last step), seconds and
    extra_stats() are appended to state["metrics"], the training state is recorded in
    `state` and save(state) writes it."""
    parts = {"opt": opt, "sched": sched, **(parts or {})}
    if state["optimizer"] is not None:
        load_training_state(state, model, **parts)
    forward = model if forward is None else forward
    for epoch in range(state["epoch"], epochs):
        t0 = time.perf_counter()
        loader.set_epoch(stage_epoch(stage, epoch))
        stats = train_epoch(forward, loader, opt, sched, reg, cfg, device, desc=f"{stage} {epoch + 1}/{epochs}",
                            quiet=quiet, world=world, where=f"stage '{stage}', epoch {epoch + 1}",
                            on_backward=on_backward, on_step=on_step)
        stats.update(accuracies())
        stats.update(stage=stage, epoch=epoch + 1, lr=opt.param_groups[0]["lr"],
                     seconds=round(time.perf_counter() - t0, 3), **(extra_stats() if extra_stats else {}))
        state["metrics"].append(stats)
        save_training_state(state, model, epoch + 1, **parts)
        save(state)
        if not quiet:
            log(f"[{stage} {epoch + 1}/{epochs}] loss {stats['task_loss']:.3f} train {stats['train_accuracy']:.2%} "
                f"test {stats['test_accuracy']:.2%} {stats['seconds']:.0f}s")


def read_training_state(path: Path) -> dict:
    """The training state in a `fit` checkpoint file; files written before the format marker
    (opt and sched at the top level) are read into the current layout."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunError(f"{path} is not a readable checkpoint ({type(err).__name__})") from None
    if isinstance(state, dict) and "format" not in state and {"opt", "sched", "model", "rng"} <= set(state):
        legacy = new_training_state(epoch=state["epoch"], metrics=state["metrics"], model=state["model"],
                                    rng=state["rng"])
        legacy["optimizer"] = {"opt": state["opt"], "sched": state["sched"]}
        return legacy
    if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT:
        raise RunError(f"{path} is not an svdtrain training checkpoint")
    return state


FIT_KEYS = ("optim", "batch_size", "label_smoothing", "augment")  # what a fit checkpoint is tied to
FINETUNE_UNREAD = ("lr", "schedule", "schedule_span", "warmup_fraction", "step_milestones", "step_gamma")


def fit(model, data, cfg: dict, epochs: int, *, stage="train", reg=None, checkpoint=None, quiet=False,
        on_backward=None, on_step=None, log=print) -> list[dict]:
    """Train any model for `epochs` with the run config's optimizer, schedule and augmentation
    (single process) in the pipeline's loop (`train_phase`): the loop the benchmarks use for
    baselines. With `checkpoint`, the training state is saved there after every epoch and a
    rerun with the same stage, epochs and training settings (FIT_KEYS) resumes from it; other
    settings are refused. Returns the per-epoch metrics."""
    cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    model.to(device)
    loader = train_loader(data, cfg, device)
    evals = {"test_accuracy": BatchLoader(data.x_test, data.y_test, cfg["eval_batch_size"], train=False,
                                          mean=data.mean, std=data.std, device=device)}
    if getattr(data, "x_val", None) is not None:
        evals["val_accuracy"] = BatchLoader(data.x_val, data.y_val, cfg["eval_batch_size"], train=False,
                                            mean=data.mean, std=data.std, device=device)
    opt, sched = make_optimizer(model, cfg, stage, epochs * len(loader))
    ckpt = Path(checkpoint) if checkpoint else None
    state = read_training_state(ckpt) if ckpt is not None and ckpt.exists() else new_training_state()
    # what this stage reads of optim (make_optimizer): fine-tuning its own lr and cosine, other stages the rest
    unread = FINETUNE_UNREAD if stage == "finetune" else ("finetune_lr",)
    settings = {"stage": stage, "epochs": epochs, **{k: cfg[k] for k in FIT_KEYS}}
    settings["optim"] = {k: v for k, v in cfg["optim"].items() if k not in unread}
    saved = dict(state.get("fit", {}))  # none in checkpoints from before it was recorded
    if isinstance(saved.get("optim"), dict):  # those that recorded all of optim: compare what is read
        saved["optim"] = {k: v for k, v in saved["optim"].items() if k not in unread}
    changed = [k for k in settings if k in saved and saved[k] != settings[k]]
    if changed:  # its schedule and optimizer state belong to those settings
        raise RunError(f"{ckpt} was written by a fit with other {', '.join(changed)}; "
                       "give another checkpoint path (or delete it to start over)")
    state["fit"] = settings
    train_phase(model, loader, opt, sched, reg, cfg, device, stage=stage, epochs=epochs, state=state,
                save=lambda s: atomic_save(s, ckpt) if ckpt is not None else None,
                accuracies=lambda: {k: evaluate(model, v) for k, v in evals.items()}, quiet=quiet,
                on_backward=on_backward, on_step=on_step, log=log)
    return state["metrics"]
