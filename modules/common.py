"""Small pieces shared by several attention modules."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import OptionError


def check_4d(x: torch.Tensor, who: str) -> None:
    """Fail clearly unless ``x`` is an (N, C, H, W) tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who}: expected a 4-D input (N, C, H, W), got shape {shape}")


def reduced(channels: int, reduction: int, who: str, option: str = "reduction") -> int:
    """``channels // reduction``, failing with a message naming the option when impossible."""
    if not isinstance(reduction, int) or reduction < 1:
        raise OptionError(f"{who}: option {option}={reduction!r} must be a positive integer")
    if reduction > channels:
        raise OptionError(
            f"{who}: option {option}={reduction} is larger than the channel count {channels}; "
            f"the hidden layer would have no channels (use {option} <= {channels})")
    return channels // reduction


def linear_1x1(conv: nn.Conv2d, rows: torch.Tensor) -> torch.Tensor:
    """A bias-or-not 1x1 ``conv`` (groups 1) applied to ``rows`` (M, C_in), one row per map
    position, as ``F.linear``: (M, C_out). The same multiply-adds (every FLOP counter gives
    the same total) and the same values up to rounding, without oneDNN's fixed cost for a
    convolution over a tiny map (CPU, batch 8: ~120-330 us against ~20-70 us; see the
    README). The conv keeps its parameters and state-dict keys; its forward hooks do not
    run."""
    return F.linear(rows, conv.weight.flatten(1), conv.bias)


class ChannelMLP(nn.Sequential):
    """Bias-free C -> C/r -> C MLP as 1x1 convolutions (SE, CBAM, FCA excitation;
    parameters and state-dict keys ``0.weight``, ``2.weight``). On an (N, C, 1, 1) input
    (a pooled descriptor) with N >= 2 the convs run as :func:`linear_1x1` on the (N, C)
    matrix; a single descriptor (N = 1) goes through the convs, which are a few us faster
    there (CPU, 2 threads: 30-94 against 36-98 us for C = 256-2048; ``F.linear`` is
    2.3-4.6x faster at N = 8; 30 interleaved rounds, medians, 2026-12-02)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[2:] != (1, 1) or x.shape[0] < 2:
            return super().forward(x)
        y = x.flatten(1)
        for m in self:
            y = linear_1x1(m, y) if isinstance(m, nn.Conv2d) else m(y)
        return y[:, :, None, None]


def bottleneck_mlp(channels: int, hidden: int) -> ChannelMLP:
    """Bias-free C -> C/r -> C MLP as 1x1 convolutions (SE, CBAM, FCA excitation)."""
    return ChannelMLP(
        nn.Conv2d(channels, hidden, 1, bias=False),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, 1, bias=False),
    )
