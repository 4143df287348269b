"""``attnbench run --backend ray``: the runner's units as Ray tasks.

The units are the local backend's (one cell, or one interleaved group of latency cells),
each sent to Ray as one task that holds, for as long as it runs, the resources its
measurement needs: on CUDA one GPU for every unit that times or measures memory (Ray sets
``CUDA_VISIBLE_DEVICES``, so the unit sees its GPU as ``cuda`` / ``cuda:0``), and the
config's ``threads`` CPUs (on the CPU, all the CPUs of the smallest node when ``threads`` is
unset, since torch then uses every core). Static units (params, FLOPs) hold no GPU.

Inside the task a unit is measured as the local backend measures it: in a fresh worker
process of its own (:class:`attnbench.matrix.worker.Worker`), with the same timeout and the
same failure messages; the driver's ``ATTNBENCH_*`` environment variables travel with the
unit. The task returns the worker's answer, its log and the node's host name; the driver
completes the rows (:func:`attnbench.matrix.runner.unit_rows`, extra column ``node``),
writes them to ``results/<run_id>/`` after each unit and appends the log to the run's
``worker.log``, so resume, ``--retry-failed`` and failed rows are the local backend's.
Ray does not retry a unit (``max_retries=0``): a unit whose Ray worker or node dies, or that
Ray cancels, gets failed rows naming the Ray error. Ctrl-C cancels the units in flight
with ``force=True``: their Ray worker processes are killed (and with them the unit's
worker and forkserver) rather than interrupted by a KeyboardInterrupt that could land in
the next task's code; finished units are kept.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from attnbench import results as R
from attnbench.matrix.worker import RunnerError, Worker
from attnbench.results import STATIC_METRICS, Cell

#: what a unit's task returns: kind, payload, worker CPU s, wall s, worker log, host
TaskResult = Tuple[str, Any, Optional[float], float, str, str]
ENV_PREFIX = "ATTNBENCH_"


def check_available() -> None:
    """:class:`RunnerError` when Ray is not installed."""
    if importlib.util.find_spec("ray") is None:
        raise RunnerError("--backend ray: Ray is not installed here; install it with "
                          "`pip install 'attnbench[ray]'` (or `pip install 'ray>=2.9'`)")


def check_cells(cells: Sequence[Cell]) -> None:
    """:class:`RunnerError` for a device a Ray task cannot address (``cuda:N``, N > 0)."""
    for c in cells:
        dev = str(c.device)
        if dev.startswith("cuda:") and dev != "cuda:0":
            raise RunnerError(f"device {dev!r}: with --backend ray every unit gets one GPU of "
                              f"its own, seen as cuda:0; set device = \"cuda\" in the config")


# --------------------------------------------------------------------------- task side

def unit_task(cells: List[Dict[str, Any]], measure, measure_group, plugins: Sequence[str],
              limit: float, env: Mapping[str, str]) -> TaskResult:
    """Measure one unit in a worker process of its own (the Ray task's body)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    host = socket.gethostname()
    try:
        with tempfile.TemporaryDirectory(prefix="attnbench-ray-") as tmp:
            log = Path(tmp) / "worker.log"
            started = time.monotonic()
            try:
                kind, payload, cpu = _in_worker(cells, measure, measure_group, plugins, limit,
                                                log)
            except RunnerError as err:
                kind, payload, cpu = "setup-error", str(err), None
            wall = round(time.monotonic() - started, 3)
            text = log.read_text(errors="replace") if log.exists() else ""
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return kind, payload, cpu, wall, text, host


#: how this Ray worker process starts unit workers: None (the forkserver) until starting
#: one through the forkserver fails, then "spawn" for the rest of the process's life
_START_METHOD: Optional[str] = None


def _start_worker(measure, measure_group, plugins, log: Path) -> Worker:
    """A unit worker; a Ray worker process is reused across tasks, and a cancelled task
    can leave its forkserver unreachable (seen in CI: ``ConnectionRefusedError`` on the
    next tasks), so an ``OSError`` while starting switches this process to ``spawn``."""
    global _START_METHOD
    try:
        return Worker(measure, measure_group, plugins, log, start_method=_START_METHOD)
    except OSError as err:
        if _START_METHOD == "spawn":
            raise
        _START_METHOD = "spawn"
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"attnbench: the forkserver of pid {os.getpid()} failed "
                     f"({type(err).__name__}: {err}); workers are spawned from now on\n")
        return Worker(measure, measure_group, plugins, log, start_method="spawn")


def _in_worker(cells, measure, measure_group, plugins, limit: float, log: Path):
    """The local backend's worker answer for ``cells``; the worker is killed when the task
    is interrupted (a KeyboardInterrupt; the runner's forced cancel kills the whole Ray
    worker process instead, and the unit's worker dies with it)."""
    worker = _start_worker(measure, measure_group, plugins, log)
    try:
        answer = worker.run([Cell.from_dict(d) for d in cells], limit)
        worker.close()
    except BaseException:
        worker.kill()
        worker.conn.close()
        raise
    return answer


# --------------------------------------------------------------------------- driver side

def connect(address: Optional[str]) -> Tuple[Any, bool]:
    """``(ray, whether this call started Ray)``: joins the cluster at ``address`` (None:
    ``RAY_ADDRESS``, else a cluster started with ``ray start`` here, else a new local
    instance), or the Ray this process already joined."""
    check_available()
    import ray
    if ray.is_initialized():
        return ray, False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = f"--address {address}" if address else "a local Ray instance"
        raise RunnerError(f"--backend ray: cannot connect to {where}: {err}") from None
    return ray, True


def _nodes(ray) -> List[Dict[str, Any]]:
    """The alive nodes: host and resources."""
    out = []
    for n in ray.nodes():
        if n.get("Alive", n.get("alive", True)):
            res = n.get("Resources") or {}
            out.append({"host": n.get("NodeManagerHostname") or n.get("NodeManagerAddress"),
                        "CPU": res.get("CPU", 0), "GPU": res.get("GPU", 0)})
    return out


def unit_resources(unit: Sequence[Cell], node_cpus: int) -> Dict[str, float]:
    """The Ray resources a unit holds: ``num_cpus`` = the cells' threads (``node_cpus``
    when unset, on the CPU; 1 on CUDA), ``num_gpus`` = 1 for a CUDA unit that times or
    measures memory."""
    cuda = any(str(c.device).startswith("cuda") for c in unit)
    threads = [int(c.threads) for c in unit if c.threads]
    cpus = max(threads) if threads else (1 if cuda else max(int(node_cpus), 1))
    timed = any(m not in STATIC_METRICS for c in unit for m in c.metrics)
    return {"num_cpus": cpus, "num_gpus": 1 if (cuda and timed) else 0}


def _warn_infeasible(todo: Sequence[Sequence[Cell]], nodes: List[Dict[str, Any]],
                     node_cpus: int, out) -> None:
    """Say when no node has what a unit needs (the unit waits for one to join)."""
    need_cpu = max(unit_resources(u, node_cpus)["num_cpus"] for u in todo)
    need_gpu = max(unit_resources(u, node_cpus)["num_gpus"] for u in todo)
    top_cpu = max((n["CPU"] for n in nodes), default=0)
    top_gpu = max((n["GPU"] for n in nodes), default=0)
    if need_cpu > top_cpu or need_gpu > top_gpu:
        print(f"attnbench: warning: units need {need_cpu:g} CPUs and {need_gpu:g} GPU each, "
              f"the largest Ray node has {top_cpu:g} CPUs and {top_gpu:g} GPUs; they wait "
              f"until such a node joins (Ctrl-C stops the run)", file=out, flush=True)


def backend(address: Optional[str], out, cells: Sequence[Cell] = ()):
    """The runner's function for the units (:func:`run_units`), with the cells checked
    and Ray connected: a bad device or address fails before the run writes anything."""
    check_available()
    check_cells(cells)
    ray, started = connect(address)
    return functools.partial(run_units, ray=ray, started=started, address=address, out=out)


def run_units(run, todo: List[List[Cell]], how, *, timeout: Optional[float], progress: bool,
              max_units: Optional[int], after_unit, address: Optional[str] = None,
              out=None, ray=None, started: bool = False) -> None:
    """Submit every unit of ``todo`` to Ray, save each one's rows as it finishes; Ctrl-C
    (or ``max_units`` saved units) cancels the rest and marks the run interrupted. Ray is
    shut down at the end when ``started`` (this run started it)."""
    from attnbench.matrix.runner import unit_rows
    out = out or sys.stdout
    check_cells([c for u in todo for c in u])
    if ray is None:
        ray, started = connect(address)
    try:
        nodes = _nodes(ray)
        node_cpus = int(min((n["CPU"] for n in nodes if n["CPU"]), default=1))
        _note_env(run.run_dir, address, nodes)
        if todo:
            _warn_infeasible(todo, nodes, node_cpus, out)
        pending = _submit(ray, todo, how, timeout, node_cpus)
        _collect(ray, run, pending, unit_rows, progress, max_units, after_unit)
    finally:
        if started:
            ray.shutdown()


def _submit(ray, todo, how, timeout, node_cpus: int) -> Dict[Any, List[Cell]]:
    """One task per unit; ``{object ref: unit}``."""
    task = ray.remote(max_calls=0, max_retries=0)(unit_task)
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    pending: Dict[Any, List[Cell]] = {}
    for unit in todo:
        limit = float(timeout if timeout is not None else unit[0].timeout_s)
        ref = task.options(**unit_resources(unit, node_cpus)).remote(
            [c.to_dict() for c in unit], how.measure, how.measure_group, list(how.plugins),
            limit, env)
        pending[ref] = unit
    return pending


def _collect(ray, run, pending: Dict[Any, List[Cell]], unit_rows, progress: bool,
             max_units: Optional[int], after_unit) -> None:
    """Save the units as they finish, until none is left or the run is stopped."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(u) for u in pending.values()), unit="cell",
                   dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
    done_units = 0
    try:
        while pending:
            if max_units is not None and done_units >= max_units:
                raise KeyboardInterrupt
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                unit = pending.pop(ref)
                run.save(unit, _unit_result(ray, ref, unit, run, unit_rows))
                done_units += 1
                if bar is not None:
                    bar.set_description_str(f"ray: {unit[0].describe()}")
                    bar.update(len(unit))
                if after_unit is not None:
                    after_unit(done_units)
                if max_units is not None and done_units >= max_units:
                    break
    except KeyboardInterrupt:
        run.summary.interrupted = True
    finally:
        for ref in pending:  # force: the Ray worker process is replaced, not interrupted
            ray.cancel(ref, force=True)
        if bar is not None:
            bar.close()


def _unit_result(ray, ref, unit: List[Cell], run, unit_rows) -> List[Dict[str, Any]]:
    """The rows of a finished task (failed rows for a Ray error), its log appended to
    the run's worker.log."""
    from ray.exceptions import RayError
    try:
        kind, payload, cpu, wall, log, host = ray.get(ref)
    except RayError as err:
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        text = f"ray: {type(err).__name__}: {lines[-1] if lines else ''}"[:400]
        kind, payload, cpu, wall, log, host = "failed", text, None, None, "", None
    if kind == "setup-error":
        raise RunnerError(f"the worker process could not start on {host}: {payload}")
    if log:
        with open(run.run_dir / "worker.log", "a", encoding="utf-8") as fh:
            fh.write(f"=== ray node {host}\n{log}")
    rows = unit_rows(unit, run.run_id, kind, payload, cpu, wall)
    for r in rows:
        r["node"] = host
    return rows


def _note_env(run_dir: Path, address: Optional[str], nodes: List[Dict[str, Any]]) -> None:
    """Record the backend, the address and the Ray nodes in the run's env.json."""
    env = R.load_env(run_dir)
    env["backend"] = "ray"
    env["ray"] = {"address": address, "nodes": nodes}
    R.write_env(run_dir, env)
