"""Glue between the profilers and their callers (the runner's workers, ``attnbench
profile``): one cell (or one interleaved group of latency cells) in, result rows out
(docs/results-schema.md, without ``run_id`` and ``cell``, which the runner fills in).

A cell is a :class:`attnbench.results.Cell` (or a dict of its fields): ``backbone,
module ("none" or a registry name), options, stages, resolution, batch, mode
("eval"/"train"/None), device, metrics`` (of ``params, flops, latency, memory``) and
the settings ``warmup, repeats, min_run_time, amp, channels_last, threads,
num_classes``; a setting that is ``None`` takes the Cell's default.

Rows per metric:

* ``params``: ``params`` and ``params_attention`` (count), mode ``null``.
* ``flops``: ``flops`` by fvcore, ptflops-pytorch and torch.utils.flop_counter (GMac,
  batch 1, with the
  counting rules of :mod:`attnbench.profilers.flops`, or the counters' stock rules with
  ``flop_rules=False``; ``method`` names counter and rules, the extra column
  ``uncounted`` lists ops left at zero) and ``flops_disagreement`` (%; ``DISAGREE`` in
  ``method`` over 2 %: the largest gap to fvcore), mode ``null``; a ``flops`` cell in
  mode ``train`` (where the config times a training step): ``flops_train`` (GMac per
  image, forward + backward, torch's counter).
* ``latency`` (timed alone): ``latency``, ``latency_p25``, ``latency_p75`` (ms per
  batch), ``throughput`` (img/s); in :func:`measure_group` also ``speed_ratio`` (x):
  the median of the paired per-round ratios plain / module with its 95 % interval
  (``ratio_lo``, ``ratio_hi``, ``ratio_ci`` = relative half-width), the rounds' stop
  reason and load average, and the A/A control's ratio and interval (``control_*``;
  ``distinct``: whether the module clears the control's noise floor).
* ``memory``: on the CPU ``peak_tensor_memory`` and ``rss_increase``, on CUDA
  ``cuda_max_allocated`` and ``cuda_max_reserved`` (MiB; :mod:`attnbench.profilers.memory`).

Latency and memory are measured in the cell's mode, or in both modes when it is
``None``. Every model is built afresh from seed 0 for each measurement (a training
step changes the weights), so figures do not depend on the order of metrics. A
metric that raises gives ``status="failed"`` rows with the error and the others
go on (with ``strict=True`` the error is raised instead). Extra columns: ``threads``,
``amp``, ``channels_last``, ``warmup``, ``repeats`` on timing rows.
"""
from __future__ import annotations

import math

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from attnbench.profilers import flops as _flops
from attnbench.profilers import memory as _memory
from attnbench.profilers import params as _params
from attnbench.profilers import speed as _speed
from attnbench.profilers import stats as _stats
from attnbench.results import STATIC_METRICS, Cell, canonical_json, error_text, failed_rows, ok_row

CellLike = Union[Cell, Mapping[str, Any]]
Rows = List[Dict[str, Any]]

SEED = 0
#: row metrics each cell metric produces (also the failed rows' metrics)
ROW_METRICS = {
    "params": [("params", "count"), ("params_attention", "count")],
    "flops": [("flops", "GMac"), ("flops", "GMac"), ("flops", "GMac"),
              ("flops_disagreement", "%")],
    "latency": [("latency", "ms"), ("latency_p25", "ms"), ("latency_p75", "ms"),
                ("throughput", "img/s")],
    "memory": [("peak_tensor_memory", "MiB"), ("rss_increase", "MiB")],  # CPU; see _pairs
}
RATIO_METRICS = [("speed_ratio", "x")]
#: label of the A/A control in a group: a second plain backbone, built independently
CONTROL = "control"
#: the ``method`` of the failed rows of a FLOP count
FLOPS_METHODS = ["fvcore", "ptflops-pytorch", _flops.TORCH_COUNTER, ""]
#: the settings the cells of an interleaved group share
GROUP_KEYS = ("backbone", "resolution", "batch", "mode", "device", "amp", "channels_last",
              "num_classes")


def build(cell: Cell):
    """The cell's model, built from seed 0 on the CPU."""
    from attnbench.modules.builder import build_model
    torch.manual_seed(SEED)
    return build_model(cell.backbone, None if cell.plain else cell.module,
                       stages=cell.stages, num_classes=int(cell.num_classes or 1000),
                       **dict(cell.options))


def _label(cell: Cell) -> Optional[str]:
    """The registry's label of the cell's module and options (the cell's own if none)."""
    try:
        import attnbench.modules  # noqa: F401 - built-in registrations
        from attnbench.modules.registry import get
        if cell.plain:
            return "none"
        return get(cell.module).display(cell.options)
    except Exception:  # noqa: BLE001 - the label is cosmetic; the build reports errors
        return cell.label or str(cell.module)


def _timing_extra(c: Cell, stats: Optional[_speed.SpeedStats] = None) -> Dict[str, Any]:
    return {"threads": (stats.threads if stats is not None else c.threads),
            "amp": bool(c.amp), "channels_last": bool(c.channels_last),
            "warmup": int(c.warmup or 0),
            "repeats": stats.repeats if stats is not None else c.repeats}


def _modes(c: Cell) -> List[str]:
    return [c.mode] if c.mode else list(_speed.MODES)


# --------------------------------------------------------------------------- one cell

def measure_cell(cell: CellLike, *, flop_rules: bool = True, strict: bool = False) -> Rows:
    """Rows for every metric of ``cell`` (see the module docstring)."""
    c = Cell.of(cell).resolved()
    label = _label(c)
    rows: Rows = []
    with _speed.num_threads(c.threads):
        for metric in c.metrics:
            # a flops cell in mode train counts forward + backward; otherwise mode null
            static = ["train" if metric == "flops" and c.mode == "train" else None]
            for mode in (static if metric in STATIC_METRICS else _modes(c)):
                rows.extend(_measure_metric(c, metric, mode, label, flop_rules, strict))
    return rows


def _measure_metric(c: Cell, metric: str, mode: Optional[str], label: Optional[str],
                    flop_rules: bool, strict: bool) -> Rows:
    """The rows of one metric in one mode, on a freshly built model."""
    base = c.base_row(mode, label)
    try:
        model = build(c)
        base["label"] = getattr(model, "attnbench_label", label)
        if metric == "flops":
            return _m_flops(c, model, base, flop_rules)
        return _MEASURE[metric](c, model, base, mode)
    except Exception as err:  # noqa: BLE001 - recorded as a failed row
        if strict:
            raise
        pairs, methods = _pairs(c, metric)
        return failed_rows(base, pairs, error_text(err), methods)


def _pairs(c: Cell, metric: str):
    """``(row metrics, methods)`` of the failed rows of ``metric`` of cell ``c``."""
    if metric == "flops" and c.mode == "train":
        return [("flops_train", "GMac")], [_flops.TORCH_COUNTER]
    if metric == "memory":
        return _memory.metric_names(c.device), None
    return ROW_METRICS[metric], FLOPS_METHODS if metric == "flops" else None


def _m_params(c: Cell, model, base, mode) -> Rows:
    total = _params.count_params(model)
    added = _params.attention_params(model, c.backbone, int(c.num_classes))
    return [ok_row(base, "params", total, "count", "sum of parameter numel (shared once)"),
            ok_row(base, "params_attention", added, "count",
                   f"params - plain {c.backbone} (num_classes={c.num_classes})")]


def _m_flops(c: Cell, model, base, rules: bool = True) -> Rows:
    if c.mode == "train":  # forward + backward of a training step, per image
        fc = _flops.count_torch_train(model, c.resolution, batch=2, rules=rules)
        return [ok_row(base, "flops_train", fc.gmac, "GMac", fc.method,
                       flops_batch=2, uncounted="; ".join(fc.uncounted),
                       rules=canonical_json(fc.by_rule))]
    both = _flops.flops_both(model, c.resolution, rules=rules)
    rows = []
    for fc in both.counts:
        rows.append(ok_row(base, "flops", fc.gmac, "GMac", fc.method, flops_batch=1,
                           uncounted="; ".join(fc.uncounted),
                           rules=canonical_json(fc.by_rule)))
    rows.append(ok_row(base, "flops_disagreement", both.disagreement_pct, "%", both.method))
    return rows


def _m_latency(c: Cell, model, base, mode) -> Rows:
    stats = _speed.time_model(model, mode, c.batch, c.resolution, c.device,
                              warmup=int(c.warmup or 0), repeats=int(c.repeats or 1),
                              min_run_time=float(c.min_run_time or 0.0),
                              amp=bool(c.amp), channels_last=bool(c.channels_last),
                              seed=SEED)
    return _latency_rows(base, stats, stats.method + " (timed alone)", _timing_extra(c, stats))


def _latency_rows(base, stats: _speed.SpeedStats, method: str, extra) -> Rows:
    return [ok_row(base, "latency", stats.median_ms, "ms", method, **extra),
            ok_row(base, "latency_p25", stats.p25_ms, "ms", method, **extra),
            ok_row(base, "latency_p75", stats.p75_ms, "ms", method, **extra),
            ok_row(base, "throughput", stats.throughput, "img/s", method + "; batch / median",
                   **extra)]


def _m_memory(c: Cell, model, base, mode) -> Rows:
    stats = _memory.peak_memory(model, mode, c.batch, c.resolution, c.device,
                                amp=bool(c.amp), channels_last=bool(c.channels_last),
                                seed=SEED)
    extra = {k: v for k, v in _timing_extra(c).items() if k in ("amp", "channels_last")}
    extra["threads"] = torch.get_num_threads() if stats.device.startswith("cpu") else None
    return [ok_row(base, metric, value, unit, method, start_memory_mib=stats.start_mib,
                   **extra) for metric, value, unit, method in stats.metrics()]


_MEASURE = {"params": _m_params, "latency": _m_latency, "memory": _m_memory}


# --------------------------------------------------------------------------- a group

def measure_group(cells: Sequence[CellLike], *, strict: bool = False) -> Rows:
    """Interleaved latency of several modules sharing backbone, resolution, batch,
    mode and device: latency/throughput rows plus ``speed_ratio`` (median over rounds
    of plain latency / module latency) and ``latency_ratio_p25/p75`` (its quartiles)
    for each cell. The plain backbone is timed in the same rounds even when no cell
    asks for it (its rows then are not returned). Returns one flat list of rows."""
    if not cells:
        return []
    cs = [Cell.of(c).resolved() for c in cells]
    first = cs[0]
    for c in cs[1:]:
        diff = [k for k in GROUP_KEYS if getattr(c, k) != getattr(first, k)]
        if diff:
            raise ValueError(f"measure_group: cells differ in {', '.join(diff)}; a group "
                             f"shares backbone, resolution, batch, mode and device")
    rows: Rows = []
    with _speed.num_threads(first.threads):
        for mode in _modes(first):
            rows.extend(_group_mode(cs, mode, strict))
    return rows


def _group_mode(cs: List[Cell], mode: str, strict: bool) -> Rows:
    """The rows of a group in one mode. A model that fails to build or to run fails
    only its own rows; the A/A control (a second plain backbone) is timed with them."""
    pairs = ROW_METRICS["latency"] + RATIO_METRICS
    models, bases, rows, baseline = _build_group(cs, mode, pairs, strict)
    if not models:
        return rows
    plain = cs[0].replace(module="none", options={}, stages=None)
    if baseline is None:
        models["plain"] = build(plain)
        baseline = "plain"
    models[CONTROL] = build(plain)
    try:
        result = _time_group(cs[0], models, mode, baseline)
    except Exception as err:  # noqa: BLE001 - the whole group failed
        if strict:
            raise
        for base in bases.values():
            rows.extend(failed_rows(base, pairs, error_text(err)))
        return rows
    if strict and result.errors:
        raise next(iter(result.errors.values()))
    ref = bases.get(baseline, {}).get("label") or "none"
    control = _control_extra(result)
    for key, base in bases.items():
        if key in result.errors:
            rows.extend(failed_rows(base, pairs, error_text(result.errors[key])))
        elif key not in result.stats:
            rows.extend(failed_rows(base, pairs, f"not timed: {result.stop}"))
        else:
            rows.extend(_group_rows(cs[0], base, result, key, ref, control))
    return rows


def _control_extra(result: _speed.InterleavedResult) -> Dict[str, Any]:
    """The A/A control's ratio and interval, carried by every row of the group."""
    ratio = result.ratios.get(CONTROL)
    if ratio is None:
        return {"control_ratio": None, "control_lo": None, "control_hi": None}
    iv = ratio.interval
    return {"control_ratio": iv.median, "control_lo": _finite(iv.lo), "control_hi": _finite(iv.hi)}


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def _build_group(cs: List[Cell], mode: str, pairs, strict: bool
                 ) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]], Rows, Optional[str]]:
    """``(models, base rows, failed rows, key of the plain backbone)``: each cell's
    model by its index, or failed rows for a cell whose model does not build."""
    models: Dict[str, Any] = {}
    bases: Dict[str, Dict[str, Any]] = {}
    rows: Rows = []
    baseline = None
    for i, c in enumerate(cs):
        key = str(i)
        base = c.base_row(mode, _label(c))
        try:
            model = build(c)
        except Exception as err:  # noqa: BLE001
            if strict:
                raise
            rows.extend(failed_rows(base, pairs, error_text(err)))
            continue
        base["label"] = getattr(model, "attnbench_label", base["label"])
        models[key], bases[key] = model, base
        if baseline is None and c.plain and not c.options:
            baseline = key
    return models, bases, rows, baseline


def _time_group(first: Cell, models: Dict[str, Any], mode: str, baseline: str):
    return _speed.time_interleaved(
        models, mode, first.batch, first.resolution, first.device,
        warmup=int(first.warmup or 0), rounds=int(first.repeats or 1),
        min_run_time=float(first.min_run_time or 0.0), amp=bool(first.amp),
        channels_last=bool(first.channels_last), baseline=baseline, seed=SEED,
        ci_target=first.ci_target, max_rounds=first.max_rounds, budget_s=first.budget_s)


def _group_rows(first: Cell, base, result: _speed.InterleavedResult, key: str,
                ref: str, control: Dict[str, Any]) -> Rows:
    """Latency and speed-ratio rows of model ``key`` of a timed group (``ref``: the
    label of the plain backbone it is compared with; ``control``: the A/A figures)."""
    stats = result.stats[key]
    extra = _timing_extra(first, stats)
    extra["rounds"] = len(result.orders)
    rows = _latency_rows(base, stats, result.method, extra)
    ratio = result.ratios[key]
    if ratio is None:  # the baseline itself failed: no ratio
        return rows + failed_rows(base, RATIO_METRICS, "the plain backbone failed", **extra)
    iv = ratio.interval
    rmethod = (f"paired per-round ratio {ref} latency / {base['label']} latency, median "
               f"of {iv.n} interleaved rounds with its 95 % order-statistic interval")
    lo, hi = _finite(iv.lo), _finite(iv.hi)
    distinct = None
    if control["control_ratio"] is not None and key != result.baseline:
        ctrl = result.ratios[CONTROL].interval
        distinct = _stats.distinguishable(iv, ctrl)
    rows.append(ok_row(base, "speed_ratio", iv.median, "x", rmethod, ratio_lo=lo,
                       ratio_hi=hi, ratio_ci=_finite(iv.half_width), stop=result.stop,
                       ci_target=result.ci_target, load_start=_finite(result.load[0]),
                       load_end=_finite(result.load[1]), group_wall_s=round(result.wall_s, 3),
                       distinct=distinct, **control, **extra))
    return rows
