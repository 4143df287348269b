"""Parameter counts: the whole model, and what an attention method adds.

``count_params`` counts every parameter (trainable or not), each shared tensor once
(``nn.Module.parameters`` already de-duplicates shared parameters, e.g. TDAF's
flows or TD's shared conv weights across steps). Buffers (FCA's fixed DCT filters,
BN running statistics) are not parameters and are not counted, as in the papers.
"""
from __future__ import annotations

from typing import Optional

from torch import nn


def count_params(model: nn.Module) -> int:
    """Total number of parameters of ``model`` (shared tensors counted once)."""
    return int(sum(p.numel() for p in model.parameters()))


def plain_params(backbone: str, num_classes: int = 1000) -> int:
    """Parameters of the plain torchvision backbone with ``num_classes`` outputs."""
    from attnbench.modules.builder import plain_backbone
    return count_params(plain_backbone(backbone, num_classes))


def attention_params(model: nn.Module, backbone: Optional[str] = None,
                     num_classes: Optional[int] = None) -> int:
    """Parameters ``model`` adds over the plain ``backbone`` built with the same
    ``num_classes`` (``count_params(model) - count_params(plain)``).

    ``backbone`` / ``num_classes`` default to the build arguments a model from
    :func:`attnbench.modules.builder.build_model` carries in ``model.attnbench_config``.
    The result can be negative for a method that removes parameters.
    """
    config = getattr(model, "attnbench_config", None) or {}
    backbone = backbone or config.get("backbone")
    if num_classes is None:
        num_classes = config.get("num_classes", 1000)
    if not backbone:
        raise ValueError("attention_params: give the backbone name (the model carries no "
                         "attnbench_config)")
    return count_params(model) - plain_params(backbone, int(num_classes))
