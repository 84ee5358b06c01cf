"""The matrix view of a Linear or Conv2d weight that SVD form factorizes, and its inverse."""
from __future__ import annotations

import torch


def weight_to_matrix(w: torch.Tensor, mode: str) -> torch.Tensor:
    """Matrix view of a Linear (as is) or Conv2d weight: "channel" n x (c*kh*kw),
    "spatial" (n*kh) x (c*kw) with M[n*kh+h, c*kw+w] = W[n,c,h,w] (1x1 kernels: channel)."""
    if w.dim() == 2:
        return w
    n, c, kh, kw = w.shape
    if mode == "channel" or kh * kw == 1:
        return w.reshape(n, c * kh * kw)
    return w.permute(0, 2, 1, 3).reshape(n * kh, c * kw)


def matrix_to_weight(m: torch.Tensor, shape, mode: str) -> torch.Tensor:
    """Inverse of weight_to_matrix for a weight of `shape`."""
    if len(shape) == 2:
        return m
    n, c, kh, kw = shape
    if mode == "channel" or kh * kw == 1:
        return m.reshape(n, c, kh, kw)
    return m.reshape(n, kh, c, kw).permute(0, 2, 1, 3).contiguous()
