"""SE: squeeze-and-excitation channel gate (Hu et al., CVPR 2018).

GAP -> FC C->C/r -> ReLU -> FC C/r->C -> sigmoid -> scale. The FCs are bias-free
1x1 convolutions: that is what reproduces the TDAM paper's Table 1 figure of
28.07 M for SE-ResNet-50 (REFERENCE.md: 25,557,032 + 2,514,944 = 28,071,976;
with biases it would be 28.09 M).
"""
import torch

from .common import ProductGate, bottleneck_mlp, check_4d, reduced
from .registry import register


@register("se", "gate", defaults={"reduction": 16},
          paper="Hu et al., Squeeze-and-Excitation Networks, CVPR 2018 (eq. 2-4)")
class SEGate(ProductGate):
    """Squeeze (global average pool) and excite (bias-free bottleneck MLP, sigmoid)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc = bottleneck_mlp(channels, reduced(channels, reduction, "se"))

    def multiplicands(self, x: torch.Tensor):
        """``(x, s)``: the output is ``x * s``, s the (N, C, 1, 1) excitation."""
        check_4d(x, "se")
        return x, torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
