"""Coordinate Attention (Hou, Zhou and Feng, CVPR 2021), as an attnbench plugin.

Pool along H and along W separately (eq. 2-3), concatenate, shared 1x1 conv + BN +
h-swish (eq. 4), split, one 1x1 conv + sigmoid per direction (eq. 5-6), and
y = x * a_h * a_w (eq. 7). Hidden width max(min_channels, C // reduction) and the
conv biases follow the authors' code (github.com/houqb/CoordAttention).
"""
import torch
from torch import nn

from attnbench import OptionError, register


@register("coordatt", "gate", defaults={"reduction": 32, "min_channels": 8},
          paper="Hou et al., Coordinate Attention for Efficient Mobile Network Design, "
                "CVPR 2021 (eq. 2-7)")
class CoordAtt(nn.Module):
    """Direction-aware gate: a_h (N, C, H, 1) and a_w (N, C, 1, W) from 1-D pooled maps."""

    def __init__(self, channels: int, reduction: int = 32, min_channels: int = 8):
        super().__init__()
        if reduction < 1 or min_channels < 1:
            raise OptionError(f"coordatt: reduction={reduction} and min_channels="
                              f"{min_channels} must be positive integers")
        hidden = max(min_channels, channels // reduction)
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act = nn.Hardswish()
        self.conv_h = nn.Conv2d(hidden, channels, 1)
        self.conv_w = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        x_h = x.mean(3, keepdim=True)                          # (N, C, H, 1)
        x_w = x.mean(2, keepdim=True).permute(0, 1, 3, 2)      # (N, C, W, 1)
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.conv_h(y_h))                  # (N, C, H, 1)
        a_w = torch.sigmoid(self.conv_w(y_w.permute(0, 1, 3, 2)))  # (N, C, 1, W)
        return x * a_h * a_w
