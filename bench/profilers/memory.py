"""Peak memory of one eval forward or one training step, in MiB.

Both modes first run one untimed step of the same kind (so lazily created state --
SGD momentum buffers, allocator caches -- exists, as in steady state), then measure
the next one. In a training step the gradients are set to ``None`` before the step,
so the figure includes their allocation in ``backward``; the momentum buffers live
throughout.

Every figure is named for what it is, and CPU and GPU figures never share a name
(:meth:`MemoryStats.metrics` gives the rows' metrics):

* CUDA, on the configured device (``cuda:1`` measures ``cuda:1``): ``empty_cache``,
  ``reset_peak_memory_stats(device)`` after a ``synchronize(device)``, the step,
  ``synchronize(device)``, then

  - ``cuda_max_allocated`` (``torch.cuda.max_memory_allocated(device)``): the
    allocator's peak of bytes in live tensors on the device (weights, buffers, optimizer
    state, inputs, activations, gradients, workspace tensors);
  - ``cuda_max_reserved`` (``torch.cuda.max_memory_reserved(device)``): the peak of
    what the caching allocator held from the driver for it (segments, fragmentation
    included); neither counts the CUDA context or cuDNN/cuBLAS handles.
* CPU ``peak_tensor_memory`` (``cpu.profiler-peak``): the first quantity measured from
  PyTorch's CPU allocator. ``torch.profiler`` with ``profile_memory=True`` records every
  allocation and free through the c10 CPU allocator during the step; the running sum
  of those (in recorded order) gives the bytes allocated above the start, and its
  maximum the step's peak. Added to it: the bytes alive at the start -- the unique
  storages of the model's parameters, buffers, gradients and tensor attributes, the
  optimizer state and the inputs/targets. Deterministic for a given model, input and
  thread count (allocation sizes do not depend on timing). Memory that libraries
  allocate outside PyTorch's allocator (oneDNN/MKL scratch space) and Python objects
  are not included.
* CPU ``rss_increase``: what the step adds to the process's resident memory, on one
  more step without the profiler: the peak resident set during the step (``VmHWM`` of
  ``/proc/self/status``, reset just before it by writing ``5`` to
  ``/proc/self/clear_refs``) minus the resident set before it (``VmRSS``). Where the
  reset is refused, ``/proc/self/statm`` sampled every millisecond by a thread; without
  ``/proc`` (macOS, Windows) no figure. It includes oneDNN scratch space and the
  allocator's own overhead, and excludes memory malloc kept from the earlier step and
  reuses (steady state: often far below the tensor peak).

``mps`` is refused (:func:`attnbench.profilers.env.check_device`): it has neither
synchronised peak statistics nor an allocator peak here.

Rows written before these names (``peak_memory``, with ``method`` naming how) stay
readable: the report shows them as before.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from attnbench.profilers.env import check_device
from attnbench.profilers.speed import Step, num_threads

MIB = 2.0 ** 20


@dataclass
class MemoryStats:
    mode: str
    device: str
    batch: int
    resolution: int
    peak_bytes: int            # peak bytes in live tensors during the step
    start_bytes: int           # bytes in live tensors just before the step
    method: str
    reserved_bytes: Optional[int] = None      # CUDA: peak bytes the allocator reserved
    rss_increase_bytes: Optional[int] = None  # CPU: resident set added by the step
    rss_method: str = ""

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    @property
    def start_mib(self) -> float:
        return self.start_bytes / MIB

    def metrics(self) -> List[Tuple[str, float, str, str]]:
        """``(metric, MiB, "MiB", method)`` of each figure: ``cuda_max_allocated`` and
        ``cuda_max_reserved`` on CUDA, ``peak_tensor_memory`` and ``rss_increase`` on
        the CPU (the latter where it could be measured)."""
        if self.device.startswith("cuda"):
            out = [("cuda_max_allocated", self.peak_mib, "MiB", self.method)]
            if self.reserved_bytes is not None:
                out.append(("cuda_max_reserved", self.reserved_bytes / MIB, "MiB",
                            f"torch.cuda.max_memory_reserved({self.device}) after "
                            f"empty_cache + reset_peak_memory_stats"))
            return out
        out = [("peak_tensor_memory", self.peak_mib, "MiB", self.method)]
        if self.rss_increase_bytes is not None:
            out.append(("rss_increase", self.rss_increase_bytes / MIB, "MiB", self.rss_method))
        return out


def metric_names(device: str) -> List[Tuple[str, str]]:
    """``(metric, unit)`` of the memory rows on ``device`` (those of a failed cell)."""
    if str(device).startswith("cuda"):
        return [("cuda_max_allocated", "MiB"), ("cuda_max_reserved", "MiB")]
    return [("peak_tensor_memory", "MiB"), ("rss_increase", "MiB")]


def _tensors_of(model: nn.Module) -> Iterable[torch.Tensor]:
    for p in model.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
    yield from model.buffers()
    for m in model.modules():  # tensors kept as plain attributes (e.g. last maps)
        for value in vars(m).values():
            if isinstance(value, torch.Tensor):
                yield value
            elif isinstance(value, (list, tuple)):
                yield from (v for v in value if isinstance(v, torch.Tensor))


def live_bytes(tensors: Iterable[torch.Tensor], device: Optional[torch.device] = None) -> int:
    """Bytes of the unique storages behind ``tensors`` (on ``device`` if given)."""
    seen = set()
    total = 0
    for t in tensors:
        if device is not None and t.device.type != device.type:
            continue
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. meta or sparse tensors
            continue
        key = (storage.device.type, storage.data_ptr())
        if key in seen or storage.data_ptr() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ log lines) for the block."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_profiled_peak(fn) -> int:
    """Max over the step of the running sum of CPU allocator (de)allocations."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                   record_shapes=False)
    with _quiet_stderr():  # kineto prints start/stop lines on fd 2
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())  # stable: recorded order within ties
    running = itertools.accumulate(int(e.nbytes()) for e in events)
    return max(0, max(running, default=0))


_KIB = re.compile(r"^(VmRSS|VmHWM):\s+(\d+)\s+kB", re.M)


def _vm() -> Dict[str, int]:
    """``{"VmRSS": bytes, "VmHWM": bytes}`` of this process (``{}`` without /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return {}
    return {k: int(v) * 1024 for k, v in _KIB.findall(text)}


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _sampled_peak_rss(fn, interval: float = 0.001) -> Optional[int]:
    """The largest ``/proc/self/statm`` resident set seen while ``fn()`` runs."""
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    peak, done = [0], threading.Event()

    def sample():
        while True:
            peak[0] = max(peak[0], int(os.pread(fd, 200, 0).split()[1]) * page)
            if done.wait(interval):
                return
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
        os.close(fd)
    return peak[0]


def rss_increase(fn) -> Tuple[Optional[int], str]:
    """``(bytes, method)``: the resident set ``fn()`` adds at its peak (see the module
    docstring); ``(None, reason)`` where it cannot be measured."""
    before = _vm().get("VmRSS")
    if before is None:
        return None, "no /proc/self/status: resident memory not measured"
    if _reset_peak_rss():
        fn()
        peak = _vm().get("VmHWM", before)
        how = "VmHWM (reset via /proc/self/clear_refs) during the step - VmRSS before"
    else:
        peak = _sampled_peak_rss(fn) or before
        how = "max /proc/self/statm resident set, sampled every 1 ms, - VmRSS before"
    return max(0, peak - before), f"cpu.rss-increase: {how} (one more step, no profiler)"


def _cuda_peaks(step, dev) -> Tuple[int, int, int]:
    """``(start, max allocated, max reserved)`` bytes of one step on CUDA ``dev``."""
    with torch.cuda.device(dev):
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        return (start, torch.cuda.max_memory_allocated(dev),
                torch.cuda.max_memory_reserved(dev))


def peak_memory(model: nn.Module, mode: str = "eval", batch: int = 8, resolution: int = 224,
                device: str = "cpu", amp: bool = False, channels_last: bool = False,
                threads: Optional[int] = None, seed: int = 0, precision: Optional[str] = None,
                compile: bool = False) -> MemoryStats:
    """Peak memory of one ``mode`` step of ``model`` (see the module docstring), in
    ``precision`` (autocast dtype; None: what ``amp`` means) and, with ``compile``, of
    the model wrapped by ``torch.compile`` (compiled by its first, unmeasured step)."""
    check_device(device)
    extra: Dict[str, Any] = {}
    with num_threads(threads):
        step = Step(model, mode, batch, resolution, device, amp, channels_last, seed,
                    precision, compile)
        dev = step.device
        step()  # steady state: optimizer state, lazy buffers
        if step.optimizer is not None:
            step.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if dev.type == "cuda":
            start, peak, extra["reserved_bytes"] = _cuda_peaks(step, dev)
            method = (f"torch.cuda.max_memory_allocated({dev}) after empty_cache + "
                      f"reset_peak_memory_stats")
        else:
            start = live_bytes(itertools.chain(_tensors_of(step.model), step.tensors()), dev)
            peak = start + _cpu_profiled_peak(step)
            method = ("cpu.profiler-peak: live params/buffers/grads/optimizer state/inputs "
                      "+ max running sum of CPU allocator events (torch.profiler "
                      "profile_memory)")
            gc.collect()
            extra["rss_increase_bytes"], extra["rss_method"] = rss_increase(step)
    return MemoryStats(mode=mode, device=str(dev), batch=batch, resolution=resolution,
                       peak_bytes=int(peak), start_bytes=int(start), method=method, **extra)


def peak_memory_both(model: nn.Module, **kwargs) -> List[MemoryStats]:
    """Eval then train peak of ``model`` (the train step changes its weights)."""
    return [peak_memory(model, "eval", **kwargs), peak_memory(model, "train", **kwargs)]
