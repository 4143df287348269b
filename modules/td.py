"""TD: top-down attention module (Jaiswal, Fernando, Tan: TDAM; paper §3).

A block-kind module: :class:`TDBlock` replaces a torchvision ``Bottleneck`` /
``BasicBlock`` and runs the last ``m`` of its conv-BN layers ("covered" layers)
``steps`` = T times. After pass t < T the searchlight S (eq. 4 joint, eq. 5 top)
is inferred from the pass's top (the last BN's output) and bottom (the covered
layers' input); the bottom is attended (eq. 6-8) and the covered layers run again
on it (eq. 1-3). The output is the last pass's top, then the usual residual
addition (identity / downsample of the *original* block input) and ReLU.

Eq. 4-8 as implemented (pool = global average pool; all MLPs bias-free 1x1 convs;
rd = C_top // reduction for both branches, as in the authors' code):

* top:   S = W_s(ReLU(W_t pool(X_top)))                       (eq. 5)
* joint: S = W_s([ReLU(W_t pool(X_top)); ReLU(W_b pool(X_bot))]) (eq. 4)
* X' = X_bot * sigmoid(S) (eq. 6);  A = sum_c S_c X'_c, with S *without* sigmoid,
  one value per pixel (eq. 7);  X_bot(next) = X' * sigmoid(A) (eq. 8).

Choices the paper leaves open (the authors' code and REFERENCE.md decide them):

* feedback distance m, Bottleneck: 1 = conv3+bn3, 2 = conv2..bn3, 3 = whole body
  (bottom = block input). BasicBlock: 1 = conv2+bn2, 2 = whole body; m=3 is an error.
* passes after the first use their own BN layers for the covered BNs (one set per
  extra step, ``bn_steps[t-1]["bn3"]`` ...), initialised as copies of the block's
  BNs; conv weights and the searchlight MLP (W_t, W_b, W_s) are shared by all steps.
* no searchlight is needed after the last pass, so T passes infer T-1 searchlights
  (and T-1 spatial maps). T=1 creates no searchlight or extra BN parameters and gives
  exactly the plain block's output.
* the pre-residual top is what the searchlight sees (the block's own ReLU comes
  after the residual addition), as in Fig. 2 (right).

Parameters keep torchvision's names (``conv1``, ``bn1``, ..., ``downsample``), so
plain-ResNet weights load with ``strict=False``. Searchlights and spatial maps of a
forward pass can be kept for visualisation with ``with recording(model): ...``.

Ops in forward beyond the block's own convs/BNs/ReLUs: ``Tensor.mean`` (pooling),
``F.linear`` with the 1x1 ``nn.Conv2d`` weights (MLP, ``common.linear_1x1``), ``F.relu``,
``torch.cat`` (joint), ``torch.sigmoid``, ``*`` (``aten::mul``) and ``torch.matmul`` for A (eq. 7).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterator, List

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .common import check_4d, linear_1x1, reduced
from .registry import OptionError, register

VARIANTS = ("joint", "top")

PAPER = ("Jaiswal, Fernando, Tan, TDAM: Top-Down Attention Module for Contextually "
         "Guided Feature Selection in CNNs (§3, eq. 1-8)")

# ResNet-101 layer3 blocks carrying TD in the paper's "TDjoint(t=2,m=1)" row. The
# paper's text says "10 alternating blocks", but its 46.75 M parameters fit exactly
# 7 blocks (REFERENCE.md); which 7 is not stated, and for m=1 the count does not
# depend on it. We take every third block.
R101_LAYER3_BLOCKS = [2, 5, 8, 11, 14, 17, 20]


def _label(opts) -> str:
    text = f"TD{opts['variant']}(T={opts['steps']},m={opts['m']}"
    if opts.get("reduction", 16) != 16:
        text += f",r={opts['reduction']}"
    return text + ")"


def _preset_paper(backbone: str):
    """The paper's placement for its TD rows: layers 3+4 (ResNet-101: layer4 + 7 of layer3)."""
    if backbone == "resnet101":
        return {3: list(R101_LAYER3_BLOCKS), 4: "all"}
    return {3: "all", 4: "all"}


def _preset_r50_m3(backbone: str):
    """TDtop(T=2,m=3) row of Table 1: layer3 blocks 0-4 and all of layer4 (27,655,208)."""
    return {3: [0, 1, 2, 3, 4], 4: "all"}


def _preset_r101(backbone: str):
    """ResNet-101 TDjoint(t=2,m=1) row: layer4 + layer3 blocks 2,5,...,20 (46,754,856)."""
    if backbone and backbone != "resnet101":
        raise OptionError(f"td: stages preset 'paper-r101' is the ResNet-101 placement "
                          f"(layer3 blocks {R101_LAYER3_BLOCKS}); backbone is {backbone!r}")
    return {3: list(R101_LAYER3_BLOCKS), 4: "all"}


def _preset_l4(backbone: str):
    """ResNet-101 TDjoint(t=2,m=1,L4) row: all blocks of layer4 only (45,937,704)."""
    return {4: "all"}


@register("td", "block", defaults={"variant": "joint", "steps": 2, "m": 1, "reduction": 16},
          stages=(3, 4), paper=PAPER, label=_label,
          stage_presets={"paper": _preset_paper, "paper-r50-m3": _preset_r50_m3,
                         "paper-r101": _preset_r101, "paper-r101-l4": _preset_l4})
class TDBlock(nn.Module):
    """Top-down attention over the last m conv layers of a ResNet block, T steps."""

    def __init__(self, block: nn.Module, variant: str = "joint", steps: int = 2, m: int = 1,
                 reduction: int = 16):
        super().__init__()
        if isinstance(block, Bottleneck):
            names = ("1", "2", "3")
        elif isinstance(block, BasicBlock):
            names = ("1", "2")
        else:
            raise OptionError(f"td: wraps a torchvision Bottleneck or BasicBlock, "
                              f"got {type(block).__name__}")
        if variant not in VARIANTS:
            raise OptionError(f"td: option variant={variant!r} must be one of "
                              f"{', '.join(repr(v) for v in VARIANTS)}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise OptionError(f"td: option steps={steps!r} must be an integer >= 1 "
                              f"(T, the number of passes; 1 = the plain block)")
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= len(names):
            raise OptionError(
                f"td: option m={m!r} (feedback distance) must be 1..{len(names)} for a "
                f"{type(block).__name__} ({len(names)} conv layers; "
                f"m={len(names)} covers the whole residual body)")
        self.variant, self.steps, self.m, self.reduction = variant, steps, m, reduction
        for n in names:
            setattr(self, f"conv{n}", getattr(block, f"conv{n}"))
            setattr(self, f"bn{n}", getattr(block, f"bn{n}"))
        self.relu = block.relu
        self.downsample = block.downsample
        self.stride = block.stride
        self._names = names
        self._before = names[:-m]
        self._covered = names[-m:]
        c_top = getattr(self, f"bn{names[-1]}").num_features
        c_bottom = getattr(self, f"conv{self._covered[0]}").in_channels
        rd = reduced(c_top, reduction, "td")  # validated even when T=1
        if steps > 1:
            self.w_t = nn.Conv2d(c_top, rd, 1, bias=False)
            if variant == "joint":
                self.w_b = nn.Conv2d(c_bottom, rd, 1, bias=False)
            self.w_s = nn.Conv2d(rd * (2 if variant == "joint" else 1), c_bottom, 1, bias=False)
            self.bn_steps = nn.ModuleList(
                nn.ModuleDict({f"bn{n}": copy.deepcopy(getattr(self, f"bn{n}"))
                               for n in self._covered})
                for _ in range(steps - 1))
        self.record = False
        self.last_searchlights: List[torch.Tensor] = []
        self.last_spatial_maps: List[torch.Tensor] = []

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, steps={self.steps}, m={self.m}, " \
               f"reduction={self.reduction}"

    def _layer(self, n: str, x: torch.Tensor, step: int) -> torch.Tensor:
        bn = getattr(self, f"bn{n}") if step == 0 else self.bn_steps[step - 1][f"bn{n}"]
        x = bn(getattr(self, f"conv{n}")(x))
        return x if n == self._names[-1] else self.relu(x)

    def searchlight(self, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        """S of eq. 4 (joint) or eq. 5 (top), shape (N, C_bottom, 1, 1), no sigmoid."""
        hidden = F.relu(linear_1x1(self.w_t, top.mean((2, 3))))
        if self.variant == "joint":
            hidden = torch.cat([hidden, F.relu(linear_1x1(self.w_b, bottom.mean((2, 3))))], 1)
        return linear_1x1(self.w_s, hidden)[:, :, None, None]

    @staticmethod
    def attend(bottom: torch.Tensor, s: torch.Tensor):
        """Eq. 6-8: returns (next bottom, spatial map A of shape (N, 1, H, W))."""
        n, c, h, w = bottom.shape
        scaled = bottom * torch.sigmoid(s)                                     # eq. 6
        a = torch.matmul(s.reshape(n, 1, c), scaled.reshape(n, c, h * w))      # eq. 7
        a = a.reshape(n, 1, h, w)
        return scaled * torch.sigmoid(a), a                                    # eq. 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_4d(x, "td")
        identity = x if self.downsample is None else self.downsample(x)
        bottom = x
        for n in self._before:
            bottom = self._layer(n, bottom, 0)
        if self.record:
            self.last_searchlights, self.last_spatial_maps = [], []
        for step in range(self.steps):
            top = bottom
            for n in self._covered:
                top = self._layer(n, top, step)
            if step + 1 < self.steps:
                s = self.searchlight(top, bottom)
                bottom, a = self.attend(bottom, s)
                if self.record:
                    self.last_searchlights.append(s.detach().flatten(1))
                    self.last_spatial_maps.append(a.detach())
        top += identity  # in place, as torchvision's blocks do (BN's backward keeps no output)
        return self.relu(top)


def td_blocks(model: nn.Module) -> Dict[str, TDBlock]:
    """Every :class:`TDBlock` in ``model`` by qualified name (e.g. ``"layer3.0"``)."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, TDBlock)}


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[Dict[str, TDBlock]]:
    """Keep searchlights and spatial maps of each forward pass inside the ``with``.

    Yields :func:`td_blocks` of ``model``. After each forward pass, every block holds
    ``last_searchlights`` (T-1 detached tensors, S of eq. 4/5 before the sigmoid,
    shape (N, C_bottom)) and ``last_spatial_maps`` (T-1 detached tensors, A of eq. 7
    before the sigmoid, shape (N, 1, H_bottom, W_bottom)); entry t is inferred after
    pass t+1. They stay readable after the ``with``; recording then stops.
    """
    blocks = td_blocks(model)
    before = {name: blk.record for name, blk in blocks.items()}
    for blk in blocks.values():
        blk.record = True
        blk.last_searchlights, blk.last_spatial_maps = [], []
    try:
        yield blocks
    finally:
        for name, blk in blocks.items():
            blk.record = before[name]
