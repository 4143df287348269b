"""The results store (see ``docs/results-schema.md``).

``results/<run_id>/rows.jsonl`` holds one measurement per line, ``env.json`` the
environment of the run. Every file is written atomically (a ``*.tmp`` file in the
same folder, fsync, ``os.replace``), so a reader never sees half a file. Loaders
never drop rows: a line that does not parse, or a row missing a required column,
raises :class:`ResultsError` naming the file and the 1-based line number.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from attnbench.modules.registry import AttnbenchError

__all__ = [
    "ROW_COLUMNS",
    "ENV_KEYS",
    "STATUSES",
    "ROWS_FILE",
    "ENV_FILE",
    "CONFIG_FILE",
    "ResultsError",
    "ResultsWriteError",
    "atomic_write",
    "atomic_write_text",
    "check_writable",
    "check_row",
    "encode_row",
    "rows_text",
    "write_rows",
    "append_rows",
    "write_env",
    "load_rows",
    "numbered_rows",
    "load_env",
    "load_run",
    "run_dirs",
    "load_all",
    "finished_cells",
    "cell_states",
    "new_run_id",
]

PathLike = Union[str, "os.PathLike[str]"]

#: columns present in every row, in this order (``null`` where not applicable)
ROW_COLUMNS = (
    "run_id", "cell", "backbone", "module", "label", "options", "stages", "resolution",
    "batch", "mode", "device", "metric", "value", "unit", "method", "status", "error",
)
#: keys of ``env.json``
ENV_KEYS = (
    "run_id", "created", "device", "device_name", "cpu_model", "threads", "torch",
    "torchvision", "cuda", "cudnn", "python", "platform", "hostname", "commit", "dirty",
    "config_hash", "config_path", "attnbench_version",
)
STATUSES = ("ok", "failed")
#: (column, accepted types, in words) of the schema columns checked on write and load
COLUMN_TYPES = tuple([(c, str, "a string") for c in (
    "run_id", "cell", "backbone", "module", "label", "options", "stages", "mode", "device",
    "unit", "method", "error")] + [("resolution", int, "an integer"), ("batch", int, "an integer"),
                                   ("value", (int, float), "a number")])
ROWS_FILE = "rows.jsonl"
ENV_FILE = "env.json"
CONFIG_FILE = "config.toml"


class ResultsError(AttnbenchError):
    """A results file that cannot be read or a row that breaks the schema."""


class ResultsWriteError(ResultsError, OSError):
    """A file that cannot be written (read-only or full disk...): the old one is intact."""


# --------------------------------------------------------------------------- writing

def atomic_write(path: PathLike, write: Callable[[IO], None], binary: bool = False) -> None:
    """Write ``path`` atomically: ``write(fh)`` fills a temporary file in the same folder,
    which is flushed, fsynced and then moved over ``path`` with ``os.replace``. On any
    failure the old file (if any) is left untouched and the temporary file is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    except OSError as err:
        raise ResultsWriteError(f"{path}: cannot write ({err.strerror or err})") from err
    try:
        try:  # mkstemp makes 0600 files: keep the old file's mode, else the umask's
            mode = path.stat().st_mode & 0o777
        except OSError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        opener = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8",
                                                                newline="\n")
        with opener as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):  # a full or read-only disk: the old file is intact
            kept = " the file as it was is unchanged" if path.exists() else " nothing written"
            raise ResultsWriteError(f"{path}: cannot write ({err.strerror or err});"
                                    f"{kept}") from err
        raise
    _fsync_dir(path.parent)


def check_writable(path: PathLike, what: str, folder: bool = False) -> None:
    """:class:`ResultsError` (naming ``what``, e.g. ``--out``) unless ``path`` can be
    written -- as a file, or with ``folder`` as a folder to write files in: not the wrong
    kind of thing already, under a folder that exists or can be made, where a file can be
    created (checked by creating and removing one; ``os.access`` would not see a read-only
    file system, nor work as root). Call it before work whose result would be lost."""
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise ResultsError(f"{what} {path}: is a file, not a folder")
    if not folder and p.is_dir():
        raise ResultsError(f"{what} {path}: is a folder; give a file name (e.g. "
                           f"{p / 'model.pt'})")
    here = p if folder and p.is_dir() else p.absolute().parent
    while not here.exists():
        here = here.parent
    if not here.is_dir():
        raise ResultsError(f"{what} {path}: {here} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=str(here)):
            pass
    except OSError as err:
        raise ResultsError(f"{what} {path}: cannot write in {here} ({err.strerror or err})") \
            from None


def atomic_write_text(path: PathLike, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda fh: fh.write(text))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _clean(value: Any) -> Any:
    """JSON-safe value: non-finite floats become null (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_row(row: Mapping[str, Any], where: str = "row") -> None:
    """Raise :class:`ResultsError` if ``row`` is not a schema row."""
    if not isinstance(row, Mapping):
        raise ResultsError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [c for c in ROW_COLUMNS if c not in row]
    if missing:
        raise ResultsError(f"{where}: row is missing required column(s) {', '.join(missing)}")
    if row["status"] not in STATUSES:
        raise ResultsError(f"{where}: status must be 'ok' or 'failed', got {row['status']!r}")
    if not isinstance(row["metric"], str) or not row["metric"]:
        raise ResultsError(f"{where}: metric must be a non-empty string, got {row['metric']!r}")
    for column, types, what in COLUMN_TYPES:
        value = row[column]
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise ResultsError(f"{where}: column {column!r} must be {what} or null, got "
                               f"{value!r}")


def encode_row(row: Mapping[str, Any]) -> str:
    """One JSONL line (schema columns first, extras after, no newline)."""
    ordered = {c: _clean(row[c]) for c in ROW_COLUMNS}
    for key, value in row.items():
        if key not in ordered:
            ordered[key] = _clean(value)
    return json.dumps(ordered, ensure_ascii=False, allow_nan=False, default=str)


def rows_text(rows: Iterable[Mapping[str, Any]]) -> str:
    lines = []
    for i, row in enumerate(rows, 1):
        check_row(row, f"row {i} to write")
        lines.append(encode_row(row))
    return "".join(line + "\n" for line in lines)


def write_rows(run_dir: PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """(Re)write ``run_dir/rows.jsonl`` with ``rows``, atomically. Returns the path."""
    path = Path(run_dir) / ROWS_FILE
    atomic_write_text(path, rows_text(rows))
    return path


def append_rows(run_dir: PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Add ``rows`` to ``run_dir/rows.jsonl`` (an atomic whole-file rewrite, so an
    interruption leaves either the old or the new file, never a torn line)."""
    path = Path(run_dir) / ROWS_FILE
    new = rows_text(rows)
    old = ""
    if path.exists():
        load_rows(path)  # refuse to extend a corrupt file
        old = path.read_text(encoding="utf-8")
        if old and not old.endswith("\n"):
            old += "\n"
    atomic_write_text(path, old + new)
    return path


def write_env(run_dir: PathLike, env: Mapping[str, Any]) -> Path:
    """Write ``run_dir/env.json`` atomically."""
    path = Path(run_dir) / ENV_FILE
    text = json.dumps({k: _clean(v) for k, v in env.items()}, indent=2, sort_keys=False,
                      ensure_ascii=False, default=str)
    atomic_write_text(path, text + "\n")
    return path


# --------------------------------------------------------------------------- reading

def load_rows(path: PathLike) -> List[Dict[str, Any]]:
    """Every row of a ``rows.jsonl`` file. Blank lines are skipped; anything else
    that is not a schema row raises :class:`ResultsError` with file and line."""
    return [row for _, row in numbered_rows(path)]


def numbered_rows(path: PathLike) -> List[Tuple[int, Dict[str, Any]]]:
    """``(1-based line number, row)`` of every row of a ``rows.jsonl`` file (see
    :func:`load_rows`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path}: cannot read results file: {err}") from err
    rows: List[Tuple[int, Dict[str, Any]]] = []
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            hint = (" (truncated last line: the run was probably killed while writing; "
                    "delete this line to keep the rest)"
                    if number == len(lines) and not text.endswith("\n") else "")
            raise ResultsError(f"{where}: not valid JSON ({err.msg}){hint}") from None
        check_row(row, where)
        rows.append((number, row))
    return rows


def _frame(rows: List[Dict[str, Any]]):
    import pandas as pd
    if not rows:
        return pd.DataFrame(columns=list(ROW_COLUMNS))
    df = pd.DataFrame(rows)
    extras = [c for c in df.columns if c not in ROW_COLUMNS]
    return df[list(ROW_COLUMNS) + extras]


def load_env(run_dir: PathLike) -> Dict[str, Any]:
    """``run_dir/env.json`` as a dict (``{}`` when the run has none)."""
    path = Path(run_dir) / ENV_FILE
    if not path.exists():
        return {}
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(env, dict):
        raise ResultsError(f"{path}: expected a JSON object")
    return env


def load_run(run_dir: PathLike) -> Tuple[Any, Dict[str, Any]]:
    """``(DataFrame of the run's rows, env dict)``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ResultsError(f"{run_dir}: no such run folder")
    rows = load_rows(run_dir / ROWS_FILE)
    return _frame(rows), load_env(run_dir)


def run_dirs(results_dir: PathLike = "results") -> List[Path]:
    """Run folders (those with a ``rows.jsonl``) under ``results_dir``, sorted by name."""
    root = Path(results_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / ROWS_FILE).exists())


def load_all(results_dir: PathLike = "results") -> Tuple[Any, Dict[str, Dict[str, Any]]]:
    """``(DataFrame of all runs' rows, {run_id: env})`` for every run under ``results_dir``."""
    rows: List[Dict[str, Any]] = []
    envs: Dict[str, Dict[str, Any]] = {}
    for folder in run_dirs(results_dir):
        run_rows = load_rows(folder / ROWS_FILE)
        env = load_env(folder)
        run_id = env.get("run_id") or folder.name
        envs[run_id] = env
        rows.extend(run_rows)
    return _frame(rows), envs


def cell_states(rows: Iterable[Mapping[str, Any]]) -> Dict[str, str]:
    """``{cell id: "ok" | "failed"}`` of the cells of ``rows`` (a cell with any failed
    row counts as failed; rows without a cell id are left out)."""
    out: Dict[str, str] = {}
    for row in rows:
        cell = row.get("cell")
        if cell is None:
            continue
        if row["status"] == "failed":
            out[cell] = "failed"
        else:
            out.setdefault(cell, "ok")
    return out


def finished_cells(run_dir: PathLike, include_failed: bool = True) -> Dict[str, str]:
    """``{cell id: "ok" | "failed"}`` of the cells with rows in ``run_dir`` (a cell with
    any failed row counts as failed). ``include_failed=False`` leaves failed cells out."""
    path = Path(run_dir) / ROWS_FILE
    if not path.exists():
        return {}
    out = cell_states(load_rows(path))
    if not include_failed:
        out = {c: s for c, s in out.items() if s == "ok"}
    return out


def new_run_id(config: Optional[PathLike] = None, now=None) -> str:
    """``<UTC YYYYmmdd-HHMMSS>-<config stem>`` (``config``: a config name or a path)."""
    import datetime as _dt
    now = now or _dt.datetime.now(_dt.timezone.utc)
    text = str(config) if config else "run"
    stem = Path(text).stem if text.endswith(".toml") else Path(text).name
    return f"{now.strftime('%Y%m%d-%H%M%S')}-{stem}"
