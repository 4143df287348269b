"""Peak memory of one eval forward or one training step, in MiB.

Both modes first run one untimed step of the same kind (so lazily created state --
SGD momentum buffers, allocator caches -- exists, as in steady state), then measure
the next one. In a training step the gradients are set to ``None`` before the step,
so the figure includes their allocation in ``backward``; the momentum buffers live
throughout.

* CUDA (``cuda.max_memory_allocated``): ``torch.cuda.reset_peak_memory_stats``
  after a ``synchronize``, the step, ``synchronize``, then
  ``torch.cuda.max_memory_allocated``: the allocator's peak of bytes in live tensors
  on the device (weights, buffers, optimizer state, inputs, activations, gradients,
  workspace tensors), not the reserved/cached total.
* CPU (``cpu.profiler-peak``): the same quantity measured from PyTorch's CPU
  allocator. ``torch.profiler`` with ``profile_memory=True`` records every
  allocation and free through the c10 CPU allocator during the step; the running sum
  of those (in recorded order) gives the bytes allocated above the start, and its
  maximum the step's peak. Added to it: the bytes alive at the start -- the unique
  storages of the model's parameters, buffers, gradients and tensor attributes, the
  optimizer state and the inputs/targets. Deterministic for a given model, input and
  thread count (allocation sizes do not depend on timing). Memory that libraries
  allocate outside PyTorch's allocator (oneDNN/MKL scratch space) and Python objects
  are not included.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
import sys
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
from torch import nn

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

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    @property
    def start_mib(self) -> float:
        return self.start_bytes / MIB


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


def peak_memory(model: nn.Module, mode: str = "eval", batch: int = 8, resolution: int = 224,
                device: str = "cpu", amp: bool = False, channels_last: bool = False,
                threads: Optional[int] = None, seed: int = 0) -> MemoryStats:
    """Peak memory of one ``mode`` step of ``model`` (see the module docstring)."""
    with num_threads(threads):
        step = Step(model, mode, batch, resolution, device, amp, channels_last, seed)
        dev = step.device
        step()  # steady state: optimizer state, lazy buffers
        if step.optimizer is not None:
            step.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
            start = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            step()
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev)
            method = "cuda.max_memory_allocated"
        else:
            start = live_bytes(itertools.chain(_tensors_of(step.model), step.tensors()), dev)
            peak = start + _cpu_profiled_peak(step)
            method = ("cpu.profiler-peak: live params/buffers/grads/optimizer state/inputs "
                      "+ max running sum of CPU allocator events (torch.profiler "
                      "profile_memory)")
    return MemoryStats(mode=mode, device=str(dev), batch=batch, resolution=resolution,
                       peak_bytes=int(peak), start_bytes=int(start), method=method)


def peak_memory_both(model: nn.Module, **kwargs) -> List[MemoryStats]:
    """Eval then train peak of ``model`` (the train step changes its weights)."""
    return [peak_memory(model, "eval", **kwargs), peak_memory(model, "train", **kwargs)]
