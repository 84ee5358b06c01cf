"""A structured-pruning baseline beside `deploy.py`'s low-rank models: the same dense model
channel-pruned by Torch-Pruning (https://github.com/VainF/Torch-Pruning) to a MACs level, each
family set up as Torch-Pruning's own examples do (all with a uniform ratio per layer):

- ViT (examples/transformers/prune_hf_vit.py): MagnitudeImportance (L1), head dimensions pruned
  and the number of heads kept, the classifier ignored;
- BERT (examples/transformers/prune_hf_bert.py): MagnitudeImportance (L2), whole heads pruned
  at the channel ratio, the pooler and classifier ignored (the example ranks globally; on random
  weights a global magnitude ranking only follows fan-in, so the ratio is uniform here too);
- Llama (examples/LLMs/prune_llm.py): group magnitude importance (L2), whole heads pruned at the
  channel ratio (head dimensions kept, so RoPE is untouched), lm_head ignored, channels rounded
  to 4;
- ResNet (the README's CNN recipe): MagnitudeImportance (L2), the classifier ignored.

The transformers' attention modules (and Llama's config) get their head counts and sizes from
the pruned weights afterwards, as the examples do. `torch_pruned` searches Torch-Pruning's
`pruning_ratio` (each trial on a fresh copy) until svdtrain's MACs count of the pruned model is
within `tol` of the level. Weights are not fine-tuned (latency does not depend on them).
"""
from __future__ import annotations

import copy
import warnings

from torch import nn

import svdtrain

FAMILIES = ("vit", "bert", "llama", "resnet")


def family(name: str) -> str:
    """The model family a name starts with ("vit_b16" -> "vit")."""
    for f in FAMILIES:
        if name.startswith(f):
            return f
    raise ValueError(f"no Torch-Pruning recipe for {name!r}; names start with one of {FAMILIES}")


def _attention(model, fam):
    """(attention module, its q, k, v Linears) for every self-attention of a transformer."""
    out = []
    for name, m in model.named_modules():
        if fam == "llama" and name.endswith("self_attn"):
            out.append((m, m.q_proj, m.k_proj, m.v_proj))
        elif fam in ("vit", "bert") and type(m).__name__ in ("ViTAttention", "ViTSelfAttention", "BertSelfAttention"):
            out.append((m, *((m.q_proj, m.k_proj, m.v_proj) if hasattr(m, "q_proj") else (m.query, m.key, m.value))))
    return out


def _pruner_args(fam, model, ratio):
    """Torch-Pruning's settings for a family, as in its examples."""
    import torch_pruning as tp
    attn = _attention(model, fam)
    if fam == "vit":
        return dict(importance=tp.importance.MagnitudeImportance(p=1), ignored_layers=[model.classifier],
                    num_heads={l: m.num_attention_heads for m, *qkv in attn for l in qkv},
                    prune_head_dims=True, prune_num_heads=False)
    if fam == "bert":
        return dict(importance=tp.importance.MagnitudeImportance(p=2, group_reduction="mean"),
                    ignored_layers=[model.bert.pooler, model.classifier],
                    num_heads={l: m.num_attention_heads for m, *qkv in attn for l in qkv},
                    prune_head_dims=False, prune_num_heads=True, head_pruning_ratio=ratio)
    if fam == "llama":
        c = model.config
        # the example's GroupNormImportance, named GroupMagnitudeImportance in Torch-Pruning 1.6
        return dict(importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
                    ignored_layers=[model.lm_head],
                    num_heads={l: h for _, q, k, v in attn
                               for l, h in ((q, c.num_attention_heads), (k, c.num_key_value_heads),
                                            (v, c.num_key_value_heads))},
                    prune_head_dims=False, prune_num_heads=True, head_pruning_ratio=ratio, round_to=4)
    return dict(importance=tp.importance.MagnitudeImportance(p=2),
                ignored_layers=[m for m in model.classifier.modules() if isinstance(m, nn.Linear)])


def _fix_attributes(fam, model):
    """Head counts and sizes from the pruned weights (the examples' attribute updates)."""
    if fam in ("vit", "bert"):
        for m, q, _, _ in _attention(model, fam):
            size = getattr(m, "head_dim", getattr(m, "attention_head_size", None))
            if fam == "vit":  # head dims pruned: the head count stays, their size shrinks
                size = q.out_features // m.num_attention_heads
            else:  # whole heads pruned: the size stays
                m.num_attention_heads = q.out_features // size
            for attr in ("head_dim", "attention_head_size"):
                if hasattr(m, attr):
                    setattr(m, attr, size)
            if hasattr(m, "all_head_size"):
                m.all_head_size = q.out_features
            m.scaling = size ** -0.5
    elif fam == "llama":
        c = model.config
        c.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        c.hidden_size = model.lm_head.in_features
        for m, q, k, _ in _attention(model, fam):
            c.num_attention_heads = q.out_features // m.head_dim
            c.num_key_value_heads = k.out_features // m.head_dim
            m.num_key_value_groups = c.num_attention_heads // c.num_key_value_heads
        for m in model.modules():
            if hasattr(m, "gate_proj"):
                m.hidden_size, m.intermediate_size = m.gate_proj.in_features, m.gate_proj.out_features
                c.intermediate_size = m.gate_proj.out_features


def _kwargs(model) -> dict:
    """use_cache=False where the model takes it (deploy.py's `Logits` does the same): traced with a
    KV cache, the cache's concatenation along the sequence reads to Torch-Pruning as a channel
    concatenation and its dependency search never ends."""
    return {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}


def prune_once(fam: str, model: nn.Module, example_inputs: tuple, ratio: float) -> nn.Module:
    """A deep copy of `model` pruned by Torch-Pruning at `pruning_ratio=ratio` (eval mode)."""
    import torch_pruning as tp
    model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():  # ViT's cls/position embeddings, RMSNorm weights: pruned on the last dim
        warnings.filterwarnings("ignore", "Unwrapped parameters detected")
        pruner = tp.pruner.MetaPruner(
            model, example_inputs, global_pruning=False, pruning_ratio=ratio,
            forward_fn=lambda m, x: m(*x, **_kwargs(m)), output_transform=lambda out: out.logits.sum(),
            in_channel_groups={}, out_channel_groups={},  # its defaults are shared dicts that keep old models alive
            **_pruner_args(fam, model, ratio))
    for g in pruner.step(interactive=True):
        g.prune()
    _fix_attributes(fam, model)
    return model


def torch_pruned(name: str, model: nn.Module, example_inputs: tuple, macs_level: float,
                 tol: float = 0.02, max_trials: int = 16) -> tuple[nn.Module, float]:
    """(a copy of `model` channel-pruned by Torch-Pruning, its MACs ratio to `model`), the ratio
    within `tol` of `macs_level` where the family's granularity allows (else the closest found).
    `name` picks the family ("vit...", "bert...", "llama...", "resnet..."); MACs are
    `svdtrain.count_macs` on `example_inputs`.

    Bisection on `pruning_ratio`, each trial on a fresh copy, the split point of the bracket
    interpolated in sqrt(MACs ratio) (pruning a ratio r of channels on both sides of a layer
    leaves about (1 - r)^2 of its MACs) and kept within its middle 60%; it stops at `tol`, after
    `max_trials`, or where the bracket is narrower than 1e-3 (a step in MACs, e.g. one head)."""
    fam = family(name)
    dense = svdtrain.count_macs(model, example_inputs=example_inputs)
    lo, hi, f_lo, f_hi = 0.0, 1.0, 1.0, 0.0  # bracket on the ratio, sqrt(MACs ratio) at its ends
    best = None
    for _ in range(max_trials):
        t = (f_lo - macs_level ** 0.5) / max(f_lo - f_hi, 1e-9)
        ratio = lo + min(max(t, 0.2), 0.8) * (hi - lo)
        pruned = prune_once(fam, model, example_inputs, ratio)
        macs = svdtrain.count_macs(pruned, example_inputs=example_inputs) / dense
        if best is None or abs(macs - macs_level) < abs(best[1] - macs_level):
            best = (pruned, macs)
        if abs(macs - macs_level) <= tol or hi - lo < 1e-3:
            break
        if macs > macs_level:
            lo, f_lo = ratio, macs ** 0.5
        else:
            hi, f_hi = ratio, macs ** 0.5
    return best
