"""TDAF: Top-Down Attention Framework for Vision Tasks (Pang et al., AAAI 2021; §3).

A network-kind module: :func:`tdaf` builds the whole model from a torchvision
ResNet (18/34/50/101). Three parts, as in §3:

* **R2DNS** (eq. 1, 2, 5). N = ``flows`` vertical flows share every weight. Flow N
  gets the image X, flow n < N gets flow n+1's input downsampled by 2 (eq. 2), and
  runs the stem plus the first S(n) = L - (N - n) stages (eq. 1). Stage l of flow n:
  x_{l+1}^(n) = h_l[x_l^(n)] * (g_l[x_{l+1}^(n-1)] + eta)   (eq. 5, eta = 0.5),
  where x_{l+1}^(n-1) is flow n-1's stage-l output *after* its own attention. Only
  flow N's output reaches the classifier (avgpool + fc).
* **ANAR** g_l (Table 1, Fig. 3a): an hourglass on flow n-1's stage-l output
  (c channels) whose one-channel sigmoid map is broadcast over flow n's channels.
  ANAR-3: 1x1 c->c/8; deconv 4x4/2 c/8->c/32; 1x1 ->1; sigmoid.
  ANAR-5: 1x1 c->c/4; conv 3x3/2 ->c/8; deconv ->c/16 (+skip); deconv ->c/32; 1x1; sigmoid.
  ANAR-7: 1x1 c->c/4; conv 3x3/2 ->c/8 twice; deconv ->c/16 (+skip), ->c/16 (+skip),
  ->c/32; 1x1; sigmoid.
  Every conv/deconv is bias-free + MFBN + ReLU; the last 1x1 has a bias and no BN.
* **MFBN** (eq. 4): :class:`MultiFlowBatchNorm2d` replaces every ``nn.BatchNorm2d``;
  one gamma/beta, running mean/var of shape (flows, C). The R2DNS forward sets the
  active flow (``.flow``, 0-based) on every MFBN before each flow; eval mode
  normalises with that flow's own running statistics.

Choices the paper leaves open (ours):

* "stage": L = 4 = layer1..layer4; the stem (conv1/bn1/relu/maxpool) is h_0, run
  by every flow, with no attention after it. So N <= 4; for N = 3 at 224^2 flow 1
  (56^2) runs stem..layer2, flow 2 (112^2) stem..layer3, flow 3 everything.
  g_l exists for l = 1..L-1 (stage L has no earlier flow to feed it) when N >= 2.
* where no earlier flow feeds stage l (flow 1, and stage 4 of flow N) the stage is
  the plain h_l (g = 1 of eq. 3), not h_l * (1 + eta).
* DSF (eq. 2): ``nn.AvgPool2d(2, ceil_mode=True)`` -- the 2x2 mean (= bilinear 0.5
  for even sizes); for odd sizes it gives ceil(H/2), the rounding of the ResNet's own
  stride-2 layers, so flow n-1's stage-l map is exactly ceil(H_l^(n)/2) and every
  ANAR upsampling is >= its target. Alignment is a top-left crop (no interpolation):
  each deconv output is cropped to the skip it joins and the last one to flow n's
  stage-l size (at most one extra row/column is dropped).
* skips ("SC", a single-layer CNN): 1x1 conv + MFBN + ReLU from the down path
  feature of the same resolution (the trans output at the input resolution, each
  down output below it), added to the cropped deconv output. ANAR-3 has none.
* ANAR MFBNs have ``flows`` slots too; the one producing flow n's attention uses
  slot n (slot 0 stays unused).
* batch 1 in train mode on a 1x1 map (a single value per channel; PyTorch's BN
  raises): MFBN normalises with that flow's running statistics and leaves them
  unchanged. Every stage map is >= ceil(S/32) for an S^2 image (eq. 1 keeps deep
  stages off the small flows) and ANAR-7's bottom >= ceil(S/128), so at
  168^2..448^2 this never happens (smallest map 2x2); it does for S <= 128
  (ANAR-7), <= 64 (ANAR-5), <= 32 (any).

Budget (ResNet-50, 3 flows, fvcore at 224^2, batch 1): paper 29.9 M / 5.4 G for
ANAR-3 (30.3 M / 5.8 G ANAR-5, 30.5 M / 5.8 G ANAR-7). Ours: 25,815,699 / 5.085 G
(ANAR-3), 26,526,675 / 5.125 G (ANAR-5), 26,817,875 / 5.126 G (ANAR-7); plain
ResNet-50 25,557,032 / 4.112 G. Table 1's widths on stages 1-3 (c = 256, 512, 1024)
give 0.26 M for ANAR-3 (the paper's FCOS table: +0.22 M), so the classification
table's +4.3 M is not reproducible from the paper. Our FLOPs are the asymmetric
flows of eq. 1 (5.05 G before ANAR) + 0.03-0.07 G of ANAR; symmetric full-depth
flows would give 5.50 G, so the paper's 5.4 G lies between.

A plain ResNet's ``state_dict`` loads into a TDAF model (``strict=False``: the
ANARs are missing), each BN's running statistics going to every flow.

Ops in forward: ``nn.AvgPool2d`` (``aten::avg_pool2d``, ceil_mode) for the DSF;
the ResNet's convs/ReLUs/maxpool/adds; ``F.batch_norm`` on row-views of the MFBN
buffers (``aten::select`` + ``aten::batch_norm``); ``nn.Conv2d`` 1x1 and 3x3/2 and
``nn.ConvTranspose2d`` 4x4/2 (``aten::_convolution`` with transposed=True);
slicing for the crops (``aten::slice``); ``+`` (skip, ``aten::add``);
``nn.Sigmoid``; ``a + eta`` (``aten::add``) and ``*`` (``aten::mul``) for eq. 5.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .builder import plain_backbone
from .common import check_4d
from .registry import OptionError, register

PAPER = ("Pang et al., TDAF: Top-Down Attention Framework for Vision Tasks, AAAI 2021 "
         "(§3: R2DNS eq. 1-3, 5; MFBN eq. 4; ANAR Table 1)")

STAGES = 4  # L: layer1..layer4 (the stem is h_0)
ANAR_DEPTHS = (3, 5, 7)


class MultiFlowBatchNorm2d(nn.Module):
    """BatchNorm2d with one gamma/beta shared by all flows and running statistics
    per flow (eq. 4). ``flow`` (0-based) selects the running statistics in use."""

    def __init__(self, num_features: int, flows: int, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1):
        super().__init__()
        if not isinstance(flows, int) or flows < 1:
            raise OptionError(f"MultiFlowBatchNorm2d: flows={flows!r} must be a positive int")
        self.num_features = num_features
        self.flows = flows
        self.eps = eps
        self.momentum = momentum
        self.flow = 0
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(flows, num_features))
        self.register_buffer("running_var", torch.ones(flows, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(flows, dtype=torch.long))

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, flows: int) -> "MultiFlowBatchNorm2d":
        """An MFBN with ``bn``'s affine parameters and its running stats in every slot."""
        m = cls(bn.num_features, flows, bn.eps, bn.momentum)
        with torch.no_grad():
            if bn.affine:
                m.weight.copy_(bn.weight)
                m.bias.copy_(bn.bias)
            if bn.running_mean is not None:
                m.running_mean.copy_(bn.running_mean.expand(flows, -1))
                m.running_var.copy_(bn.running_var.expand(flows, -1))
        return m

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a plain BatchNorm2d's statistics (shape (C,) / scalar) load into every flow
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            key = prefix + name
            value = state_dict.get(key)
            if value is not None and value.dim() == getattr(self, name).dim() - 1:
                state_dict[key] = value.unsqueeze(0).expand_as(getattr(self, name)).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, flows={self.flows}, eps={self.eps}, "
                f"momentum={self.momentum}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = self.flow
        if not 0 <= i < self.flows:
            raise ValueError(f"MultiFlowBatchNorm2d: active flow {i} is not in 0..{self.flows - 1}")
        mean, var = self.running_mean[i], self.running_var[i]
        # one value per channel (batch 1, 1x1 map): batch statistics are undefined,
        # so normalise with this flow's running statistics and leave them unchanged
        training = self.training and x.numel() // max(x.shape[1], 1) > 1
        momentum = 0.0 if self.momentum is None else self.momentum
        if training:
            self.num_batches_tracked[i] += 1
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked[i])
        return F.batch_norm(x, mean, var, self.weight, self.bias, training, momentum, self.eps)


def _cbr(conv: nn.Module, channels: int, flows: int) -> nn.Sequential:
    return nn.Sequential(conv, MultiFlowBatchNorm2d(channels, flows), nn.ReLU(inplace=True))


def _crop(x: torch.Tensor, size) -> torch.Tensor:
    """Top-left crop of ``x`` to spatial ``size`` (never smaller than ``size``)."""
    h, w = int(size[0]), int(size[1])
    if x.shape[-2] < h or x.shape[-1] < w:
        raise RuntimeError(f"tdaf: ANAR map {tuple(x.shape[-2:])} is smaller than its "
                           f"target {(h, w)}")
    return x[:, :, :h, :w]


class ANAR(nn.Module):
    """Attention Network across Recurrence g_l (Table 1): c channels at H x W ->
    one sigmoid map at ``out_size`` (about 2H x 2W, cropped)."""

    def __init__(self, channels: int, depth: int = 3, flows: int = 3):
        super().__init__()
        if depth not in ANAR_DEPTHS:
            raise OptionError(f"tdaf: option anar={depth!r} must be one of 3, 5, 7 "
                              f"(ANAR-3/5/7, Table 1)")
        c = channels
        if c % 32:
            raise OptionError(f"tdaf: ANAR needs channels divisible by 32 (Table 1's c/32), "
                              f"got {c}")
        n_down = (depth - 3) // 2          # 0, 1, 2
        trans = c // 8 if depth == 3 else c // 4
        downs = [c // 8] * n_down
        ups = {3: [c // 32], 5: [c // 16, c // 32], 7: [c // 16, c // 16, c // 32]}[depth]
        self.depth = depth
        self.trans = _cbr(nn.Conv2d(c, trans, 1, bias=False), trans, flows)
        self.down = nn.ModuleList()
        prev = trans
        down_widths = [trans]
        for w in downs:
            self.down.append(_cbr(nn.Conv2d(prev, w, 3, 2, 1, bias=False), w, flows))
            prev = w
            down_widths.append(w)
        self.up = nn.ModuleList()
        self.skip = nn.ModuleList()
        for k, w in enumerate(ups):
            self.up.append(_cbr(nn.ConvTranspose2d(prev, w, 4, 2, 1, bias=False), w, flows))
            if k < n_down:  # joins the down feature of the same resolution
                src = down_widths[n_down - 1 - k]
                self.skip.append(_cbr(nn.Conv2d(src, w, 1, bias=False), w, flows))
            prev = w
        self.out = nn.Conv2d(prev, 1, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor, out_size) -> torch.Tensor:
        feats = [self.trans(x)]
        for d in self.down:
            feats.append(d(feats[-1]))
        y = feats[-1]
        n_down = len(self.down)
        for k, up in enumerate(self.up):
            y = up(y)
            if k < n_down:
                src = feats[n_down - 1 - k]
                y = _crop(y, src.shape[-2:]) + self.skip[k](src)
        y = _crop(y, out_size)
        return self.sigmoid(self.out(y))


def stage_counts(flows: int) -> List[int]:
    """S(n) of eq. 1 for n = 1..N (stages run by each flow, stem not counted)."""
    return [STAGES - (flows - n) for n in range(1, flows + 1)]


class TDAFResNet(nn.Module):
    """R2DNS over a torchvision ResNet (torchvision's parameter names kept) with
    ANARs ``anar[l-1]`` = g_l and every BN replaced by MFBN."""

    def __init__(self, resnet: nn.Module, flows: int = 3, anar: int = 3, eta: float = 0.5):
        super().__init__()
        _check_options(flows, anar, eta)
        self.flows, self.anar_depth, self.eta = flows, anar, float(eta)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3",
                     "layer4", "avgpool", "fc"):
            setattr(self, name, getattr(resnet, name))
        _replace_bn(self, flows)
        self.dsf = nn.AvgPool2d(2, 2, ceil_mode=True)
        widths = [_stage_width(getattr(self, f"layer{l}")) for l in range(1, STAGES)]
        self.anar = nn.ModuleList(
            [ANAR(c, anar, flows) for c in widths] if flows >= 2 else [])
        # every MFBN, found once, instead of walking every module before each flow (a
        # plain attribute: not a submodule; a deep copy maps it onto the copied modules)
        self._mfbns = tuple(m for m in self.modules() if isinstance(m, MultiFlowBatchNorm2d))

    def set_flow(self, index: int) -> None:
        """Select the running statistics of flow ``index`` (0-based) in every MFBN."""
        for m in self._mfbns:
            m.flow = index

    def forward_flows(self, x: torch.Tensor) -> List[Dict[int, torch.Tensor]]:
        """Stage outputs x_{l+1}^(n) of every flow: ``out[n-1][l]``, l = 1..S(n)."""
        check_4d(x, "tdaf")
        inputs = [x]
        for _ in range(self.flows - 1):
            inputs.append(self.dsf(inputs[-1]))
        inputs.reverse()  # inputs[n-1] = x_1^(n)
        outs: List[Dict[int, torch.Tensor]] = []
        for n, (inp, depth) in enumerate(zip(inputs, stage_counts(self.flows))):
            self.set_flow(n)
            y = self.maxpool(self.relu(self.bn1(self.conv1(inp))))
            prev = outs[-1] if outs else {}
            mine: Dict[int, torch.Tensor] = {}
            for l in range(1, depth + 1):
                y = getattr(self, f"layer{l}")(y)
                if l in prev:  # eq. 5; plain h_l where no earlier flow feeds stage l
                    g = self.anar[l - 1](prev[l], y.shape[-2:])
                    if torch.is_grad_enabled():
                        y = y * (g + self.eta)
                    else:  # inference: in place, no new map (autograd needs y and g)
                        y = y.mul_(g.add_(self.eta))
                mine[l] = y
            outs.append(mine)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.forward_flows(x)[-1][STAGES]
        return self.fc(torch.flatten(self.avgpool(y), 1))


def _stage_width(layer: nn.Sequential) -> int:
    last = layer[-1]
    bn = last.bn3 if hasattr(last, "bn3") else last.bn2
    return bn.num_features


def _replace_bn(module: nn.Module, flows: int) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, MultiFlowBatchNorm2d.from_bn(child, flows))
        else:
            _replace_bn(child, flows)


def _check_options(flows, anar, eta) -> None:
    if not isinstance(flows, int) or isinstance(flows, bool) or not 1 <= flows <= STAGES:
        raise OptionError(f"tdaf: option flows={flows!r} must be an integer in 1..{STAGES} "
                          f"(N <= L = {STAGES} stages, eq. 1)")
    if anar not in ANAR_DEPTHS or isinstance(anar, bool):
        raise OptionError(f"tdaf: option anar={anar!r} must be one of 3, 5, 7 "
                          f"(ANAR-3/5/7, Table 1)")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise OptionError(f"tdaf: option eta={eta!r} must be a number in [0, 1] (eq. 5)")


def _label(o) -> str:
    extra = "" if o["eta"] == 0.5 else f",eta={o['eta']:g}"
    return f"TDAF(N={o['flows']},ANAR-{o['anar']}{extra})"


@register("tdaf", "network", defaults={"flows": 3, "anar": 3, "eta": 0.5}, paper=PAPER,
          label=_label)
def tdaf(backbone: str, num_classes: int = 1000, flows: int = 3, anar: int = 3,
         eta: float = 0.5) -> TDAFResNet:
    """TDAF ResNet: R2DNS flows with ANAR attention and multi-flow BN."""
    _check_options(flows, anar, eta)
    return TDAFResNet(plain_backbone(backbone, num_classes), flows, anar, eta)
