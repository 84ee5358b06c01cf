"""nn.Conv2d in SVD form: the two matrix views of a conv weight and their factor convs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SVDLayer
from .matrix_view import matrix_to_weight, weight_to_matrix
from .plan import Call


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class SVDConv2d(SVDLayer):
    """nn.Conv2d (groups=1) in SVD form.

    mode "channel": matrix n x (c*kh*kw); factors are a kh x kw conv c->r (the layer's
    stride, padding, dilation) then a 1x1 conv r->n.
    mode "spatial": matrix (n*kh) x (c*kw) with M[n*kh+h, c*kw+w] = W[n, c, h, w]; factors
    are a 1 x kw conv c->r (horizontal stride/padding/dilation) then a kh x 1 conv r->n
    (vertical ones). A 1x1 kernel has nothing to split spatially and uses the channel view.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, padding_mode: str = "zeros", mode: str = "channel",
                 weight: torch.Tensor | None = None, init: str = "random"):
        super().__init__()
        if mode not in ("channel", "spatial"):
            raise ValueError(f"mode must be 'channel' or 'spatial', got {mode!r}")
        if isinstance(padding, str):
            raise ValueError("string padding ('same'/'valid') is not supported; use integers")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.padding_mode = padding_mode
        kh, kw = self.kernel_size
        self.mode = "channel" if kh * kw == 1 else mode
        if self.mode == "channel":
            self.rows, self.cols = out_channels, in_channels * kh * kw
        else:
            self.rows, self.cols = out_channels * kh, in_channels * kw
        self._init_factors(None if weight is None else self.weight_to_matrix(weight), init)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mode: str = "channel", init: str = "svd") -> "SVDConv2d":
        if conv.groups != 1:
            raise ValueError("grouped convolutions are not decomposed")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                  conv.padding, conv.dilation, conv.bias is not None, conv.padding_mode,
                  mode=mode, weight=conv.weight, init=init)
        if conv.bias is not None:
            new.bias.data.copy_(conv.bias.detach())
        return new.to(device=conv.weight.device, dtype=conv.weight.dtype)

    # ----- matrix view <-> weight -----
    def weight_to_matrix(self, w: torch.Tensor) -> torch.Tensor:
        return weight_to_matrix(w, self.mode)

    def matrix_to_weight(self, m: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        return matrix_to_weight(m, (self.out_channels, self.in_channels, kh, kw), self.mode)

    def dense_weight(self) -> torch.Tensor:
        """U diag(s) V^T in nn.Conv2d's weight shape (n, c, kh, kw)."""
        return self.matrix_to_weight(self.matrix())

    # ----- the two factor convs: (weight, stride, padding, dilation) each -----
    def _factor_specs(self, u, s, v):
        n, c = self.out_channels, self.in_channels
        kh, kw = self.kernel_size
        r = u.shape[1]
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        if self.mode == "channel":
            first = (v.T.reshape(r, c, kh, kw), self.stride, self.padding, self.dilation)
            second = ((u * s).reshape(n, r, 1, 1), (1, 1), (0, 0), (1, 1))
        else:
            first = (v.T.reshape(r, c, 1, kw), (1, sw), (0, pw), (1, dw))
            second = ((u * s).reshape(n, kh, r).permute(0, 2, 1).unsqueeze(3),
                      (sh, 1), (ph, 0), (dh, 1))
        return first, second

    def _conv(self, x, weight, stride, padding, dilation, bias=None):
        if self.padding_mode != "zeros":
            ph, pw = padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = (0, 0)
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    def out_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        return tuple(
            (in_hw[i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1)
            // self.stride[i] + 1
            for i in range(2)
        )

    def macs(self, in_hw=None, rank=None):
        r = self.rank if rank is None else rank
        n, c = self.out_channels, self.in_channels
        kh, kw = self.kernel_size
        if in_hw is None:
            # Without a known input size, assume one output pixel (and the input rows
            # that feed it): the dense/factored ratio is what matters here.
            in_hw = (self.stride[0], self.stride[1])
            ho, wo = 1, 1
        else:
            ho, wo = self.out_hw(in_hw)
        dense = ho * wo * kh * kw * c * n
        if self.mode == "channel":
            factored = ho * wo * (kh * kw * c * r + r * n)
        else:  # 1 x kw first over all input rows, then kh x 1
            factored = in_hw[0] * wo * kw * c * r + ho * wo * kh * r * n
        return dense, factored

    def call_cost(self, shape):
        batch = shape[0] if len(shape) == 4 else 1
        dense, per_rank = self.macs(tuple(shape[-2:]), rank=1)
        return Call(tuple(shape), batch * dense, batch * per_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_factored(tuple(x.shape[-2:])):
            first, second = self._factor_specs(*self._run_factors())
            return self._conv(self._conv(x, *first), *second, bias=self.bias)
        return self._conv(x, self.dense_weight(), self.stride, self.padding, self.dilation,
                          bias=self.bias)

    # ----- export -----
    def _new_conv(self, c, n, weight, stride, padding, dilation, bias):
        conv = nn.Conv2d(c, n, tuple(weight.shape[-2:]), stride, padding, dilation,
                         bias=bias is not None, padding_mode=self.padding_mode, **self._like())
        conv.weight.data.copy_(weight.detach())
        if bias is not None:
            conv.bias.data.copy_(bias.detach())
        return conv

    def factor_layers(self) -> nn.Sequential:
        """The two ordinary nn.Conv2d layers at the active rank."""
        u, s, v = (t.detach() for t in self.factors())
        first, second = self._factor_specs(u, s, v)
        r = u.shape[1]
        return nn.Sequential(self._new_conv(self.in_channels, r, *first, None),
                             self._new_conv(r, self.out_channels, *second, self.bias))

    def dense_layer(self) -> nn.Conv2d:
        """One ordinary nn.Conv2d holding U diag(s) V^T."""
        return self._new_conv(self.in_channels, self.out_channels, self.dense_weight(),
                              self.stride, self.padding, self.dilation, self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, mode={self.mode}, rank={self.rank}/{self.full_rank}")
