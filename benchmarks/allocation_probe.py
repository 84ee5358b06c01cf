"""How well does a MACs-budget rank allocation keep a trained model's function? Accuracy right
after `prune(macs_budget=...)` (no fine-tuning) of a trained ResNet-20 (on its validation
split) and ViT (on 5k training images: it has no split), for svdtrain's rule by energy share
("svdtrain") and by loss importance ("loss": `loss_importance` over --score-batches augmented
training batches) and, with --old-prune, for another prune.py (e.g. an earlier commit's,
written out with `git show`).
The ResNet-20 is the committed results/pretrained_dense; the ViT is the dense run of
`vit_cifar10.py` (work/vit/dense: run that first).

    git show 86d0daf:src/svdtrain/prune.py > /tmp/prune_greedy.py
    python benchmarks/allocation_probe.py --old-prune /tmp/prune_greedy.py
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import importlib.util
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import svdtrain
from svdtrain.data import load_dataset
from svdtrain.engine import evaluate
from svdtrain.loader import BatchLoader
from svdtrain.models import build_model

HERE = Path(__file__).resolve().parent
MODELS = {"resnet20": HERE / "results" / "pretrained_dense" / "checkpoint.pt",
          "vit": HERE / "work" / "vit" / "dense" / "model_state.pt"}


def load_rule(path: str):
    """prune() of a prune.py file, imported inside the svdtrain package (it uses relative imports)."""
    spec = importlib.util.spec_from_file_location("svdtrain._prune_compared", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.prune


def state(path: Path) -> dict:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved["model"] if "model" in saved else saved  # a run checkpoint or a state_dict


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(Path.home() / ".cache" / "cifar10"))
    p.add_argument("--old-prune", default=None, help="a prune.py to compare with (its rule is named 'old')")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--score-batches", type=int, default=32, help="batches of 128 the loss rule scores on")
    p.add_argument("--out", default=str(HERE / "results" / "allocation_probe.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rules = {"svdtrain": svdtrain.prune}
    if args.old_prune:
        rules["old"] = load_rule(args.old_prune)
    data = load_dataset("cifar10", args.data_dir)
    val = data.with_validation(5000, 0)
    held_out = {"resnet20": (val.x_val, val.y_val), "vit": (data.x_train[:5000], data.y_train[:5000])}
    rows = []
    for name in args.models:
        dense = build_model(name, 10)
        dense.load_state_dict(state(MODELS[name]))
        x, y = held_out[name]
        loader = BatchLoader(x, y, 500, train=False, mean=data.mean, std=data.std)
        base = evaluate(dense.eval(), loader)
        scored = svdtrain.decompose(copy.deepcopy(dense), init="svd")
        train = BatchLoader(val.x_train if name == "resnet20" else data.x_train[5000:],
                            val.y_train if name == "resnet20" else data.y_train[5000:], 128, train=True,
                            mean=data.mean, std=data.std)
        scores = svdtrain.loss_importance(scored, train, lambda out, t: F.cross_entropy(out, t, label_smoothing=0.1),
                                          args.score_batches)
        rules["loss"] = functools.partial(svdtrain.prune, scores=scores)  # this model's scores
        for budget in (0.5, 0.33, 0.25):
            for rule, prune in rules.items():
                model = svdtrain.decompose(copy.deepcopy(dense), init="svd").eval()
                ranks = prune(model, macs_budget=budget, input_shape=(1, 3, 32, 32))
                rows.append({"model": name, "budget": budget, "rule": rule, "dense_accuracy": base,
                             "accuracy": evaluate(model, loader), "macs": svdtrain.count_macs(model, (1, 3, 32, 32)),
                             "rank_1_layers": sum(k == 1 for k in ranks.values()), "ranks": ranks})
                print(f"{name} {budget:.0%} {rule}: {rows[-1]['accuracy']:.2%} right after pruning "
                      f"(dense {base:.2%}), {rows[-1]['rank_1_layers']} layers at rank 1", flush=True)
    out = {"rows": rows, "old_prune": args.old_prune, "machine": f"{platform.machine()}, torch {torch.__version__}",
           "date": datetime.date.today().isoformat(),
           "command": " ".join(["python benchmarks/allocation_probe.py", *(argv if argv is not None else sys.argv[1:])])}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
