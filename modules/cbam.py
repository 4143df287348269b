"""CBAM: convolutional block attention module (Woo et al., ECCV 2018).

Channel gate: a shared bias-free MLP (C->C/r->C) on the average- and max-pooled
vectors, summed, sigmoid (eq. 2). Spatial gate: [max over channels; mean over
channels] -> 7x7 conv (2->1, padding 3, no bias) -> BN(1) -> sigmoid (eq. 3).
Channel first, then spatial (the paper's best order). The MLP runs once on the
2N stacked descriptors (the same values as two calls, one call's fixed cost).
Both max poolings are ``amax`` without autograd; under it they are the authors' own ops,
``F.max_pool2d`` over the whole map and ``torch.max(x, 1)``, whose gradient goes to one
maximum (``amax``'s is split over tied maxima, the same on untied maps): their backward
scatters to the stored indices where ``amax``'s recomputes masks over the whole map
(ResNet-50, a batch-8 training step, CPU 2 threads, ``attnbench efficiency``, 20-30 rounds in
4-6 blocks, 2026-12-04: 0.772 [0.762, 0.783] of the plain network's speed, against 0.684
[0.681, 0.688] for timm's ``amax`` layer in the same rounds and 0.669 before). Where a
FLOP counter watches (:func:`~attnbench.modules.common.watched`) it is ``amax`` in both.
With these choices CBAM-ResNet-50 has 28,073,576 parameters, the count REFERENCE.md
measured on the reference implementation.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .common import ProductGate, bottleneck_mlp, check_4d, reduced, watched
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
        argmax = torch.is_grad_enabled() and not watched()
        # the shared MLP once on the 2N stacked descriptors (avg rows, then max rows)
        peak = F.max_pool2d(x, x.shape[2:]) if argmax else x.amax((2, 3), keepdim=True)
        both = self.mlp(torch.cat([x.mean((2, 3), keepdim=True), peak]))
        x = x * torch.sigmoid(both[:n] + both[n:])
        peak = x.max(1, keepdim=True)[0] if argmax else x.amax(1, keepdim=True)
        pooled = torch.cat([peak, x.mean(1, keepdim=True)], dim=1)
        return x, torch.sigmoid(self.spatial(pooled))
