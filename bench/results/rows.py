"""Result rows: the one place that builds them, ok and failed (docs/results-schema.md).

Every producer of rows (the matrix's measurements, the runner's failed cells, the
robustness evaluation, the demo) builds them here, so a row's columns are defined once.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

#: the test resolutions of the TDAM paper's Table 2 / Fig. 3: 168² to 448² in steps of 28
RESOLUTION_SWEEP: Tuple[int, ...] = tuple(range(168, 449, 28))

#: the identity columns every row carries before its measurement columns
BASE_COLUMNS = ("backbone", "module", "label", "options", "stages", "resolution", "batch",
                "mode", "device")


def canonical_json(value: Any) -> str:
    """Sorted, compact, ASCII JSON: the form in which options and stages are stored and hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=str)


def short_hash(value: Any, n: int = 12) -> str:
    """The first ``n`` hex digits of the SHA-256 of ``canonical_json(value)``."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:n]


def is_oom(err: BaseException) -> bool:
    """True for an out-of-memory error (``torch.OutOfMemoryError`` or its message)."""
    import torch
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    return isinstance(err, oom_types) or "out of memory" in str(err).lower()


def error_text(err: BaseException) -> str:
    """``Type: first line`` of an exception; out-of-memory errors say so first."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    if is_oom(err) and "out of memory" not in first.lower():
        first = f"out of memory: {first}"
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def base_row(*, backbone: str, module: Optional[str], label: Optional[str],
             options: Optional[Mapping[str, Any]], stages: Any, resolution: Optional[int],
             batch: Optional[int], mode: Optional[str], device: Optional[str],
             **ids: Any) -> Dict[str, Any]:
    """The identity columns of a row (plus ``ids`` such as ``run_id`` and ``cell``)."""
    row = dict(ids)
    row.update(backbone=backbone, module=module or "none", label=label,
               options=canonical_json(dict(options or {})),
               stages=None if stages is None else canonical_json(stages),
               resolution=resolution, batch=batch, mode=mode, device=device or "cpu")
    return row


def ok_row(base: Mapping[str, Any], metric: str, value: Optional[float], unit: Optional[str],
           method: str = "", **extra: Any) -> Dict[str, Any]:
    """A measured row; a value that is missing or not finite makes it a failed row."""
    row = dict(base)
    ok = value is not None and math.isfinite(float(value))
    row.update(metric=metric, value=float(value) if ok else None, unit=unit, method=method,
               status="ok" if ok else "failed", error="" if ok else "not a finite number")
    row.update(extra)
    return row


def failed_rows(base: Mapping[str, Any], pairs: Sequence[Tuple[str, Optional[str]]],
                error: str, methods: Optional[Sequence[str]] = None,
                **extra: Any) -> List[Dict[str, Any]]:
    """One failed row per ``(metric, unit)`` pair, all carrying ``error``."""
    rows = []
    for i, (metric, unit) in enumerate(pairs):
        row = dict(base)
        row.update(metric=metric, value=None, unit=unit,
                   method=(methods[i] if methods else ""), status="failed",
                   error=error or "failed")
        row.update(extra)
        rows.append(row)
    return rows
