"""The settings a timed row was measured with, so that a report never mixes them.

A row's settings are its non-null :data:`attnbench.results.ROW_SETTING_COLUMNS` (amp,
precision, channels_last, compile, threads, cudnn.benchmark, TF32, matmul precision; a
memory row's threads excepted, its method names them). Rows of one
run and device are split into one part per combination of settings
(:func:`split_by_settings`); a row that lacks some of them (a parameter count, a FLOP
count, a failed cell recorded before its settings were known) belongs to every part it
does not contradict. Runs measured with one combination are not split.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from attnbench.report.tables import MEMORY_METRICS
from attnbench.results import ROW_SETTING_COLUMNS

Settings = Tuple[Tuple[str, Any], ...]

#: how each setting is written in a part's name
_SHORT = {"amp": "amp", "precision": "precision", "channels_last": "channels_last",
          "compile": "compile",
          "threads": "threads", "cudnn_benchmark": "cudnn.benchmark",
          "tf32_cudnn": "TF32 conv", "tf32_matmul": "TF32 matmul",
          "matmul_precision": "matmul precision"}


def settings_of(row: Dict[str, Any]) -> Settings:
    """The row's recorded settings, ``((column, value), ...)``. A memory row's
    (:data:`attnbench.report.tables.MEMORY_METRICS`) leave out ``threads``: the thread
    count does not split a report by them (peak tensor memory of ResNet-50 modules
    measured 0.0-0.54 % apart between 1 and 2 threads), and their method names it."""
    free = ("threads",) if row.get("metric") in MEMORY_METRICS else ()
    return tuple((c, _plain(row[c])) for c in ROW_SETTING_COLUMNS
                 if c not in free and row.get(c) is not None)


def _plain(value: Any) -> Any:
    """An integer read back as a float (a column with nulls) as the integer it is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _fits(row: Settings, part: Dict[str, Any]) -> bool:
    return all(part.get(k, v) == v for k, v in row)


def _parts(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The distinct combinations: the fullest settings first, each partial one merged
    into the first combination it does not contradict."""
    found = sorted({settings_of(r) for r in rows}, key=lambda s: (-len(s), repr(s)))
    parts: List[Dict[str, Any]] = []
    for s in found:
        for p in parts:
            if _fits(s, p):
                p.update(s)
                break
        else:
            parts.append(dict(s))
    return parts or [{}]


def describe(part: Dict[str, Any], keys: Sequence[str]) -> str:
    """``amp on, threads 4``: the ``keys`` of one combination."""
    out = []
    for k in keys:
        v = part.get(k)
        if isinstance(v, bool):
            out.append(f"{_SHORT[k]} {'on' if v else 'off'}")
        elif v is not None:
            out.append(f"{_SHORT[k]} {v}")
    return ", ".join(out)


def split_by_settings(rows: Sequence[Dict[str, Any]]) -> List[Tuple[str, List[Dict[str, Any]]]]:
    """``[(name, rows)]``: one part per combination of settings, named by the settings in
    which the parts differ (``""`` when there is one part)."""
    parts = _parts(rows)
    if len(parts) == 1:
        return [("", list(rows))]
    differ = [k for k in ROW_SETTING_COLUMNS if len({repr(p.get(k)) for p in parts}) > 1]
    if "precision" in differ and "amp" in differ:  # amp is implied by the precision
        differ.remove("amp")
    return [(describe(p, differ) or "default settings",
             [r for r in rows if _fits(settings_of(r), p)]) for p in parts]


def settings_line(rows: Sequence[Dict[str, Any]]) -> str:
    """Every setting the rows record, when they record the backend settings (``""`` for
    rows written before those were recorded)."""
    parts = _parts(rows)
    if not any("matmul_precision" in p for p in parts):
        return ""
    keys = [k for k in ROW_SETTING_COLUMNS if any(k in p for p in parts)]
    return "; ".join(describe(p, keys) for p in parts)
