"""DDP: joining the torchrun process group, and checks that every rank holds the same model."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from .engine import RunError
from .layers import unwrap


def setup_distributed(device_name: str):
    """(rank, world_size, device); joins the torchrun process group when launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name == "cuda" and not torch.cuda.is_available():
        raise RunError("device: cuda was asked for but no CUDA device is available")
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def spread(value, device) -> float:
    """Max minus min of a number over all ranks."""
    v = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(1)
    hi, lo = v.clone(), -v
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX)
    return float(hi + lo)


def replica_spread(model: nn.Module) -> float:
    """Max minus min over ranks of a checksum of all parameters and buffers: 0.0 when every
    replica holds the same model (DDP must keep them identical, regularizer included)."""
    tensors = [t.detach() for t in unwrap(model).state_dict().values() if torch.is_tensor(t)]
    total = sum(t.double().sum() for t in tensors if t.is_floating_point())
    # the active masks (bool) and counters exactly: every rank at the same ranks
    counts = sum(t.double().sum() for t in tensors if not t.is_floating_point())
    gap, count_gap = spread(total, total.device), spread(counts, total.device)  # both on every rank
    scale = torch.as_tensor(abs(float(total)), dtype=torch.float64, device=total.device).reshape(1)
    dist.all_reduce(scale, op=dist.ReduceOp.MAX)  # one tolerance, so every rank decides alike
    if gap > 1e-6 * max(1.0, float(scale)) or count_gap != 0:
        raise RunError(f"DDP replicas diverged (parameter checksum spread {gap:.3g}, or their masks differ)")
    return gap


def rank0_timer(timer=None):
    """Under DDP, a latency timer (module, inputs) -> seconds whose every reading is rank 0's,
    so every rank makes the same latency-budget choices (each process times differently);
    without a process group, the timer itself (default: latency.wall_time)."""
    from .latency import wall_time
    timer = timer or wall_time
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return timer

    def timed(module, inputs):
        seconds = [timer(module, inputs)]
        dist.broadcast_object_list(seconds, src=0)
        return seconds[0]
    return timed
