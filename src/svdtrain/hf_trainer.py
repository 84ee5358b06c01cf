"""SVD training inside Hugging Face `transformers.Trainer` (needs `svdtrain[hf]`).

    from svdtrain.hf_trainer import SVDTrainer
    trainer = SVDTrainer(model=svdtrain.decompose(model), args=args, train_dataset=data,
                         regularizer=svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=1e-3),
                         budget={"target_macs": 0.5, "mask": True}, example_inputs=(ids,))
    trainer.train()                  # resume_from_checkpoint=... continues where it stopped
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .budget import BudgetController
from .layers import svd_layers, unwrap
from .losses import Regularizer
from .pretrained import load_into, save_pretrained

BUDGET_FILE = "svdtrain_budget.json"


class SVDTrainer(Trainer):
    """`transformers.Trainer` for SVD training: `regularizer(model)` joins the loss; with
    `budget` (BudgetController keywords: target_macs, target_at, mask, keep_energy, ...) a
    controller over the run's steps steers its strength (and masks values, the optimizer's
    state of them zeroed) after every optimizer step; `example_inputs` is one batch of the
    model's positional inputs for its MACs. Checkpoints hold the SVD form
    (`svdtrain.save_pretrained`) and the controller's state, so `train(resume_from_checkpoint=...)`
    continues where the run stopped, and `load_best_model_at_end` loads the best one's. Under
    gradient accumulation the regularizer counts once per optimizer step. The model must be
    decomposed already."""

    def __init__(self, *args, regularizer: Regularizer, budget: dict | None = None, example_inputs=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if budget is not None and example_inputs is None:
            raise ValueError("a budget needs example_inputs (one batch of the model's positional inputs)")
        self.regularizer, self.budget_args, self.example_inputs = regularizer, budget, example_inputs
        self.budget: BudgetController | None = None
        self._budget_state: dict | None = None
        self.add_callback(_StepBudget(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = out if return_outputs else (out, None)
        loss = loss + self.regularizer(unwrap(model)) / self._ga_divisor(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _ga_divisor(self, num_items_in_batch) -> int:
        """What makes the regularizer count once per optimizer step under gradient accumulation:
        the micro-batch count where transformers will not divide the loss by it itself (a loss
        normalised by `num_items_in_batch`, its test in training_step), else 1."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = ((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                      or self.compute_loss_func is not None)
        return getattr(self, "current_gradient_accumulation_steps", 1) if scaled and self.model.training else 1

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """transformers' choice, less the singular values: no weight decay on s (as the pipeline)."""
        s = {f"{name}.s" if name else "s" for name, _ in svd_layers(unwrap(model))}
        return [n for n in super().get_decay_parameter_names(model) if n not in s]

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_pretrained(unwrap(self.model), output_dir)
        if getattr(unwrap(self.model), "config", None) is not None:
            unwrap(self.model).config.save_pretrained(output_dir)
        if self.budget is not None:
            with open(os.path.join(output_dir, BUDGET_FILE), "w") as f:
                json.dump(self.budget.state_dict(), f)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_best_model(self) -> None:  # load_best_model_at_end: the best checkpoint's SVD form
        load_into(unwrap(self.model), self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_into(unwrap(model if model is not None else self.model), resume_from_checkpoint)
        path = os.path.join(resume_from_checkpoint, BUDGET_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                self._budget_state = json.load(f)


class _StepBudget(TrainerCallback):
    """Builds the trainer's BudgetController when training starts (it needs the optimizer and
    the run's step count) and steps it after every optimizer step, before the gradients are
    cleared (loss importance reads them)."""

    def __init__(self, trainer: SVDTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        t = self.trainer
        if t.budget_args is None:
            return
        inputs = t.example_inputs if isinstance(t.example_inputs, tuple) else (t.example_inputs,)
        t.budget = BudgetController(unwrap(t.model), t.regularizer, total_steps=state.max_steps,
                                    optimizer=optimizer, example_inputs=inputs, input_shape=None,
                                    **t.budget_args)
        if t._budget_state is not None:
            t.budget.load_state_dict(t._budget_state)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.budget is not None:
            self.trainer.budget.step()
