"""Small pieces shared by several attention modules."""
from __future__ import annotations

import torch
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


def bottleneck_mlp(channels: int, hidden: int) -> nn.Sequential:
    """Bias-free C -> C/r -> C MLP as 1x1 convolutions (SE, CBAM, FCA excitation)."""
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 1, bias=False),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, 1, bias=False),
    )
