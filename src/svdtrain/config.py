"""Run configuration: plain nested dicts, YAML files, dotted key=value overrides, validation."""
from __future__ import annotations

import copy
from pathlib import Path

DEFAULTS: dict = {
    "model": "resnet20",          # resnet20/32/56/110, small_cnn, vit, tv:<torchvision name>, or module:function
    "dataset": "cifar10",         # cifar10 | cifar100 | digits | folder
    "data_dir": "data",
    "val_size": 0,                # > 0: hold out this many training images (fixed split) and
                                  # report val_accuracy beside test_accuracy, for tuning
    "val_split": "random",        # how they are drawn: random (a seeded shuffle) or stratified
                                  # (each class in its share; for small or imbalanced classes)
    "image_size": 64,             # folder datasets only
    "decompose": {
        "enabled": True,          # false: plain dense training (a baseline)
        "mode": "channel",        # channel | spatial
        "init": "random_scaled",  # from scratch: random_scaled (Kaiming factors, W scaled to the norm of the
                                  # model's fresh dense init; chosen on CIFAR-10's validation split), random
                                  # (the reference's: U, V^T Kaiming, s ~ |N(0,1)|) or dense_init (SVD of the
                                  # model's own fresh dense init); svd: from dense_checkpoint
        "dense_checkpoint": "",   # state_dict file of the dense model (or a dense run's checkpoint.pt), for init: svd
        # init: svd, activation-aware (whiten.py): > 0 factors W·S, S from each layer's inputs on
        # this many training batches (whiten: cholesky as SVD-LLM, diag as ASVD), so that the
        # singular values rank directions by output error; channel mode only. orth_metric: how the
        # orthogonality term measures a whitened V: "activation" (V^T C V = I, C the inputs'
        # second moment, which the whitened start satisfies) or "plain" (V^T V = I)
        "calibration": 0,
        "whiten": "cholesky",
        "orth_metric": "activation",
        "skip": [],               # qualified layer names left dense
    },
    # target_macs > 0: the sparsity strength is steered (from `strength`) so that the MACs
    # pruning would keep reach this fraction of dense at target_at of the train stage
    # (svdtrain/budget.py), and prune cuts to it (unless prune.macs_budget is set).
    # target_latency > 0 instead: the same, for the model's time on this machine at export.batch
    # (a table of per-layer times measured once, svdtrain/latency.py); prune cuts to it.
    # orth_probes > 0: the orthogonality term's Grams estimated with that many random probes
    # (unbiased; for wide transformer layers, losses.py).
    "regularizer": {"orth": 1.0, "sparsity": "hoyer", "strength": 0.005, "target_macs": 0.0, "target_at": 0.5,
                    "target_latency": 0.0, "orth_probes": 0},
    # macs_budget > 0 replaces keep_energy. gradual (with regularizer.target_macs): mask values
    # along the budget schedule during the train stage instead of all at once afterwards.
    # score (under a MACs budget): rank values by energy share, or by loss importance
    # (svdtrain/importance.py; measured on score_batches training batches before a one-shot cut).
    # recalibrate > 0: after the cut, re-estimate BatchNorm statistics on that many training
    # batches (svdtrain/calibrate.py); the prune metrics then say so. unwhiten (with
    # decompose.calibration): once the ranks are final (the cut; with gradual, the ramp's end)
    # re-factor each whitened layer as the plain SVD of its cut matrix (whiten.unwhiten).
    # ranks: a JSON file {layer name: rank} (e.g. another run's ranks.json): each named layer cut
    # to its rank (values ranked by score; the layers it does not name keep theirs) instead of a
    # budget; to compare allocations at equal MACs (svdtrain.set_ranks).
    "prune": {"keep_energy": 0.9999, "macs_budget": 0.0, "gradual": False, "score": "energy", "score_batches": 32,
              "recalibrate": 0, "unwhiten": False, "ranks": ""},
    "epochs": {"orth": 0, "train": 10, "finetune": 2},
    # Each SVD layer is exported as its factor pair or one dense layer, whichever has fewer
    # MACs ("macs") or runs faster on this machine, timed at export.batch in the memory
    # format you will deploy with ("latency").
    # onnx: also write compact.onnx (ONNX Runtime; pip install svdtrain[onnx]).
    "export": {"choose": "macs", "batch": 1, "channels_last": False, "onnx": False},
    "optim": {
        "name": "sgd",            # sgd | adam | adamw
        "lr": 0.2,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,     # never applied to singular values
        "schedule": "onecycle",   # onecycle | cosine | step | constant
        "warmup_fraction": 0.25,  # onecycle/cosine: share of steps spent warming up
        # The span of one longer schedule the orth/train stages cover, e.g. [0.3, 1.0] after
        # a dense warm-up run of [0.0, 0.3]: together they follow the schedule of one run.
        "schedule_span": [0.0, 1.0],
        "step_milestones": [0.5, 0.75],
        "step_gamma": 0.1,
        "finetune_lr": 0.02,      # fine-tuning: cosine decay from this lr
    },
    "batch_size": 128,
    "eval_batch_size": 1000,
    "label_smoothing": 0.1,
    "augment": True,
    "seed": 0,
    "threads": 0,                 # CPU threads; 0 = torch's default
    "device": "auto",             # auto | cpu | cuda
    "amp": True,                  # CUDA only: bfloat16 autocast
    "channels_last": True,        # CUDA only
    # torch.compile the training forward with this backend ("" = eager). Measured on a 2-core
    # CPU: inductor steps ~0.85x eager (benchmarks/README.md). Ranks that change recompile:
    # with prune.gradual they change all along the ramp, so compile helps after it.
    "compile": "",
}

CHOICES = {
    "dataset": ("cifar10", "cifar100", "digits", "folder"),
    "val_split": ("random", "stratified"),
    "decompose.mode": ("channel", "spatial"),
    "prune.score": ("energy", "loss"),
    "decompose.init": ("random", "random_scaled", "dense_init", "svd"),
    "decompose.whiten": ("cholesky", "diag"),
    "decompose.orth_metric": ("activation", "plain"),
    "regularizer.sparsity": ("hoyer", "hoyer_square", "l1", "none"),
    "optim.name": ("sgd", "adam", "adamw"),
    "optim.schedule": ("onecycle", "cosine", "step", "constant"),
    "device": ("auto", "cpu", "cuda"),
    "export.choose": ("macs", "latency"),
    "compile": ("", "inductor", "aot_eager", "cudagraphs"),
}

# Which stage first uses a key: a finished stage's keys may not change on resume. An entry
# ending in "." covers every key under it; the others are single keys (checked in order).
_KEY_STAGE = {"export.": "export", "prune.gradual": "train", "prune.unwhiten": "train", "prune.score": "train",
              "prune.": "prune", "epochs.finetune": "finetune", "optim.finetune_lr": "finetune", "epochs.train": "train",
              "regularizer.sparsity": "train", "regularizer.strength": "train", "regularizer.target_macs": "train",
              "regularizer.target_at": "train", "regularizer.target_latency": "train"}
_FREE = {"threads", "device", "amp", "channels_last", "eval_batch_size", "data_dir", "compile"}


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line meant for the user."""


def flatten(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_value(key: str, value, default):
    if isinstance(value, str) and isinstance(default, float) and not isinstance(default, bool):
        try:  # YAML 1.1 reads "5e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"config key '{key}' must be {type(default).__name__}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(CHOICES[key])}; got {value!r}")
    return value


def _set(cfg: dict, key: str, value) -> None:
    defaults = flatten(DEFAULTS)
    if key not in defaults:
        raise ConfigError(f"unknown config key '{key}'; valid keys: {', '.join(defaults)}")
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = _check_value(key, value, defaults[key])


def load_config(path=None, overrides=(), base: dict | None = None) -> dict:
    """`base` (default: DEFAULTS), updated by a YAML file, then by 'dotted.key=value'
    overrides whose values are parsed as YAML."""
    import yaml

    cfg = copy.deepcopy(DEFAULTS if base is None else base)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{path}{where}: not valid YAML ({what})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys")
        for key, value in flatten(data).items():
            _set(cfg, key, value)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set(cfg, key.strip(), value)
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    """Cross-field checks that single types cannot express."""
    e = cfg["epochs"]
    if min(e.values()) < 0:
        raise ConfigError("epochs must be >= 0")
    p = cfg["prune"]
    if not 0.0 < p["keep_energy"] <= 1.0:
        raise ConfigError(f"prune.keep_energy must be in (0, 1], got {p['keep_energy']}")
    if not 0.0 <= p["macs_budget"] <= 1.0:
        raise ConfigError(f"prune.macs_budget must be in [0, 1] (0 = off), got {p['macs_budget']}")
    r = cfg["regularizer"]
    steered = r["target_macs"] or r["target_latency"]
    if p["score"] == "loss" and not (p["macs_budget"] or steered or p["ranks"]):
        raise ConfigError("prune.score: loss ranks values under a budget: set prune.macs_budget, regularizer.target_macs, "
                          "regularizer.target_latency or prune.ranks")
    if p["ranks"] and (p["macs_budget"] or r["target_latency"] or (p["gradual"] and e["train"] > 0)):
        raise ConfigError("prune.ranks gives the layers' ranks: unset prune.macs_budget, regularizer.target_latency "
                          "and prune.gradual (its masks cut to another allocation while training)")
    if p["score_batches"] < 1:
        raise ConfigError(f"prune.score_batches must be >= 1, got {p['score_batches']}")
    if not 0.0 <= r["target_macs"] <= 1.0 or not 0.0 < r["target_at"] <= 1.0:
        raise ConfigError("regularizer.target_macs must be in [0, 1] (0 = off) and regularizer.target_at in (0, 1]")
    if not 0.0 <= r["target_latency"] <= 1.0:
        raise ConfigError(f"regularizer.target_latency must be in [0, 1] (0 = off), got {r['target_latency']}")
    if r["target_latency"] and (r["target_macs"] or p["macs_budget"]):
        raise ConfigError("regularizer.target_latency is a budget of its own: unset regularizer.target_macs and "
                          "prune.macs_budget")
    if r["orth_probes"] < 0:
        raise ConfigError(f"regularizer.orth_probes must be >= 0 (0 = the exact term), got {r['orth_probes']}")
    if r["sparsity"] != "none" and r["strength"] <= 0:
        raise ConfigError("regularizer.strength must be > 0 with a sparsity term (regularizer.sparsity=none turns it off)")
    if cfg["prune"]["gradual"] and not steered:
        raise ConfigError("prune.gradual follows the budget schedule: set regularizer.target_macs (or target_latency) too")
    if steered and r["sparsity"] == "none":
        raise ConfigError("regularizer.target_macs / target_latency steer the sparsity term: set regularizer.sparsity "
                          "(e.g. hoyer)")
    d = cfg["decompose"]
    if d["enabled"] and d["init"] == "svd" and not d["dense_checkpoint"]:
        raise ConfigError("decompose.init: svd needs decompose.dense_checkpoint (a dense state_dict file)")
    if d["calibration"] and (d["init"] != "svd" or d["mode"] != "channel"):
        raise ConfigError("decompose.calibration whitens the SVD of trained weights: it needs decompose.init=svd "
                          "and decompose.mode=channel")
    if cfg["prune"]["unwhiten"] and not (d["enabled"] and d["calibration"]):
        raise ConfigError("prune.unwhiten re-factors whitened layers: set decompose.calibration too")
    if cfg["prune"]["recalibrate"] < 0 or cfg["prune"]["score_batches"] < 1:
        raise ConfigError("prune.recalibrate must be >= 0 (0 = off) and prune.score_batches >= 1")
    if d["calibration"] < 0:
        raise ConfigError(f"decompose.calibration must be >= 0 (0 = off), got {d['calibration']}")
    o = cfg["optim"]
    if (e["orth"] + e["train"] and o["lr"] <= 0) or (e["finetune"] and o["finetune_lr"] <= 0) \
            or not 0.0 <= o["warmup_fraction"] <= 1.0:
        raise ConfigError("optim.lr and optim.finetune_lr must be > 0 (for stages that train), "
                          "optim.warmup_fraction in [0, 1]")
    if r["orth"] < 0 or o["weight_decay"] < 0:
        raise ConfigError("regularizer.orth and optim.weight_decay must be >= 0")
    miles = o["step_milestones"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in miles):
        raise ConfigError(f"optim.step_milestones must be fractions of the schedule in [0, 1], got {miles}")
    span = o["schedule_span"]
    if (len(span) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in span)
            or not 0.0 <= span[0] < span[1] <= 1.0):
        raise ConfigError(f"optim.schedule_span must be [start, end] with 0 <= start < end <= 1, got {span}")
    if cfg["val_size"] < 0:
        raise ConfigError(f"val_size must be >= 0 (0 = no validation split), got {cfg['val_size']}")
    if cfg["batch_size"] < 1 or cfg["eval_batch_size"] < 1 or cfg["export"]["batch"] < 1:
        raise ConfigError("batch sizes must be >= 1")


def key_stage(key: str, cfg: dict | None = None) -> str | None:
    """The first pipeline stage that reads `key` (None: free to change at any time); with
    `cfg`, also what its budget controller reads while training: prune.keep_energy (the
    measure it steers) and, for a latency target, export.batch (the batch it times)."""
    if key in _FREE:
        return None
    if cfg is not None and (key == "prune.keep_energy" and (cfg["regularizer"]["target_macs"]
                                                              or cfg["regularizer"]["target_latency"])
                            or key == "export.batch" and cfg["regularizer"]["target_latency"]):
        return "train"
    for entry, stage in _KEY_STAGE.items():
        if key == entry or (entry.endswith(".") and key.startswith(entry)):
            return stage
    return "orth"


def read_by(key: str, cfg: dict) -> bool:
    """Whether a run of `cfg` reads `key`: a dense run (decompose.enabled false) reads no other
    decompose setting, no regularizer or prune setting and no fine-tuning one (it only trains),
    so a changed value there (e.g. decompose.init, prune.gradual, optim.finetune_lr) leaves it
    resumable. A run without a validation split (val_size 0) reads no val_split."""
    if key == "val_split" and not cfg["val_size"]:
        return False
    if cfg["decompose"]["enabled"]:
        return True
    return not ((key.startswith("decompose.") and key != "decompose.enabled") or key_stage(key) == "finetune"
                or key.startswith(("regularizer.", "prune.")))


def with_defaults(cfg: dict) -> dict:
    """`cfg` with the keys added to DEFAULTS since it was written filled in (old runs resume)."""
    def merge(dst: dict, src: dict) -> None:
        for key, value in src.items():
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                merge(dst[key], value)
            else:
                dst[key] = value
    out = copy.deepcopy(DEFAULTS)
    merge(out, cfg)
    return out


def diff(a: dict, b: dict) -> list[str]:
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
