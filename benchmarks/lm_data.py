"""Byte-level data, the Llama-style decoder, its training loop and evaluation, for benchmarks/lm.py.

Data: each split's bytes as a uint8 tensor (vocabulary 256, no tokenizer). Training draws random
contiguous windows of seq + 1 bytes (the split's last byte is never a target); evaluation uses
fixed non-overlapping windows (window i starts at i * seq, so each byte after the first is
predicted at most once; the fewer than seq bytes after the last full window are not scored).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "pycode"
SPLITS = ("train", "val", "test")


def load_split(data_dir, split: str) -> torch.Tensor:
    raw = (Path(data_dir) / f"{split}.txt").read_bytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def check_splits(data: dict, seq: int) -> None:
    """A one-line ValueError for a split too short for one window of seq + 1 bytes (+ 1 to draw from)."""
    for split, d in data.items():
        if len(d) < seq + 2:
            raise ValueError(f"the {split} split has {len(d)} bytes, fewer than a window of --seq {seq} needs ({seq + 2})")


def train_batch(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    """(inputs, targets), each (batch, seq) int64: random windows drawn with `gen`."""
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    w = torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).long()
    return w[:, :-1], w[:, 1:]


def eval_windows(data: torch.Tensor, seq: int, max_windows: int = 0):
    """The fixed non-overlapping evaluation windows (inputs, targets); max_windows > 0 keeps that
    many, evenly spaced over the split."""
    n = (len(data) - 1) // seq
    if n == 0:
        raise ValueError(f"a split of {len(data)} bytes is shorter than one evaluation window of {seq + 1}")
    idx = torch.arange(n)
    if 0 < max_windows < n:
        idx = torch.linspace(0, n - 1, max_windows).round().long()
    w = data[idx[:, None] * seq + torch.arange(seq + 1)].long()
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def evaluate(model, windows, batch: int = 32) -> float:
    """Mean cross-entropy in nats per predicted byte (ppl = exp, bits per byte = / ln 2)."""
    x, y = windows
    device = next(model.parameters()).device
    was_training, total = model.training, 0.0
    model.eval()
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch].to(device)).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), y[i:i + batch].flatten().to(device),
                                 reduction="none").double().sum().item()
    model.train(was_training)
    return total / y.numel()


def metrics(nats: float) -> tuple[float, float]:
    """(perplexity per byte, bits per byte) of a mean loss in nats."""
    return math.exp(nats), nats / math.log(2)


def build_model(layers: int, hidden: int, heads: int, intermediate: int, seq: int):
    """A Llama-style decoder from a transformers config (random init, nothing downloaded)."""
    import transformers as T
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                        max_position_embeddings=max(seq, 512), tie_word_embeddings=False, use_cache=False,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return T.LlamaForCausalLM(cfg)


def decomposable(model):
    """(name, nn.Linear) of every Linear inside the decoder layers: what is compressed and counted
    (embeddings and lm_head stay dense)."""
    return [(n, m) for n, m in model.named_modules()
            if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (weights, embeddings, U, V), none on vectors (norms, biases, s)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine from 1 to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t)))


def train(model, opt, data, steps: int, *, batch: int, seq: int, gen: torch.Generator, warmup: int,
          start: int = 0, extra_loss=None, after_step=None, save=None, every: int = 0, stage: str = "train"):
    """Steps start..steps-1 of AdamW-style training on random windows; the learning rate of each group
    follows lr_factor from its 'initial_lr'. extra_loss(model) joins the loss; after_step(done) runs
    after each optimizer step; save(done) every `every` steps. A NaN/Inf loss stops the run."""
    device = next(model.parameters()).device
    base = getattr(opt, "base_optimizer", opt)
    for g in base.param_groups:
        g.setdefault("initial_lr", g["lr"])
    model.train()
    for step in range(start, steps):
        x, y = train_batch(data, batch, seq, gen)
        logits = model(x.to(device)).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten().to(device))
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        if not torch.isfinite(loss):
            raise SystemExit(f"{stage}: loss {loss.item()} at step {step}")
        model.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in base.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(step, steps, warmup)
        opt.step()
        if after_step is not None:
            after_step(step + 1)
        if save is not None and every and (step + 1) % every == 0 and step + 1 < steps:
            save(step + 1)
    return model
