"""The comparison methods of the benchmarks (compare.py, train_cost.py), usable on any model.

- `filter_prune`: structured filter pruning (Torch-Pruning, global group magnitude) to a
  whole-model MACs target; needs `pip install torch-pruning`.
- `GroupSparsity`: Torch-Pruning's sparse-training path (DepGraph's group-norm
  regularization) to run in your loop before `filter_prune(..., p=2)`.
- `TRP`: Trained Rank Pruning (Xu et al., IJCAI 2020): dense training with a periodic
  in-place SVD truncation of every weight and a nuclear-norm subgradient.

Post-hoc SVD needs no code of its own: `svdtrain.decompose(model, init="svd")` keeps a trained
model's outputs, then `svdtrain.prune(model, macs_budget=..., input_shape=...)` cuts it
(compare.py runs it so, through the pipeline's config).

Imported as `baselines` with benchmarks/ on sys.path, as a script there has it.
"""
from .filter_pruning import GroupSparsity, filter_prune
from .trp import TRP

__all__ = ["filter_prune", "GroupSparsity", "TRP"]
