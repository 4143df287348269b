"""Latency and throughput: inference (eval, ``no_grad``) and one training step
(forward, cross-entropy, backward, SGD step), timed after warm-up over repeated runs.

Timers:

* CPU: ``torch.utils.benchmark.Timer`` timing one call per run (its inner
  ``timeit.Timer``: ``perf_counter``, garbage collection off during the run), with the
  thread count in use (``torch.get_num_threads()``, recorded with every figure).
* CUDA: CUDA events recorded around each run on the current stream, after a
  ``torch.cuda.synchronize()``; the end event is synchronised before reading
  ``elapsed_time``, so every figure covers the whole step on the device.

Every run's time is kept; the summary is the median with the 25th/75th percentiles
(linear interpolation) and the throughput ``batch / median``.

On a shared machine a model timed alone drifts by +-15 % from minute to minute
(DESIGN.md). :func:`time_interleaved` times the models of one comparison in rounds --
each round times every model once, in a seeded random order
(:func:`attnbench.profilers.stats.round_order`) so that no model always follows the
same neighbour -- and gives each model's speed ratio to the plain backbone as the
paired per-round ratio (baseline time / model time in the same round), summarised by
its median and a 95 % order-statistic interval (:mod:`attnbench.profilers.stats`).
With ``ci_target`` it keeps adding rounds until every ratio's interval is narrower
than +-``ci_target`` (relative), or ``max_rounds`` / ``budget_s`` run out; the
result says which stopped it, and the machine's load average at start and end.

A model whose step raises (an exception, out of memory) is dropped from the group with
its error in ``errors``; the others go on.

Models are moved to the device (and to channels_last when asked) in place; a
training step changes their weights.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attnbench.profilers.env import check_device
from attnbench.profilers.stats import (Interval, block_interval, median_interval, round_order)

MODES = ("eval", "train")
MAX_REPEATS = 1000
#: fewest blocks from which a blocked ratio's interval may end the rounds (t with 2 df)
MIN_BLOCKS = 3


# --------------------------------------------------------------------------- statistics

def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation (numpy's default method)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class SpeedStats:
    """Timed runs of one model in one mode."""

    mode: str
    device: str
    batch: int
    resolution: int
    times_ms: List[float]
    warmup: int
    timer: str
    threads: Optional[int]          # torch.get_num_threads() during the runs (CPU)
    amp: bool = False
    channels_last: bool = False
    precision: str = "fp32"         # the autocast dtype ("fp32": no autocast)
    compile_s: Optional[float] = None   # torch.compile: seconds of the first (compiling) call
    malloc_kept: bool = False       # timed with :func:`keep_freed_memory` in effect

    @property
    def repeats(self) -> int:
        return len(self.times_ms)

    @property
    def median_ms(self) -> float:
        return quantile(self.times_ms, 0.5)

    @property
    def p25_ms(self) -> float:
        return quantile(self.times_ms, 0.25)

    @property
    def p75_ms(self) -> float:
        return quantile(self.times_ms, 0.75)

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch / (self.median_ms / 1e3)

    @property
    def method(self) -> str:
        amp = f", amp {self.precision}" if self.precision != "fp32" else (
            ", amp" if self.amp else "")
        extra = "".join([amp,
                         ", channels_last" if self.channels_last else "",
                         ", torch.compile" if self.compile_s is not None else "",
                         f", {self.threads} threads" if self.threads else ""])
        ftz = ", denormals flushed" if self.device.startswith("cpu") else ""
        ftz += ", freed memory kept (glibc mallopt)" if self.malloc_kept else ""
        return (f"{self.timer}, median of {self.repeats} runs after {self.warmup} warm-up"
                f"{extra}{ftz}")


@dataclass
class RatioStats:
    """Paired per-round ratios baseline latency / model latency (the throughput ratio),
    with the block each round was timed in (:func:`~attnbench.profilers.stats.block_interval`)."""

    per_round: List[float]
    blocks: List[int] = field(default_factory=list)

    @property
    def interval(self) -> Interval:
        """The suite's definition: the mean of the block medians with its Student-t 95 %
        interval over blocks; with one block, the median with its order-statistic one."""
        if len(self.blocks) == len(self.per_round) and len(set(self.blocks)) > 1:
            return block_interval(self.per_round, self.blocks)
        return median_interval(self.per_round)

    @property
    def p25(self) -> float:
        return quantile(self.per_round, 0.25)

    @property
    def p75(self) -> float:
        return quantile(self.per_round, 0.75)


@dataclass
class InterleavedResult:
    stats: Dict[str, SpeedStats]
    ratios: Dict[str, Optional[RatioStats]]     # None when there is no baseline
    baseline: Optional[str]
    orders: List[List[str]] = field(default_factory=list)
    stop: str = "fixed rounds"                  # what ended the rounds
    ci_target: Optional[float] = None
    load: tuple = (math.nan, math.nan)          # 1-minute load average at start, end
    wall_s: float = 0.0
    errors: Dict[str, BaseException] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.describe()

    def describe(self, rounds: Optional[str] = None, stop: Optional[str] = None) -> str:
        """The method; ``rounds`` and ``stop`` replace this group's round count and stop
        reason (a table of several groups gives those per row)."""
        any_stats = next(iter(self.stats.values()))
        target = f", target +-{100 * self.ci_target:g} %" if self.ci_target else ""
        rounds = f"{len(self.orders)} rounds" if rounds is None else rounds
        stop = f"stopped by {self.stop}" if stop is None else stop
        return (f"interleaved: {rounds} x {len(self.stats)} models, seeded random order each "
                f"round, {stop}{target}; {any_stats.method.split(', median of')[0]}")


# --------------------------------------------------------------------------- steps

def _num_classes(model: nn.Module) -> Optional[int]:
    config = getattr(model, "attnbench_config", None) or {}
    if config.get("num_classes"):
        return int(config["num_classes"])
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):
        return fc.out_features
    return None


#: the autocast dtype of each precision (fp32: no autocast)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_of(device: torch.device, amp: bool, precision: Optional[str] = None) -> str:
    """The precision a step runs in: ``precision`` if given, else what ``amp`` means on
    ``device`` (fp16 on CUDA, bf16 elsewhere; fp32 without amp)."""
    if precision is not None:
        if precision != "fp32" and precision not in DTYPES:
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        return precision
    if not amp:
        return "fp32"
    return "fp16" if torch.device(device).type == "cuda" else "bf16"


def autocast_context(device: torch.device, amp: bool, precision: Optional[str] = None):
    """``torch.autocast`` to the dtype of ``precision`` (:func:`precision_of`), or a null
    context for fp32."""
    precision = precision_of(device, amp, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def backward_step(loss: torch.Tensor, optimizer, scaler=None) -> None:
    """Backward pass and optimizer step, through the AMP GradScaler when there is one
    (the timed training step and ``attnbench train`` share it)."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


class Step:
    """One callable step of ``model``: an eval forward under ``no_grad`` or a training
    step (zero_grad(set_to_none) -> forward -> cross-entropy -> backward -> SGD step).

    Inputs and targets are made once, from ``seed``, on the device. SGD: lr 0.01,
    momentum 0.9, weight decay 1e-4 (momentum buffers appear at the first step).
    ``precision`` ("fp32", "bf16", "fp16"; None: what ``amp`` means, float16 on CUDA and
    bfloat16 on the CPU) is the autocast dtype; a GradScaler scales the loss for
    float16 on CUDA only.

    With ``compile`` the model is wrapped by ``torch.compile`` and the step is called
    once here, untimed: ``compile_s`` is the wall time of that first call (tracing,
    compiling and the first run, synchronised), kept apart from the timed runs.
    """

    def __init__(self, model: nn.Module, mode: str = "eval", batch: int = 8,
                 resolution: int = 224, device: str = "cpu", amp: bool = False,
                 channels_last: bool = False, seed: int = 0, precision: Optional[str] = None,
                 compile: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.device = torch.device(check_device(device))  # mps refused: no synchronised timer
        self.mode = mode
        self.precision = precision_of(self.device, amp, precision)
        self.amp = self.precision != "fp32"
        self.channels_last = bool(channels_last)
        self.compile_s: Optional[float] = None
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=fmt)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, resolution, resolution, generator=gen)
        self.x = x.to(self.device).contiguous(memory_format=fmt)
        classes = _num_classes(model)
        if classes is None:
            with torch.no_grad():
                classes = int(self.model.eval()(self.x[:1]).shape[-1])
        self.y = torch.randint(0, classes, (batch,), generator=gen).to(self.device)
        self.optimizer = None
        self.scaler = None
        if mode == "train":
            self.model.train()
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9,
                                             weight_decay=1e-4)
            if self.precision == "fp16" and self.device.type == "cuda":
                self.scaler = torch.amp.GradScaler("cuda")
        else:
            self.model.eval()
        if compile:
            self._compile()

    def _compile(self) -> None:
        """``torch.compile`` the model and time its first (compiling) step."""
        self.model = torch.compile(self.model)
        _sync(self.device)
        t0 = time.perf_counter()
        self()
        _sync(self.device)
        self.compile_s = time.perf_counter() - t0

    def __call__(self) -> None:
        if self.mode == "eval":
            with torch.no_grad(), autocast_context(self.device, self.amp, self.precision):
                self.model(self.x)
            return
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.amp, self.precision):
            out = self.model(self.x)
        loss = F.cross_entropy(out.float(), self.y)
        backward_step(loss, self.optimizer, self.scaler)

    def tensors(self) -> List[torch.Tensor]:
        """Tensors the step keeps alive between runs (inputs, targets, optimizer state)."""
        out = [self.x, self.y]
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                out.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        return out


# --------------------------------------------------------------------------- timing

class _RunTimer:
    """Times single calls of ``fn`` in milliseconds."""

    def __init__(self, fn: Callable[[], None], device: torch.device):
        self.fn = fn
        self.device = device
        if device.type == "cuda":
            self.name = "cuda-events"
        else:
            import logging
            log = logging.getLogger("torch.utils.cpp_extension")
            level = log.level
            log.setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU-only hosts
            try:
                from torch.utils.benchmark import Timer
            finally:
                log.setLevel(level)
            self.threads = torch.get_num_threads()
            self._timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=self.threads)
            self.name = "torch.utils.benchmark.Timer"

    def __call__(self) -> float:
        if self.device.type == "cuda":
            return self._cuda_call()
        # Timer.timeit(n) would add 2 untimed warm-up calls to every call; its
        # ``_timeit`` is the bare timeit.Timer run (perf_counter, gc off).
        inner = getattr(self._timer, "_timeit", None)
        if inner is not None:
            return float(inner(1) * 1e3)
        return float(self._timer.timeit(1).times[0] * 1e3)  # pragma: no cover

    def _cuda_call(self) -> float:
        """One call timed by CUDA events on the configured device's current stream (the
        step runs with that device current, so ``cuda:1`` is timed on cuda:1)."""
        with torch.cuda.device(self.device):
            torch.cuda.synchronize(self.device)
            stream = torch.cuda.current_stream(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            gc_was = gc.isenabled()
            gc.disable()
            try:
                start.record(stream)
                self.fn()
                end.record(stream)
                end.synchronize()
            finally:
                if gc_was:
                    gc.enable()
        return float(start.elapsed_time(end))


@contextlib.contextmanager
def num_threads(threads: Optional[int]):
    """Set ``torch.set_num_threads`` for the block (no change when ``threads`` is None)."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(old)


@contextlib.contextmanager
def flush_denormal(device: torch.device):
    """Denormal floats flushed to zero on the CPU while timing (``torch.set_flush_denormal``;
    off again after, PyTorch's default). A timed training step trains on one fixed batch
    again and again, so the model memorises it, gradients shrink into denormals, and x86
    arithmetic on denormals is 10-100x slower: measured here, SE-ResNet-50's batch-1 step
    went from 0.41 s to 13.5 s after 15 steps, and stayed at 0.43 s with flushing. Real
    training rarely meets denormals; a benchmark that does measures its own artefact."""
    on = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


#: glibc ``mallopt`` parameters (malloc.h) and the values :func:`keep_freed_memory` sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_MMAP_THRESHOLD, KEEP_TRIM_THRESHOLD = 32 << 20, 1 << 30
_kept: Optional[bool] = None


def keep_freed_memory(device: torch.device) -> bool:
    """On the CPU with glibc: keep freed memory in the process for the rest of it, so a
    timed step reuses its pages instead of faulting in fresh zeroed ones (``mallopt``:
    allocations up to 32 MiB from the heap, not ``mmap``; the heap trimmed only above
    1 GiB free). Without it glibc hands big freed blocks back to the OS and every step
    pays page faults for them again: measured here, 19k-57k minor faults per ResNet-50
    batch-8 forward (plain) and 53k-55k (AW), ~0 with it; AW's batch-8 ratio moved
    0.840 [0.797, 0.883] -> 0.866 [0.829, 0.903]. PyTorch's CPU tuning guide recommends
    an allocator that reuses memory (jemalloc, tcmalloc) for the same reason; these are
    glibc's own settings, no extra library. Applied to every model alike; the method
    says so. ``ATTNBENCH_MALLOC=system`` leaves glibc's defaults. Returns whether the
    setting is in effect."""
    global _kept
    if device.type != "cpu" or os.environ.get("ATTNBENCH_MALLOC", "") == "system":
        return bool(_kept)
    if _kept is None:
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6")
            _kept = bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)
                         and libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))
        except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
            _kept = False
    return _kept


def _enough(times: List[float], repeats: int, min_run_time: float) -> bool:
    if len(times) < max(1, repeats):
        return False
    if len(times) >= MAX_REPEATS:
        return True
    return sum(times) / 1e3 >= (min_run_time or 0.0)


def time_model(model: nn.Module, mode: str = "eval", batch: int = 8, resolution: int = 224,
               device: str = "cpu", warmup: int = 2, repeats: int = 10,
               min_run_time: float = 0.0, amp: bool = False, channels_last: bool = False,
               threads: Optional[int] = None, seed: int = 0, precision: Optional[str] = None,
               compile: bool = False) -> SpeedStats:
    """Time ``model`` alone: ``warmup`` untimed steps, then at least ``repeats`` timed
    steps and until the timed total reaches ``min_run_time`` seconds (at most 1000).
    With ``compile`` the compiling first call comes before the warm-up (``compile_s``)."""
    kept = keep_freed_memory(torch.device(device))
    with num_threads(threads), flush_denormal(torch.device(device)):
        step = Step(model, mode, batch, resolution, device, amp, channels_last, seed,
                    precision, compile)
        timer = _RunTimer(step, step.device)
        for _ in range(max(0, int(warmup))):
            step()
        _sync(step.device)
        times: List[float] = []
        while not _enough(times, repeats, min_run_time):
            times.append(timer())
        used = torch.get_num_threads()
    return SpeedStats(mode=mode, device=str(step.device), batch=batch, resolution=resolution,
                      times_ms=times, warmup=int(warmup), timer=timer.name,
                      threads=used if step.device.type == "cpu" else None, amp=step.amp,
                      channels_last=bool(channels_last), precision=step.precision,
                      compile_s=step.compile_s, malloc_kept=kept)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def find_baseline(models: Dict[str, nn.Module]) -> Optional[str]:
    """The label of the plain backbone: label ``"none"`` or ``attnbench_label == "none"``."""
    if "none" in models:
        return "none"
    for label, model in models.items():
        if getattr(model, "attnbench_label", None) == "none":
            return label
    return None


@dataclass(frozen=True)
class Rounds:
    """When interleaved timing stops: after at least ``min_rounds`` rounds, once every
    ratio's interval is within +-``ci_target`` (None: once every model has run for
    ``min_run_time`` s), or at ``max_rounds`` / after ``budget_s`` seconds. With
    ``block_rounds`` the rounds come in blocks of that many (see :func:`time_interleaved`):
    the plan stops only at the end of a block, and judges the target only from
    ``MIN_BLOCKS`` blocks on."""

    min_rounds: int = 10
    ci_target: Optional[float] = None
    max_rounds: int = MAX_REPEATS
    budget_s: Optional[float] = None
    min_run_time: float = 0.0
    block_rounds: Optional[int] = None

    def block_of(self, round_index: int) -> int:
        """The block of round ``round_index`` (0 without blocks)."""
        return round_index // self.block_rounds if self.block_rounds else 0

    def stop(self, times: Dict[str, List[float]], baseline: Optional[str],
             elapsed: float) -> Optional[str]:
        """The reason to stop now, or None to time another round."""
        n = min((len(v) for v in times.values()), default=0)
        if n < max(1, self.min_rounds) or (self.block_rounds and n % self.block_rounds):
            return None
        blocks = [self.block_of(i) for i in range(n)]
        if self.ci_target is None:
            if all(_enough(v, self.min_rounds, self.min_run_time) for v in times.values()):
                return "fixed rounds"
        elif baseline is None or (len(set(blocks)) >= (MIN_BLOCKS if self.block_rounds else 1)
                                  and _widest(times, baseline, blocks) <= self.ci_target):
            return "target reached"
        if n >= self.max_rounds:
            return "max rounds"
        if self.budget_s is not None and elapsed >= self.budget_s:
            return "time budget"
        return None


def _widest(times: Dict[str, List[float]], baseline: str, blocks: List[int]) -> float:
    """The largest relative half-width of the ratio intervals of the non-baseline models."""
    widths = [_ratio_stats(times[baseline], v, blocks).interval.half_width
              for k, v in times.items() if k != baseline]
    return max(widths, default=0.0)


def _load() -> float:
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):  # pragma: no cover - not on every platform
        return math.nan


def time_interleaved(models: Dict[str, nn.Module], mode: str = "eval", batch: int = 8,
                     resolution: int = 224, device: str = "cpu", warmup: int = 2,
                     rounds: int = 10, min_run_time: float = 0.0, amp: bool = False,
                     channels_last: bool = False, threads: Optional[int] = None,
                     baseline: Optional[str] = None, seed: int = 0,
                     ci_target: Optional[float] = None, max_rounds: Optional[int] = None,
                     budget_s: Optional[float] = None, precision: Optional[str] = None,
                     compile: bool = False, block_rounds: Optional[int] = None
                     ) -> InterleavedResult:
    """Time ``models`` (label -> model) in interleaved rounds (see the module docstring).

    ``warmup`` untimed rounds, then rounds in a seeded random order until :class:`Rounds`
    says stop (``rounds`` is the minimum). Ratio per round = baseline latency / model
    latency; ``baseline`` defaults to :func:`find_baseline`. All models get the same
    inputs (``seed``). Models that fail are dropped and listed in ``errors``.

    With ``block_rounds`` the rounds come in blocks of that many; before each block after
    the first every model is re-instantiated (:func:`_renewer`) and warmed up once, and
    each ratio is summarised over blocks (:func:`attnbench.profilers.stats.block_interval`).
    A compiled model is not re-instantiated (that would compile it again): its blocks
    only split the rounds in time.
    """
    if not models:
        raise ValueError("time_interleaved: no models given")
    if baseline is None:
        baseline = find_baseline(models)
    elif baseline not in models:
        raise ValueError(f"time_interleaved: baseline {baseline!r} is not one of {list(models)}")
    plan = Rounds(int(rounds), ci_target, int(max_rounds or MAX_REPEATS), budget_s,
                  float(min_run_time or 0.0), int(block_rounds) if block_rounds else None)
    load0, t0, kept = _load(), time.perf_counter(), keep_freed_memory(torch.device(device))
    with num_threads(threads), flush_denormal(torch.device(device)):
        errors: Dict[str, BaseException] = {}
        steps = _make_steps(models, errors, mode, batch, resolution, device, amp,
                            channels_last, seed, precision, compile)
        dev = torch.device(device)
        timers = {k: _RunTimer(s, dev) for k, s in steps.items()}
        _warm_up(steps, errors, warmup, seed)
        _sync(dev)
        make = functools.partial(Step, mode=mode, batch=batch, resolution=resolution,
                                 device=device, amp=amp, channels_last=channels_last,
                                 seed=seed, precision=precision)
        renew = _renewer(steps, timers, errors, make, seed) if not compile else None
        # the budget counts the timed rounds only, not building, compiling or warming up
        times, orders, stop = _timed_rounds(timers, errors, plan, baseline, seed,
                                            time.perf_counter(), renew)
        used = torch.get_num_threads()
    name = next(iter(timers.values())).name if timers else "none"
    stats = {k: SpeedStats(mode=mode, device=str(dev), batch=batch, resolution=resolution,
                           times_ms=v, warmup=int(warmup), timer=name,
                           threads=used if dev.type == "cpu" else None, amp=bool(amp),
                           channels_last=bool(channels_last), malloc_kept=kept, **_step_stats(
                               steps.get(k))) for k, v in times.items()}
    ok_base = baseline if baseline in times else None
    blocks = [plan.block_of(i) for i in range(len(orders))]
    ratios = {k: (_ratio_stats(times[ok_base], v, blocks) if ok_base else None)
              for k, v in times.items()}
    return InterleavedResult(stats=stats, ratios=ratios, baseline=baseline, orders=orders,
                             stop=stop, ci_target=ci_target, load=(load0, _load()),
                             wall_s=time.perf_counter() - t0, errors=errors)


def _ratio_stats(base: List[float], model: List[float], blocks: List[int]) -> RatioStats:
    """The paired ratios of two models' rounds, with the block of each round."""
    pairs = [(b / m, blk) for b, m, blk in zip(base, model, blocks) if b > 0 and m > 0]
    return RatioStats([r for r, _ in pairs], [blk for _, blk in pairs])


def _make_steps(models, errors, mode, batch, resolution, device, amp, channels_last, seed,
                precision=None, compile=False):
    """A :class:`Step` per model; a model whose step cannot be made (or compiled) goes to
    ``errors``."""
    steps = {}
    for k, model in models.items():
        try:
            steps[k] = Step(model, mode, batch, resolution, device, amp, channels_last, seed,
                            precision, compile)
        except Exception as err:  # noqa: BLE001 - isolated: only this model fails
            errors[k] = err
    return steps


def _step_stats(step: Optional["Step"]) -> Dict[str, object]:
    """The :class:`SpeedStats` fields a step knows: its precision and compile time."""
    if step is None:
        return {}
    return {"precision": step.precision, "compile_s": step.compile_s}


def _warm_up(steps: Dict[str, "Step"], errors, warmup: int, seed: int) -> None:
    for r in range(max(0, int(warmup))):
        for k in round_order(list(steps), seed, -1 - r):
            if k in errors:
                continue
            try:
                steps[k]()
            except Exception as err:  # noqa: BLE001 - isolated: only this model fails
                errors[k] = err
    for k in errors:
        steps.pop(k, None)


def _timed_rounds(timers, errors, plan: Rounds, baseline, seed: int, t0: float,
                  renew: Optional[Callable[[int], None]] = None):
    """Timed rounds until ``plan`` stops them: (times per model, orders, stop reason).
    ``renew(block)`` is called before the first round of every block after the first."""
    times: Dict[str, List[float]] = {k: [] for k in timers}
    orders: List[List[str]] = []
    stop = None
    while times and stop is None:
        block = plan.block_of(len(orders))
        if renew is not None and block > plan.block_of(len(orders) - 1) and orders:
            renew(block)
            for k in [k for k in times if k in errors]:
                del times[k]
            if not times:
                break
        order = round_order(list(times), seed, len(orders))
        orders.append(order)
        for k in order:
            try:
                times[k].append(timers[k]())
            except Exception as err:  # noqa: BLE001 - isolated: only this model fails
                errors[k] = err
        for k in [k for k in times if k in errors]:
            del times[k]
        n = min(len(v) for v in times.values()) if times else 0
        times = {k: v[:n] for k, v in times.items()}  # keep the rounds paired
        stop = plan.stop(times, baseline if baseline in times else None,
                         time.perf_counter() - t0) if times else "every model failed"
    return times, orders, stop or "every model failed"


def _renewer(steps: Dict[str, "Step"], timers: Dict[str, "_RunTimer"], errors,
             make: Callable[[nn.Module], "Step"], seed: int) -> Callable[[int], None]:
    """What a new block does: every model gets a fresh instance (a deep copy of its
    current weights, so a training step goes on from where it was) and fresh inputs,
    in a seeded random order, then one untimed round. So memory placement and the
    state of the minutes a block runs in vary between blocks."""
    def renew(block: int) -> None:
        for k in round_order(list(steps), seed, -1000 - block):
            try:
                fresh = copy.deepcopy(steps[k].model)
                steps[k] = make(fresh)
                timers[k] = _RunTimer(steps[k], steps[k].device)
            except Exception as err:  # noqa: BLE001 - isolated: only this model fails
                errors[k] = err
        _warm_up(steps, errors, 1, seed + 7919 * block)
    return renew
