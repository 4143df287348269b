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

from attnbench.report import tables as T

_TEXT_COLUMNS = ("mode", "options", "stages", "error", "method", "label", "module",
                 "backbone", "device", "run_id", "dataset")
_INT_COLUMNS = ("resolution", "batch", "train_resolution")


class ReportError(AttnbenchError):
    """The report cannot be written (no results, unknown run, bad option)."""


def load(results_dir) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    """Normalised rows (``None`` for nulls, ints for sizes, ``_order`` = file order) and
    ``{run_id: env}``. Raises :class:`ReportError` when there is nothing to report."""
    from attnbench.results import ROWS_FILE, ResultsError, load_all, run_dirs
    root = Path(results_dir)
    if not root.exists():
        raise ReportError(f"results folder '{root}' does not exist: run `attnbench run CONFIG` "
                          f"first, or pass --results DIR")
    if not root.is_dir():
        raise ReportError(f"'{root}' is not a folder (--results wants the results folder)")
    if not run_dirs(root):
        raise ReportError(f"no runs in '{root}': expected {root}/<run_id>/{ROWS_FILE} "
                          f"(run `attnbench run CONFIG` first)")
    try:
        df, envs = load_all(root)
    except ResultsError:
        raise
    except (OSError, ValueError) as err:
        raise ReportError(f"cannot read results in '{root}': {err}") from err
    if len(df) == 0:
        raise ReportError(f"the runs in '{root}' hold no measurements (empty {ROWS_FILE})")
    records = [_normalise(rec, i) for i, rec in enumerate(df.to_dict("records"))]
    return records, envs


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
    tables: List[T.Table] = field(default_factory=list)
    plots: List[Tuple[str, List[Path]]] = field(default_factory=list)   # (title, files)
    tex: Dict[str, Path] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return Path(T.slug(self.run_id)) / T.slug(self.device)

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
        return f"{self.device_name} (`{self.device}`), run `{self.run_id}`"

    @property
    def plot_subtitle(self) -> str:
        return f"{self.device_name} ({self.device}) · run {self.run_id}"


def groups(records, envs, runs: Optional[Sequence[str]] = None) -> List[Group]:
    """The rows split by (run_id, device), sorted; only ``runs`` if given."""
    known = sorted({r["run_id"] for r in records})
    if runs:
        unknown = sorted(set(runs) - set(known))
        if unknown:
            raise ReportError(f"unknown run(s) {', '.join(unknown)}; known: {', '.join(known)}")
        records = [r for r in records if r["run_id"] in set(runs)]
    by: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in records:
        by.setdefault((r["run_id"], r["device"]), []).append(r)
    return [Group(run, dev, envs.get(run, {}), rows) for (run, dev), rows in sorted(by.items())]
