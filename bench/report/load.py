"""Reading ``results/`` for ``attnbench report``: normalised rows, split into groups.

The unit of a report is a *group*: the rows of one run on one device (the ``device``
column of the rows). Every table and every plot is drawn from one group only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from attnbench.modules.registry import AttnbenchError
from attnbench.results import ROW_SETTING_COLUMNS

from attnbench.report import tables as T

_TEXT_COLUMNS = ("mode", "options", "stages", "error", "method", "label", "module",
                 "backbone", "device", "run_id", "dataset")
_INT_COLUMNS = ("resolution", "batch", "train_resolution")


class ReportError(AttnbenchError):
    """The report cannot be written (no results, unknown run, bad option)."""


def load(results_dir) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    """Normalised rows (``None`` for nulls, ints for sizes, ``_order`` = file order) and
    ``{run_id: env}``. Raises :class:`ReportError` when there is nothing to report."""
    records, envs, _ = load_checked(results_dir)
    return records, envs


def load_checked(results_dir) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, Any]],
                                       Dict[str, List[str]]]:
    """:func:`load`, and the notes on what it did not take as it stands, by run (``""``:
    the whole results folder): runs skipped (no or empty rows.jsonl), rows whose
    ``run_id`` disagrees with their folder, duplicated cells with different values.

    A run is its folder: every row of ``results/<name>/rows.jsonl`` is a row of run
    ``<name>``, whatever its ``run_id`` column says (a copied or renamed folder is its own
    run, never merged into another)."""
    from attnbench.results import ROWS_FILE, run_dirs
    root = Path(results_dir)
    if not root.exists():
        raise ReportError(f"results folder '{root}' does not exist: run `attnbench run CONFIG` "
                          f"first, or pass --results DIR")
    if not root.is_dir():
        raise ReportError(f"'{root}' is not a folder (--results wants the results folder)")
    if not run_dirs(root):
        raise ReportError(f"no runs in '{root}': expected {root}/<run_id>/{ROWS_FILE} "
                          f"(run `attnbench run CONFIG` first)")
    rows: List[Dict[str, Any]] = []
    envs: Dict[str, Dict[str, Any]] = {}
    notes: Dict[str, List[str]] = {}
    try:
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            rows += _folder_rows(folder, envs, notes)
    except OSError as err:
        raise ReportError(f"cannot read results in '{root}': {err}") from err
    if not rows:
        raise ReportError(f"the runs in '{root}' hold no measurements (empty {ROWS_FILE})")
    records = [_normalise(rec, i) for i, rec in enumerate(_frame_records(rows))]
    return records, envs, notes


def _frame_records(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The rows with every column of any row (missing ones null), as pandas gives them."""
    import pandas as pd
    from attnbench.results import ROW_COLUMNS
    df = pd.DataFrame(rows)
    return df[list(ROW_COLUMNS) + [c for c in df.columns if c not in ROW_COLUMNS]] \
        .to_dict("records")


def _folder_rows(folder: Path, envs: Dict[str, Dict[str, Any]],
                 notes: Dict[str, List[str]]) -> List[Dict[str, Any]]:
    """The rows of run folder ``folder`` (its name as their run_id, conflicting duplicates
    as one failed row), its env in ``envs``; what was changed or skipped in ``notes``."""
    from attnbench.results import CONFIG_FILE, ENV_FILE, ROWS_FILE, load_env, numbered_rows
    path = folder / ROWS_FILE
    run = folder.name
    if not path.exists():
        if (folder / ENV_FILE).exists() or (folder / CONFIG_FILE).exists():
            notes.setdefault("", []).append(f"skipped run `{run}`: it has no {ROWS_FILE} "
                                            f"(no measurement of it finished)")
        return []
    numbered = numbered_rows(path)
    if not numbered:
        notes.setdefault("", []).append(f"skipped run `{run}`: its {ROWS_FILE} is empty")
        return []
    envs[run] = load_env(folder)
    own = notes.setdefault(run, [])
    stray = [(n, r.get("run_id")) for n, r in numbered if r.get("run_id") != run]
    if stray:
        ids = sorted({str(i) for _, i in stray})
        own.append(f"`{path.as_posix()}`, {_lines([n for n, _ in stray])}: run_id "
                   f"{', '.join(f'`{i}`' for i in ids)} disagrees with the folder `{run}` (a "
                   f"copied or renamed run?); these rows are reported as run `{run}`, the "
                   f"folder they are in")
    if envs[run].get("run_id") not in (None, run):
        own.append(f"`{(folder / ENV_FILE).as_posix()}` names run `{envs[run]['run_id']}`, "
                   f"not its folder `{run}`")
    rows = [dict(r, run_id=run) for _, r in numbered]
    rows = _without_duplicates(path, numbered, rows, own)
    rows = _in_config(path, envs[run], rows, own)
    if not own:
        del notes[run]
    return rows


#: the columns that say which measurement a row is (not what was measured)
_KEY_COLUMNS = ("cell", "backbone", "module", "label", "options", "stages", "resolution",
                "batch", "mode", "device", "metric", "method", "checkpoint", "dataset",
                "train_resolution", "batch_used") + ROW_SETTING_COLUMNS


def _without_duplicates(path: Path, numbered, rows: List[Dict[str, Any]],
                        own: List[str]) -> List[Dict[str, Any]]:
    """``rows`` with each measurement once: identical copies dropped, copies with other
    values replaced by one failed row naming the lines (and a note in ``own``)."""
    from attnbench.results import failed_rows
    seen: Dict[tuple, List[int]] = {}
    for i, row in enumerate(rows):
        key = tuple(str(row.get(c)) for c in _KEY_COLUMNS)
        seen.setdefault(key, []).append(i)
    out: List[Dict[str, Any]] = []
    for i, row in enumerate(rows):
        copies = seen[tuple(str(row.get(c)) for c in _KEY_COLUMNS)]
        if copies[0] != i:
            continue
        values = {(rows[j]["status"], rows[j]["value"], rows[j]["error"]) for j in copies}
        if len(values) == 1:
            out.append(row)
            continue
        lines = [numbered[j][0] for j in copies]
        shown = ", ".join(f"line {n}: {_shown(rows[j])}" for n, j in zip(lines, copies))
        what = (f"{row['label'] or row['module']} {row['metric']} {row['resolution']}px "
                f"batch {row['batch']} {row['mode'] or ''}").replace("  ", " ").strip()
        own.append(f"`{path.as_posix()}`, {_lines(lines)}: the same measurement ({what}) "
                   f"with different values ({shown}); shown as failed, not merged")
        base = {k: v for k, v in row.items() if k not in ("value", "status", "error")}
        out += failed_rows(base, [(row["metric"], row["unit"])],
                           f"conflicting duplicate rows in {path.name} ({shown})",
                           methods=[row["method"]])
    return out


def _in_config(path: Path, env: Dict[str, Any], rows: List[Dict[str, Any]],
               own: List[str]) -> List[Dict[str, Any]]:
    """``rows`` without those of cells no longer in the run's config (env.json
    ``config_cells``, written by the runner at each session), saying so in ``own``."""
    cells = env.get("config_cells")
    if not isinstance(cells, list):
        return rows   # a run of an older runner, or not of the matrix runner
    keep = set(cells)
    gone = [r for r in rows if r.get("cell") and r["cell"] not in keep]
    if not gone:
        return rows
    ids = sorted({r["cell"] for r in gone})
    own.append(f"`{path.as_posix()}`: {len(gone)} rows of {len(ids)} cells that are no longer "
               f"in the run's config (its latest session) are left out of the tables "
               f"(cells {', '.join(f'`{i}`' for i in ids[:8])}"
               f"{f' and {len(ids) - 8} more' if len(ids) > 8 else ''}); rerun or restore "
               f"the config to report them")
    return [r for r in rows if not (r.get("cell") and r["cell"] not in keep)]


def _shown(row: Dict[str, Any]) -> str:
    return f"{row['value']:.10g}" if row["status"] == "ok" and row["value"] is not None \
        else f"failed ({row['error']})"


def _lines(numbers: List[int]) -> str:
    """``line 3`` / ``lines 3, 9`` / ``lines 1-40`` (a run of consecutive lines)."""
    if len(numbers) == 1:
        return f"line {numbers[0]}"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"lines {numbers[0]}-{numbers[-1]}"
    head = ", ".join(map(str, numbers[:6]))
    return f"lines {head}" + (f" (+{len(numbers) - 6} more)" if len(numbers) > 6 else "")


def _normalise(rec: Dict[str, Any], order: int) -> Dict[str, Any]:
    """One row as the tables read it: text columns ``""`` for null, sizes as ints."""
    r = {k: _none(v) for k, v in rec.items()}
    for col in _TEXT_COLUMNS:
        r[col] = "" if r.get(col) is None else str(r[col])
    for col in _INT_COLUMNS:
        r[col] = None if r.get(col) is None else int(r[col])
    r["value"] = None if r.get("value") is None else float(r["value"])
    r["backbone"] = r["backbone"] or "unknown-backbone"   # e.g. an unreadable checkpoint
    r["label"] = r["label"] or r["module"] or "unknown"
    r["mode"] = r["mode"] or None
    if r.get("batch_used") is not None and int(r["batch_used"]) != r["batch"]:
        r["batch_requested"], r["batch"] = r["batch"], int(r["batch_used"])  # backed off
    r["_order"] = order
    return r


def _none(v):
    """``None`` for a null or NaN cell, else the value."""
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


@dataclass
class Group:
    """The rows of one run on one device, and what its report holds."""

    run_id: str
    device: str
    env: Dict[str, Any]
    records: List[Dict[str, Any]]
    notes: List[str] = field(default_factory=list)   # what load_checked changed or skipped
    settings: str = ""   # the settings this part of the run was measured with, when it has two
    tables: List[T.Table] = field(default_factory=list)
    plots: List[Tuple[str, List[Path]]] = field(default_factory=list)   # (title, files)
    tex: Dict[str, Path] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        device = self.device + (f"-{self.settings}" if self.settings else "")
        return Path(T.slug(self.run_id)) / T.slug(device)

    @property
    def device_name(self) -> str:
        env = self.env
        kind = self.device.split(":")[0]
        if kind == "cpu":
            return str(env.get("cpu_model") or (env.get("device_name") if
                       str(env.get("device", "cpu")).startswith("cpu") else None) or "CPU")
        if str(env.get("device", "")).split(":")[0] == kind and env.get("device_name"):
            return str(env["device_name"])
        return self.device

    @property
    def where(self) -> str:
        settings = f", measured with {self.settings}" if self.settings else ""
        return f"{self.device_name} (`{self.device}`), run `{self.run_id}`{settings}"

    @property
    def plot_subtitle(self) -> str:
        return f"{self.device_name} ({self.device}) · run {self.run_id}"


def groups(records, envs, runs: Optional[Sequence[str]] = None) -> List[Group]:
    """The rows split by (run_id, device), sorted, and each by the settings of its timed
    rows (:func:`attnbench.report.settings.split_by_settings`); only ``runs`` if given."""
    known = sorted({r["run_id"] for r in records})
    if runs:
        unknown = sorted(set(runs) - set(known))
        if unknown:
            raise ReportError(f"unknown run(s) {', '.join(unknown)}; known: {', '.join(known)}")
        records = [r for r in records if r["run_id"] in set(runs)]
    by: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in records:
        by.setdefault((r["run_id"], r["device"]), []).append(r)
    from attnbench.report.settings import split_by_settings
    return [Group(run, dev, envs.get(run, {}), part, settings=name)
            for (run, dev), rows in sorted(by.items())
            for name, part in split_by_settings(rows)]
