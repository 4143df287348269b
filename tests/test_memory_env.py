"""Memory figures named for what they are (CPU tensor peak and resident-set increase,
CUDA max allocated and max reserved on the configured device), ``mps`` refused, the
backend settings applied and read back, the GPU recorded in env.json.

CUDA paths run against a mocked ``torch.cuda`` (no GPU needed): the tests check which
device every statistic is read on and what the rows are called.
"""
import subprocess
import types

import pytest
import torch
from torch import nn

from attnbench.profilers import env, memory


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 16 * 16, 10))


def test_cpu_figures_are_the_tensor_peak_and_the_resident_set_increase():
    st = memory.peak_memory(_cnn(), "train", batch=4, resolution=16)
    names = [m[0] for m in st.metrics()]
    assert names[0] == "peak_tensor_memory" and set(names) <= {"peak_tensor_memory",
                                                               "rss_increase"}
    assert not any(n.startswith("cuda") or n == "peak_memory" for n in names)
    if "rss_increase" in names:  # Linux: measured, never negative
        rss = dict((m[0], m) for m in st.metrics())["rss_increase"]
        assert rss[1] >= 0 and rss[3].startswith("cpu.rss-increase: ")


def test_rss_increase_sees_a_step_that_allocates_and_frees():
    big = 64 * 2 ** 20

    def step():
        # fresh anonymous pages, unmapped at once: unlike a tensor, never served from
        # memory the allocator kept resident after an earlier test freed it
        import mmap
        with mmap.mmap(-1, big) as m:
            for i in range(0, big, 4096):
                m[i] = 1
    added, method = memory.rss_increase(step)
    if added is None:
        pytest.skip(method)
    assert added >= 0.9 * big, (added, method)


def test_rss_sampling_fallback(monkeypatch):
    monkeypatch.setattr(memory, "_reset_peak_rss", lambda: False)
    added, method = memory.rss_increase(lambda: torch.ones(2 ** 24).add_(1))
    if added is None:
        pytest.skip(method)
    assert "sampled every 1 ms" in method and added >= 0


class _FakeCuda:
    """Records the device of every statistic call; a 100 MiB peak, 128 MiB reserved."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        values = {"memory_allocated": 10 * 2 ** 20, "max_memory_allocated": 100 * 2 ** 20,
                  "max_memory_reserved": 128 * 2 ** 20}

        def call(*args, **kwargs):
            self.calls.append((name, args[0] if args else None))
            return values.get(name)
        if name == "device":
            return lambda dev: (self.calls.append(("device", dev)), _nullcontext())[1]
        return call


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _FakeStep:
    def __init__(self, model, mode, batch, resolution, device, *args):
        self.device = torch.device(device)
        self.optimizer = None
        self.model = model
        self.steps = 0

    def __call__(self):
        self.steps += 1


def test_cuda_figures_are_read_on_the_configured_device(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(memory.torch, "cuda", fake)
    monkeypatch.setattr(memory, "Step", _FakeStep)
    st = memory.peak_memory(_cnn(), "eval", batch=2, resolution=16, device="cuda:1")
    stats = [c for c in fake.calls if c[0] in ("synchronize", "memory_allocated",
                                               "reset_peak_memory_stats",
                                               "max_memory_allocated", "max_memory_reserved")]
    # empty_cache takes no device: it runs inside torch.cuda.device(cuda:1)
    inside = fake.calls[fake.calls.index(("device", torch.device("cuda:1"))):]
    assert ("empty_cache", None) in inside
    assert stats and all(dev == torch.device("cuda:1") for _, dev in stats), stats
    assert ("reset_peak_memory_stats", torch.device("cuda:1")) in stats
    assert ("device", torch.device("cuda:1")) in fake.calls
    m = {name: (value, method) for name, value, _, method in st.metrics()}
    assert set(m) == {"cuda_max_allocated", "cuda_max_reserved"}
    assert m["cuda_max_allocated"][0] == 100 and m["cuda_max_reserved"][0] == 128
    assert "max_memory_allocated(cuda:1)" in m["cuda_max_allocated"][1]
    assert "max_memory_reserved(cuda:1)" in m["cuda_max_reserved"][1]


def test_mps_is_refused_with_a_clear_message():
    with pytest.raises(env.DeviceError, match="'mps': not supported.*use 'cpu', 'cuda'"):
        memory.peak_memory(_cnn(), device="mps")
    with pytest.raises(env.DeviceError, match="expected 'cpu', 'cuda' or 'cuda:N'"):
        env.check_device("xpu")
    assert env.check_device("cuda:1") == "cuda:1"


def test_settings_are_applied_and_read_back():
    saved = env.backend_settings()
    try:
        got = env.apply_settings({"cudnn_benchmark": False, "tf32_cudnn": True,
                                  "matmul_precision": "high"})
        assert got == {"cudnn_benchmark": False, "tf32_cudnn": True, "tf32_matmul": True,
                       "matmul_precision": "high"}
        assert torch.get_float32_matmul_precision() == "high"
        got = env.apply_settings({"cudnn_benchmark": True, "tf32_cudnn": False,
                                  "matmul_precision": "highest"})
        assert got == {"cudnn_benchmark": True, "tf32_cudnn": False, "tf32_matmul": False,
                       "matmul_precision": "highest"}
    finally:
        env.apply_settings(saved)


def test_gpu_name_and_driver_from_torch_and_nvidia_smi(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA H200", total_memory=141 * 2 ** 30, major=9,
                                  minor=0)
    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: (seen.append(dev), props)[1])

    def smi(args, **kwargs):
        assert args[0] == "nvidia-smi" and "--query-gpu=driver_version,name" in args
        return subprocess.CompletedProcess(args, 0, "570.86.15, NVIDIA H200\n", "")
    monkeypatch.setattr(env.subprocess, "run", smi)
    info = env.gpu_info("cuda:1")
    assert seen == [torch.device("cuda:1")]
    assert info == {"gpu_name": "NVIDIA H200", "gpu_driver": "570.86.15",
                    "gpu_memory_mib": 141 * 1024, "gpu_capability": "9.0"}
    assert env.gpu_info("cpu")["gpu_name"] is None
