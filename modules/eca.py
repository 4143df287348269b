"""ECA: efficient channel attention (Wang et al., CVPR 2020).

GAP -> 1-D convolution across channels (no bias) -> sigmoid -> scale. The kernel
size adapts to the channel count (eq. 12): t = int(|log2(C)/gamma + b/gamma|),
k = t if t is odd else t + 1, with gamma = 2, b = 1. ``kernel_size`` overrides it.
"""
import math

import torch
from torch import nn

from .common import ProductGate, check_4d
from .registry import OptionError, register


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """Adaptive kernel size of ECA's eq. 12."""
    t = int(abs(math.log2(channels) / gamma + b / gamma))
    return t if t % 2 else t + 1


@register("eca", "gate", defaults={"gamma": 2, "b": 1, "kernel_size": 0},
          paper="Wang et al., ECA-Net, CVPR 2020 (eq. 12)")
class ECAGate(ProductGate):
    """GAP, 1-D conv of adaptive size across channels, sigmoid."""

    def __init__(self, channels: int, gamma: int = 2, b: int = 1, kernel_size: int = 0):
        super().__init__()
        if gamma < 1:
            raise OptionError(f"eca: option gamma={gamma} must be a positive integer")
        k = kernel_size or eca_kernel_size(channels, gamma, b)
        if k < 1 or k % 2 == 0:
            raise OptionError(f"eca: option kernel_size={k} must be a positive odd integer "
                              f"(0 picks it from the channel count)")
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def multiplicands(self, x: torch.Tensor):
        """``(x, s)``: the output is ``x * s``, s the (N, C, 1, 1) channel weights."""
        check_4d(x, "eca")
        y = x.mean((2, 3)).unsqueeze(1)                    # (N, 1, C)
        y = self.conv(y).squeeze(1)                        # (N, C)
        return x, torch.sigmoid(y)[:, :, None, None]
