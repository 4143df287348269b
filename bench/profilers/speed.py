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
each round times every model once, the order rotated by one each round -- and
reports each model's throughput ratio to the plain backbone from the same rounds
(median and quartiles over rounds), which cancels most of that drift.

Models are moved to the device (and to channels_last when asked) in place; a
training step changes their weights.
"""
from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("eval", "train")
MAX_REPEATS = 1000


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
        extra = "".join([", amp" if self.amp else "", ", channels_last" if self.channels_last
                         else "", f", {self.threads} threads" if self.threads else ""])
        return (f"{self.timer}, median of {self.repeats} runs after {self.warmup} warm-up"
                f"{extra}")


@dataclass
class RatioStats:
    """Throughput ratio to the baseline (baseline latency / model latency) per round."""

    per_round: List[float]

    @property
    def median(self) -> float:
        return quantile(self.per_round, 0.5)

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

    @property
    def method(self) -> str:
        any_stats = next(iter(self.stats.values()))
        return (f"interleaved: {len(self.orders)} rounds x {len(self.stats)} models, order "
                f"rotated each round; {any_stats.method.split(', median of')[0]}")


# --------------------------------------------------------------------------- steps

def _num_classes(model: nn.Module) -> Optional[int]:
    config = getattr(model, "attnbench_config", None) or {}
    if config.get("num_classes"):
        return int(config["num_classes"])
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):
        return fc.out_features
    return None


def autocast_context(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


class Step:
    """One callable step of ``model``: an eval forward under ``no_grad`` or a training
    step (zero_grad(set_to_none) -> forward -> cross-entropy -> backward -> SGD step).

    Inputs and targets are made once, from ``seed``, on the device. SGD: lr 0.01,
    momentum 0.9, weight decay 1e-4 (momentum buffers appear at the first step).
    With ``amp`` on CUDA a GradScaler scales the loss (float16); on the CPU autocast
    uses bfloat16.
    """

    def __init__(self, model: nn.Module, mode: str = "eval", batch: int = 8,
                 resolution: int = 224, device: str = "cpu", amp: bool = False,
                 channels_last: bool = False, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.device = torch.device(device)
        self.mode = mode
        self.amp = bool(amp)
        self.channels_last = bool(channels_last)
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
            if self.amp and self.device.type == "cuda":
                self.scaler = torch.amp.GradScaler("cuda")
        else:
            self.model.eval()

    def __call__(self) -> None:
        if self.mode == "eval":
            with torch.no_grad(), autocast_context(self.device, self.amp):
                self.model(self.x)
            return
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.amp):
            out = self.model(self.x)
        loss = F.cross_entropy(out.float(), self.y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

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
            torch.cuda.synchronize(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            gc_was = gc.isenabled()
            gc.disable()
            try:
                start.record()
                self.fn()
                end.record()
                end.synchronize()
            finally:
                if gc_was:
                    gc.enable()
            return float(start.elapsed_time(end))
        # Timer.timeit(n) would add 2 untimed warm-up calls to every call; its
        # ``_timeit`` is the bare timeit.Timer run (perf_counter, gc off).
        inner = getattr(self._timer, "_timeit", None)
        if inner is not None:
            return float(inner(1) * 1e3)
        return float(self._timer.timeit(1).times[0] * 1e3)  # pragma: no cover


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


def _enough(times: List[float], repeats: int, min_run_time: float) -> bool:
    if len(times) < max(1, repeats):
        return False
    if len(times) >= MAX_REPEATS:
        return True
    return sum(times) / 1e3 >= (min_run_time or 0.0)


def time_model(model: nn.Module, mode: str = "eval", batch: int = 8, resolution: int = 224,
               device: str = "cpu", warmup: int = 2, repeats: int = 10,
               min_run_time: float = 0.0, amp: bool = False, channels_last: bool = False,
               threads: Optional[int] = None, seed: int = 0) -> SpeedStats:
    """Time ``model`` alone: ``warmup`` untimed steps, then at least ``repeats`` timed
    steps and until the timed total reaches ``min_run_time`` seconds (at most 1000)."""
    with num_threads(threads):
        step = Step(model, mode, batch, resolution, device, amp, channels_last, seed)
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
                      threads=used if step.device.type == "cpu" else None, amp=bool(amp),
                      channels_last=bool(channels_last))


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


def time_interleaved(models: Dict[str, nn.Module], mode: str = "eval", batch: int = 8,
                     resolution: int = 224, device: str = "cpu", warmup: int = 2,
                     rounds: int = 10, min_run_time: float = 0.0, amp: bool = False,
                     channels_last: bool = False, threads: Optional[int] = None,
                     baseline: Optional[str] = None, seed: int = 0) -> InterleavedResult:
    """Time ``models`` (label -> model) in interleaved rounds.

    Warm-up: ``warmup`` rounds. Then at least ``rounds`` rounds (more until every model's
    timed total reaches ``min_run_time`` s); round ``r`` times every model once in the
    order of the labels rotated by ``r``. Ratio per round = baseline latency / model
    latency (the throughput ratio); ``baseline`` defaults to :func:`find_baseline`.
    All models get the same inputs (``seed``).
    """
    if not models:
        raise ValueError("time_interleaved: no models given")
    labels = list(models)
    if baseline is None:
        baseline = find_baseline(models)
    elif baseline not in models:
        raise ValueError(f"time_interleaved: baseline {baseline!r} is not one of {labels}")
    with num_threads(threads):
        steps = {k: Step(models[k], mode, batch, resolution, device, amp, channels_last, seed)
                 for k in labels}
        dev = next(iter(steps.values())).device
        timers = {k: _RunTimer(steps[k], dev) for k in labels}
        for r in range(max(0, int(warmup))):
            for k in _rotate(labels, r):
                steps[k]()
        _sync(dev)
        times: Dict[str, List[float]] = {k: [] for k in labels}
        orders: List[List[str]] = []
        r = 0
        while not all(_enough(times[k], rounds, min_run_time) for k in labels):
            order = _rotate(labels, r)
            orders.append(order)
            for k in order:
                times[k].append(timers[k]())
            r += 1
        used = torch.get_num_threads()
    name = next(iter(timers.values())).name
    stats = {k: SpeedStats(mode=mode, device=str(dev), batch=batch, resolution=resolution,
                           times_ms=times[k], warmup=int(warmup), timer=name,
                           threads=used if dev.type == "cpu" else None, amp=bool(amp),
                           channels_last=bool(channels_last)) for k in labels}
    ratios: Dict[str, Optional[RatioStats]] = {}
    for k in labels:
        if baseline is None:
            ratios[k] = None
        else:
            ratios[k] = RatioStats([b / t for b, t in zip(times[baseline], times[k])])
    return InterleavedResult(stats=stats, ratios=ratios, baseline=baseline, orders=orders)


def _rotate(labels: List[str], r: int) -> List[str]:
    k = r % len(labels)
    return labels[k:] + labels[:k]
