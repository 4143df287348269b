"""Glue between the runner and the profilers: one cell (or one interleaved group of
latency cells) in, result rows out (docs/results-schema.md, without ``run_id`` and
``cell``, which the runner fills in).

A cell is a dict with ``backbone, module ("none" or a registry name), options, stages,
resolution, batch, mode ("eval"/"train"/None), device, metrics`` (a list of
``params, flops, latency, memory``) and optionally ``warmup, repeats, min_run_time,
amp, channels_last, threads, num_classes`` (default 1000).

Rows per metric:

* ``params``: ``params`` and ``params_attention`` (count), mode ``null``.
* ``flops``: ``flops`` by fvcore and by ptflops-pytorch (GMac, batch 1, with the
  counting rules of :mod:`attnbench.profilers.flops`; ``method`` names counter and rules, the
  extra column ``uncounted`` lists ops left at zero) and ``flops_disagreement`` (%;
  ``DISAGREE`` in ``method`` over 2 %), mode ``null``.
* ``latency`` (timed alone): ``latency``, ``latency_p25``, ``latency_p75`` (ms per
  batch), ``throughput`` (img/s); in :func:`measure_group` also ``speed_ratio`` (x)
  and its spread over rounds ``latency_ratio_p25`` / ``latency_ratio_p75``.
* ``memory``: ``peak_memory`` (MiB).

Latency and memory are measured in the cell's mode, or in both modes when it is
``None``. Every model is built afresh from seed 0 for each measurement (a training
step changes the weights), so figures do not depend on the order of metrics. A
metric that raises gives ``status="failed"`` rows with the error and the others
go on. Extra columns: ``threads``, ``amp``, ``channels_last``, ``warmup``,
``repeats`` on timing rows.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from attnbench.profilers import flops as _flops
from attnbench.profilers import memory as _memory
from attnbench.profilers import params as _params
from attnbench.profilers import speed as _speed

SEED = 0
METRICS = ("params", "flops", "latency", "memory")
#: row metrics each cell metric produces (also the failed rows' metrics)
ROW_METRICS = {
    "params": [("params", "count"), ("params_attention", "count")],
    "flops": [("flops", "GMac"), ("flops", "GMac"), ("flops_disagreement", "%")],
    "latency": [("latency", "ms"), ("latency_p25", "ms"), ("latency_p75", "ms"),
                ("throughput", "img/s")],
    "memory": [("peak_memory", "MiB")],
}
RATIO_METRICS = [("speed_ratio", "x"), ("latency_ratio_p25", "x"), ("latency_ratio_p75", "x")]
DEFAULTS = {"warmup": 2, "repeats": 5, "min_run_time": 0.0, "amp": False,
            "channels_last": False, "threads": None, "num_classes": 1000, "options": {},
            "stages": None, "mode": None, "device": "cpu"}


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=str)


def error_text(err: BaseException) -> str:
    """``Type: first line``; out-of-memory errors say so first."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    oom = isinstance(err, getattr(torch.cuda, "OutOfMemoryError", ())) or \
        "out of memory" in str(err).lower()
    if oom and "out of memory" not in first.lower():
        first = f"out of memory: {first}"
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _cell(cell: Mapping[str, Any]) -> Dict[str, Any]:
    c = dict(DEFAULTS)
    c.update({k: v for k, v in cell.items() if v is not None or k in ("mode", "stages")})
    for key in ("backbone", "module", "resolution", "batch", "metrics"):
        if key not in c:
            raise ValueError(f"measure: the cell has no {key!r} key")
    c["options"] = dict(c.get("options") or {})
    c["metrics"] = [c["metrics"]] if isinstance(c["metrics"], str) else list(c["metrics"])
    bad = [m for m in c["metrics"] if m not in METRICS]
    if bad:
        raise ValueError(f"measure: unknown metric(s) {bad}; known: {', '.join(METRICS)}")
    for key in ("resolution", "batch"):
        if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] < 1:
            raise ValueError(f"measure: {key} must be a positive integer, got {c[key]!r}")
    if c["mode"] not in (None,) + _speed.MODES:
        raise ValueError(f"measure: mode must be eval, train or null, got {c['mode']!r}")
    return c


def build(cell: Mapping[str, Any]):
    """The cell's model, built from seed 0 on the CPU."""
    from attnbench.modules.builder import build_model
    torch.manual_seed(SEED)
    module = cell["module"]
    return build_model(cell["backbone"], None if module in (None, "", "none") else module,
                       stages=cell.get("stages"), num_classes=int(cell.get("num_classes") or 1000),
                       **dict(cell.get("options") or {}))


def _label(cell: Mapping[str, Any]) -> Optional[str]:
    try:
        import attnbench.modules  # noqa: F401 - built-in registrations
        from attnbench.modules.registry import get
        if cell["module"] in (None, "", "none"):
            return "none"
        return get(cell["module"]).display(cell.get("options") or {})
    except Exception:  # noqa: BLE001 - the label is cosmetic; the build reports errors
        return cell.get("label") or str(cell["module"])


def _base(cell: Mapping[str, Any], mode: Optional[str], label: Optional[str]) -> Dict[str, Any]:
    stages = cell.get("stages")
    return {"backbone": cell["backbone"], "module": cell["module"] or "none", "label": label,
            "options": canonical_json(cell.get("options") or {}),
            "stages": None if stages is None else canonical_json(stages),
            "resolution": cell["resolution"], "batch": cell["batch"], "mode": mode,
            "device": cell.get("device") or "cpu"}


def _row(base: Mapping[str, Any], metric: str, value: Optional[float], unit: str,
         method: str, **extra: Any) -> Dict[str, Any]:
    row = dict(base)
    ok = value is not None and math.isfinite(float(value))
    row.update(metric=metric, value=float(value) if ok else None, unit=unit, method=method,
               status="ok" if ok else "failed",
               error="" if ok else "not a finite number")
    row.update(extra)
    return row


def _failed(base: Mapping[str, Any], pairs, error: str, methods=None) -> List[Dict[str, Any]]:
    rows = []
    for i, (metric, unit) in enumerate(pairs):
        row = dict(base)
        row.update(metric=metric, value=None, unit=unit,
                   method=(methods[i] if methods else ""), status="failed", error=error)
        rows.append(row)
    return rows


def _timing_extra(c: Mapping[str, Any], stats: Optional[_speed.SpeedStats] = None):
    return {"threads": (stats.threads if stats is not None else c.get("threads")),
            "amp": bool(c.get("amp")), "channels_last": bool(c.get("channels_last")),
            "warmup": int(c.get("warmup") or 0),
            "repeats": stats.repeats if stats is not None else c.get("repeats")}


def _modes(c: Mapping[str, Any]) -> List[str]:
    return [c["mode"]] if c.get("mode") else list(_speed.MODES)


# --------------------------------------------------------------------------- one cell

def measure_cell(cell: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Rows for every metric of ``cell`` (see the module docstring)."""
    c = _cell(cell)
    label = _label(c)
    rows: List[Dict[str, Any]] = []
    with _speed.num_threads(c.get("threads")):
        for metric in c["metrics"]:
            modes = [None] if metric in ("params", "flops") else _modes(c)
            for mode in modes:
                base = _base(c, mode, label)
                try:
                    model = build(c)
                    base["label"] = getattr(model, "attnbench_label", label)
                    rows.extend(_MEASURE[metric](c, model, base, mode))
                except Exception as err:  # noqa: BLE001 - recorded as a failed row
                    methods = ["fvcore", "ptflops-pytorch", ""] if metric == "flops" else None
                    rows.extend(_failed(base, ROW_METRICS[metric], error_text(err), methods))
                finally:
                    model = None
    return rows


def _m_params(c, model, base, mode):
    total = _params.count_params(model)
    added = _params.attention_params(model, c["backbone"], int(c["num_classes"]))
    return [_row(base, "params", total, "count", "sum of parameter numel (shared once)"),
            _row(base, "params_attention", added, "count",
                 f"params - plain {c['backbone']} (num_classes={c['num_classes']})")]


def _m_flops(c, model, base, mode):
    both = _flops.flops_both(model, c["resolution"])
    rows = []
    for fc in (both.fvcore, both.ptflops):
        rows.append(_row(base, "flops", fc.gmac, "GMac", fc.method, flops_batch=1,
                         uncounted="; ".join(fc.uncounted),
                         rules=canonical_json(fc.by_rule)))
    rows.append(_row(base, "flops_disagreement", both.disagreement_pct, "%", both.method))
    return rows


def _m_latency(c, model, base, mode):
    stats = _speed.time_model(model, mode, c["batch"], c["resolution"], c["device"],
                              warmup=int(c["warmup"] or 0), repeats=int(c["repeats"] or 1),
                              min_run_time=float(c["min_run_time"] or 0.0),
                              amp=bool(c["amp"]), channels_last=bool(c["channels_last"]),
                              seed=SEED)
    return _latency_rows(base, stats, stats.method + " (timed alone)", _timing_extra(c, stats))


def _latency_rows(base, stats: _speed.SpeedStats, method: str, extra) -> List[Dict[str, Any]]:
    return [_row(base, "latency", stats.median_ms, "ms", method, **extra),
            _row(base, "latency_p25", stats.p25_ms, "ms", method, **extra),
            _row(base, "latency_p75", stats.p75_ms, "ms", method, **extra),
            _row(base, "throughput", stats.throughput, "img/s", method + "; batch / median",
                 **extra)]


def _m_memory(c, model, base, mode):
    stats = _memory.peak_memory(model, mode, c["batch"], c["resolution"], c["device"],
                                amp=bool(c["amp"]), channels_last=bool(c["channels_last"]),
                                seed=SEED)
    extra = {k: v for k, v in _timing_extra(c).items() if k in ("amp", "channels_last")}
    extra["threads"] = torch.get_num_threads() if stats.device.startswith("cpu") else None
    return [_row(base, "peak_memory", stats.peak_mib, "MiB", stats.method,
                 start_memory_mib=stats.start_mib, **extra)]


_MEASURE = {"params": _m_params, "flops": _m_flops, "latency": _m_latency,
            "memory": _m_memory}


# --------------------------------------------------------------------------- a group

def measure_group(cells: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Interleaved latency of several modules sharing backbone, resolution, batch,
    mode and device: latency/throughput rows plus ``speed_ratio`` (median over rounds
    of plain latency / module latency) and ``latency_ratio_p25/p75`` (its quartiles)
    for each cell. The plain backbone is timed in the same rounds even when no cell
    asks for it (its rows then are not returned). Returns one flat list of rows."""
    if not cells:
        return []
    cs = [_cell(c) for c in cells]
    first = cs[0]
    keys = ("backbone", "resolution", "batch", "mode", "device", "amp", "channels_last",
            "num_classes")
    for c in cs[1:]:
        diff = [k for k in keys if c.get(k) != first.get(k)]
        if diff:
            raise ValueError(f"measure_group: cells differ in {', '.join(diff)}; a group "
                             f"shares backbone, resolution, batch, mode and device")
    rows: List[Dict[str, Any]] = []
    with _speed.num_threads(first.get("threads")):
        for mode in _modes(first):
            rows.extend(_group_mode(cs, mode))
    return rows


def _group_mode(cs: List[Dict[str, Any]], mode: str) -> List[Dict[str, Any]]:
    first = cs[0]
    models: Dict[str, Any] = {}
    bases: Dict[str, Dict[str, Any]] = {}
    rows: List[Dict[str, Any]] = []
    pairs = ROW_METRICS["latency"] + RATIO_METRICS
    baseline = None
    for i, c in enumerate(cs):
        key = str(i)
        base = _base(c, mode, _label(c))
        try:
            model = build(c)
        except Exception as err:  # noqa: BLE001
            rows.extend(_failed(base, pairs, error_text(err)))
            continue
        base["label"] = getattr(model, "attnbench_label", base["label"])
        models[key], bases[key] = model, base
        if baseline is None and c["module"] in (None, "", "none") and not c["options"]:
            baseline = key
    if not models:
        return rows
    if baseline is None:
        plain = dict(first, module="none", options={}, stages=None)
        models["plain"] = build(plain)
        baseline = "plain"
    try:
        result = _speed.time_interleaved(
            models, mode, first["batch"], first["resolution"], first["device"],
            warmup=int(first["warmup"] or 0), rounds=int(first["repeats"] or 1),
            min_run_time=float(first["min_run_time"] or 0.0), amp=bool(first["amp"]),
            channels_last=bool(first["channels_last"]), baseline=baseline, seed=SEED)
    except Exception as err:  # noqa: BLE001 - the whole group failed
        for key, base in bases.items():
            rows.extend(_failed(base, pairs, error_text(err)))
        return rows
    for key, base in bases.items():
        stats = result.stats[key]
        extra = _timing_extra(first, stats)
        extra["rounds"] = len(result.orders)
        method = result.method
        rows.extend(_latency_rows(base, stats, method, extra))
        ratio = result.ratios[key]
        rmethod = (f"per round {bases.get(baseline, {}).get('label') or 'none'} latency / "
                   f"{base['label']} latency (throughput ratio), {len(ratio.per_round)} "
                   f"interleaved rounds")
        rows.append(_row(base, "speed_ratio", ratio.median, "x", rmethod + ", median",
                         ratio_p25=ratio.p25, ratio_p75=ratio.p75, **extra))
        rows.append(_row(base, "latency_ratio_p25", ratio.p25, "x", rmethod + ", 25th pct",
                         **extra))
        rows.append(_row(base, "latency_ratio_p75", ratio.p75, "x", rmethod + ", 75th pct",
                         **extra))
    return rows
