"""``build_model``: a torchvision ResNet with one registered attention method applied.

Placement by kind (see :mod:`modules.registry`):

* gate  -- after the last BN of each selected block, before the residual addition
  (the placement of SE/CBAM/ECA/FCA in their papers and in REFERENCE.md);
* conv  -- replaces every 3x3 convolution of each selected block (Bottleneck:
  conv2, as in the AW paper; BasicBlock: conv1 and conv2), optionally followed by a
  gate (``gate="se"``: AW-SE);
* block -- replaces each selected residual block;
* network -- the factory builds the whole model from the backbone name;
* head  -- replaces global average pooling.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck

from .common import check_4d, gate_residual
from .registry import REGISTRY, ModuleSpec, OptionError, UnknownNameError, unknown_name_message

BACKBONES = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "resnet101": tvm.resnet101,
}

StageSpec = Union[None, str, int, List[int], Mapping[Any, Any]]


def plain_backbone(backbone: str, num_classes: int = 1000) -> nn.Module:
    """Torchvision ResNet by name, randomly initialised (no weight download)."""
    if not isinstance(backbone, str) or backbone.lower() not in BACKBONES:
        raise UnknownNameError(unknown_name_message("backbone", str(backbone), BACKBONES))
    if not isinstance(num_classes, int) or num_classes < 1:
        raise OptionError(f"num_classes must be a positive integer, got {num_classes!r}")
    return BACKBONES[backbone.lower()](weights=None, num_classes=num_classes)


def block_counts(backbone: str) -> List[int]:
    """Blocks per stage (layer1..layer4) of a backbone."""
    model = plain_backbone(backbone, 10)
    return [len(getattr(model, f"layer{i}")) for i in range(1, 5)]


def resolve_stages(model: nn.Module, stages: StageSpec, spec: Optional[ModuleSpec] = None,
                   backbone: str = "") -> Dict[int, List[int]]:
    """Normalise a stage selection to ``{layer: [block indices]}``.

    Accepted: ``None`` (the module's default stages), ``"all"``, a preset name of the
    module (e.g. ``"paper"``), a layer number, a list of layer numbers (all their
    blocks), or a mapping ``{layer: "all" | count | [indices]}`` where a count ``k``
    means the first ``k`` blocks. Layer keys may be ``3``, ``"3"`` or ``"layer3"``.
    """
    who = spec.name if spec else "build_model"
    given = stages
    if stages is None:
        stages = list(spec.stages) if spec else [1, 2, 3, 4]
    if isinstance(stages, str):
        if stages == "all":
            stages = [1, 2, 3, 4]
        elif spec is not None and stages in spec.stage_presets:
            stages = spec.stage_presets[stages](backbone)
        else:
            presets = sorted(spec.stage_presets) if spec else []
            raise OptionError(
                f"{who}: stages={stages!r} is not 'all' or a preset of this module "
                f"(presets: {', '.join(presets) or 'none'})")
    if isinstance(stages, int) and not isinstance(stages, bool):
        stages = [stages]
    if isinstance(stages, Mapping):
        items = list(stages.items())
    elif isinstance(stages, (list, tuple)):
        items = [(s, "all") for s in stages]
    else:
        raise OptionError(f"{who}: stages must be a list of layers or a mapping, got {stages!r}")
    out: Dict[int, List[int]] = {}
    for key, sel in items:
        layer = _layer_number(key, who)
        n = len(getattr(model, f"layer{layer}"))
        if sel is None or sel == "all":
            idx = list(range(n))
        elif isinstance(sel, int) and not isinstance(sel, bool):
            if not 0 <= sel <= n:
                raise OptionError(f"{who}: stages asks for {sel} blocks of layer{layer}, "
                                  f"which has {n}")
            idx = list(range(sel))
        elif isinstance(sel, (list, tuple)):
            idx = sorted({int(i) for i in sel})
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise OptionError(f"{who}: layer{layer} has blocks 0..{n - 1}; "
                                  f"block index(es) {bad} do not exist")
        else:
            raise OptionError(f"{who}: bad block selection {sel!r} for layer{layer}")
        out[layer] = idx
    if spec is not None and not any(out.values()):
        raise OptionError(f"{who}: stages={given!r} selects no block, so the model would hold "
                          f"no {who} module; select at least one block (e.g. stages=[3, 4] "
                          f"or 'all'), or use the plain backbone (module 'none')")
    return dict(sorted(out.items()))


def _layer_number(key: Any, who: str) -> int:
    text = str(key)
    text = text[5:] if text.startswith("layer") else text
    if not text.isdigit() or not 1 <= int(text) <= 4:
        raise OptionError(f"{who}: stage {key!r} is not one of 1, 2, 3, 4 (layer1..layer4)")
    return int(text)


class _GatedBottleneck(Bottleneck):
    """torchvision Bottleneck with ``self.attention`` after bn3, before the addition
    (:func:`~attnbench.modules.common.gate_residual`: gate and addition in one pass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(gate_residual(self.attention, self.bn3(self.conv3(out)), identity))


class _GatedBasicBlock(BasicBlock):
    """torchvision BasicBlock with ``self.attention`` after bn2, before the addition."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(gate_residual(self.attention, self.bn2(self.conv2(out)), identity))


def block_out_channels(block: nn.Module) -> int:
    last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
    return last_bn.num_features


def attach_gate(block: nn.Module, gate: nn.Module) -> nn.Module:
    """Insert ``gate`` after the block's last BN (keeps torchvision's parameter names)."""
    if isinstance(block, Bottleneck):
        block.__class__ = _GatedBottleneck
    elif isinstance(block, BasicBlock):
        block.__class__ = _GatedBasicBlock
    else:
        raise TypeError(f"cannot attach a gate to {type(block).__name__}")
    block.attention = gate
    return block


def make_gate(spec: ModuleSpec, channels: int, stage: int, options: Mapping[str, Any]) -> nn.Module:
    kwargs = dict(options)
    if _accepts(spec.factory, "stage"):
        kwargs["stage"] = stage
    return spec.factory(channels, **kwargs)


def _accepts(fn, name: str) -> bool:
    import inspect
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _input_check(module: nn.Module, args) -> None:
    x = args[0] if args else None
    check_4d(x, f"{module.attnbench_label} model")
    if x.shape[1] != 3:
        raise ValueError(f"{module.attnbench_label} model: expected 3 input channels (RGB), "
                         f"got {x.shape[1]} in shape {tuple(x.shape)}")


def split_gate_options(options: Dict[str, Any]):
    """Pop the builder-level ``gate`` / ``gate_options`` combination options."""
    gate = options.pop("gate", None)
    gate_options = dict(options.pop("gate_options", None) or {})
    if gate in ("", "none"):
        gate = None
    return gate, gate_options


def build_model(backbone: str, attention: Optional[str] = None, stages: StageSpec = None,
                num_classes: int = 1000, **options: Any) -> nn.Module:
    """A torchvision ResNet (18/34/50/101) with ``attention`` applied.

    ``attention=None`` (or ``"none"``) gives the plain backbone. ``stages`` selects
    layers and blocks (see :func:`resolve_stages`). Remaining keyword arguments are
    the module's options (``reduction=8``, ``variant="top"``...). Conv-kind
    modules may be combined with a gate: ``gate="se"``,
    ``gate_options={...}``. The returned model carries its build arguments in
    ``model.attnbench_config`` and a readable label in ``model.attnbench_label``.
    """
    options = dict(options)
    config = {"backbone": backbone, "attention": attention, "stages": stages,
              "num_classes": num_classes, "options": dict(options)}
    if attention in (None, "none", ""):
        if options:
            raise OptionError(f"the plain backbone takes no options; got {sorted(options)}")
        model = plain_backbone(backbone, num_classes)
        label = "none"
    else:
        spec = REGISTRY.get(attention)
        gate, gate_options = split_gate_options(options)
        if gate is not None and spec.kind != "conv":
            raise OptionError(f"{spec.name}: option 'gate' combines a gate with a conv-kind "
                              f"module (e.g. aw); {spec.name!r} is of kind {spec.kind!r}")
        opts = spec.options(options)
        gate_spec = REGISTRY.get(gate) if gate is not None else None
        if gate_spec is not None and gate_spec.kind != "gate":
            raise OptionError(f"{spec.name}: gate={gate!r} is of kind {gate_spec.kind!r}, "
                              f"not 'gate'")
        gate_opts = gate_spec.options(gate_options) if gate_spec else {}
        label = spec.display(opts)
        if gate_spec is not None:
            label = f"{label}-{gate_spec.display(gate_opts)}"
        if spec.kind == "network":
            if stages is not None:
                raise OptionError(f"{spec.name}: a network-kind module takes no 'stages'")
            plain_backbone(backbone, num_classes)  # validates the names first
            model = spec.factory(backbone.lower(), num_classes=num_classes, **opts)
        else:
            model = plain_backbone(backbone, num_classes)
            _apply(model, spec, opts, resolve_stages(model, stages, spec, backbone.lower()),
                   gate_spec, gate_opts)
    model.attnbench_config = config
    model.attnbench_label = label
    model.register_forward_pre_hook(_input_check)
    return model


def _apply(model: nn.Module, spec: ModuleSpec, opts: Dict[str, Any],
           selection: Dict[int, List[int]], gate_spec: Optional[ModuleSpec],
           gate_opts: Dict[str, Any]) -> None:
    if spec.kind == "head":
        model.avgpool = spec.factory(model.fc.in_features, **opts)
        return
    for layer, indices in selection.items():
        stage = getattr(model, f"layer{layer}")
        for i in indices:
            block = stage[i]
            if spec.kind == "gate":
                attach_gate(block, make_gate(spec, block_out_channels(block), layer, opts))
                continue
            if spec.kind == "conv":
                names = ["conv2"] if isinstance(block, Bottleneck) else ["conv1", "conv2"]
                for name in names:
                    setattr(block, name, spec.factory(getattr(block, name), **opts))
            if gate_spec is not None:
                attach_gate(block, make_gate(gate_spec, block_out_channels(block), layer,
                                             gate_opts))
            if spec.kind == "block":
                stage[i] = spec.factory(block, **opts)
