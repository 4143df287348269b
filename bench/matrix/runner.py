"""The matrix runner behind ``attnbench run``: :func:`run_config`.

A config (:mod:`attnbench.matrix.config`) expands into cells; cells run in units (one
cell, or one interleaved group of latency cells), each unit in a fresh *worker process*
of its own (:mod:`attnbench.matrix.worker`; multiprocessing: forked from a
``forkserver`` that has imported torch and the profilers once, so a worker starts in a
fraction of a second with clean state; ``spawn`` where there is no forkserver). An
exception, an out-of-memory kill, a segfault or a timeout in one unit is recorded as
``failed`` rows and the run goes on:

* an exception inside the measurement: the worker reports ``Type: message`` and lives on;
* the worker dying (signal, ``os._exit``, OOM killer): ``worker process killed by signal
  SIGKILL...``;
* no answer within the timeout: the worker is killed, ``timeout after N s``.

Rows get two extra columns: ``unit_wall_s`` (wall time of the unit, worker start
included) and ``unit_cpu_s`` (CPU seconds of its worker, all threads).

After every unit the rows of its cells replace any earlier rows of the same cell ids in
``results/<run_id>/rows.jsonl`` (atomic rewrite), so a stop at any point loses at most the
unit in progress. A run is resumed with ``--resume`` (latest run of that config) or the
same ``--run-id``: cells with rows are not redone, failed ones only with
``--retry-failed``.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from attnbench import results as R
from attnbench.matrix.config import Config, ConfigError, expand, load_config, units
from attnbench.matrix.lock import RunLock
from attnbench.matrix.worker import MeasureSpec, RunnerError, Worker, start_server
from attnbench.results import Cell, canonical_json

__all__ = ["FAILED_METRIC", "EXIT_FAILED", "EXIT_INTERRUPTED", "RunnerError", "RunSummary",
           "complete_rows", "run_config"]

#: the schema's metric and unit a failed cell of each config metric is recorded under
FAILED_METRIC = {"params": ("params", "count"), "flops": ("flops", "GMac"),
                 "latency": ("latency", "ms"),
                 "memory": ("peak_tensor_memory", "MiB")}   # cuda_max_allocated on CUDA
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

Row = Dict[str, Any]


# --------------------------------------------------------------------------- rows

def _cell_base(cell: Cell, run_id: str) -> Row:
    """The identity columns of the runner's rows of ``cell`` (the config's label)."""
    return cell.base_row(cell.mode, cell.label, run_id=run_id, cell=cell.id)


def _failed_cells(cells: Sequence[Cell], run_id: str, error: str) -> List[Row]:
    """One failed row per cell, under the schema metric of its config metric."""
    out: List[Row] = []
    for cell in cells:
        metric = cell.metrics[0]
        pair = FAILED_METRIC.get(metric, (metric, None))
        if metric == "memory":  # CPU and CUDA figures have names of their own
            from attnbench.profilers.memory import metric_names
            pair = metric_names(cell.device)[0]
        elif metric == "flops" and cell.mode == "train":  # forward + backward
            pair = ("flops_train", "GMac")
        out.extend(R.failed_rows(_cell_base(cell, run_id), [pair], error,
                                 **_cell_settings(cell)))
    return out


def _cell_settings(cell: Cell) -> Row:
    """The settings a timed cell is measured with, as row columns (none for params and
    FLOPs), so that its failed rows carry the identity its measured rows would."""
    if cell.metrics[0] in R.STATIC_METRICS:
        return {}
    out: Row = {"threads": cell.threads, "amp": bool(cell.amp), "precision": cell.precision,
                "channels_last": bool(cell.channels_last), "compile": bool(cell.compile)}
    out.update(cell.settings())
    return out


def _parse(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _match_cell(row: Mapping[str, Any], cells: Sequence[Cell]) -> Optional[Cell]:
    """The cell of a group a measured row belongs to (module, options, stages)."""
    if len(cells) == 1:
        return cells[0]
    same = [c for c in cells if c.module == row.get("module")]
    if len(same) == 1:
        return same[0]
    opts, stages = _parse(row.get("options")), _parse(row.get("stages"))
    exact = [c for c in same if c.options == opts and c.stages == stages]
    if len(exact) == 1:
        return exact[0]
    if isinstance(opts, dict):
        loose = [c for c in same if c.stages == stages
                 and all(opts.get(k) == v for k, v in c.options.items() if k in opts)]
        if len(loose) == 1:
            return loose[0]
    label = [c for c in same if c.label == row.get("label")]
    if len(label) == 1:
        return label[0]
    return None


def _complete_row(raw: Mapping[str, Any], cell: Cell, run_id: str, where: str) -> Row:
    """A measured row with run_id, cell and the cell's label set, and the columns the
    measurement left out filled in; checked against the schema."""
    row = _cell_base(cell, run_id)
    row.update({k: v for k, v in raw.items() if k not in ("run_id", "cell")})
    row["label"] = cell.label  # the config may name a variant itself
    for key in ("options", "stages"):
        if row.get(key) is not None and not isinstance(row[key], str):
            row[key] = canonical_json(row[key])
    row.setdefault("method", "")
    row.setdefault("status", "ok")
    if row.get("error") is None:
        row["error"] = ""
    for col in R.ROW_COLUMNS:
        row.setdefault(col, None)
    R.check_row(row, where)
    return row


def complete_rows(measured: Sequence[Mapping[str, Any]], cells: Sequence[Cell],
                  run_id: str) -> List[Row]:
    """Measured rows with run_id and cell set and the cell's keys filled in where the
    measurement left them out; cells without any row get a failed row."""
    out: List[Row] = []
    seen = set()
    for i, raw in enumerate(measured):
        if not isinstance(raw, Mapping):
            raise R.ResultsError(f"measured row {i + 1} is not a dict: {raw!r}")
        cell = _match_cell(raw, cells)
        if cell is None:
            raise R.ResultsError(
                f"measured row {i + 1} ({raw.get('module')} {raw.get('options')} "
                f"{raw.get('metric')}) matches no cell of its group")
        out.append(_complete_row(raw, cell, run_id, f"measured row {i + 1}"))
        seen.add(cell.id)
    missing = [c for c in cells if c.id not in seen]
    out.extend(_failed_cells(missing, run_id, "the measurement returned no rows for this cell"))
    return out


# --------------------------------------------------------------------------- the run

@dataclass
class RunSummary:
    run_id: str
    run_dir: Path
    cells: int = 0            # cells selected
    done: int = 0             # measured now
    skipped: int = 0          # finished before (resume)
    ok: int = 0               # of the selected cells, ok now
    failed: int = 0           # of the selected cells, failed now (incl. earlier failures)
    interrupted: bool = False
    wall_s: float = 0.0
    failures: List[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.failed else 0


@dataclass(frozen=True)
class _Measurement:
    """What the workers measure with: the measure functions and the plugins to load."""

    measure: MeasureSpec = None
    measure_group: MeasureSpec = None
    plugins: Sequence[str] = ()


@dataclass
class _Run:
    """One run in progress: its cells, folder, rows so far and each cell's status."""

    cfg: Config
    cells: List[Cell]
    run_dir: Path
    summary: RunSummary
    rows: List[Row] = field(default_factory=list)
    state: Dict[str, str] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.summary.run_id

    def finished(self, cell: Cell, retry_failed: bool) -> bool:
        """Whether ``cell`` has rows (failed ones count unless ``retry_failed``)."""
        st = self.state.get(cell.id)
        return st == "ok" or (st == "failed" and not retry_failed)

    def save(self, unit: Sequence[Cell], new: List[Row]) -> None:
        """Replace the unit's rows by ``new`` in rows.jsonl (atomic rewrite)."""
        ids = {c.id for c in unit}
        self.rows = [r for r in self.rows if r["cell"] not in ids] + new
        R.write_rows(self.run_dir, self.rows)
        states = R.cell_states(new)
        for c in unit:
            self.state[c.id] = states.get(c.id, "ok")
        self.summary.done += len(unit)


def _find_latest(results_dir: Path, cfg: Config) -> Optional[Path]:
    """The most recently written run of this config: its folder is named ``*-<name>``
    or its env.json names the same config file."""
    if not results_dir.is_dir():
        return None
    here = str(cfg.path.resolve()) if cfg.path else None
    found = []
    for p in results_dir.iterdir():
        if not (p / R.ROWS_FILE).exists():
            continue
        same = p.name.endswith(f"-{cfg.name}")
        if not same and here:
            try:
                old = R.load_env(p).get("config_path")
                same = bool(old) and str(Path(old).resolve()) == here
            except R.ResultsError:
                same = False
        if same:
            found.append(((p / R.ROWS_FILE).stat().st_mtime, p.name, p))
    return max(found)[2] if found else None


def _fmt_wall(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_config(config: Union[Config, str, os.PathLike], *, only: Sequence[str] = (),
               run_id: Optional[str] = None, results_dir: Union[str, os.PathLike] = "results",
               resume: bool = False, retry_failed: bool = False,
               timeout: Optional[float] = None, dry_run: bool = False,
               measure: MeasureSpec = None, measure_group: MeasureSpec = None,
               plugins: Sequence[str] = (), progress: bool = True,
               max_units: Optional[int] = None,
               after_unit: Optional[Callable[[int], None]] = None,
               out=None, backend: str = "local", address: Optional[str] = None,
               allow_env_change: bool = False, jobs: Optional[int] = None) -> RunSummary:
    """Run (or resume) a config; returns a :class:`RunSummary` (``exit_code``).

    ``measure`` / ``measure_group``: callables or ``"module:function"`` strings
    (default ``attnbench.matrix.measure.measure_cell`` / ``measure_group``, imported in the
    worker), given :class:`attnbench.results.Cell` objects; callables must be importable
    module-level functions (pickled by reference). With ``measure`` alone, grouped cells
    are measured one by one. ``max_units`` stops after that many units (as if
    interrupted, exit code 130); ``after_unit(n)`` is called after each persisted unit
    (tests raise KeyboardInterrupt from it). The run folder is locked while the run goes
    on (:mod:`attnbench.matrix.lock`); a resumed run refuses another device, torch version
    or thread count than its env.json records unless ``allow_env_change``.
    ``backend``: ``"local"`` (a process pool here) or ``"ray"``
    (:mod:`attnbench.matrix.ray_backend`, the cluster at ``address``). ``jobs`` (default:
    the config's, 1): untimed units measured at once by the local backend (timed units
    always run alone, after them).
    """
    out = out or sys.stdout
    t0 = time.monotonic()
    cfg = config if isinstance(config, Config) else load_config(config)
    if backend != "local" and jobs and jobs > 1:
        raise RunnerError(f"--jobs {jobs}: only with the local backend (Ray places the "
                          f"units itself)")
    cells = expand(cfg, only)
    if not cells:
        raise ConfigError(f"{cfg.where}: the config expands to no cells")
    results_dir = Path(results_dir)
    run_units = None if dry_run else _backend(backend, address, out, cells)  # before writing
    run_id = _run_id(cfg, results_dir, run_id, resume, dry_run, out)
    with (contextlib.nullcontext() if dry_run else _locked(results_dir / run_id, out)):
        run = _open_run(cfg, cells, results_dir / run_id, run_id)
        todo = [u for u in units(cells) if not all(run.finished(c, retry_failed) for c in u)]
        run.summary.skipped = len(cells) - sum(len(u) for u in todo)
        if dry_run:
            _print_plan(run, todo, out)
            run.summary.wall_s = time.monotonic() - t0
            return run.summary
        _start(run, out, allow_env_change)
        local = {"jobs": int(jobs or cfg.jobs)} if backend == "local" else {}
        untimed = [c.threads or os.cpu_count() or 1 for u in todo if not _timed(u) for c in u]
        _note_oversubscription(local.get("jobs", 1), max(untimed, default=1), out)
        run_units(run, todo, _Measurement(measure, measure_group, tuple(plugins)),
                  timeout=timeout, progress=progress, max_units=max_units,
                  after_unit=after_unit, **local)
    _tally(run)
    run.summary.wall_s = time.monotonic() - t0
    shown = str(config) if not isinstance(config, Config) else str(cfg.path or "CONFIG")
    _print_summary(run.summary, shown, only, results_dir, out)
    return run.summary


def _note_oversubscription(jobs: int, threads: int, out) -> None:
    """Say so when ``jobs`` workers of ``threads`` threads each (the most of any untimed
    cell) want more cores than the machine has: they then compete (measured on a 2-core
    VM, jobs 2 x threads 2 took 1.5x as long as jobs 1 for FLOP and memory cells; jobs 2 x
    threads 1 took 0.64x)."""
    cores = os.cpu_count() or 1
    if jobs > 1 and jobs * threads > cores:
        print(f"attnbench: note: jobs {jobs} x threads {threads} exceeds the "
              f"{cores} CPUs here; the untimed units will compete for them (the timed "
              f"ones still run alone)", file=out)


def _run_id(cfg: Config, results_dir: Path, run_id: Optional[str], resume: bool,
            dry_run: bool, out) -> str:
    """The given run id, the latest run of the config (``resume``), or a new one."""
    if run_id is None and resume:
        latest = _find_latest(results_dir, cfg)
        if latest is not None:
            run_id = latest.name
        else:
            print(f"attnbench: no earlier run of {cfg.name!r} under {results_dir}; "
                  f"starting a new one", file=out)
    if run_id is None:
        run_id = R.new_run_id(cfg.name)
        while (results_dir / run_id).exists() and not dry_run:
            time.sleep(1)
            run_id = R.new_run_id(cfg.name)
    if not run_id or "/" in run_id or run_id in (".", ".."):
        raise RunnerError(f"bad run id {run_id!r}")
    return run_id


def _open_run(cfg: Config, cells: List[Cell], run_dir: Path, run_id: str) -> _Run:
    """The run with the rows (and so the cell states) an earlier session left."""
    rows: List[Row] = []
    if (run_dir / R.ROWS_FILE).exists():
        rows = R.load_rows(run_dir / R.ROWS_FILE)
    summary = RunSummary(run_id=run_id, run_dir=run_dir, cells=len(cells))
    return _Run(cfg=cfg, cells=cells, run_dir=run_dir, summary=summary, rows=rows,
                state=R.cell_states(rows))


def _print_plan(run: _Run, todo: List[List[Cell]], out) -> None:
    """``--dry-run``: the counts, then every cell that would run."""
    n_todo = sum(len(u) for u in todo)
    print(f"{run.cfg.where}: {len(run.cells)} cells in {len(units(run.cells))} units; "
          f"{run.summary.skipped} already done in {run.run_dir}; {n_todo} to run", file=out)
    for u in todo:
        head = f"group {u[0].group} ({len(u)} modules): " if u[0].group else ""
        for c in u:
            print(f"  {c.id}  {head}{c.describe()}", file=out)
            head = " " * len(head)


@contextlib.contextmanager
def _locked(run_dir: Path, out):
    """Hold the lock of ``run_dir`` for the block (a stale one is taken over, saying so)."""
    with RunLock(run_dir) as lock:
        if lock.stale:
            print(f"attnbench: {run_dir}: taking over a stale lock (runner pid "
                  f"{lock.stale.get('pid')} on {lock.stale.get('host')} is gone)", file=out)
        yield lock


def _start(run: _Run, out, allow_env_change: bool = False) -> None:
    """Create the run folder with env.json and the config; say when resuming."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    _write_env(run.run_dir, run.cfg, run.run_id, allow_env_change)
    R.atomic_write_text(run.run_dir / R.CONFIG_FILE, run.cfg.text)
    if run.summary.skipped:
        print(f"attnbench: resuming {run.run_dir}: {run.summary.skipped} of {len(run.cells)} "
              f"cells already done", file=out, flush=True)


# --- backend switch (issue 14): the local process pool below, or Ray (matrix/ray_backend.py)

BACKENDS = ("local", "ray")


def _backend(backend: str, address: Optional[str], out,
             cells: Sequence[Cell] = ()) -> Callable[..., None]:
    """The function that measures and saves the units of the run (for Ray: connected,
    so that a bad address or device fails before anything is written)."""
    if backend not in BACKENDS:
        raise RunnerError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "local":
        if address:
            raise RunnerError(f"--address {address}: only with --backend ray")
        return _run_units
    from attnbench.matrix import ray_backend
    return ray_backend.backend(address, out, cells)

# --- end of the backend switch


def _timed(unit: Sequence[Cell]) -> bool:
    """Whether a unit times something (it then runs with the machine to itself)."""
    return any("latency" in c.metrics for c in unit)


class _Progress:
    """The tqdm bar (when asked) and the count of saved units, for ``max_units`` and
    ``after_unit``."""

    def __init__(self, todo: List[List[Cell]], progress: bool, max_units: Optional[int],
                 after_unit: Optional[Callable[[int], None]]):
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=sum(len(u) for u in todo), unit="cell", dynamic_ncols=True,
                            file=sys.stderr, smoothing=0.1)
        self.done, self.max_units, self.after_unit = 0, max_units, after_unit

    def check(self) -> None:
        if self.max_units is not None and self.done >= self.max_units:
            raise KeyboardInterrupt

    def starting(self, unit: List[Cell]) -> None:
        if self.bar is not None:
            more = f" +{len(unit) - 1}" if len(unit) > 1 else ""
            self.bar.set_description_str(unit[0].describe() + more)

    def saved(self, unit: List[Cell]) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(len(unit))
        if self.after_unit is not None:
            self.after_unit(self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_units(run: _Run, todo: List[List[Cell]], how: _Measurement, *,
               timeout: Optional[float], progress: bool, max_units: Optional[int],
               after_unit: Optional[Callable[[int], None]], jobs: int = 1) -> None:
    """Measure and save each unit; Ctrl-C (or ``max_units``) stops the run. With
    ``jobs`` > 1 the untimed units (params, FLOPs, memory) run first, that many at once
    (each in its own worker process); timed units always run one at a time, after them,
    so that nothing else of the run competes with a timing."""
    prog = _Progress(todo, progress, max_units, after_unit)
    parallel = [u for u in todo if jobs > 1 and not _timed(u)]
    alone = [u for u in todo if jobs <= 1 or _timed(u)]
    try:
        if parallel:
            _run_parallel(run, parallel, how, timeout, prog, jobs)
        for unit in alone:
            prog.check()
            prog.starting(unit)
            run.save(unit, _measure_unit(unit, run, _limit(unit, timeout), how))
            prog.saved(unit)
    except KeyboardInterrupt:
        run.summary.interrupted = True
    finally:
        prog.close()


def _limit(unit: List[Cell], timeout: Optional[float]) -> float:
    return float(timeout if timeout is not None else unit[0].timeout_s)


def _run_parallel(run: _Run, units_: List[List[Cell]], how: _Measurement,
                  timeout: Optional[float], prog: _Progress, jobs: int) -> None:
    """Untimed units, ``jobs`` at once (a thread each waits on its worker process);
    rows are saved here, one unit at a time. Ctrl-C kills the workers in flight."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
    start_server(how.measure, how.measure_group)  # from this thread, not a pool's
    live: Dict[int, Worker] = {}
    pool = ThreadPoolExecutor(max_workers=jobs)
    pending: Dict[Any, List[Cell]] = {}
    queue = list(units_)
    try:
        while queue or pending:
            while queue and len(pending) < jobs:
                prog.check()
                unit = queue.pop(0)
                prog.starting(unit)
                pending[pool.submit(_measure_unit, unit, run, _limit(unit, timeout), how,
                                    live)] = unit
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                unit = pending.pop(fut)
                run.save(unit, fut.result())
                prog.saved(unit)
    except BaseException:
        for worker in list(live.values()):
            worker.kill()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _measure_unit(unit: List[Cell], run: _Run, limit: float, how: _Measurement,
                  live: Optional[Dict[int, Worker]] = None) -> List[Row]:
    """The rows of one unit, measured in a worker process of its own (failed rows when
    the worker fails), with the unit's wall and CPU time. ``live`` holds the workers in
    flight (for the parallel runner to kill on Ctrl-C)."""
    started = time.monotonic()
    worker = Worker(how.measure, how.measure_group, how.plugins, run.run_dir / "worker.log")
    key = id(worker)
    if live is not None:
        live[key] = worker
    try:
        kind, payload, cpu = worker.run(unit, limit)
        worker.close()
    except KeyboardInterrupt:
        worker.kill()
        worker.conn.close()
        raise
    except BaseException:
        worker.close()
        raise
    finally:
        if live is not None:
            live.pop(key, None)
    return unit_rows(unit, run.run_id, kind, payload, cpu, round(time.monotonic() - started, 3))


def unit_rows(unit: List[Cell], run_id: str, kind: str, payload: Any, cpu: Optional[float],
              wall: Optional[float]) -> List[Row]:
    """The rows of a unit from its worker's answer (``Worker.run``; failed rows unless
    ``kind`` is ``"rows"``), with the unit's wall time (worker start included) and the
    worker's CPU time."""
    if kind == "rows":
        try:
            new = complete_rows(payload, unit, run_id)
        except R.ResultsError as err:
            new = _failed_cells(unit, run_id, f"invalid measurement rows: {err}")
    else:
        new = _failed_cells(unit, run_id, str(payload))
    for r in new:
        r["unit_wall_s"] = wall
        r["unit_cpu_s"] = cpu
    return new


def _tally(run: _Run) -> None:
    """The summary's counts of ok and failed cells and its failed rows."""
    s = run.summary
    selected = {c.id for c in run.cells}
    for c in run.cells:
        st = run.state.get(c.id)
        if st == "ok":
            s.ok += 1
        elif st == "failed":
            s.failed += 1
    for r in run.rows:
        if r["cell"] in selected and r["status"] == "failed":
            s.failures.append(f"{r['cell']} {r['backbone']} {r['label']} "
                              f"{r['resolution']}px b{r['batch']} {r['mode'] or ''} "
                              f"{r['metric']}: {r['error']}")


#: what a resumed run must share with its env.json (unless ``allow_env_change``)
ENV_CHECK_KEYS = ("device", "device_name", "torch", "threads")


def _env_changes(run_dir: Path, old: Mapping[str, Any], env: Mapping[str, Any],
                 allow: bool) -> Dict[str, List[Any]]:
    """``{key: [recorded, now]}`` of :data:`ENV_CHECK_KEYS` that differ; RunnerError
    unless ``allow``."""
    changed = {k: [old.get(k), env.get(k)] for k in ENV_CHECK_KEYS
               if k in old and old.get(k) != env.get(k)}
    if changed and not allow:
        text = "; ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in changed.items())
        raise RunnerError(f"{run_dir}: cannot resume in another environment ({text}): its "
                          f"rows would mix measurements; start a new --run-id, or pass "
                          f"--allow-env-change to resume anyway (recorded in env.json)")
    return changed


def _write_env(run_dir: Path, cfg: Config, run_id: str, allow_env_change: bool = False) -> None:
    """env.json of a new run; on resume, the recorded one with this session (and any
    allowed change of environment) added. ``settings`` and ``config_cells`` (the ids of
    every cell of the config) are those of the latest session."""
    from attnbench.profilers.env import collect_env
    env = collect_env(cfg.text, cfg.path, cfg.device, run_id=run_id)
    if cfg.threads is not None:
        env["threads"] = cfg.threads
    old = R.load_env(run_dir)
    if old:
        changed = _env_changes(run_dir, old, env, allow_env_change)
        sessions = list(old.get("sessions") or [])
        sessions.append({k: env[k] for k in ("created", "commit", "dirty", "hostname",
                                             "config_hash")})
        if changed:
            sessions[-1]["env_changed"] = changed
            old["env_changed"] = True
        old["sessions"] = sessions
        if old.get("config_hash") != env["config_hash"]:
            old["config_changed"] = True
        env = old
    env["settings"] = dict(cfg.settings)
    env["config_cells"] = sorted(c.id for c in expand(cfg))
    R.write_env(run_dir, env)


def _print_summary(s: RunSummary, config: str, only: Sequence[str], results_dir: Path,
                   out) -> None:
    rows_path = s.run_dir / R.ROWS_FILE
    print(f"\nattnbench run {s.run_id}: {s.ok} cells ok, {s.failed} failed, "
          f"{s.cells - s.ok - s.failed} not run "
          f"({s.done} measured now, {s.skipped} done before); "
          f"wall time {_fmt_wall(s.wall_s)}", file=out)
    print(f"rows: {rows_path}", file=out)
    for line in s.failures[:20]:
        print(f"  FAILED {line}", file=out)
    if len(s.failures) > 20:
        print(f"  ... and {len(s.failures) - 20} more failed rows", file=out)
    extra = "".join(f" --only {o}" for o in only)
    if str(results_dir) != "results":
        extra += f" --results {results_dir}"
    if s.failures:
        print(f"  (tracebacks: {s.run_dir / 'worker.log'}; to retry: attnbench run {config} "
              f"--run-id {s.run_id}{extra} --retry-failed)", file=out)
    if s.interrupted:
        print(f"interrupted: every finished cell is saved. Resume with:\n"
              f"  attnbench run {config} --run-id {s.run_id}{extra}", file=out)
