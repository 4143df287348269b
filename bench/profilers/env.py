"""The environment a run was taken in (``env.json``, keys in docs/results-schema.md)."""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

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
    }
