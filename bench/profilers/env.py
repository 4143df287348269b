"""The environment a run was taken in (``env.json``, keys in docs/results-schema.md), and
the backend settings a worker measures with (:func:`apply_settings`)."""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from attnbench.modules.registry import AttnbenchError

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout, when run from one


def config_hash(config_text: str) -> str:
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor", "cpu model"):
                    if value.strip():
                        return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def git_state(cwd: Optional[os.PathLike] = None) -> Dict[str, Any]:
    """``{"commit": HEAD sha or None, "dirty": bool or None}`` via the ``git`` command."""
    cwd = str(cwd or REPO_ROOT)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=cwd, capture_output=True, text=True, timeout=20)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001 - not installed / no metadata
        return None


class DeviceError(AttnbenchError, ValueError):
    """A device attnbench cannot measure on."""


def check_device(device: Any) -> str:
    """``device`` as text when attnbench can measure on it (``cpu``, ``cuda``, ``cuda:N``);
    :class:`DeviceError` otherwise (``mps``: no synchronised timing or allocator peak)."""
    text = str(device)
    kind = text.split(":")[0]
    if kind == "mps":
        raise DeviceError(f"device {text!r}: not supported (timing and peak memory on MPS "
                          f"would need torch.mps synchronisation and allocator statistics, "
                          f"which attnbench does not implement); use 'cpu', 'cuda' or 'cuda:N'")
    if kind not in ("cpu", "cuda"):
        raise DeviceError(f"device {text!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return text


def apply_settings(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """Set cudnn.benchmark, cuDNN TF32 and the float32 matmul precision (the config's
    ``[settings]``); returns :func:`backend_settings`. Only the legacy API is used
    (``cudnn.allow_tf32``, ``set_float32_matmul_precision``): mixing it with the
    ``fp32_precision`` attributes makes torch refuse to report the precision."""
    import torch
    if settings.get("cudnn_benchmark") is not None:
        torch.backends.cudnn.benchmark = bool(settings["cudnn_benchmark"])
    if settings.get("tf32_cudnn") is not None:
        torch.backends.cudnn.allow_tf32 = bool(settings["tf32_cudnn"])
    if settings.get("matmul_precision") is not None:
        torch.set_float32_matmul_precision(str(settings["matmul_precision"]))
    return backend_settings()


def backend_settings() -> Dict[str, Any]:
    """The settings in effect: ``cudnn_benchmark``, ``tf32_cudnn``, ``tf32_matmul`` (CUDA
    matmuls) and ``matmul_precision``."""
    import torch
    try:
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:  # legacy and new precision APIs mixed by someone else
        precision = "mixed: cuda " + str(getattr(torch.backends.cuda.matmul, "fp32_precision",
                                                 "?"))
    return {"cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "matmul_precision": precision}


def _nvidia_smi(*query: str) -> Optional[list]:
    """The first GPU's ``query`` fields from ``nvidia-smi`` (``None`` without it)."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(query)}",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return [v.strip() for v in lines[0].split(",")] if lines else None


def gpu_info(device: str) -> Dict[str, Any]:
    """``gpu_name``, ``gpu_driver``, ``gpu_memory_mib``, ``gpu_capability`` of a CUDA
    ``device`` (torch.cuda, and nvidia-smi for the driver); ``None`` where unknown."""
    info: Dict[str, Any] = {"gpu_name": None, "gpu_driver": None, "gpu_memory_mib": None,
                            "gpu_capability": None}
    if not str(device).startswith("cuda"):
        return info
    try:
        import torch
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu_name=props.name, gpu_memory_mib=int(props.total_memory // 2 ** 20),
                    gpu_capability=f"{props.major}.{props.minor}")
    except Exception:  # noqa: BLE001 - no driver / no such device
        pass
    smi = _nvidia_smi("driver_version", "name")
    if smi:
        info["gpu_driver"] = smi[0]
        info["gpu_name"] = info["gpu_name"] or (smi[1] if len(smi) > 1 else None)
    return info


def collect_env(config_text: str = "", config_path: Optional[os.PathLike] = None,
                device: str = "cpu", run_id: Optional[str] = None) -> Dict[str, Any]:
    """Every ``env.json`` key of the schema for a run on ``device``."""
    import torch
    try:
        import torchvision
        tv = torchvision.__version__
    except Exception:  # noqa: BLE001
        tv = None
    device = str(device)
    device_name = None
    if device.startswith("cuda"):
        try:
            device_name = torch.cuda.get_device_name(torch.device(device))
        except Exception:  # noqa: BLE001 - no driver / no such device
            device_name = None
    cpu = cpu_model()
    if device_name is None:
        device_name = cpu if device == "cpu" else device
    cudnn = None
    try:
        if torch.backends.cudnn.is_available():
            cudnn = str(torch.backends.cudnn.version())
    except Exception:  # noqa: BLE001
        cudnn = None
    git = git_state()
    return {
        "run_id": run_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name,
        "cpu_model": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": tv,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "commit": git["commit"],
        "dirty": git["dirty"],
        "config_hash": config_hash(config_text or ""),
        "config_path": str(config_path) if config_path is not None else None,
        "attnbench_version": _version("attnbench"),
        **gpu_info(device),
    }
