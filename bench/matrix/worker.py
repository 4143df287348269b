"""The runner's worker processes: each measures units of cells sent over a pipe.

A worker is forked from a ``forkserver`` that has imported torch and the profilers
once (``spawn`` where there is no forkserver), so it starts in a fraction of a second
with clean state. It receives a unit -- a list of :meth:`Cell.to_dict` dicts -- and
answers ``("rows", rows, cpu seconds)`` or ``("error", "Type: message")``; the parent
(:class:`Worker`) turns a death or a timeout into ``("failed", text)``.

Before each unit the worker applies the cells' backend settings (cudnn.benchmark, TF32,
matmul precision: :func:`attnbench.profilers.env.apply_settings`) and adds the settings
in effect to the rows of latency and memory cells.

No worker outlives its runner by more than a second or so, whatever kills the runner
(``kill -9`` included): on Linux the worker asks for SIGKILL when its parent (the
forkserver, which exits when the runner's end of its pipe closes) dies
(``prctl(PR_SET_PDEATHSIG)``), and on every platform a watchdog thread checks every
0.5 s that the runner's pid is still running (not gone, not a zombie, same start time)
and kills the worker when it is not. The forkserver, which imports this module first,
asks for SIGKILL when the runner dies too (instead of exiting at its next wake-up).
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from attnbench import results as R
from attnbench.results import Cell

MeasureSpec = Union[None, str, Callable[..., Any]]

DEFAULT_MEASURE = "attnbench.matrix.measure:measure_cell"
DEFAULT_MEASURE_GROUP = "attnbench.matrix.measure:measure_group"
WORKER_START_TIMEOUT = 600.0
#: seconds between the watchdog's checks that the runner is alive
WATCH_INTERVAL = 0.5
#: what the forkserver imports for the default measurement
_PRELOAD = ["attnbench.modules", "attnbench.matrix.worker", "attnbench.matrix.measure",
            "attnbench.profilers.preload"]


class RunnerError(R.ResultsError):
    """A run that cannot start (bad run folder, bad options, a worker that cannot start)."""


def _resolve(spec: MeasureSpec) -> Optional[Callable[..., Any]]:
    """A callable, or the function a ``"module:function"`` string names."""
    if spec is None or callable(spec):
        return spec
    module, _, attr = str(spec).partition(":")
    obj = importlib.import_module(module)
    for part in (attr or "measure_cell").split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------- lifeline

def die_with_parent() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent exits
    (``prctl(PR_SET_PDEATHSIG, SIGKILL)`` through ctypes); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _imported_by_forkserver() -> bool:
    """Whether this import is the preload of a multiprocessing forkserver."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "main" and code.co_filename.endswith("forkserver.py"):
            return True
        frame = frame.f_back
    return False


if _imported_by_forkserver():  # the forkserver dies with the runner that started it
    die_with_parent()


def _start_time(pid: int) -> Optional[str]:
    """``(state, start time)`` field text of ``/proc/<pid>/stat``; None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return f"{fields[0]} {fields[19]}"
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, started: Optional[str] = None) -> bool:
    """Whether ``pid`` runs (a zombie does not; with ``started``, the start time recorded
    by :func:`_start_time` must match, so a reused pid does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _start_time(pid)
    if stat is None:
        return True
    state, _, start = stat.partition(" ")
    if state in ("Z", "X"):
        return False
    return started is None or start == started.partition(" ")[2]


def watch_runner(pid: int, interval: float = WATCH_INTERVAL) -> threading.Thread:
    """A daemon thread that SIGKILLs this process once ``pid`` no longer runs."""
    started = _start_time(pid)

    def watch() -> None:
        while pid_alive(pid, started):
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGKILL)
    thread = threading.Thread(target=watch, name="attnbench-runner-watchdog", daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------- worker side

def _worker_main(conn, measure: MeasureSpec, measure_group: MeasureSpec,
                 plugins: Sequence[str], log_path: Optional[str],
                 environ: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                 runner_pid: Optional[int] = None) -> None:
    """Loop of the worker process: receive a unit (list of cell dicts), send back rows."""
    die_with_parent()
    if runner_pid is not None:
        watch_runner(runner_pid)
    _prepare(environ, cwd, log_path)
    functions = _setup(conn, measure, measure_group, plugins)
    if functions is None:
        return
    conn.send(("ready", os.getpid()))
    _serve(conn, *functions)


def _prepare(environ: Optional[Mapping[str, str]], cwd: Optional[str],
             log_path: Optional[str]) -> None:
    """Ignore Ctrl-C (the parent handles it), take the parent's environment and folder,
    send stdout and stderr to ``log_path``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if environ is not None:  # a forkserver child has the server's environment: sync it
        os.environ.clear()
        os.environ.update(environ)
    if cwd:
        os.chdir(cwd)
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def _setup(conn, measure: MeasureSpec, measure_group: MeasureSpec, plugins: Sequence[str]):
    """``(cell function, group function or None)`` after loading the plugins; ``None``
    (and a ``setup-error`` message sent) when that fails."""
    try:
        if plugins or measure is None:  # an injected measure alone needs no registry
            from attnbench.plugins import loader as plugin_loader
            plugin_loader.load_all(list(plugins))
        cell_fn = _resolve(measure or DEFAULT_MEASURE)
        if measure_group is None and measure is not None:
            group_fn = None  # an injected measure_cell alone: time group cells one by one
        else:
            group_fn = _resolve(measure_group or DEFAULT_MEASURE_GROUP)
    except BaseException as err:  # noqa: BLE001
        traceback.print_exc()
        conn.send(("setup-error", R.error_text(err)))
        return None
    return cell_fn, group_fn


def _serve(conn, cell_fn: Callable[..., Any], group_fn: Optional[Callable[..., Any]]) -> None:
    """Answer units until the pipe closes or ``None`` arrives."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        try:
            rows = _measure_unit([Cell.from_dict(d) for d in msg], cell_fn, group_fn)
            conn.send(("rows", [dict(r) for r in rows], _cpu_seconds()))
        except BaseException as err:  # noqa: BLE001 - anything a cell raises is its failure
            traceback.print_exc()
            sys.stdout.flush()
            try:
                conn.send(("error", R.error_text(err)))
            except Exception:  # noqa: BLE001
                return


def _measure_unit(cells: List[Cell], cell_fn: Callable[..., Any],
                  group_fn: Optional[Callable[..., Any]]) -> List[Mapping[str, Any]]:
    """The rows of one unit: a single cell, an interleaved group, or (no group
    function) the group's cells one by one."""
    print(f"--- unit {', '.join(c.id for c in cells)}: "
          f"{cells[0].describe()}{' ...' if len(cells) > 1 else ''} (pid {os.getpid()})",
          flush=True)
    from attnbench.profilers.env import apply_settings
    in_effect = apply_settings(cells[0].settings())
    if len(cells) == 1 and not cells[0].group:
        rows = list(cell_fn(cells[0]))
    elif group_fn is not None:
        rows = list(group_fn(cells))
    else:
        rows = []
        for c in cells:
            rows.extend(cell_fn(c))
    if cells[0].matmul_precision is None:  # an untimed cell: the settings change nothing
        return rows
    return [dict(in_effect, **r) for r in rows]


def _cpu_seconds() -> Optional[float]:
    try:
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return round(ru.ru_utime + ru.ru_stime, 3)
    except Exception:  # noqa: BLE001 - not on this platform
        return None


# --------------------------------------------------------------------------- parent side

def _context(*measures: MeasureSpec, start_method: Optional[str] = None):
    """The multiprocessing context of the workers: ``forkserver`` where there is one
    (the server imports torch, the modules and the profilers once; each worker is a
    fork of that clean process: fresh, quick, no CUDA state), else ``spawn``;
    ``start_method="spawn"`` forces spawn."""
    import multiprocessing as mp
    if start_method == "spawn" or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # the profilers' imports for the default measure; an injected one brings its own
    preload = list(_PRELOAD) if all(m is None for m in measures) else ["attnbench.matrix.worker"]
    for m in measures:
        if m is None:
            continue
        name = m.__module__ if callable(m) else str(m).partition(":")[0]
        if name and name != "__main__" and name not in preload:
            preload.append(name)
    ctx.set_forkserver_preload(preload)  # takes effect when the server first starts
    return ctx


def start_server(*measures: MeasureSpec) -> None:
    """Start the forkserver from the calling thread, before any worker thread needs it.
    The server asks the kernel to kill it when its parent dies (``PR_SET_PDEATHSIG``),
    and on Linux that parent is the *thread* that started it: a server first started
    from a thread of the parallel runner's pool was killed when the pool's threads
    ended, and the next worker's start failed with "EOFError: unexpected EOF"."""
    ctx = _context(*measures)
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver
        forkserver.ensure_running()


def fmt_s(seconds: float) -> str:
    """Seconds as the timeout message writes them (``3``, ``2.5``, ``600``)."""
    return f"{seconds:g}" if seconds < 100 else f"{seconds:.0f}"


class Worker:
    """A spawned worker process and its pipe."""

    def __init__(self, measure: MeasureSpec, measure_group: MeasureSpec,
                 plugins: Sequence[str], log_path: Optional[Path],
                 start_method: Optional[str] = None):
        ctx = _context(measure, measure_group, start_method=start_method)
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, name="attnbench-worker", daemon=True,
                                args=(child, measure, measure_group, list(plugins),
                                      str(log_path) if log_path else None,
                                      dict(os.environ), os.getcwd(), os.getpid()))
        self.proc.start()
        child.close()
        kind, payload = self._receive(WORKER_START_TIMEOUT, "starting the worker")
        if kind == "setup-error":
            self.close()
            raise RunnerError(f"the worker process could not start: {payload}")

    def _receive(self, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                return "failed", f"timeout after {fmt_s(timeout)} s"
            try:
                if self.conn.poll(min(left, 0.5)):
                    return self.conn.recv()
            except (EOFError, OSError):
                return "failed", self._death()
            if not self.proc.is_alive():
                try:
                    if self.conn.poll(0.05):
                        return self.conn.recv()
                except (EOFError, OSError):
                    pass
                return "failed", self._death()

    def _death(self) -> str:
        self.proc.join(5)
        code = self.proc.exitcode
        if code is None:
            self.kill()
            return "worker process stopped answering"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"worker process killed by signal {name}{hint}"
        return f"worker process exited with status {code}"

    def run(self, cells: Sequence[Cell], timeout: float) -> Tuple[str, Any, Optional[float]]:
        """``("rows", rows, cpu seconds of the worker)``, ``("error", text, None)`` or
        ``("failed", text, None)`` (died, timed out)."""
        unit: List[Dict[str, Any]] = [c.to_dict() for c in cells]
        try:
            self.conn.send(unit)
        except (OSError, EOFError, BrokenPipeError):
            return "failed", self._death(), None
        msg = self._receive(timeout, "unit")
        return tuple(msg) + (None,) * (3 - len(msg))

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except (OSError, EOFError):
                pass
            self.proc.join(5)
        self.kill()
        self.conn.close()
