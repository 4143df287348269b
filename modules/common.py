"""Small pieces shared by several attention modules."""
from __future__ import annotations

from typing import Iterable, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module
from torch.utils import _python_dispatch

from .registry import OptionError


def check_4d(x: torch.Tensor, who: str) -> None:
    """Fail clearly unless ``x`` is an (N, C, H, W) tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who}: expected a 4-D input (N, C, H, W), got shape {shape}")


def watched() -> bool:
    """Whether a JIT trace or a torch function/dispatch mode watches the ops (the FLOP
    counters: fvcore traces, ptflops' rules are a function mode, ``FlopCounterMode`` a
    dispatch mode). A module whose fast path uses other ops than the authors' expression
    then runs the authors' one, so every counter's convention counts it as it counts
    their code."""
    return (torch.jit.is_tracing() or torch._C._is_torch_function_mode_enabled()
            or _python_dispatch._get_current_dispatch_mode() is not None)


def hooked(modules: Iterable[nn.Module]) -> bool:
    """Whether a forward hook (the modules' own or a global one) would run on ``modules``:
    a fast path that skips their ``__call__`` would skip it too."""
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


class ProductGate(nn.Module):
    """A gate whose output is the product ``a * b`` of two broadcastable tensors that
    :meth:`multiplicands` returns (SE, ECA, FCA: the input and its (N, C, 1, 1) scale;
    CBAM: the channel-gated map and its (N, 1, H, W) spatial scale). The gated blocks
    then add the residual in the same pass (:func:`gate_residual`: one ``torch.addcmul``
    instead of a multiplication and an addition, each a pass over the block's output).
    A plugin gate may subclass it the same way; any other gate is called as it is."""

    def multiplicands(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.multiplicands(x)
        return a * b


def _fusable(gate: nn.Module) -> bool:
    """A :class:`ProductGate` whose ``forward`` is still the product (not overridden by a
    subclass or on the instance) and on which no forward hook would run."""
    return (isinstance(gate, ProductGate) and type(gate).forward is ProductGate.forward
            and "forward" not in gate.__dict__ and not hooked((gate,)))


def gate_residual(gate: nn.Module, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """``gate(x) + identity``, the end of a gated residual block before its ReLU.

    A :class:`ProductGate` gives ``a * b + identity`` as one ``torch.addcmul``: without
    autograd it writes into ``x`` (the block's own last-BN output, as torchvision's
    ``out += identity`` writes into its own), under autograd into a new tensor (``a``
    may be ``x``, which the product's gradient needs). Any other gate is called, then
    the residual is added in place without autograd (as torchvision and timm's blocks
    do) and out of place under it (a plugin's output may be saved for its backward).
    The same values as ``gate(x) + identity`` up to float rounding (addcmul may round
    the product and the sum once, fused)."""
    grad = torch.is_grad_enabled()
    if _fusable(gate):
        a, b = gate.multiplicands(x)
        if grad or x.shape != identity.shape:
            return torch.addcmul(identity, a, b)
        return torch.addcmul(identity, a, b, out=x)
    out = gate(x)
    return out + identity if grad else out.add_(identity)


def reduced(channels: int, reduction: int, who: str, option: str = "reduction") -> int:
    """``channels // reduction``, failing with a message naming the option when impossible."""
    if not isinstance(reduction, int) or reduction < 1:
        raise OptionError(f"{who}: option {option}={reduction!r} must be a positive integer")
    if reduction > channels:
        raise OptionError(
            f"{who}: option {option}={reduction} is larger than the channel count {channels}; "
            f"the hidden layer would have no channels (use {option} <= {channels})")
    return channels // reduction


def linear_1x1(conv: nn.Conv2d, rows: torch.Tensor) -> torch.Tensor:
    """A bias-or-not 1x1 ``conv`` (groups 1) applied to ``rows`` (M, C_in), one row per map
    position, as ``F.linear``: (M, C_out). The same multiply-adds (every FLOP counter gives
    the same total) and the same values up to rounding, without oneDNN's fixed cost for a
    convolution over a tiny map (CPU, batch 8: ~120-330 us against ~20-70 us; see the
    README). The conv keeps its parameters and state-dict keys; its forward hooks do not
    run."""
    return F.linear(rows, conv.weight.flatten(1), conv.bias)


class ChannelMLP(nn.Sequential):
    """Bias-free C -> C/r -> C MLP as 1x1 convolutions (SE, CBAM, FCA excitation;
    parameters and state-dict keys ``0.weight``, ``2.weight``). On an (N, C, 1, 1) input
    (a pooled descriptor) with N >= 2 the convs run as :func:`linear_1x1` on the (N, C)
    matrix; a single descriptor (N = 1) goes through the convs, which are a few us faster
    there (CPU, 2 threads: 30-94 against 36-98 us for C = 256-2048; ``F.linear`` is
    2.3-4.6x faster at N = 8; 30 interleaved rounds, medians, 2026-12-02)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[2:] != (1, 1) or x.shape[0] < 2:
            return super().forward(x)
        y = x.flatten(1)
        for m in self:
            y = linear_1x1(m, y) if isinstance(m, nn.Conv2d) else m(y)
        return y[:, :, None, None]


def bottleneck_mlp(channels: int, hidden: int) -> ChannelMLP:
    """Bias-free C -> C/r -> C MLP as 1x1 convolutions (SE, CBAM, FCA excitation)."""
    return ChannelMLP(
        nn.Conv2d(channels, hidden, 1, bias=False),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, channels, 1, bias=False),
    )
