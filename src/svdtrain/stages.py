"""The stages of a pipeline run, as methods `Run` inherits: train (orthogonality + sparsity,
budget-driven when asked), prune, fine-tune, export and report. `Run` (train.py) owns the
run directory, the checkpoint and the order of the stages."""
from __future__ import annotations

import copy

import json
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from .budget import BudgetController, budget_warning, macs_at_energy
from .checkpoint import atomic_save, atomic_write_text, rng_state
from .distributed import replica_spread, spread
from .engine import evaluate, make_optimizer, task_loss, train_epochs
from .export import export, export_program
from .layers import svd_layers, unwrap
from .losses import Regularizer
from .importance import loss_importance
from .macs import count_macs, count_params, profile
from .prune import prune, ranks

log = logging.getLogger("svdtrain")


def _sparsity(cfg: dict, stage: str) -> tuple[str | None, float]:
    r = cfg["regularizer"]
    if stage != "train" or r["sparsity"] == "none":
        return None, 0.0
    return r["sparsity"], r["strength"]


class Stages:
    """The stage bodies; see `Run` for the attributes they use (cfg, state, model, loaders)."""

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

        def accuracies():
            if self.world > 1:
                # BatchNorm statistics drift apart per rank after DDP's last broadcast: take
                # rank 0's, so every rank evaluates (and rank 0 saves) the same model.
                for buf in unwrap(self.model).buffers():
                    dist.broadcast(buf, src=0)
            return self.accuracies()

        def extra_stats():
            stats = self._rank_stats()
            if self.world > 1:
                stats.update(world_size=self.world, replica_spread=replica_spread(self.model))
            if sparsity and self.is_svd:
                stats["strength"] = reg.strength
            if budget is not None:
                stats["macs_schedule"] = budget.schedule() * self.state["info"]["dense_macs"]
                if self.world > 1:  # the controller reads only synced parameters: ranks must agree
                    stats["strength_spread"] = spread(reg.strength, self.device)
            return stats

        def save(epoch, stats):
            self.state["metrics"].append(stats)
            self.state.update(epoch=epoch, model=unwrap(self.model).state_dict(),
                              optimizer={"opt": opt.state_dict(), "sched": sched.state_dict(),
                                         "budget": budget.state_dict() if budget is not None else None},
                              rng=rng_state())
            self.save()
        train_epochs(ddp, self.train_loader, opt, sched, reg, cfg, self.device, stage=stage, epochs=epochs,
                     start=self.state["epoch"], accuracies=accuracies, save=save, world=self.world,
                     quiet=self.quiet or self.rank != 0, on_step=on_step, extra_stats=extra_stats, log=self.log)

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
                                mask=p["gradual"], optimizer=opt, score=p["score"])

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
            scores = self._loss_scores(p["score_batches"]) if p["score"] == "loss" else None
            info["ranks"] = prune(self.model, macs_budget=budget, input_shape=self.shape, scores=scores)
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

    def _loss_scores(self, batches: int) -> dict:
        """Loss importance of every singular value over `batches` training batches (the run's
        task loss). The loader's stream depends only on (seed, epoch): reading it here leaves
        the fine-tuning's batches as they were."""
        scores = loss_importance(unwrap(self.model), self.train_loader,
                                 lambda out, y: task_loss(out, y, self.cfg), batches)
        if self.world > 1:  # each rank scored its own shard: average, so every rank cuts the same values
            for name, value in scores.items():
                value = value.to(self.device)
                dist.all_reduce(value)
                scores[name] = value / self.world
        return scores

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
        atomic_save({k: v.cpu() if torch.is_tensor(v) else v for k, v in model.state_dict().items()},
                    self.out / "model_state.pt")
        atomic_write_text(self.out / "ranks.json", json.dumps(ranks(model), indent=1) + "\n")
        ex = self.cfg["export"]
        # Timed (choose=latency) on the run's own device, then moved to the CPU to be saved.
        compact = export(model, input_shape=(ex["batch"],) + tuple(self.shape[1:]), choose=ex["choose"],
                         channels_last=ex["channels_last"]) if self.is_svd else copy.deepcopy(model)
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
