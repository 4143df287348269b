"""AW-convolution: attention on the weights (Zhu et al., "An Attention Module for
Convolutional Neural Networks", ICANN 2021 / arXiv 2108.08205; "AW paper").

An :class:`AWConv2d` replaces a 3x3 ``nn.Conv2d`` (ResNet Bottleneck: conv2; the
builder also replaces both 3x3 convs of a BasicBlock). With input I (N, C1, H, W)
and the conv's weight K (C2, C1, h, w):

* eq. 7 (F1): ``A2 = Sigmoid(BN(Pointconv2(ReLU(BN(Pointconv1(Avgpool2d(I)))))))`` --
  adaptive average pool of I to h x w (the kernel size), 1x1 conv C1 -> C1/r
  (r = ``reduction`` = 16), BN, ReLU, 1x1 conv C1/r -> C2*C1/r_C1, BN, sigmoid.
* eq. 8 (Expand_C1): with r_C1 = C1 (the paper's setting, r_C2 = r_hw = 1) A2 has
  C2 maps of h x w, one per output channel, shared by all C1 input channels:
  A[n, p, o, j, k] = A2[n, p, j, k].
* eq. 6 (F2): attentional weights ``AK = K + A (.) K``, different for each sample.
* eq. 5 (F3): ``O = Convolution(I, AK)`` with the conv's stride, padding,
  dilation (and bias, if the replaced conv had one).

Choices the paper leaves open, and what this implementation does:

* **Bias in Pointconv1/2**: none (``attn_bias=False``). Each pointwise conv is
  followed by BN, which makes a bias redundant, and only the bias-free version
  reproduces the paper's Table 1 figure: the branch adds
  sum(C^2/8 + 2*(C/16 + C)) = 157,184 + 8,024 = 165,208 parameters to ResNet-50,
  25,557,032 -> 25,722,240 = **25.72 M** (paper: 25.72 M, "+0.16 M"); with biases
  it would be 25,726,252 = 25.73 M, without the BNs 25,714,216 = 25.71 M.
* **BN placement**: after each pointwise conv, before its ReLU / sigmoid (the text
  under eq. 7: "BN and ReLU after Pointconv1, BN and Sigmoid after Pointconv2").
  BN normalises over N x h x w, so it trains even with batch 1 for 3x3 kernels.
* **Pooled input**: the input activations I of the AW-conv itself (Fig. 1: A = F1(I)),
  pooled by ``adaptive_avg_pool2d`` to exactly (h, w); on maps smaller than the
  kernel the adaptive pool repeats values.
* **Expand_C1 (eq. 8)** is realised by broadcasting A (N, C2, 1, h, w) against K
  (C2, C1, h, w) instead of materialising the reshape/unsqueeze/expand; the
  result is identical.
* **F2** is computed as ``K * (1 + A)``, algebraically equal to eq. 6's
  ``K + A (.) K`` but one fewer full-size temporary (only rounding can differ).
* **Initialisation**: PyTorch defaults (BN weight 1, bias 0), so A starts near 0.5;
  the paper does not say otherwise.
* **The batched convolution** has four exact formulations (:data:`FORMULATIONS`),
  chosen per call by :func:`choose_formulation` from the layer's shape and the device
  (option ``formulation``, default ``auto``, or :func:`use_formulation` force one; the
  outputs do not depend on it, so it is not part of the label unless forced):

  - ``grouped``: the per-sample weights AK (N, C2, C1/g, h, w) in ONE grouped
    convolution, batch folded into channels -- input (1, N*C1, H, W), weight
    (N*C2, C1/g, h, w), groups = N*g.
  - ``loop``: the same AK, one dense convolution per sample.
  - ``taps``: AK is never materialised. A depends only on (sample, output channel,
    tap), so O = sum over taps t of (1 + A[:, :, t]) * P_t with P_t the input shifted
    to tap t times K[:, :, t]: the h*w shifted (strided) views of the padded input are
    gathered once into (h*w, C1, N*Ho*Wo) and multiplied by K's taps in ONE batched
    GEMM (the multiply-adds of one dense convolution), then scaled and summed.
  - ``fused`` (groups 1; else ``taps``): at stride 1 ONE GEMM of the unpadded input's
    (N*H*W, C1) rows by the stacked taps (h*w*C2, C1) (:func:`_tap_gemm`: ``torch.mm``,
    a 1x1 convolution or oneDNN's matmul, whichever is fastest at the shape), no shifted
    copies; at stride s the
    input's s*s phases (rows a, a + s, ...; columns b, b + s, ...) each go through one
    GEMM with the taps that read that phase. Each tap's partial output is added,
    scaled, to the output rectangle it reaches (what falls on the zero padding is
    never computed). Same multiply-adds.

  They differ in memory traffic: ``grouped``/``loop`` write and read N*C2*(C1/g)*h*w
  weights, ``taps``/``fused`` N*C2*Ho*Wo*h*w partial outputs, so the latter win where
  the output map is small against the input channels (ResNet layers 3-4) and the
  others where it is large. Every formulation equals the per-sample float64 reference
  in eval and train, with gradients (tests/test_aw.py).
* **groups > 1** in the replaced conv (not in the paper): supported; A still has
  one h x w map per output channel, broadcast over that channel's C1/g inputs,
  and Pointconv1 sees all C1 input channels.
* **padding_mode** other than ``'zeros'``: the input is padded with ``F.pad`` first,
  as ``nn.Conv2d`` does.

Torch ops in :meth:`AWConv2d.forward` (for FLOP counters): ``adaptive_avg_pool2d``,
``conv2d`` (1x1, C1 -> C1/r; from batch 2 on ``linear`` on the (N*h*w, C1) rows, the same
multiply-adds), ``batch_norm``, ``relu_``, ``conv2d`` or ``linear`` (C1/r -> C2),
``batch_norm``, ``sigmoid``, ``unsqueeze``, ``add`` (1 + A, N*C2*h*w elements),
``mul`` (K * (1 + A), N*C2*(C1/g)*h*w elements), ``reshape``, optionally ``pad`` and
``repeat`` (bias), then (``grouped``) ONE functional ``F.conv2d`` with groups = N*g (per sample the
FLOPs of the original conv) and a final ``view``; ``loop`` makes N such convs; ``taps``
one ``stack`` and one ``bmm``, ``fused`` one ``mm`` per phase (under a counter; else the fastest
GEMM backend, :func:`_tap_gemm`; either: the FLOPs of the original conv), then ``mul``/``sum``
or h*w ``addcmul_`` of the output's size. On the CPU without autograd compiled kernels
replace eager ops: in eval mode all of F1 with 1 + A (``fused``) or K * (1 + A)
(``grouped``/``loop``) (:func:`_attention_eval`), else the pool (:func:`_pool`); and
``fused``'s sum (:func:`_shifted_sum`). The counters never see them: they count with the
eager ops (and element-wise ops are uncounted).
FLOPs are counted at batch 1 (on the meta device: the CPU's choice, ``grouped`` or, in layer
4, ``fused``).
"""
from __future__ import annotations

import contextlib
import time
import types
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .common import check_4d, hooked as _hooked, linear_1x1, reduced, watched
from .registry import OptionError, register


#: the exact formulations of F2-F3 (eq. 5-6); ``auto`` picks one per call
FORMULATIONS = ("auto", "grouped", "loop", "taps", "fused")


#: at batch 1 on the CPU, ``taps``/``fused`` need Ho*Wo this many times below C1/g
BATCH1_MARGIN = 4


def choose_formulation(n: int, c1g: int, taps: int, out_hw: int, device_type: str,
                       dense: bool = True, grad: bool = False) -> str:
    """The formulation for a batch of ``n`` (``taps`` = h*w, ``out_hw`` = Ho*Wo,
    ``dense``: groups 1, where ``fused`` applies; ``grad``: autograd records the call).

    ``taps``/``fused`` move N*C2*Ho*Wo*h*w partial outputs instead of N*C2*(C1/g)*h*w
    weights, so they move less where Ho*Wo < C1/g (ResNet layers 3-4). Measured on the
    CPU with ``attnbench efficiency --layers --batches 1,2,4,8 --modes eval,train`` (each
    AW-conv shape of ResNet-50 at 224², every formulation's paired ratio to the dense conv
    it replaces, 95 % intervals; 2 threads; README): ``grouped`` is the fastest where
    Ho*Wo >= C1/g (layers 1-2) at every batch, in eval and train (batch 1 eval 0.74-0.77x
    the dense conv, batch 8 0.72-0.80x), and ``loop`` is never faster than ``grouped``
    (batch 1: the same convolution plus a copy; batch 4, layer 4: 0.23-0.25x against
    fused's 0.77x). Where Ho*Wo < C1/g, ``fused`` wins in eval from batch 2 on (batch 4:
    0.66-0.77x against grouped's 0.16-0.60x) and ``taps`` in training (batch 4:
    0.55-0.68x; fused's in-place adds into output slices cost autograd a copy each). At
    batch 1 the crossover moves: layer 3 (Ho*Wo = 196, C1 = 256) stays ``grouped`` (eval
    0.70x against fused's 0.67x), layer 4 (49 against 512) gains (fused 0.66-0.73x, taps
    0.58-0.63x in training, against grouped's 0.58-0.61x), hence ``BATCH1_MARGIN``. So on
    the CPU: where Ho*Wo (times ``BATCH1_MARGIN`` at batch 1) < C1/g, ``fused`` without
    autograd (``taps`` if groups > 1) and ``taps`` with it, else ``grouped``. On CUDA
    (not measured yet): ``taps`` where Ho*Wo < C1/g, else ``grouped``. The meta device
    (FLOP counting on shapes) takes the CPU's choice.
    """
    cpu = device_type in ("cpu", "meta")
    margin = BATCH1_MARGIN if cpu and n == 1 else 1
    if out_hw * margin < c1g:
        return "fused" if cpu and dense and not grad else "taps"
    return "grouped"


#: AW's compiled CPU kernels (torch.compile, inductor), ``fused``'s sum
#: (:func:`_shifted_sum`) and F1 (:meth:`AWConv2d._weighting`, or its pool alone,
#: :func:`_pool`), run from this many elements (the sum's output, the branch's input) on;
#: 0 = always, None = never (eager ops)
COMPILED_MIN_ELEMENTS: Optional[int] = 1 << 16

#: the compiled functions, made on first use: (function, signature) -> compiled
_compiled: Dict[Any, Any] = {}
#: True once compiling failed (warned once): the eager ops from then on
_compile_failed = False


def _sum_shifted(zs: List[torch.Tensor], scale: torch.Tensor, parts: Tuple,
                 shape: Tuple[int, ...], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``fused``'s accumulation: O = sum over taps of (1 + A_t) * Z_t shifted, plus bias, as
    a contiguous (N, C2, Ho, Wo) output. ``zs``: each phase's partial outputs, (N, Hp, Wp,
    T, C2); ``scale``: 1 + A as (N, h, w, C2); O is summed channels-innermost, (N, Ho, Wo,
    C2).
    ``parts``: per tap (y0, y1, x0, x1, phase, t, j, k, dy, dx), the output rectangle it
    reaches and where it reads, a tap covering all of O first if one does; ``shape``: (C2,
    N, Ho, Wo)."""
    c2, n, ho, wo = shape
    out = None
    for y0, y1, x0, x1, p, t, j, k, dy, dx in parts:
        part = zs[p][:, y0 + dy:y1 + dy, x0 + dx:x1 + dx, t]
        tap_scale = scale[:, j, k, None, None, :]
        if out is None and (y0, y1, x0, x1) == (0, ho, 0, wo):
            out = part * tap_scale
            continue
        if out is None:  # no tap covers the whole output
            out = zs[0].new_zeros((n, ho, wo, c2))
        out[:, y0:y1, x0:x1].addcmul_(part, tap_scale)
    if out is None:  # every tap reads only padding: bias only
        out = zs[0].new_zeros((n, ho, wo, c2))
    return _nchw(out.permute(3, 0, 1, 2), bias)


def _nchw(out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The (C2, N, Ho, Wo) sum of ``taps``/``fused`` as a contiguous NCHW output, plus
    the bias."""
    out = out.transpose(0, 1)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out.contiguous()


def _plain_ops_only(t: torch.Tensor) -> bool:
    """Whether ops on ``t`` must be the plain eager ones (no compiled kernel, no timed
    backend choice): ``t`` is not on the CPU, autograd records, or a JIT trace,
    torch.compile or a torch function/dispatch mode (the FLOP and memory counters) watches
    the ops."""
    return (t.device.type != "cpu" or torch.is_grad_enabled()
            or torch.compiler.is_compiling() or watched())


def _compiled_applies(t: torch.Tensor, elements: int) -> bool:
    """Whether a compiled kernel runs on ``t``: not :func:`_plain_ops_only`, compiling has
    not failed, and at least ``COMPILED_MIN_ELEMENTS`` ``elements``."""
    limit = COMPILED_MIN_ELEMENTS
    return (limit is not None and not _compile_failed and elements >= limit
            and not _plain_ops_only(t))


def _signature(args: Any) -> Any:
    """A hashable key of ``args``: each tensor's shape, strides and dtype, other values
    as they are (the ints and tuples a kernel is specialised on)."""
    if isinstance(args, torch.Tensor):
        return (tuple(args.shape), args.stride(), args.dtype)
    if isinstance(args, (tuple, list)):
        return tuple(_signature(a) for a in args)
    return args


def _run_compiled(fn: Any, args: Tuple, eager: Any) -> torch.Tensor:
    """``fn(*args)`` compiled for exactly these shapes (static: a dynamic-shape kernel
    measured hardly faster than eager); each new layer shape compiles once (seconds;
    inductor caches on disk). Each signature (:func:`_signature`) gets its own copy of
    ``fn`` (a fresh code object, so one dynamo cache entry each): no recompile limit to
    raise, whose ``config.patch`` cost ~80 us a call, more than the guards it spared. If
    compiling fails (no C++ compiler), a warning says so and ``eager()`` gives the result,
    as it does from then on (:func:`_compiled_applies` is false)."""
    global _compile_failed
    key = (fn, _signature(args))
    try:
        compiled = _compiled.get(key)
        if compiled is None:
            fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                      fn.__defaults__, fn.__closure__)
            compiled = _compiled[key] = torch.compile(fresh, dynamic=False)
        return compiled(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, say so once
        _compile_failed = True
        warnings.warn(f"aw: torch.compile of {fn.__name__} failed "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                      f"using eager ops", RuntimeWarning, stacklevel=3)
        return eager()


def _sum_padded(zs: List[torch.Tensor], scale: torch.Tensor, parts: Tuple,
                shape: Tuple[int, ...], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`_sum_shifted` as one expression for the compiler: each tap's scaled partial
    output zero-padded to the whole output (``F.pad``), the taps added in the same order.
    Inductor makes it one pass of masked loads; the in-place slice updates of
    :func:`_sum_shifted` became chains of blends re-reading each element (CPU, batch 8,
    2026-12-04, 30 shuffled rounds x 5 calls, medians: 256x14² 0.83 -> 0.73 ms, 512x7² 0.32
    -> 0.24, 256x28² stride 2 0.63 -> 0.51, 512x14² stride 2 0.35 -> 0.25; float32 results
    identical). Eager, it would make a full-size temporary per tap."""
    c2, n, ho, wo = shape
    out = None
    for y0, y1, x0, x1, p, t, j, k, dy, dx in parts:
        part = zs[p][:, y0 + dy:y1 + dy, x0 + dx:x1 + dx, t] * scale[:, j, k, None, None, :]
        if (y0, y1, x0, x1) != (0, ho, 0, wo):
            part = F.pad(part, (0, 0, x0, wo - x1, y0, ho - y1))
        out = part if out is None else out + part
    if out is None:  # every tap reads only padding: bias only
        out = zs[0].new_zeros((n, ho, wo, c2))
    return _nchw(out.permute(3, 0, 1, 2), bias)


def _shifted_sum(zs: List[torch.Tensor], scale: torch.Tensor, parts: Tuple,
                 shape: Tuple[int, ...], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``fused``'s sum: :func:`_sum_padded` compiled where :func:`_compiled_applies`
    (output elements), else :func:`_sum_shifted`. Eager, that makes h*w passes over the
    output (one ``addcmul_`` per tap); compiled, one pass reads each partial output once
    and writes O once (CPU, batch 8, 2026-12-02, with positions innermost then: 256x14²
    2.49 -> 1.22 ms, 512x7² 2.23 -> 1.10 ms; see the README)."""
    args = (zs, scale, parts, shape, bias)
    if not _compiled_applies(zs[0], shape[0] * shape[1] * shape[2] * shape[3]):
        return _sum_shifted(*args)
    return _run_compiled(_sum_padded, args, lambda: _sum_shifted(*args))


def _bins(size: int, out: int) -> Tuple[Tuple[int, int], ...]:
    """Adaptive average pooling's windows along one axis: [floor(i*size/out),
    ceil((i+1)*size/out)) for i < out (PyTorch's definition; they overlap or repeat where
    ``size`` is not a multiple of ``out`` or is smaller)."""
    return tuple(((i * size) // out, -(-(i + 1) * size // out)) for i in range(out))


def _windows(x: torch.Tensor, pool: nn.AdaptiveAvgPool2d) -> Tuple[Tuple, Tuple]:
    """``pool``'s row and column windows on ``x`` (:func:`_bins`), for :func:`_pool_windows`."""
    h, w = _pair(pool.output_size)
    return _bins(x.shape[2], h), _bins(x.shape[3], w)


def _pool_windows(x: torch.Tensor, rows: Tuple, cols: Tuple) -> torch.Tensor:
    """The mean of each (row window, column window) of x: (N, C, len(rows), len(cols)).
    Summed over each row window first (whole rows added, vectors along W), then over each
    column window of those sums, divided by the window's size: compiled, that reads x at
    nearly a plain sum's speed; the per-window means that inductor vectorised across the
    window's own 5-19 columns took 1.3-1.6x as long (CPU, batch 8, 2026-12-04, caches
    flushed before each call, 25 shuffled rounds, medians: 8x64x56² 0.67 -> 0.49 ms,
    8x128x56² 1.06 -> 0.68, 8x128x28² 0.56 -> 0.40, 8x256x14² 0.51 -> 0.38, 8x512x7² 0.56
    -> 0.36)."""
    s = torch.stack([x[:, :, a:b].sum(2) for a, b in rows], 2)       # (N, C, rows, W)
    p = torch.stack([s[..., c:d].sum(-1) for c, d in cols], -1)     # (N, C, rows, cols)
    size = torch.tensor([[(b - a) * (d - c) for c, d in cols] for a, b in rows],
                        dtype=x.dtype, device=x.device)
    return p / size


def _pool(x: torch.Tensor, pool: nn.AdaptiveAvgPool2d) -> torch.Tensor:
    """F1's ``Avgpool2d`` (eq. 7), adaptive to the kernel size h x w. Where
    :func:`_compiled_applies` (input elements), one compiled kernel of the h*w window means
    (:func:`_pool_windows`), which inductor vectorises; PyTorch's NCHW adaptive pool runs
    a scalar loop, about 1.3 ns per element here (CPU, batch 8, 2026-12-03, 30 shuffled
    rounds x 5 calls, medians: 8x64x56² 0.71 -> 0.24 ms, 8x128x56² 1.31 -> 0.63 ms,
    8x256x14² 0.28 -> 0.18 ms). Else, or if a forward hook would run on it, the module
    itself."""
    if not _compiled_applies(x, x.numel()) or _hooked((pool,)):
        return pool(x)
    return _run_compiled(_pool_windows, (x, *_windows(x, pool)), lambda: pool(x))


def _bn_eval(y: torch.Tensor, bn: Tuple) -> torch.Tensor:
    """Eval-mode BN (running statistics) of ``y`` (M, C); ``bn`` = (mean, var, weight,
    bias, eps), the affine terms None where the BN has none."""
    return F.batch_norm(y, bn[0], bn[1], bn[2], bn[3], False, 0.0, bn[4])


def _attention_eval(x: torch.Tensor, rows: Tuple, cols: Tuple, pc1: Tuple, bn1: Tuple,
                    pc2: Tuple, bn2: Tuple, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """F1 (eq. 7) in eval mode and what the formulation takes from it, as one function
    for one compiled kernel (:meth:`AWConv2d._branch_compiles`): the pool's windows
    (:func:`_pool_windows`), Pointconv1 (``pc1`` = (weight, bias)) on the (N*h*w, C1)
    rows, BN, ReLU, Pointconv2, BN, sigmoid. Returns 1 + A as (N, h, w, C2) (``fused``'s
    scales) if ``weight`` is None, else eq. 6's AK = K * (1 + A), (N, C2, C1/g, h, w)."""
    p = _pool_windows(x, rows, cols)
    n, c, h, w = p.shape
    y = p.permute(0, 2, 3, 1).reshape(n * h * w, c)
    y = F.relu(_bn_eval(F.linear(y, pc1[0].flatten(1), pc1[1]), bn1))
    y = torch.sigmoid(_bn_eval(F.linear(y, pc2[0].flatten(1), pc2[1]), bn2)).view(n, h, w, -1)
    if weight is None:
        return 1 + y
    return weight * (1 + y.permute(0, 3, 1, 2).unsqueeze(2))


#: the branch's module types that :func:`_attention_eval` computes
_BRANCH_TYPES = (nn.AdaptiveAvgPool2d, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d,
                 nn.BatchNorm2d, nn.Sigmoid)


def _gemm_mm(xp: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    return torch.mm(xp.reshape(-1, xp.shape[3]), taps.t())


def _gemm_conv(xp: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """As a 1x1 convolution of the channels-last phase: oneDNN's convolution kernels."""
    z = F.conv2d(xp.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last),
                 taps[:, :, None, None])
    return z.permute(0, 2, 3, 1).reshape(-1, taps.shape[0])  # a view: z is channels-last


def _gemm_onednn(xp: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op inductor uses for
    linear layers on the CPU; no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(xp.reshape(-1, xp.shape[3]), taps, None,
                                              "none", [], "")


#: the exact backends of ``fused``'s tap GEMM (:func:`_tap_gemm`); ``auto`` times them
TAP_GEMMS = {"mm": _gemm_mm, "conv": _gemm_conv, "onednn": _gemm_onednn}

#: ``"auto"`` or one of :data:`TAP_GEMMS` for every tap GEMM (benchmarks, tests)
TAP_GEMM = "auto"

#: rounds of :func:`_fastest`, the timing behind ``auto``
GEMM_TIMING_ROUNDS = 5

#: the backend ``auto`` chose, per (phase shape and strides, taps shape, dtype, threads)
_gemm_choice: Dict[Tuple, str] = {}


def _gemm_candidates(xp: torch.Tensor) -> List[str]:
    """The backends ``auto`` times: on the CPU in float32 without autograd or a watching
    counter all three (``onednn`` where this build has the op and oneDNN is enabled), else
    ``mm`` alone."""
    if xp.dtype != torch.float32 or _plain_ops_only(xp):
        return ["mm"]
    names = ["mm", "conv"]
    if (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        names.append("onednn")
    return names


def _fastest(names: List[str], xp: torch.Tensor, taps: torch.Tensor) -> str:
    """The backend of ``names`` with the least time over ``GEMM_TIMING_ROUNDS`` rounds
    after a warm call each, every round timing each once in turn (interleaved, so a
    stretch of load on this shared machine slows all of them, and the minimum, which
    noise only raises). A backend this build cannot run is not chosen."""
    best = {}
    for name in names:
        try:
            TAP_GEMMS[name](xp, taps)
            best[name] = float("inf")
        except Exception:  # noqa: BLE001
            continue
    for _ in range(GEMM_TIMING_ROUNDS):
        for name in best:
            t0 = time.perf_counter()
            TAP_GEMMS[name](xp, taps)
            best[name] = min(best[name], time.perf_counter() - t0)
    return min(best, key=best.get) if best else "mm"


def _tap_gemm(xp: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``fused``'s GEMM: ``xp`` (N, Hp, Wp, C1), the channels-last view of one input phase,
    as (M, C1) rows (M = N*Hp*Wp) times the phase's (T*C2, C1) stacked taps, transposed:
    (M, T*C2), every tap's partial output at every position, channels innermost. Its speed
    depends on the BLAS, the host and the shape (CPU, batch 8, 2026-12-03, an AMD EPYC host, 25
    shuffled rounds, medians, against the dense 3x3 conv's 9.2 / 9.3 / 12.9 / 10.6 ms:
    256x14² mm 14.3, 1x1 conv 10.6, oneDNN matmul 11.4 ms; 512x7² 17.1 / 13.3 / 11.3;
    256x28² stride 2, its 4 phases 18.6 / 14.7 / 13.0; 512x14² stride 2 14.7 / 15.8 / 12.7;
    MKL's sgemm, which ``mm`` calls on x86, is slow on AMD; on 2026-12-04's Intel Xeon host
    ``mm`` was the fastest at stride 1, the whole ``fused`` call 256x14² 5.5-5.9 ms against
    6.2-6.8 with oneDNN's matmul), so ``auto`` times the candidates
    (:func:`_gemm_candidates`, :func:`_fastest`) at the first call of each shape -- as
    ``torch.backends.cudnn.benchmark`` does for convolutions -- and keeps the fastest; the
    untimed warm-up of a benchmark absorbs it. All give the same product up to float
    rounding."""
    how = TAP_GEMM
    if how == "auto":
        names = _gemm_candidates(xp)
        if len(names) == 1:
            how = names[0]
        else:
            key = (tuple(xp.shape), tuple(xp.stride()), tuple(taps.shape), xp.dtype,
                   torch.get_num_threads())
            how = _gemm_choice.get(key)
            if how is None:
                how = _gemm_choice[key] = _fastest(names, xp, taps)
    return TAP_GEMMS[how](xp, taps)


_forced: Optional[str] = None


@contextlib.contextmanager
def use_formulation(name: str) -> Iterator[None]:
    """Force one formulation for every AW-conv inside the block (benchmarks, tests)."""
    global _forced
    if name not in FORMULATIONS:
        raise OptionError(f"aw: formulation must be one of {', '.join(FORMULATIONS)}, "
                          f"got {name!r}")
    old, _forced = _forced, (None if name == "auto" else name)
    try:
        yield
    finally:
        _forced = old


def _label(opts: Mapping[str, Any]) -> str:
    changed = []
    if opts.get("reduction", 16) != 16:
        changed.append(f"reduction={opts['reduction']}")
    if opts.get("attn_bias", False):
        changed.append("attn_bias=True")
    if opts.get("formulation", "auto") != "auto":
        changed.append(f"formulation={opts['formulation']}")
    return "AW" + (f"({','.join(changed)})" if changed else "")


@register("aw", "conv", defaults={"reduction": 16, "attn_bias": False, "formulation": "auto"},
          stages=(1, 2, 3, 4), label=_label,
          paper="Zhu et al., An Attention Module for Convolutional Neural Networks "
                "(AW-convolution), ICANN 2021 (eq. 5-8)")
class AWConv2d(nn.Module):
    """AW-convolution: the conv weight K is rescaled per sample, AK = K + A (.) K."""

    def __init__(self, conv: nn.Conv2d, reduction: int = 16, attn_bias: bool = False,
                 formulation: str = "auto"):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise OptionError(f"aw: expected the nn.Conv2d to replace, got {type(conv).__name__}")
        if formulation not in FORMULATIONS:
            raise OptionError(f"aw: option formulation={formulation!r} must be one of "
                              f"{', '.join(FORMULATIONS)}")
        self.formulation = formulation
        c2, c1g, h, w = conv.weight.shape
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        # keep the very same parameters (state-dict keys stay ``...conv2.weight``)
        self.weight = conv.weight
        self.bias: Optional[nn.Parameter]
        if conv.bias is not None:
            self.bias = conv.bias
        else:
            self.register_parameter("bias", None)
        c1 = self.in_channels
        hidden = reduced(c1, reduction, "aw")
        self.reduction = reduction
        # F1 (eq. 7): r_C1 = C1, so Pointconv2 outputs C2 * C1 / r_C1 = C2 maps of h x w
        self.branch = nn.Sequential(
            nn.AdaptiveAvgPool2d((h, w)),
            nn.Conv2d(c1, hidden, 1, bias=attn_bias),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, c2, 1, bias=attn_bias),
            nn.BatchNorm2d(c2),
            nn.Sigmoid(),
        )

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}, "
                f"reduction={self.reduction}")

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """A of eq. 7-8 in broadcastable form: (N, C2, 1, h, w) (the 1 expands over C1).

        From batch 2 on, the branch's modules run in order on the pooled map as an (N*h*w,
        C) matrix, one row per pooled position: Pointconv1/2 as :func:`linear_1x1`, each BN
        on its (N*h*w, C, 1, 1) view (the same elements per channel, so the same batch
        statistics). At batch 1 the layout copies cost more than the convs' fixed cost, so
        the branch after the pool runs as the plain ``nn.Sequential`` (CPU, measured:
        README). The pool: :func:`_pool`."""
        pool, conv1, bn1, relu, conv2, bn2, sigmoid = self.branch
        p = _pool(x, pool)
        if x.shape[0] < 2:
            return sigmoid(bn2(conv2(relu(bn1(conv1(p)))))).unsqueeze(2)
        n, c, h, w = p.shape
        rows = p.permute(0, 2, 3, 1).reshape(n * h * w, c)
        y = relu(bn1(linear_1x1(conv1, rows)[..., None, None]))
        y = sigmoid(bn2(linear_1x1(conv2, y.flatten(1))[..., None, None]))
        # contiguous (N, C2, h, w): K * (1 + A) then makes a contiguous weight
        return y.view(n, h, w, -1).permute(0, 3, 1, 2).contiguous().unsqueeze(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_4d(x, "aw")
        n, c, hin, win = x.shape
        if c != self.in_channels:
            raise ValueError(f"aw: expected {self.in_channels} input channels, got {c} "
                             f"in shape {tuple(x.shape)}")
        if n == 0:  # a grouped conv cannot have groups=0; the plain conv gives the shape
            return self._plain(x)
        x0, padding = x, self.padding  # A comes from the unpadded input I (Fig. 1b)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        how = self.formulation_for(x, padding)
        if how == "fused" and self.groups == 1:
            return self._fused(x, self._weighting(x0, None), padding)
        if how in ("taps", "fused"):  # fused needs groups 1
            return self._taps(x, self.attention_maps(x0), padding)
        # F2 (eq. 6): AK = K + A (.) K = K * (1 + A), shape (N, C2, C1/g, h, w)
        ak = self._weighting(x0, self.weight)
        if how == "loop":
            return torch.cat([F.conv2d(x[i:i + 1], ak[i], self.bias, self.stride, padding,
                                       self.dilation, self.groups) for i in range(n)])
        ak = ak.reshape(n * self.out_channels, *self.weight.shape[1:])
        bias = self.bias.repeat(n) if self.bias is not None else None
        # F3 (eq. 5): the whole batch in one grouped convolution
        out = F.conv2d(x.reshape(1, n * c, x.shape[2], x.shape[3]), ak, bias, self.stride,
                       padding, self.dilation, n * self.groups)
        return out.view(n, self.out_channels, out.shape[2], out.shape[3])

    def _branch_compiles(self, x: torch.Tensor) -> bool:
        """Whether F1 runs as one compiled kernel on ``x`` (:func:`_attention_eval`): the
        branch in eval mode and as built (its module types, BNs with running statistics),
        :func:`_compiled_applies` (input elements), no forward hook on its modules, and
        :meth:`attention_maps` not overridden (by a subclass or on the instance). Eagerly,
        F1's ten-odd small ops cost ~0.2 ms more per call than the pool alone (CPU, batch
        8, 2026-12-04, 30 shuffled rounds x 5 calls, medians, 1 + A for ``fused``:
        256x14² 0.38 -> 0.15 ms, 512x7² 0.40 -> 0.18; K * (1 + A) for ``grouped``: 64x56²
        0.61 -> 0.40, 128x28² 0.71 -> 0.45)."""
        mods = tuple(self.branch)
        if not _compiled_applies(x, x.numel()) or any(m.training for m in mods):
            return False
        return (tuple(map(type, mods)) == _BRANCH_TYPES
                and mods[2].running_mean is not None and mods[5].running_mean is not None
                and not _hooked(mods + (self.branch,))
                and type(self).attention_maps is AWConv2d.attention_maps
                and "attention_maps" not in self.__dict__)

    def _weighting(self, x: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
        """What ``fused`` (``weight`` None: 1 + A as (N, h, w, C2), the partial outputs'
        order, contiguous) or ``grouped``/``loop`` (eq. 6's AK = K * (1 + A)) takes from F1
        on input ``x``: :func:`_attention_eval` compiled per shape where
        :meth:`_branch_compiles`, else from :meth:`attention_maps`."""
        def eager() -> torch.Tensor:
            a = self.attention_maps(x)
            if weight is None:
                return (1 + a[:, :, 0]).permute(0, 2, 3, 1).contiguous()
            return weight * (1 + a)
        if not self._branch_compiles(x):
            return eager()
        pool, conv1, bn1, _, conv2, bn2, _ = self.branch
        args = (x, *_windows(x, pool), (conv1.weight, conv1.bias),
                (bn1.running_mean, bn1.running_var, bn1.weight, bn1.bias, bn1.eps),
                (conv2.weight, conv2.bias),
                (bn2.running_mean, bn2.running_var, bn2.weight, bn2.bias, bn2.eps), weight)
        return _run_compiled(_attention_eval, args, eager)

    def formulation_for(self, x: torch.Tensor, padding) -> str:
        """The formulation used for input ``x`` (already padded if not zero-padded)."""
        forced = _forced or (None if self.formulation == "auto" else self.formulation)
        if forced:
            return forced
        ho, wo = self._out_size(x.shape[2], x.shape[3], padding)
        c2, c1g, h, w = self.weight.shape
        return choose_formulation(x.shape[0], c1g, h * w, ho * wo, x.device.type,
                                  self.groups == 1, torch.is_grad_enabled())

    def _out_size(self, hin: int, win: int, padding):
        (kh, kw), (sh, sw), (dh, dw) = self.weight.shape[2:], self.stride, self.dilation
        return ((hin + 2 * padding[0] - dh * (kh - 1) - 1) // sh + 1,
                (win + 2 * padding[1] - dw * (kw - 1) - 1) // sw + 1)

    def _taps(self, x: torch.Tensor, a: torch.Tensor, padding) -> torch.Tensor:
        """O = sum_t (1 + A_t) * P_t, P_t = K_t times the input shifted to tap t (eq. 5-6
        without materialising AK): the h*w shifted (strided) views of the padded input
        gathered into one (h*w*g, C1/g, N*Ho*Wo) tensor, ONE batched GEMM by K's taps
        (h*w*g, C2/g, C1/g), then the scaled sum over taps."""
        (kh, kw), (sh, sw), (dh, dw) = self.weight.shape[2:], self.stride, self.dilation
        ho, wo = self._out_size(x.shape[2], x.shape[3], padding)
        if padding[0] or padding[1]:
            x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        n, c1, c2, g = x.shape[0], self.in_channels, self.out_channels, self.groups
        xt = x.transpose(0, 1)                                     # (C1, N, Hp, Wp), a view
        cols = torch.stack([xt[:, :, j * dh: j * dh + sh * (ho - 1) + 1: sh,
                               k * dw: k * dw + sw * (wo - 1) + 1: sw]
                            for j in range(kh) for k in range(kw)])  # (h*w, C1, N, Ho, Wo)
        q = torch.bmm(self._tap_weights().view(kh * kw * g, c2 // g, c1 // g),
                      cols.view(kh * kw * g, c1 // g, n * ho * wo))
        return self._sum_taps(q.view(kh * kw, c2, n, ho, wo), a)

    def _sum_taps(self, q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """sum_t (1 + A[:, :, t]) * q[t] for q (h*w, C2, N, Ho, Wo); (N, C2, Ho, Wo) out."""
        taps, c2, n, ho, wo = q.shape
        scale = (1 + a[:, :, 0]).reshape(n, c2, taps).permute(2, 1, 0)[..., None, None]
        if torch.is_grad_enabled():
            return _nchw((q * scale).sum(0), self.bias)
        out = q.new_empty(n, c2, ho, wo)  # in place, summed straight into the NCHW output
        torch.sum(q.mul_(scale), 0, out=out.transpose(0, 1))
        return _nchw(out.transpose(0, 1), self.bias)

    def _tap_weights(self, order: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
        """K as h*w stacked taps, (h*w*C2, C1/g), tap-major (groups in order within a
        tap), the taps in row-major order or in ``order`` (indices j*w + k). A permuted
        copy of K: kept between inference calls while K is unchanged (same storage and
        version)."""
        w = self.weight
        cacheable = not torch.is_grad_enabled() and not w.is_inference()
        key = (w.data_ptr(), w._version, w.dtype, w.device, order) if cacheable else None
        cached = getattr(self, "_tap_cache", None)
        if cacheable and cached is not None and cached[0] == key:
            return cached[1]
        c2, c1g, kh, kw = w.shape
        stacked = w.permute(2, 3, 0, 1).reshape(kh * kw, c2 * c1g)
        if order is not None and list(order) != list(range(kh * kw)):
            # basic slices, not a list index (which a JIT trace, fvcore's, misreads)
            stacked = torch.cat([stacked[i:i + 1] for i in order])
        stacked = stacked.reshape(kh * kw * c2, c1g)
        if cacheable:
            self._tap_cache = (key, stacked)
        return stacked

    def _phases(self, padding):
        """The taps grouped by the input phase they read, for ``fused``: [(a, b, [(j, k,
        dy, dx), ...])]. At stride s, tap (j, k) reads input row s*y + j*d - p =
        s*(y + dy) + a, i.e. row y + dy of phase a (input rows a, a + s, ...), and likewise
        for columns; at stride 1 there is one phase, the input, with dy = j*d - p."""
        (kh, kw), (sh, sw), (dh, dw) = self.weight.shape[2:], self.stride, self.dilation
        phases: dict = {}
        for j in range(kh):
            a, dy = (j * dh - padding[0]) % sh, (j * dh - padding[0]) // sh
            for k in range(kw):
                b, dx = (k * dw - padding[1]) % sw, (k * dw - padding[1]) // sw
                phases.setdefault((a, b), []).append((j, k, dy, dx))
        return [(a, b, taps) for (a, b), taps in sorted(phases.items())]

    def _fused(self, x: torch.Tensor, scale: torch.Tensor, padding) -> torch.Tensor:
        """``taps`` with one plain GEMM per input phase and no shifted copies (groups 1):
        at stride s the input splits into s*s phases (rows a, a + s, ...; columns b, b + s,
        ...), each tap reads one of them, shifted (:meth:`_phases`; at stride 1 the phase
        is the input itself). Per phase, its stacked taps (T*C2, C1) times the phase give
        each tap's partial output Z_t at every phase position; then O[y, x] = sum_t (1 +
        A_t) * Z_t[y + dy, x + dx] over the positions inside the phase (what falls on the
        zero padding is never computed). The multiply-adds of one dense convolution; the
        phases together copy the input once. ``scale``: 1 + A as (N, h, w, C2), contiguous
        (Z's order: no gather in the summing kernel).

        Z is channels-innermost, (N, Hp, Wp, T, C2): the GEMM is the phase's (N*Hp*Wp, C1)
        rows times the taps transposed (:func:`_tap_gemm`), and the scaled sum runs along
        C2 instead of along rows of Wo = 7-14 (CPU, batch 8, 2026-12-03, 40 interleaved
        rounds, medians: at stride 1 the compiled sum took 256x14² 1.24 -> 0.82 ms, 512x7²
        1.13 -> 0.32 ms against positions innermost; README)."""
        n, c2, (sh, sw) = x.shape[0], self.out_channels, self.stride
        ho, wo = self._out_size(x.shape[2], x.shape[3], padding)
        phases = self._phases(padding)
        kw = self.weight.shape[3]
        weights = self._tap_weights(tuple(j * kw + k for _, _, taps in phases
                                          for j, k, _, _ in taps))
        xh = x.permute(0, 2, 3, 1)                                       # a view
        zs, parts, row = [], [], 0
        for pa, pb, taps in phases:
            w_phase = weights[row * c2:(row + len(taps)) * c2]           # (T*C2, C1)
            row += len(taps)
            xp = xh[:, pa::sh, pb::sw]
            hp, wp = xp.shape[1:3]
            zs.append(_tap_gemm(xp, w_phase).view(n, hp, wp, len(taps), c2))
            for t, (j, k, dy, dx) in enumerate(taps):
                y0, y1, x0, x1 = max(0, -dy), min(ho, hp - dy), max(0, -dx), min(wo, wp - dx)
                if y0 < y1 and x0 < x1:  # else the tap reads only zero padding
                    parts.append((y0, y1, x0, x1, len(zs) - 1, t, j, k, dy, dx))
        parts.sort(key=lambda p: p[:4] != (0, ho, 0, wo))  # a tap covering all of O first
        return _shifted_sum(zs, scale, tuple(parts), (c2, n, ho, wo), self.bias)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        """The replaced convolution with K itself (used for empty batches)."""
        if self.padding_mode != "zeros":
            return F.conv2d(F.pad(x, self._reversed_padding_repeated_twice,
                                  mode=self.padding_mode),
                            self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)
