"""The stage bodies of a pipeline run, as functions of its `RunContext` (context.py): train
(orthogonality + sparsity, budget-driven when asked), prune, fine-tune, export and report.
`Run` (train.py) owns the run directory, the checkpoint and the order of the stages, and calls
STAGE_BODIES[stage](ctx)."""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil

import torch
import torch.distributed as dist
from torch import nn

from .budget import BudgetController, budget_warning, macs_at_energy
from .calibrate import recalibrate_batchnorm
from .checkpoint import atomic_save, atomic_write_text, model_state
from .context import RunContext, read_rank_file
from .distributed import rank0_timer, replica_spread, spread
from .engine import evaluate, make_optimizer, stage_epoch, task_loss, train_phase
from .export import export, export_onnx, export_program
from .importance import loss_importance
from .latency import measured_latency_ratio
from .layers import svd_layers
from .losses import Regularizer
from .macs import count_macs, count_params, profile
from .prune import prune, ranks, set_ranks
from .whiten import unwhiten

log = logging.getLogger("svdtrain")


def _sparsity(cfg: dict, stage: str) -> tuple[str | None, float]:
    r = cfg["regularizer"]
    if stage != "train" or r["sparsity"] == "none":
        return None, 0.0
    return r["sparsity"], r["strength"]


def _epochs(ctx: RunContext, stage: str) -> int:
    if not ctx.is_svd and stage in ("orth", "finetune"):
        return 0  # a dense run only trains
    return ctx.cfg["epochs"][stage]


def orth_stage(ctx: RunContext) -> None:
    """Training with the orthogonality term only (epochs.orth)."""
    _train(ctx, "orth")


def train_stage(ctx: RunContext) -> None:
    """Training with orthogonality + sparsity (dense runs: plain training); records the
    spectra before and after and the accuracy reached, and warns on a missed MACs target."""
    info = ctx.state["info"]
    if ctx.is_svd and "spectra_before" not in info:
        info["spectra_before"] = spectra(ctx.model)
    _train(ctx, "train")
    if ctx.is_svd:
        info["spectra_after"] = spectra(ctx.model)
        _check_budget(ctx)
    _record_accuracy(ctx, "accuracy_trained")


def finetune_stage(ctx: RunContext) -> None:
    """Training at fixed ranks, sparsity off, orthogonality on (finetune_lr, cosine)."""
    _train(ctx, "finetune")


def _train(ctx: RunContext, stage: str) -> None:
    """The epochs of a training stage in engine.train_phase, resumed from and saved to the run
    checkpoint; with regularizer.target_macs the budget controller steers the strength."""
    epochs = _epochs(ctx, stage)
    if epochs == 0:
        return
    cfg, state = ctx.cfg, ctx.state
    module = ctx.training_module()
    sparsity, strength = _sparsity(cfg, stage)
    reg = Regularizer(orth=cfg["regularizer"]["orth"] if ctx.is_svd else 0.0,
                      sparsity=sparsity if ctx.is_svd else None, strength=strength,
                      orth_probes=cfg["regularizer"]["orth_probes"])
    steps = epochs * len(ctx.train_loader)
    opt, sched = make_optimizer(ctx.model, cfg, stage, steps)
    budget = _budget(ctx, reg, opt, steps) if sparsity and ctx.is_svd else None

    def on_step(model):
        state["step"] += 1
        if budget is not None:
            budget.step()

    def synced_accuracies():
        if ctx.world > 1:
            # BatchNorm statistics drift apart per rank after DDP's last broadcast: take
            # rank 0's, so every rank evaluates (and rank 0 saves) the same model.
            for buf in ctx.model.buffers():
                dist.broadcast(buf, src=0)
        return accuracies(ctx)

    def extra_stats():
        stats = _rank_stats(ctx)
        if ctx.world > 1:
            stats.update(world_size=ctx.world, replica_spread=replica_spread(ctx.model))
        if sparsity and ctx.is_svd:
            stats["strength"] = reg.strength
        if budget is not None and budget.table is not None:  # a latency target: fractions of dense time
            stats["latency_schedule"], stats["latency_at_threshold"] = budget.schedule(), budget.measure()
        elif budget is not None:
            stats["macs_schedule"] = budget.schedule() * state["info"]["dense_macs"]
            if ctx.world > 1:  # the controller reads only synced parameters: ranks must agree
                stats["strength_spread"] = spread(reg.strength, ctx.device)
        return stats

    train_phase(ctx.model, ctx.train_loader, opt, sched, reg, cfg, ctx.device, stage=stage, epochs=epochs,
                state=state, save=lambda _: ctx.save(), accuracies=synced_accuracies, parts={"budget": budget},
                forward=module, world=ctx.world, quiet=not ctx.verbose, on_step=on_step,
                extra_stats=extra_stats, log=ctx.log)


def accuracies(ctx: RunContext) -> dict:
    """test_accuracy, and val_accuracy when the run holds out a validation split."""
    out = {"test_accuracy": evaluate(ctx.model, ctx.test_loader, ctx.world)}
    if ctx.val_loader is not None:
        out["val_accuracy"] = evaluate(ctx.model, ctx.val_loader, ctx.world)
    return out


def _record_accuracy(ctx: RunContext, key: str) -> None:
    """info[key] = test accuracy now; info['val_' + key] = validation accuracy if held out."""
    acc = accuracies(ctx)
    ctx.state["info"][key] = acc["test_accuracy"]
    if "val_accuracy" in acc:
        ctx.state["info"]["val_" + key] = acc["val_accuracy"]


def _budget(ctx: RunContext, reg: Regularizer, opt, total_steps: int) -> BudgetController | None:
    r, p = ctx.cfg["regularizer"], ctx.cfg["prune"]
    if not (r["target_macs"] or r["target_latency"]):
        return None
    target = {"target_latency": r["target_latency"]} if r["target_latency"] else {"target_macs": r["target_macs"]}
    return BudgetController(ctx.model, reg, input_shape=_deploy_shape(ctx) if r["target_latency"] else ctx.shape,
                            total_steps=total_steps, target_at=r["target_at"], keep_energy=p["keep_energy"],
                            mask=p["gradual"], optimizer=opt, score=p["score"],
                            on_final=(lambda: unwhiten(ctx.model, opt, every=_plain(ctx))) if p["unwhiten"] else None,
                            timer=rank0_timer(), **target)


def _plain(ctx: RunContext) -> bool:
    """Whitened layers trained with plain orthogonality keep no metric: unwhiten each layer."""
    return ctx.cfg["decompose"]["orth_metric"] == "plain"


def _deploy_shape(ctx: RunContext) -> tuple:
    """The input shape a latency budget is timed at: export.batch inputs."""
    return (ctx.cfg["export"]["batch"],) + tuple(ctx.shape[1:])


def _rank_stats(ctx: RunContext) -> dict:
    """Mean rank and deploy MACs if pruned now at prune.keep_energy (SVD runs only)."""
    if not ctx.is_svd:
        return {}
    if "profile" not in ctx.cache:
        ctx.cache["profile"] = profile(ctx.model, ctx.shape)
    total, rank_list = macs_at_energy(ctx.cache["profile"], ctx.cfg["prune"]["keep_energy"])
    return {"mean_rank": sum(rank_list) / len(rank_list), "macs_at_threshold": total}


def _check_budget(ctx: RunContext) -> None:
    """After a budget-driven train stage: warn (log + report) if the target was missed."""
    r, info = ctx.cfg["regularizer"], ctx.state["info"]
    last = next((m for m in reversed(ctx.state["metrics"]) if m.get("stage") == "train"), None)
    if last is None:
        return
    if r["target_latency"] and "latency_at_threshold" in last:
        warning = budget_warning(last["latency_at_threshold"], r["target_latency"], ctx.cfg["prune"]["keep_energy"],
                                 what="latency")
    elif r["target_macs"] and "macs_at_threshold" in last:
        warning = budget_warning(last["macs_at_threshold"] / info["dense_macs"], r["target_macs"],
                                 ctx.cfg["prune"]["keep_energy"])
    else:
        return
    if warning:
        info["budget_warning"] = warning
        log.warning("svdtrain: %s", info["budget_warning"])
        if ctx.verbose:
            ctx.log(f"WARNING: {info['budget_warning']}")


def prune_stage(ctx: RunContext) -> None:
    """Remove singular values by energy (prune.keep_energy), to a MACs budget
    (prune.macs_budget, else regularizer.target_macs), to regularizer.target_latency (each
    layer then pinned to its faster form) or to the ranks of a file (prune.ranks), ranked by
    energy or loss importance."""
    info = ctx.state["info"]
    if not ctx.is_svd:
        return
    p, latency = ctx.cfg["prune"], ctx.cfg["regularizer"]["target_latency"]
    budget = p["macs_budget"] or ctx.cfg["regularizer"]["target_macs"]
    # The batches scored and recalibrated on: the prune stage's own epoch of the stream, not
    # whichever epoch this process last trained (the same in one `run` and in `train` + `prune`).
    ctx.train_loader.set_epoch(stage_epoch("prune"))
    scores = _loss_scores(ctx, p["score_batches"]) if p["score"] == "loss" and (budget or latency or p["ranks"]) else None
    if p["ranks"]:
        info["ranks"] = set_ranks(ctx.model, read_rank_file(p["ranks"], ctx.model), scores=scores)
    elif latency:
        for _, layer in svd_layers(ctx.model):
            layer.set_form("auto")  # the cut re-times every layer and pins its faster form again
        info["ranks"] = prune(ctx.model, latency_budget=latency, input_shape=_deploy_shape(ctx), scores=scores,
                              timer=rank0_timer())
    elif budget > 0:
        info["ranks"] = prune(ctx.model, macs_budget=budget, input_shape=ctx.shape, scores=scores)
    else:
        info["ranks"] = prune(ctx.model, keep_energy=p["keep_energy"])
    if p["unwhiten"]:  # where the gradual masks' end already did it: a no-op, or (every) plain SVDs again
        unwhiten(ctx.model, every=_plain(ctx))
    if p["recalibrate"]:
        info["recalibrated_batches"] = recalibrate_batchnorm(ctx.model, ctx.train_loader, p["recalibrate"])
        if ctx.world > 1:  # each rank saw its own shard: keep rank 0's statistics everywhere
            for buf in ctx.model.buffers():
                dist.broadcast(buf, src=0)
    _record_accuracy(ctx, "accuracy_pruned")
    info["macs_pruned"] = count_macs(ctx.model, ctx.shape)
    ctx.state["metrics"].append({"stage": "prune", "epoch": 0, "test_accuracy": info["accuracy_pruned"],
                                 **({"val_accuracy": info["val_accuracy_pruned"]} if "val_accuracy_pruned" in info else {}),
                                 "macs": info["macs_pruned"], "mean_rank": _mean(info["ranks"]),
                                 "recalibrated_batches": info.get("recalibrated_batches", 0)})
    if ctx.verbose:
        ctx.log(f"[prune] ranks {list(info['ranks'].values())} -> test {info['accuracy_pruned']:.2%}, "
                f"MACs {info['macs_pruned'] / info['dense_macs']:.1%} of dense")


def _loss_scores(ctx: RunContext, batches: int) -> dict:
    """Loss importance of every singular value over `batches` training batches (the run's
    task loss). The loader's stream depends only on (seed, epoch): reading it here leaves
    the fine-tuning's batches as they were."""
    scores = loss_importance(ctx.model, ctx.train_loader, lambda out, y: task_loss(out, y, ctx.cfg), batches)
    if ctx.world > 1:  # each rank scored its own shard: average, so every rank cuts the same values
        for name, value in scores.items():
            value = value.to(ctx.device)
            dist.all_reduce(value)
            scores[name] = value / ctx.world
    return scores


def export_stage(ctx: RunContext) -> None:
    """Write compact.pt2 (torch.export, loads without svdtrain), model_state.pt and ranks.json;
    records the accuracy, MACs and params of what ships."""
    info = ctx.state["info"]
    _record_accuracy(ctx, "accuracy")
    info["macs"] = count_macs(ctx.model, ctx.shape)
    info["params"] = count_params(ctx.model)
    if ctx.rank != 0:
        return
    model = ctx.model.eval()
    atomic_save(model_state(model), ctx.out / "model_state.pt")
    atomic_write_text(ctx.out / "ranks.json", json.dumps(ranks(model), indent=1) + "\n")
    ex = ctx.cfg["export"]
    # Timed (choose=latency) on the run's own device, then moved to the CPU to be saved.
    compact = export(model, input_shape=(ex["batch"],) + tuple(ctx.shape[1:]), choose=ex["choose"],
                     channels_last=ex["channels_last"]) if ctx.is_svd else copy.deepcopy(model)
    if ctx.is_svd and ctx.cfg["regularizer"]["target_latency"]:
        info["latency_ratio"] = measured_latency_ratio(model, compact, _deploy_shape(ctx))
    compact = compact.to("cpu", memory_format=torch.contiguous_format).eval()
    # What ships: a latency export may keep a layer dense or pad its rank.
    info["macs"], info["params"] = count_macs(compact, ctx.shape), count_params(compact)
    example = torch.zeros((2,) + ctx.shape[1:])
    tmp = ctx.out / "compact.tmp.pt2"
    export_program(compact, example, tmp, dynamic_batch=True)
    os.replace(tmp, ctx.out / "compact.pt2")
    if ex["onnx"]:  # written under its final name in a temporary folder: an external data file keeps its name
        tmp = ctx.out / "onnx.tmp"  # the run's own folder: a killed export's leftovers go first
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            export_onnx(compact, example, tmp / "compact.onnx")
            for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".onnx"):  # the .onnx last
                os.replace(f, ctx.out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def report_stage(ctx: RunContext) -> None:
    """Write summary.json, report.md and its plots."""
    info, cfg = ctx.state["info"], ctx.cfg
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
        "keep_energy": cfg["prune"]["keep_energy"] if ctx.is_svd else None,
        "macs_budget": cfg["prune"]["macs_budget"] or cfg["regularizer"]["target_macs"] or None,
        "budget_warning": info.get("budget_warning"),
        **({"latency_budget": cfg["regularizer"]["target_latency"], "latency_ratio": info.get("latency_ratio"),
            "latency_batch": cfg["export"]["batch"]} if cfg["regularizer"]["target_latency"] and ctx.is_svd else {}),
        "model": cfg["model"], "dataset": cfg["dataset"],
        "train_seconds": sum(m.get("seconds", 0.0) for m in ctx.state["metrics"]),
    }
    info["summary"] = summary
    if ctx.rank != 0:
        return
    atomic_write_text(ctx.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    from .report import write_report
    write_report(ctx.out, summary, ctx.state["metrics"], info, cfg)


STAGE_BODIES = {"orth": orth_stage, "train": train_stage, "prune": prune_stage,
                "finetune": finetune_stage, "export": export_stage, "report": report_stage}


def _mean(d: dict) -> float:
    return sum(d.values()) / max(1, len(d))


def spectra(model: nn.Module) -> dict[str, list[float]]:
    """Active singular values of each SVD layer, descending."""
    return {n: sorted(l.s.detach()[l.active].abs().cpu().tolist(), reverse=True)
            for n, l in svd_layers(model)}
