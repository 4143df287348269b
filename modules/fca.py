"""FCA: frequency channel attention, FcaNet "top-16" (Qin et al., ICCV 2021).

The squeeze step pools each of 16 channel groups with one fixed 2-D DCT basis
(eq. 6-8, the paper's multi-spectral attention); the excitation is SE's bias-free
MLP. The frequencies are the paper's top-16 on a 7x7 grid (REFERENCE.md), scaled
by d // 7 on a d x d DCT grid. DCT grid size per stage as in the authors' code for
ResNet at 224^2: 56, 28, 14, 7 for stages 1..4. Like the authors, a feature map of
another size (any test resolution other than 224^2) is adaptively average-pooled to
the DCT size first. The filters are a buffer (not learned), so FCA-ResNet-50 has
SE's 28,071,976 parameters.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import bottleneck_mlp, check_4d, reduced
from .registry import OptionError, register

TOP16_U = (0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2)
TOP16_V = (0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2)
DCT_SIZE_BY_STAGE = {1: 56, 2: 28, 3: 14, 4: 7}


def dct_basis(pos: int, freq: int, n: int) -> float:
    """B(pos, freq, N) = cos(pi*freq*(pos+0.5)/N)/sqrt(N), times sqrt(2) for freq != 0."""
    value = math.cos(math.pi * freq * (pos + 0.5) / n) / math.sqrt(n)
    return value * math.sqrt(2) if freq != 0 else value


def dct_filters(channels: int, size: int, n_freq: int = 16) -> torch.Tensor:
    """(C, size, size) filters: channel group g is pooled with frequency g."""
    if channels % n_freq:
        raise OptionError(f"fca: channel count {channels} must be divisible by the number "
                          f"of frequencies {n_freq}")
    scale = max(size // 7, 1)
    filt = torch.zeros(channels, size, size)
    group = channels // n_freq
    for g, (u, v) in enumerate(zip(TOP16_U[:n_freq], TOP16_V[:n_freq])):
        bx = torch.tensor([dct_basis(i, u * scale, size) for i in range(size)])
        by = torch.tensor([dct_basis(j, v * scale, size) for j in range(size)])
        filt[g * group:(g + 1) * group] = bx[:, None] * by[None, :]
    return filt


@register("fca", "gate", defaults={"reduction": 16, "n_freq": 16, "dct_size": 0},
          paper="Qin et al., FcaNet: Frequency Channel Attention Networks, ICCV 2021 "
                "(eq. 6-8, top-16)",
          label=lambda o: "FCA-TS" if o["n_freq"] == 16 else f"FCA(n_freq={o['n_freq']})")
class FCAGate(nn.Module):
    """Multi-spectral (DCT) pooling of channel groups, then SE's excitation."""

    def __init__(self, channels: int, reduction: int = 16, n_freq: int = 16,
                 dct_size: int = 0, stage: int = 1):
        super().__init__()
        if not 1 <= n_freq <= 16:
            raise OptionError(f"fca: option n_freq={n_freq} must be between 1 and 16 "
                              f"(the top-16 table)")
        size = dct_size or DCT_SIZE_BY_STAGE.get(stage, 7)
        if size < 1:
            raise OptionError(f"fca: option dct_size={dct_size} must be positive")
        self.dct_size = size
        self.register_buffer("dct", dct_filters(channels, size, n_freq))
        self.fc = bottleneck_mlp(channels, reduced(channels, reduction, "fca"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_4d(x, "fca")
        pooled = x
        if x.shape[-2:] != (self.dct_size, self.dct_size):
            pooled = F.adaptive_avg_pool2d(x, self.dct_size)
        y = (pooled * self.dct).sum((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc(y))
