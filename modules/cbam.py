"""CBAM: convolutional block attention module (Woo et al., ECCV 2018).

Channel gate: a shared bias-free MLP (C->C/r->C) on the average- and max-pooled
vectors, summed, sigmoid (eq. 2). Spatial gate: [max over channels; mean over
channels] -> 7x7 conv (2->1, padding 3, no bias) -> BN(1) -> sigmoid (eq. 3).
Channel first, then spatial (the paper's best order). The MLP runs once on the
2N stacked descriptors (the same values as two calls, one call's fixed cost). With these choices
CBAM-ResNet-50 has 28,073,576 parameters, the count REFERENCE.md measured on the
reference implementation.
"""
import torch
from torch import nn

from .common import ProductGate, bottleneck_mlp, check_4d, reduced
from .registry import OptionError, register


@register("cbam", "gate", defaults={"reduction": 16, "kernel_size": 7},
          paper="Woo et al., CBAM: Convolutional Block Attention Module, ECCV 2018 (eq. 1-3)")
class CBAMGate(ProductGate):
    """Channel attention (avg+max pooled shared MLP) then spatial attention (7x7 conv)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise OptionError(f"cbam: option kernel_size={kernel_size} must be a positive odd "
                              f"integer (the spatial map keeps its size with padding k//2)")
        self.mlp = bottleneck_mlp(channels, reduced(channels, reduction, "cbam"))
        self.spatial = nn.Sequential(
            nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(1),
        )

    def multiplicands(self, x: torch.Tensor):
        """``(x', s)``: the output is ``x' * s``, x' the channel-gated map (eq. 2) and s
        its (N, 1, H, W) spatial weights (eq. 3)."""
        check_4d(x, "cbam")
        n = x.shape[0]
        # the shared MLP once on the 2N stacked descriptors (avg rows, then max rows)
        both = self.mlp(torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)]))
        x = x * torch.sigmoid(both[:n] + both[n:])
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return x, torch.sigmoid(self.spatial(pooled))
