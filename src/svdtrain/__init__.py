"""svdtrain: learn low-rank networks by SVD training (Yang et al., CVPR 2020 workshops).

    model = svdtrain.decompose(model, mode="channel", init="svd")
    reg = svdtrain.Regularizer(orth=1.0, sparsity="hoyer", strength=0.005)
    budget = svdtrain.BudgetController(model, reg, 0.33, (1, 3, 32, 32), total_steps)
    loss = task_loss + reg(model)                  # in your own training loop; budget.step()
    ranks = svdtrain.prune(model, keep_energy=0.999)
    compact = svdtrain.export(model)               # ordinary nn layers only
"""
from .attention import SVDMultiheadAttention
from .budget import BudgetController, LinearSchedule
from .calibrate import recalibrate_batchnorm
from .decompose import decompose
from .export import export, export_onnx, export_program
from .importance import EnergyShare, SingularValueImportance, loss_importance
from .conv import SVDConv2d
from .layers import SVDLayer, SVDLinear, svd_layers
from .losses import Regularizer, orthogonality_loss, param_groups, sparsity_loss
from .macs import count_macs, count_params
from .pretrained import from_pretrained, save_pretrained
from .prune import prune, ranks, set_ranks
from .whiten import unwhiten

__version__ = "0.1.0"

__all__ = [
    "BudgetController", "SVDMultiheadAttention", "decompose", "export", "export_program", "export_onnx", "SVDConv2d", "SVDLayer", "SVDLinear", "svd_layers",
    "Regularizer", "orthogonality_loss", "sparsity_loss", "param_groups", "count_macs",
    "count_params", "prune", "ranks", "set_ranks", "SingularValueImportance", "loss_importance",
    "EnergyShare", "LinearSchedule", "save_pretrained", "from_pretrained", "recalibrate_batchnorm", "unwhiten",
    "__version__",
]
