"""The lock of a run folder: one runner at a time on ``results/<run_id>/``.

The lock is the file ``results/<run_id>/runner.lock``, held with ``flock`` (released by
the kernel however the runner ends, ``kill -9`` included) and holding the holder's pid,
host, start time and command line as JSON. A second runner on the same folder is
refused with a message naming the holder. A lock file left behind by a runner that no
longer runs (same host, pid gone, or no ``flock`` held on it) is stale and taken over;
one written on another host is refused, since its pid cannot be checked from here.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from attnbench.matrix.worker import RunnerError, pid_alive

LOCK_FILE = "runner.lock"


class RunLockedError(RunnerError):
    """Another runner holds the run folder."""


def _describe(holder: Dict[str, Any]) -> str:
    cmd = holder.get("command")
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')}" + (f" ({cmd})" if cmd else ""))


class RunLock:
    """``with RunLock(run_dir):`` holds the run folder (see the module docstring).
    ``stale`` is the holder of a stale lock that was taken over (or None)."""

    def __init__(self, run_dir: os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: Optional[int] = None
        self.stale: Optional[Dict[str, Any]] = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _refuse(self, holder: Dict[str, Any]) -> RunLockedError:
        return RunLockedError(
            f"{self.run_dir} is in use by another runner: {_describe(holder)}; lock file "
            f"{self.path}. Wait for it to finish or stop it; if it is gone, delete the "
            f"lock file")

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockedError` naming its holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # the file may be replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _flock(fd):
                holder = _read(fd)
                os.close(fd)
                raise self._refuse(holder or {"pid": "?", "host": "?", "started": "?"})
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - a folder whose lock file keeps changing
            raise RunLockedError(f"{self.path}: cannot take the lock (the file keeps changing)")
        holder = _read(fd)
        if holder and not self._is_stale(holder):
            os.close(fd)
            raise self._refuse(holder)
        self.stale = holder or None
        self.fd = fd
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
        os.fsync(fd)

    @staticmethod
    def _is_stale(holder: Dict[str, Any]) -> bool:
        """A holder on this host whose pid is gone (its flock is gone too: we hold it)."""
        if holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        return not isinstance(pid, int) or pid == os.getpid() or not pid_alive(pid)

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and release the lock."""
        if self.fd is None:
            return
        try:
            if _read(self.fd).get("pid") == os.getpid():
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # closing releases the flock
        self.fd = None


def _flock(fd: int) -> bool:
    """An exclusive non-blocking ``flock`` on ``fd``: False when another process holds it
    (True where there is no ``fcntl``: the pid check alone then guards the folder)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock: fall back to the pid check
        return True


def _read(fd: int) -> Dict[str, Any]:
    """The holder recorded in the lock file (``{}`` when empty or unreadable)."""
    try:
        data = os.pread(fd, 65536, 0)
        holder = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
