"""``attnbench run``: the matrix runner.

A config (:mod:`attnbench.matrix.config`) expands into cells; cells run in units (one cell, or
one interleaved group of latency cells), each unit in a fresh *worker process* of its
own (multiprocessing: forked from a ``forkserver`` that has imported torch and the
profilers once, so a worker starts in a fraction of a second with clean state; ``spawn``
where there is no forkserver). An exception, an out-of-memory kill, a segfault or a
timeout in one unit is recorded as ``failed`` rows and the run goes on:

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

import argparse
import importlib
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from attnbench import results as R
from attnbench.matrix.config import (Config, ConfigError, canonical_json, expand, load_config, measure_args,
                     units)

MeasureSpec = Union[None, str, Callable[..., Any]]

DEFAULT_MEASURE = "attnbench.matrix.measure:measure_cell"
DEFAULT_MEASURE_GROUP = "attnbench.matrix.measure:measure_group"
#: the schema's metric and unit a failed cell of each config metric is recorded under
FAILED_METRIC = {"params": ("params", "count"), "flops": ("flops", "GMac"),
                 "latency": ("latency", "ms"), "memory": ("peak_memory", "MiB")}
WORKER_START_TIMEOUT = 600.0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class RunnerError(R.ResultsError):
    """A run that cannot start (bad run folder, bad options)."""


# --------------------------------------------------------------------------- worker side

def _resolve(spec: MeasureSpec) -> Optional[Callable[..., Any]]:
    if spec is None or callable(spec):
        return spec
    module, _, attr = str(spec).partition(":")
    obj = importlib.import_module(module)
    for part in (attr or "measure_cell").split("."):
        obj = getattr(obj, part)
    return obj


def _error_text(err: BaseException) -> str:
    name = type(err).__name__
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if "out of memory" in str(err).lower() and "out of memory" not in first.lower():
        first = f"out of memory: {first}"
    return f"{name}: {first}" if first else name


def _worker_main(conn, measure: MeasureSpec, measure_group: MeasureSpec,
                 plugins: Sequence[str], log_path: Optional[str],
                 environ: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None) -> None:
    """Loop of the worker process: receive a unit (list of cells), send back rows."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
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
        conn.send(("setup-error", _error_text(err)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        cells = msg
        try:
            args = [measure_args(c) for c in cells]
            print(f"--- unit {', '.join(c['cell'] for c in cells)}: "
                  f"{describe(cells[0])}{' ...' if len(cells) > 1 else ''}", flush=True)
            if len(cells) == 1 and not cells[0].get("group"):
                rows = cell_fn(args[0])
            elif group_fn is not None:
                rows = group_fn(args)
            else:
                rows = []
                for a in args:
                    rows.extend(cell_fn(a))
            conn.send(("rows", [dict(r) for r in rows], _cpu_seconds()))
        except BaseException as err:  # noqa: BLE001 - anything a cell raises is its failure
            traceback.print_exc()
            sys.stdout.flush()
            try:
                conn.send(("error", _error_text(err)))
            except Exception:  # noqa: BLE001
                return


_PRELOAD = ["modules", "attnbench.matrix.runner", "attnbench.matrix.measure", "fvcore.nn", "ptflops"]


def _context(*measures: MeasureSpec):
    """The multiprocessing context of the workers: ``forkserver`` where there is one
    (the server imports torch, the modules and the profilers once; each worker is a
    fork of that clean process: fresh, quick, no CUDA state), else ``spawn``."""
    import multiprocessing as mp
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # the profilers' imports for the default measure; an injected one brings its own
    preload = list(_PRELOAD) if all(m is None for m in measures) else ["attnbench.matrix.runner"]
    for m in measures:
        if m is None:
            continue
        name = m.__module__ if callable(m) else str(m).partition(":")[0]
        if name and name != "__main__" and name not in preload:
            preload.append(name)
    ctx.set_forkserver_preload(preload)  # takes effect when the server first starts
    return ctx


def _cpu_seconds() -> Optional[float]:
    try:
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return round(ru.ru_utime + ru.ru_stime, 3)
    except Exception:  # noqa: BLE001 - not on this platform
        return None


class Worker:
    """A spawned worker process and its pipe."""

    def __init__(self, measure: MeasureSpec, measure_group: MeasureSpec,
                 plugins: Sequence[str], log_path: Optional[Path]):
        ctx = _context(measure, measure_group)
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, name="attnbench-worker", daemon=True,
                                args=(child, measure, measure_group, list(plugins),
                                      str(log_path) if log_path else None,
                                      dict(os.environ), os.getcwd()))
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
                return "failed", f"timeout after {_fmt_s(timeout)} s"
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

    def run(self, cells: List[Dict[str, Any]], timeout: float):
        """``("rows", rows, cpu seconds of the worker)``, ``("error", text, None)`` or
        ``("failed", text, None)`` (died, timed out)."""
        try:
            self.conn.send(cells)
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


# --------------------------------------------------------------------------- rows

def describe(cell: Mapping[str, Any]) -> str:
    mode = f" {cell['mode']}" if cell.get("mode") else ""
    return (f"{cell['backbone']} {cell['label']} {cell['resolution']}px "
            f"b{cell['batch']}{mode} {cell['metrics'][0]}")


def _json_or_none(value: Any) -> Optional[str]:
    return None if value is None else canonical_json(value)


def _base_row(cell: Mapping[str, Any], run_id: str) -> Dict[str, Any]:
    return {"run_id": run_id, "cell": cell["cell"], "backbone": cell["backbone"],
            "module": cell["module"], "label": cell["label"],
            "options": canonical_json(cell["options"]),
            "stages": _json_or_none(cell["stages"]), "resolution": cell["resolution"],
            "batch": cell["batch"], "mode": cell["mode"], "device": cell["device"]}


def failed_rows(cells: Sequence[Mapping[str, Any]], run_id: str, error: str) -> List[Dict[str, Any]]:
    out = []
    for cell in cells:
        metric, unit = FAILED_METRIC.get(cell["metrics"][0], (cell["metrics"][0], None))
        row = _base_row(cell, run_id)
        row.update(metric=metric, value=None, unit=unit, method="", status="failed",
                   error=error or "failed")
        out.append(row)
    return out


def _parse(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _match_cell(row: Mapping[str, Any], cells: Sequence[Mapping[str, Any]]):
    """The cell of a group a measured row belongs to (module, options, stages)."""
    if len(cells) == 1:
        return cells[0]
    same = [c for c in cells if c["module"] == row.get("module")]
    if len(same) == 1:
        return same[0]
    opts, stages = _parse(row.get("options")), _parse(row.get("stages"))
    exact = [c for c in same if c["options"] == opts and c["stages"] == stages]
    if len(exact) == 1:
        return exact[0]
    if isinstance(opts, dict):
        loose = [c for c in same if c["stages"] == stages
                 and all(opts.get(k) == v for k, v in c["options"].items() if k in opts)]
        if len(loose) == 1:
            return loose[0]
    label = [c for c in same if c["label"] == row.get("label")]
    if len(label) == 1:
        return label[0]
    return None


def complete_rows(measured: Sequence[Mapping[str, Any]], cells: Sequence[Mapping[str, Any]],
                  run_id: str) -> List[Dict[str, Any]]:
    """Measured rows with run_id and cell set and the cell's keys filled in where the
    measurement left them out; cells without any row get a failed row."""
    out: List[Dict[str, Any]] = []
    seen = set()
    for i, raw in enumerate(measured):
        if not isinstance(raw, Mapping):
            raise R.ResultsError(f"measured row {i + 1} is not a dict: {raw!r}")
        cell = _match_cell(raw, cells)
        if cell is None:
            raise R.ResultsError(
                f"measured row {i + 1} ({raw.get('module')} {raw.get('options')} "
                f"{raw.get('metric')}) matches no cell of its group")
        row = _base_row(cell, run_id)
        row.update({k: v for k, v in raw.items() if k not in ("run_id", "cell")})
        row["label"] = cell["label"]  # the config may name a variant itself
        for key in ("options", "stages"):
            if row.get(key) is not None and not isinstance(row[key], str):
                row[key] = canonical_json(row[key])
        row.setdefault("method", "")
        row.setdefault("status", "ok")
        if row.get("error") is None:
            row["error"] = ""
        for col in R.ROW_COLUMNS:
            row.setdefault(col, None)
        R.check_row(row, f"measured row {i + 1}")
        out.append(row)
        seen.add(cell["cell"])
    missing = [c for c in cells if c["cell"] not in seen]
    out.extend(failed_rows(missing, run_id, "the measurement returned no rows for this cell"))
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


def _fmt_s(seconds: float) -> str:
    return f"{seconds:g}" if seconds < 100 else f"{seconds:.0f}"


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
               out=None) -> RunSummary:
    """Run (or resume) a config; returns a :class:`RunSummary` (``exit_code``).

    ``measure`` / ``measure_group``: callables or ``"module:function"`` strings
    (default ``attnbench.matrix.measure.measure_cell`` / ``measure_group``, imported in the worker);
    callables must be importable module-level functions (pickled by reference). With
    ``measure`` alone, grouped cells are measured one by one. ``max_units`` stops after
    that many units (as if interrupted, exit code 130); ``after_unit(n)`` is called after
    each persisted unit (tests raise KeyboardInterrupt from it).
    """
    out = out or sys.stdout
    t0 = time.monotonic()
    cfg = config if isinstance(config, Config) else load_config(config)
    cells = expand(cfg, only)
    if not cells:
        raise ConfigError(f"{cfg.where}: the config expands to no cells")
    results_dir = Path(results_dir)

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
    run_dir = results_dir / run_id
    summary = RunSummary(run_id=run_id, run_dir=run_dir, cells=len(cells))

    rows: List[Dict[str, Any]] = []
    if (run_dir / R.ROWS_FILE).exists():
        rows = R.load_rows(run_dir / R.ROWS_FILE)
    state: Dict[str, str] = {}
    for row in rows:
        if row["status"] == "failed":
            state[row["cell"]] = "failed"
        else:
            state.setdefault(row["cell"], "ok")

    def finished(cell: Mapping[str, Any]) -> bool:
        st = state.get(cell["cell"])
        return st == "ok" or (st == "failed" and not retry_failed)

    todo = [u for u in units(cells) if not all(finished(c) for c in u)]
    n_todo = sum(len(u) for u in todo)
    summary.skipped = len(cells) - n_todo

    if dry_run:
        print(f"{cfg.where}: {len(cells)} cells in {len(units(cells))} units; "
              f"{summary.skipped} already done in {run_dir}; {n_todo} to run", file=out)
        for u in todo:
            head = f"group {u[0]['group']} ({len(u)} modules): " if u[0].get("group") else ""
            for c in u:
                print(f"  {c['cell']}  {head}{describe(c)}", file=out)
                head = " " * len(head)
        summary.wall_s = time.monotonic() - t0
        return summary

    run_dir.mkdir(parents=True, exist_ok=True)
    _write_env(run_dir, cfg, run_id)
    R.atomic_write_text(run_dir / R.CONFIG_FILE, cfg.text)
    if summary.skipped:
        print(f"attnbench: resuming {run_dir}: {summary.skipped} of {len(cells)} cells "
              f"already done", file=out, flush=True)

    log_path = run_dir / "worker.log"
    worker: Optional[Worker] = None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_todo, unit="cell", dynamic_ncols=True, file=sys.stderr,
                   smoothing=0.1)
    done_units = 0
    try:
        for unit in todo:
            if max_units is not None and done_units >= max_units:
                raise KeyboardInterrupt
            if bar is not None:
                more = f" +{len(unit) - 1}" if len(unit) > 1 else ""
                bar.set_description_str(describe(unit[0]) + more)
            limit = float(timeout if timeout is not None else unit[0]["timeout_s"])
            started = time.monotonic()
            worker = Worker(measure, measure_group, plugins, log_path)
            kind, payload, cpu = worker.run(unit, limit)
            worker.close()
            worker = None
            if kind == "rows":
                try:
                    new = complete_rows(payload, unit, run_id)
                except R.ResultsError as err:
                    new = failed_rows(unit, run_id, f"invalid measurement rows: {err}")
            else:
                new = failed_rows(unit, run_id, str(payload))
            wall = round(time.monotonic() - started, 3)
            for r in new:  # the whole unit's wall time (worker start included), CPU time
                r["unit_wall_s"] = wall
                r["unit_cpu_s"] = cpu
            ids = {c["cell"] for c in unit}
            rows = [r for r in rows if r["cell"] not in ids] + new
            R.write_rows(run_dir, rows)
            for c in unit:
                state[c["cell"]] = ("failed" if any(r["status"] == "failed" for r in new
                                                    if r["cell"] == c["cell"]) else "ok")
            summary.done += len(unit)
            done_units += 1
            if bar is not None:
                bar.update(len(unit))
            if after_unit is not None:
                after_unit(done_units)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if bar is not None:
            bar.close()
        if worker is not None:
            if summary.interrupted:
                worker.kill()
                worker.conn.close()
            else:
                worker.close()

    selected = {c["cell"] for c in cells}
    for c in cells:
        st = state.get(c["cell"])
        if st == "ok":
            summary.ok += 1
        elif st == "failed":
            summary.failed += 1
    for r in rows:
        if r["cell"] in selected and r["status"] == "failed":
            summary.failures.append(f"{r['cell']} {r['backbone']} {r['label']} "
                                    f"{r['resolution']}px b{r['batch']} {r['mode'] or ''} "
                                    f"{r['metric']}: {r['error']}")
    summary.wall_s = time.monotonic() - t0
    shown = str(config) if not isinstance(config, Config) else str(cfg.path or "CONFIG")
    _print_summary(summary, shown, only, results_dir, out)
    return summary


def _write_env(run_dir: Path, cfg: Config, run_id: str) -> None:
    from attnbench.profilers.env import collect_env
    env = collect_env(cfg.text, cfg.path, cfg.device, run_id=run_id)
    if cfg.threads is not None:
        env["threads"] = cfg.threads
    old = R.load_env(run_dir)
    if old:
        sessions = list(old.get("sessions") or [])
        sessions.append({k: env[k] for k in ("created", "commit", "dirty", "hostname",
                                             "config_hash")})
        old["sessions"] = sessions
        if old.get("config_hash") != env["config_hash"]:
            old["config_changed"] = True
        env = old
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


# --------------------------------------------------------------------------- command line

def register_cli(sub, parent) -> None:
    p = sub.add_parser(
        "run", parents=[parent], help="run a benchmark matrix config",
        description="Expand a matrix config into cells and measure each in a separate "
                    "worker process; rows go to RESULTS/<run-id>/rows.jsonl. A stopped run "
                    "resumes with --resume (or the same --run-id) without redoing finished "
                    "cells. Exit status: 0 all ok, 1 some cell failed, 2 bad config, "
                    "130 interrupted.")
    p.add_argument("config", metavar="CONFIG",
                   help="a TOML config, or the name of a built-in one: default, paper, tiny")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUES",
                   help="run only the cells matching, e.g. module=se,td backbone=resnet50 "
                        "resolution=224 metric=latency mode=eval (repeatable; all must match)")
    p.add_argument("--run-id", default=None,
                   help="run id (folder name); an existing one is resumed "
                        "(default: <UTC date-time>-<config name>)")
    p.add_argument("--results", default="results", metavar="DIR",
                   help="results folder (default: results)")
    p.add_argument("--resume", action="store_true",
                   help="resume the latest run of this config (or --run-id)")
    p.add_argument("--retry-failed", action="store_true",
                   help="on resume, run failed cells again")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="per-cell (per interleaved group) timeout in seconds, overriding "
                        "the config's timing.timeout_s")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells that would run, run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--measure-module", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _loaded_plugins(args) -> List[str]:
    try:
        from attnbench.plugins.loader import loaded_plugins
        return list(loaded_plugins())
    except ImportError:  # pragma: no cover
        return list(getattr(args, "plugin", []) or [])


def run(args) -> int:
    if args.timeout is not None and args.timeout <= 0:
        raise RunnerError(f"--timeout must be positive, got {args.timeout}")
    measure = measure_group = None
    if args.measure_module:  # testing hook: a module with measure_cell / measure_group
        measure = f"{args.measure_module}:measure_cell"
        mod = importlib.import_module(args.measure_module)
        if hasattr(mod, "measure_group"):
            measure_group = f"{args.measure_module}:measure_group"
    summary = run_config(args.config, only=args.only, run_id=args.run_id,
                         results_dir=args.results, resume=args.resume,
                         retry_failed=args.retry_failed, timeout=args.timeout,
                         dry_run=args.dry_run, measure=measure, measure_group=measure_group,
                         plugins=_loaded_plugins(args),
                         progress=not args.no_progress)
    return 0 if args.dry_run else summary.exit_code
