"""Glue between the profilers and their callers (the runner's workers, ``attnbench
profile``): one cell (or one interleaved group of latency cells) in, result rows out
(docs/results-schema.md, without ``run_id`` and ``cell``, which the runner fills in).

A cell is a :class:`attnbench.results.Cell` (or a dict of its fields): ``backbone,
module ("none" or a registry name), options, stages, resolution, batch, mode
("eval"/"train"/None), device, metrics`` (of ``params, flops, latency, memory``) and
the settings ``warmup, repeats, min_run_time, amp, precision, channels_last, compile,
threads, num_classes, oom_backoff``; a setting that is ``None`` takes the Cell's default.

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
  the paired per-round ratio plain / module, over blocks of fresh instances (``blocks``,
  ``block_rounds``), with its 95 % interval
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
``amp``, ``precision``, ``channels_last``, ``compile``, ``warmup``, ``repeats``,
``batch_used`` on timing rows (memory rows: the first four and ``batch_used``).

Execution modes (timm's benchmark.py offers the same): ``precision`` is the autocast
dtype (fp32: none; bf16; fp16, with a GradScaler on CUDA); with ``compile`` the model
is wrapped by ``torch.compile`` and called once, untimed, before the warm-up: that
call's wall time is the latency rows' ``compile_s``, never part of the timed runs. A
compiled ``flops`` cell is not counted (failed rows saying why: FLOPs are counted on
the eager model).

Out of memory (``torch.OutOfMemoryError`` or a RuntimeError saying so), with the cell's
``oom_backoff`` on (the default): a latency or memory measurement at batch N > 1 is
retried at N // 2, down to batch 1 (timm's ``decay_batch_step`` backs off the same way,
in finer steps). Its rows keep ``batch`` = the requested batch and record
``batch_used``; the report shows them at the batch used. In an interleaved group only
the model that ran out of memory backs off, and it is timed apart from the group, with
a plain backbone and A/A control of its own at the smaller batch (a speed ratio always
compares equal batches); the group's other models keep their rows at the requested
batch. Rows that fail at batch 1 too say so in ``error``.
"""
from __future__ import annotations

import gc
import math

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from attnbench.profilers import flops as _flops
from attnbench.profilers import memory as _memory
from attnbench.profilers import params as _params
from attnbench.profilers import speed as _speed
from attnbench.profilers import stats as _stats
from attnbench.results import (STATIC_METRICS, Cell, canonical_json, error_text, failed_rows,
                               is_oom, ok_row)

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
GROUP_KEYS = ("backbone", "resolution", "batch", "mode", "device", "amp", "precision",
              "channels_last", "compile", "num_classes")
#: the error of the FLOP rows of a compiled cell
COMPILED_FLOPS = ("not counted: FLOPs are counted on the eager model, and this cell is "
                  "compiled (torch.compile); its FLOPs are those of the same cell with "
                  "compile = false")


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
    out = {"threads": (stats.threads if stats is not None else c.threads),
           "amp": bool(c.amp), "precision": c.precision,
           "channels_last": bool(c.channels_last), "compile": bool(c.compile),
           "warmup": int(c.warmup or 0),
           "repeats": stats.repeats if stats is not None else c.repeats}
    if stats is not None:
        out["batch_used"] = stats.batch
        if c.compile:  # the compiling first call, never part of the timed runs
            out["compile_s"] = stats.compile_s
    return out


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
    """The rows of one metric in one mode, on a freshly built model; out of memory at a
    batch over 1: the same at half the batch (:func:`_backoff_batch`)."""
    base = c.base_row(mode, label)
    if metric == "flops" and c.compile:
        pairs, methods = _pairs(c, metric)
        return failed_rows(base, pairs, COMPILED_FLOPS, methods)
    _fresh_compiler(c)
    model = None
    try:
        model = build(c)
        base["label"] = getattr(model, "attnbench_label", label)
        if metric == "flops":
            return _m_flops(c, model, base, flop_rules)
        return _MEASURE[metric](c, model, base, mode)
    except Exception as err:  # noqa: BLE001 - recorded as a failed row
        smaller = _backoff_batch(c, metric, err)
        if smaller is None:
            if strict:
                raise
            pairs, methods = _pairs(c, metric)
            return failed_rows(base, pairs, error_text(err), methods)
    del model  # out of the except block: the error's frames (and tensors) are freed
    _free_memory(c.device)
    rows = _measure_metric(c.replace(batch=smaller), metric, mode, label, flop_rules, strict)
    return _backed_off(rows, c.batch)


# --------------------------------------------------------------------------- OOM back-off

def _backoff_batch(c: Cell, metric: str, err: BaseException) -> Optional[int]:
    """The batch to retry a latency or memory measurement at after ``err``: half the
    cell's (at least 1) when ``err`` is out of memory, the batch is over 1 and the
    cell's ``oom_backoff`` is on (timm's benchmark.py backs off the same way, in finer
    steps); None otherwise."""
    if metric not in ("latency", "memory") or not c.oom_backoff or c.batch <= 1:
        return None
    return max(1, c.batch // 2) if is_oom(err) else None


def _free_memory(device: str) -> None:
    """Collect garbage (and empty CUDA's cache) before a retry at a smaller batch."""
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _backed_off(rows: Rows, requested: int) -> Rows:
    """The rows of a measurement retried at a smaller batch as rows of the ``requested``
    one: ``batch`` stays the requested batch, ``batch_used`` is the batch measured
    (measured rows) and ``method`` / ``error`` say so."""
    out = []
    for row in rows:
        row = dict(row, batch=requested)
        if row["status"] == "ok":
            used = row.get("batch_used")
            method = str(row.get("method") or "").split("; batch backed off")[0]
            row["method"] = f"{method}; batch backed off {requested} -> {used} (out of memory)"
        elif "out of memory" in str(row.get("error") or "").lower():  # at every batch
            error = str(row["error"]).split(" (out of memory down to")[0]
            row["error"] = f"{error} (out of memory down to batch {row.get('batch_used') or 1}" \
                           f", requested {requested})"
            row.pop("batch_used", None)
        out.append(row)
    return out


def _fresh_compiler(c: Cell) -> None:
    """A compiled cell (or group) starts with torch.compile's caches cleared, so models
    compiled for earlier cells do not count against its recompile limit; the limit is
    raised to 64 (a group compiles each of its models) and reaching it is an error, not
    a silent fall-back to the eager model under the compiled cell's name."""
    if not c.compile:
        return
    import torch._dynamo
    torch._dynamo.reset()
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(64, int(getattr(config, name))))
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True


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
                              seed=SEED, precision=c.precision, compile=bool(c.compile))
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
                                seed=SEED, precision=c.precision, compile=bool(c.compile))
    extra = {k: v for k, v in _timing_extra(c).items()
             if k in ("amp", "precision", "channels_last", "compile")}
    extra["batch_used"] = stats.batch
    threads = extra["threads"] = (torch.get_num_threads() if stats.device.startswith("cpu")
                                  else None)
    said = f"; {threads} thread(s)" if threads else ""
    return [ok_row(base, metric, value, unit, method + said, start_memory_mib=stats.start_mib,
                   **extra) for metric, value, unit, method in stats.metrics()]


_MEASURE = {"params": _m_params, "latency": _m_latency, "memory": _m_memory}


# --------------------------------------------------------------------------- a group

def measure_group(cells: Sequence[CellLike], *, strict: bool = False) -> Rows:
    """Interleaved latency of several modules sharing backbone, resolution, batch,
    mode and device: latency/throughput rows plus ``speed_ratio`` (the paired per-round
    ratio plain latency / module latency: the mean of its block medians with a t
    interval over blocks, or with one block the median with its order-statistic
    interval; :mod:`attnbench.profilers.stats`) for each cell. The plain backbone is
    timed in the same rounds even when no cell asks for it (its rows then are not
    returned). Returns one flat list of rows."""
    if not cells:
        return []
    cs = [Cell.of(c).resolved() for c in cells]
    first = cs[0]
    for c in cs[1:]:
        diff = [k for k in GROUP_KEYS if getattr(c, k) != getattr(first, k)]
        if diff:
            raise ValueError(f"measure_group: cells differ in {', '.join(diff)}; a group "
                             f"shares backbone, resolution, batch, mode, device, precision, "
                             f"channels_last and compile")
    rows: Rows = []
    _fresh_compiler(first)
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
            rows.extend(_failed_in_group(cs[int(key)], base, pairs, result.errors[key], mode,
                                         strict))
        elif key not in result.stats:
            rows.extend(failed_rows(base, pairs, f"not timed: {result.stop}"))
        else:
            rows.extend(_group_rows(cs[0], base, result, key, ref, control))
    return rows


def _failed_in_group(c: Cell, base, pairs, err: BaseException, mode: str,
                     strict: bool) -> Rows:
    """The rows of a group's model that failed with ``err``: failed rows, or -- out of
    memory, with ``oom_backoff`` -- the model timed apart from its group at half the
    batch (again halved while it runs out of memory, down to batch 1), in a group of
    its own with a freshly built plain backbone and A/A control at that batch, so that
    its speed ratio compares equal batches. Its rows keep the requested ``batch`` and
    record ``batch_used``; the group's other models are not timed again."""
    smaller = _backoff_batch(c, "latency", err)
    if smaller is None:
        return failed_rows(base, pairs, error_text(err))
    err.__traceback__ = None  # frees the failed step's tensors
    _free_memory(c.device)
    return _backed_off(_group_mode([c.replace(batch=smaller)], mode, strict), c.batch)


def _control_extra(result: _speed.InterleavedResult) -> Dict[str, Any]:
    """The A/A control's ratio and interval, carried by every row of the group."""
    ratio = result.ratios.get(CONTROL)
    if ratio is None:
        return {"control_ratio": None, "control_lo": None, "control_hi": None}
    iv = ratio.interval
    return {"control_ratio": iv.estimate, "control_lo": _finite(iv.lo),
            "control_hi": _finite(iv.hi)}


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
        precision=first.precision, compile=bool(first.compile),
        ci_target=first.ci_target, max_rounds=first.max_rounds, budget_s=first.budget_s,
        block_rounds=first.block_rounds)


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
    rmethod = (f"paired per-round ratio {ref} latency / {base['label']} latency, "
               + _stats.describe(iv))
    lo, hi = _finite(iv.lo), _finite(iv.hi)
    distinct = None
    if control["control_ratio"] is not None and key != result.baseline:
        ctrl = result.ratios[CONTROL].interval
        distinct = _stats.distinguishable(iv, ctrl)
    rows.append(ok_row(base, "speed_ratio", iv.estimate, "x", rmethod, ratio_lo=lo,
                       ratio_hi=hi, ratio_ci=_finite(iv.half_width), stop=result.stop,
                       ci_target=result.ci_target, load_start=_finite(result.load[0]),
                       load_end=_finite(result.load[1]), group_wall_s=round(result.wall_s, 3),
                       distinct=distinct, blocks=iv.blocks, block_rounds=first.block_rounds,
                       **control, **extra))
    return rows
