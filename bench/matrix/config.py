"""Benchmark matrix configs (TOML) and their expansion into cells.

A config names backbones x modules and one or more *sweeps*; each sweep says which
metrics to take at which resolutions, batch sizes and modes. Top-level
``resolutions`` / ``batches`` / ``modes`` / ``metrics`` are the defaults of every
sweep; without ``[[sweeps]]`` the top level is the one sweep::

    name = "example"                  # run-id stem (default: the file's stem)
    device = "cpu"                    # "cpu", "cuda", "cuda:1"
    backbones = ["resnet50"]
    num_classes = 1000
    threads = 2                       # torch threads in each cell (default: torch's)
    precision = "fp32"                # "fp32", "bf16", "fp16" (CUDA only) or a list of them:
                                      # the autocast dtype of timing/memory (an axis)
    # amp = true                      # the older switch: precision "fp16" on CUDA, "bf16" on CPU
    channels_last = false             # or [false, true] (an axis)
    compile = false                   # torch.compile the model; or [false, true] (an axis)
    baseline = true                   # add the plain backbone ("none") if not listed
    jobs = 1                          # untimed units (params, FLOPs, memory) at once; timed
                                      # ones always run alone, after them

    [timing]
    warmup = 2
    repeats = 5
    min_run_time = 0.0                # seconds of timed runs at least
    interleave = true                 # time the modules of a comparison in rotated rounds
    timeout_s = 600                   # per cell (per group when interleaved)
    oom_backoff = true                # out of memory: retry at half the batch, down to 1

    [settings]                        # applied in each worker before latency/memory cells
    cudnn_benchmark = true            # torch.backends.cudnn.benchmark (autotuned kernels)
    tf32_cudnn = false                # TF32 convolutions (torch.backends.cudnn.allow_tf32)
    matmul_precision = "highest"      # torch.set_float32_matmul_precision: "highest" = fp32,
                                      # "high" = TF32 matmuls (CPU: also oneDNN), "medium"
    # tf32_matmul = false             # the same as matmul_precision "highest" (true: "high")

    [[modules]]
    name = "se"
    [[modules]]
    name = "td"
    options = {variant = "top", steps = 2, m = 3}
    stages = "paper-r50-m3"           # a preset, "all", a layer list or {3 = "all", 4 = 2}
    backbones = ["resnet50"]          # only on these (default: every backbone)
    label = "TDtop(T=2,m=3,paper)"    # the label in results (default: the registry's)

    [[sweeps]]                        # FLOPs and latency over the whole sweep
    metrics = ["flops", "latency"]
    resolutions = {start = 168, stop = 448, step = 28}   # stop included
    batches = [1]
    modes = ["eval"]
    [[sweeps]]
    metrics = ["params", "latency", "memory"]
    resolutions = [224]
    batches = [8]
    modes = ["eval", "train"]
    repeats = 10                      # timing keys may be overridden per sweep
    threads = 1                       # so may threads (e.g. untimed sweeps run jobs at once)
    precision = ["fp32", "bf16"]      # so may precision, channels_last and compile
    channels_last = [false, true]

Every cell (a :class:`attnbench.results.Cell`) measures one metric of one model at one
resolution, batch and mode (``params`` / ``flops`` cells: batch 1, mode null). Its id
is a short sha256 of its canonical JSON keys, so the same cell in two runs (or two
sweeps) has the same id. With ``interleave`` on, the latency cells of all modules
sharing backbone, resolution, batch, mode, precision, channels_last, compile and timing
settings form one *group* (``cell.group``), timed together. Where a config counts FLOPs
and also times (or measures the memory of) a training step, each such model and resolution gets a
``flops`` cell in mode ``train`` too: forward + backward per image. The ``[settings]``
of latency and memory cells join their ids only when they differ from the defaults.

``precision``, ``channels_last`` and ``compile`` (top level: the default of every sweep)
are axes of the latency and memory cells, multiplied like resolutions and batches;
``params`` and ``flops`` cells take the first precision and channels_last and are
never compiled (FLOPs are counted on the eager model). A precision and compile join a
cell's id only where they are not the default (``amp = true`` keeps its ids: it is the
device's autocast dtype), so older cells keep theirs. ``fp16`` on a CPU device is
refused (autocast on the CPU is bfloat16).
"""
from __future__ import annotations

import functools
import importlib.resources
import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from attnbench.modules.registry import AttnbenchError
from attnbench.results import (METRICS, MODES, PRECISIONS, STATIC_METRICS, Cell,  # noqa: F401
                               SETTING_DEFAULTS, amp_precision, canonical_json,
                               canonical_options, cell_id, short_hash)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: the built-in configs: ``configs/`` in the checkout, installed as ``attnbench.configs``
CONFIG_DIR = Path(str(importlib.resources.files("attnbench.configs")))

TOP_KEYS = {"name", "description", "device", "backbones", "num_classes", "threads", "amp",
            "precision", "channels_last", "compile", "baseline", "timing", "modules", "sweeps",
            "resolutions", "batches", "modes", "metrics", "settings", "jobs"}
SETTINGS_KEYS = {"cudnn_benchmark", "tf32_cudnn", "tf32_matmul", "matmul_precision"}
MATMUL_PRECISIONS = ("highest", "high", "medium")
TIMING_KEYS = {"warmup", "repeats", "min_run_time", "interleave", "timeout_s", "ci_target",
               "max_rounds", "budget_s", "oom_backoff", "block_rounds"}
MODULE_KEYS = {"name", "options", "stages", "backbones", "label"}
#: the execution-mode axes (top level: every sweep's default)
AXIS_KEYS = ("precision", "channels_last", "compile")
SWEEP_KEYS = {"metrics", "resolutions", "batches", "modes", "backbones", "threads"} | TIMING_KEYS \
    | set(AXIS_KEYS)
TIMING_DEFAULTS = {"warmup": 2, "repeats": 5, "min_run_time": 0.0, "interleave": True,
                   "timeout_s": 600.0}

#: keys the ``--only`` filters accept
FILTER_KEYS = ("module", "backbone", "resolution", "batch", "mode", "metric", "label",
               "precision", "channels_last", "compile")


@functools.lru_cache(maxsize=None)
def _block_counts(backbone: str) -> Tuple[int, ...]:
    """Blocks per stage of ``backbone`` (built once per process), to check stage
    selections without building an attention model."""
    from attnbench.modules.builder import block_counts
    return tuple(block_counts(backbone))


class ConfigError(AttnbenchError, ValueError):
    """A config that cannot be read or does not validate."""


@dataclass
class ModuleEntry:
    name: str                      # registry name or "none"
    options: Dict[str, Any]        # full options (defaults filled in), canonical
    stages: Any                    # as given (None: the module's default)
    label: str
    backbones: Optional[List[str]] = None   # only on these backbones (None: all)


@dataclass
class Sweep:
    metrics: List[str]
    resolutions: List[int]
    batches: List[int]
    modes: List[str]
    backbones: List[str]
    timing: Dict[str, Any]
    precisions: List[str] = field(default_factory=lambda: ["fp32"])
    channels_last: List[bool] = field(default_factory=lambda: [False])
    compile: List[bool] = field(default_factory=lambda: [False])
    threads: Optional[int] = None   # torch threads of its cells: the sweep's, else the config's


@dataclass
class Config:
    path: Optional[Path]
    text: str
    name: str
    device: str
    backbones: List[str]
    num_classes: int
    threads: Optional[int]
    amp: bool                       # as given (its precision is in the sweeps)
    channels_last: bool             # the first top-level value (the sweeps hold the axis)
    timing: Dict[str, Any]
    modules: List[ModuleEntry]
    sweeps: List[Sweep]
    raw: Dict[str, Any] = field(default_factory=dict)
    settings: Dict[str, Any] = field(default_factory=lambda: dict(SETTING_DEFAULTS))
    jobs: int = 1                   # untimed units measured at once (timed ones alone)

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "<config>"


# --------------------------------------------------------------------------- loading

def resolve_path(path: Any) -> Path:
    """``"default"`` / ``"paper"`` / ``"tiny"`` (or any name of configs/*.toml) ->
    the file in configs/; anything else is a path."""
    p = Path(str(path))
    if not p.suffix and not p.exists() and (CONFIG_DIR / f"{p.name}.toml").exists() \
            and p.parent == Path("."):
        return CONFIG_DIR / f"{p.name}.toml"
    return p


def load_config(path: Any) -> Config:
    """Read and validate a config file (or a built-in name such as ``default``)."""
    p = resolve_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        known = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.toml")))
        raise ConfigError(f"{p}: no such config file (built-in configs: {known})") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot read config: {err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not a TOML config: not UTF-8 text (byte {err.start} is "
                          f"{err.object[err.start:err.start + 1]!r}); is it a binary file?") \
            from None
    return parse_config(text, p)


def parse_config(text: str, path: Optional[Path] = None) -> Config:
    where = str(path) if path else "<config>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where}: not valid TOML: {err}") from None
    return _validate(data, text, path)


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, msg: str) -> "ConfigError":
        return ConfigError(f"{self.where}: {key}: {msg}")

    def keys(self, table: Mapping[str, Any], allowed: Iterable[str], key: str) -> None:
        allowed = set(allowed)
        for k in table:
            if k not in allowed:
                from attnbench.modules.registry import closest
                near = closest(k, allowed)
                hint = f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""
                where = f"{key}.{k}" if key else k
                raise self.fail(where, f"unknown key{hint}; known keys: "
                                       f"{', '.join(sorted(allowed))}")

    def int_(self, value: Any, key: str, minimum: int = 0) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def num(self, value: Any, key: str, minimum: float = 0.0, strict: bool = False) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum \
                or (strict and value == minimum):
            op = ">" if strict else ">="
            raise self.fail(key, f"must be a number {op} {minimum}, got {value!r}")
        return float(value)

    def bool_(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    def str_list(self, value: Any, key: str, choices: Optional[Sequence[str]] = None) -> List[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or \
                not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"must be a non-empty list of strings, got {value!r}")
        if choices is not None:
            for v in value:
                if v not in choices:
                    raise self.fail(key, f"{v!r} is not one of {', '.join(choices)}")
        return _unique(value)

    def bool_list(self, value: Any, key: str) -> List[bool]:
        if isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value or \
                not all(isinstance(v, bool) for v in value):
            raise self.fail(key, f"must be true, false or a non-empty list of them, "
                                 f"got {value!r}")
        return _unique(value)

    def precisions(self, value: Any, key: str, device: str) -> List[str]:
        """Precisions of ``PRECISIONS``; fp16 only on a CUDA device."""
        out = self.str_list(value, key, PRECISIONS)
        if "fp16" in out and not device.startswith("cuda"):
            raise self.fail(key, f"'fp16' needs a CUDA device (device = {device!r}); "
                                 f"autocast on the CPU is bfloat16: use \"bf16\"")
        return out

    def int_list(self, value: Any, key: str, minimum: int = 1) -> List[int]:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"must be a non-empty list of integers, got {value!r}")
        return _unique([self.int_(v, key, minimum) for v in value])

    def resolutions(self, value: Any, key: str) -> List[int]:
        if isinstance(value, dict):
            self.keys(value, {"start", "stop", "step"}, key)
            for k in ("start", "stop"):
                if k not in value:
                    raise self.fail(key, f"a range needs 'start' and 'stop' (and 'step'), "
                                         f"got {value!r}")
            start = self.int_(value["start"], f"{key}.start", 8)
            stop = self.int_(value["stop"], f"{key}.stop", 8)
            step = self.int_(value.get("step", 32), f"{key}.step", 1)
            if stop < start:
                raise self.fail(key, f"stop ({stop}) is below start ({start})")
            return list(range(start, stop + 1, step))
        return self.int_list(value, key, 8)


def _unique(values: List[Any]) -> List[Any]:
    out: List[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _validate(data: Dict[str, Any], text: str, path: Optional[Path]) -> Config:
    """The :class:`Config` of parsed TOML ``data``; :class:`ConfigError` naming the key."""
    import attnbench.modules  # noqa: F401  (registers the built-in modules)
    ck = _Checker(str(path) if path else "<config>")
    ck.keys(data, TOP_KEYS, "")
    top = _top_level(ck, data, path)
    timing_raw = data.get("timing", {})
    if not isinstance(timing_raw, dict):
        raise ck.fail("timing", "must be a table")
    timing = _timing(ck, timing_raw, dict(TIMING_DEFAULTS), "timing")
    entries = _module_entries(ck, data.get("modules"), top.backbones, top.baseline)
    sweeps = _sweeps(ck, data, top.backbones, timing, top.device)
    return Config(path=path, text=text, name=top.name, device=top.device,
                  backbones=top.backbones, num_classes=top.num_classes, threads=top.threads,
                  amp=top.amp, channels_last=top.channels_last, timing=timing,
                  modules=entries, sweeps=sweeps, raw=data,
                  settings=_settings(ck, data.get("settings", {})),
                  jobs=ck.int_(data.get("jobs", 1), "jobs", 1))


def _top_level(ck: _Checker, data: Mapping[str, Any], path: Optional[Path]) -> SimpleNamespace:
    """The top-level settings: name, device, backbones, num_classes, threads, amp,
    channels_last, baseline."""
    name = data.get("name", path.stem if path else "config")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ck.fail("name", f"must be letters, digits, '.', '_' or '-', got {name!r}")
    if "description" in data and not isinstance(data["description"], str):
        raise ck.fail("description", "must be a string")
    device = data.get("device", "cpu")
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise ck.fail("device", f"must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "mps":
        from attnbench.profilers.env import DeviceError, check_device
        try:
            check_device(device)
        except DeviceError as err:
            raise ck.fail("device", str(err)) from None
    backbones = _backbones(ck, data.get("backbones", ["resnet50"]))
    num_classes = ck.int_(data.get("num_classes", 1000), "num_classes", 1)
    threads = data.get("threads")
    if threads is not None:
        threads = ck.int_(threads, "threads", 1)
    return SimpleNamespace(
        name=name, device=device, backbones=backbones, num_classes=num_classes,
        threads=threads, amp=ck.bool_(data.get("amp", False), "amp"),
        channels_last=ck.bool_list(data.get("channels_last", False), "channels_last")[0],
        baseline=ck.bool_(data.get("baseline", True), "baseline"))


def _top_axes(ck: _Checker, data: Mapping[str, Any], device: str) -> Dict[str, Any]:
    """The top-level ``precision`` / ``channels_last`` / ``compile`` (the sweeps'
    defaults); ``amp = true`` is precision ``amp_precision(device)`` (fp16 on CUDA,
    bf16 on the CPU) and must agree with a ``precision`` given beside it."""
    amp = ck.bool_(data.get("amp", False), "amp")
    precision = [amp_precision(device)] if amp else ["fp32"]
    if "precision" in data:
        given = ck.precisions(data["precision"], "precision", device)
        if "amp" in data and given != precision:
            raise ck.fail("amp", f"contradicts precision = {data['precision']!r} (amp = "
                                 f"{str(amp).lower()} is precision {precision[0]!r} on "
                                 f"{device}); give one of the two")
        precision = given
    return {"precision": precision, "channels_last": data.get("channels_last", False),
            "compile": data.get("compile", False)}


def _backbones(ck: _Checker, value: Any) -> List[str]:
    """The config's backbones, lower-cased; each must be a known one."""
    from attnbench.modules.builder import BACKBONES
    backbones = ck.str_list(value, "backbones")
    for b in backbones:
        if b.lower() not in BACKBONES:
            from attnbench.modules.registry import unknown_name_message
            raise ck.fail("backbones", unknown_name_message("backbone", b, BACKBONES))
    return [b.lower() for b in backbones]


def _module_entries(ck: _Checker, mods_raw: Any, backbones: List[str],
                    baseline: bool) -> List[ModuleEntry]:
    """The ``[[modules]]`` entries, with the plain backbone first when ``baseline``."""
    if mods_raw is None:
        raise ck.fail("modules", "missing: list the modules as [[modules]] tables "
                                 "(name = \"se\", optional options and stages)")
    if not isinstance(mods_raw, list) or not all(isinstance(m, dict) for m in mods_raw):
        raise ck.fail("modules", "must be an array of tables ([[modules]] name = ...)")
    entries: List[ModuleEntry] = []
    for i, m in enumerate(mods_raw):
        entry = _module_entry(ck, m, f"modules[{i}]", backbones)
        _check_distinct(ck, entries, entry, f"modules[{i}]", backbones)
        entries.append(entry)
    if baseline and not any(e.name == "none" for e in entries):
        entries.insert(0, ModuleEntry("none", {}, None, "none"))
    if not entries:
        raise ck.fail("modules", "is empty")
    return entries


def _check_distinct(ck: _Checker, entries: List[ModuleEntry], entry: ModuleEntry, key: str,
                    backbones: List[str]) -> None:
    """``entry`` is neither listed before nor labelled like another on a shared backbone."""
    if any(e.name == entry.name and e.options == entry.options and e.stages == entry.stages
           and e.backbones == entry.backbones for e in entries):
        raise ck.fail(key, f"{entry.label} is listed twice")
    for e in entries:
        shared = [b for b in backbones if (e.backbones is None or b in e.backbones)
                  and (entry.backbones is None or b in entry.backbones)]
        if e.label == entry.label and shared:
            raise ck.fail(key, f"two modules are labelled {entry.label!r} on "
                               f"{shared[0]} (they differ in stages); give "
                               f"one a label = \"...\"")


def _sweeps(ck: _Checker, data: Mapping[str, Any], backbones: List[str],
            timing: Dict[str, Any], device: str = "cpu") -> List[Sweep]:
    """The ``[[sweeps]]`` (or the top level as the one sweep), top-level keys as defaults."""
    defaults = {
        "metrics": data.get("metrics", list(METRICS)),
        "resolutions": data.get("resolutions", [224]),
        "batches": data.get("batches", [1]),
        "modes": data.get("modes", ["eval"]),
        "backbones": backbones,
        "threads": data.get("threads"),
        **_top_axes(ck, data, device),
    }
    sweeps_raw = data.get("sweeps")
    if sweeps_raw is None:
        return [_sweep(ck, {}, "", defaults, backbones, timing, device)]
    if not isinstance(sweeps_raw, list) or not sweeps_raw or \
            not all(isinstance(s, dict) for s in sweeps_raw):
        raise ck.fail("sweeps", "must be a non-empty array of tables ([[sweeps]])")
    return [_sweep(ck, s, f"sweeps[{i}]", defaults, backbones, timing, device)
            for i, s in enumerate(sweeps_raw)]


def _sweep(ck: _Checker, s: Mapping[str, Any], key: str, defaults: Mapping[str, Any],
           backbones: List[str], timing: Dict[str, Any], device: str = "cpu") -> Sweep:
    """One sweep table ``s`` (at ``key``; ``""`` for the top level) over ``defaults``."""
    ck.keys(s, SWEEP_KEYS, key)

    def k(name: str) -> str:  # the key an error names: the sweep's own, else the top level's
        return f"{key}.{name}" if key and name in s else name
    merged = dict(defaults, **s)
    sweep_backbones = ck.str_list(merged["backbones"], k("backbones"))
    for b in sweep_backbones:
        if b.lower() not in backbones:
            raise ck.fail(k("backbones"), f"{b!r} is not one of the config's backbones "
                                          f"({', '.join(backbones)})")
    return Sweep(
        metrics=ck.str_list(merged["metrics"], k("metrics"), METRICS),
        resolutions=ck.resolutions(merged["resolutions"], k("resolutions")),
        batches=ck.int_list(merged["batches"], k("batches"), 1),
        modes=ck.str_list(merged["modes"], k("modes"), MODES),
        backbones=[b.lower() for b in sweep_backbones],
        timing=_timing(ck, {t: s[t] for t in TIMING_KEYS if t in s}, timing, key),
        precisions=ck.precisions(merged["precision"], k("precision"), device),
        channels_last=ck.bool_list(merged["channels_last"], k("channels_last")),
        compile=ck.bool_list(merged["compile"], k("compile")),
        threads=(None if merged["threads"] is None
                 else ck.int_(merged["threads"], k("threads"), 1)),
    )


def _timing(ck: _Checker, raw: Mapping[str, Any], base: Dict[str, Any], key: str) -> Dict[str, Any]:
    ck.keys(raw, TIMING_KEYS, key)
    out = dict(base)

    def k(name: str) -> str:
        return f"{key}.{name}" if key else name
    if "warmup" in raw:
        out["warmup"] = ck.int_(raw["warmup"], k("warmup"), 0)
    if "repeats" in raw:
        out["repeats"] = ck.int_(raw["repeats"], k("repeats"), 1)
    if "min_run_time" in raw:
        out["min_run_time"] = ck.num(raw["min_run_time"], k("min_run_time"), 0.0)
    if "interleave" in raw:
        out["interleave"] = ck.bool_(raw["interleave"], k("interleave"))
    if "timeout_s" in raw:
        out["timeout_s"] = ck.num(raw["timeout_s"], k("timeout_s"), 0.0, strict=True)
    if "oom_backoff" in raw:
        out["oom_backoff"] = ck.bool_(raw["oom_backoff"], k("oom_backoff"))
    _rounds_keys(ck, raw, out, k)
    return out


def _rounds_keys(ck: _Checker, raw: Mapping[str, Any], out: Dict[str, Any], k) -> None:
    """The adaptive-rounds keys: ``ci_target`` (relative half-width of the ratio's 95 %
    interval, e.g. 0.015), ``max_rounds``, ``budget_s`` (seconds per group) and
    ``block_rounds`` (rounds per block; every model is re-instantiated between blocks
    and the interval is taken over blocks, see attnbench.profilers.stats)."""
    if "ci_target" in raw:
        out["ci_target"] = ck.num(raw["ci_target"], k("ci_target"), 0.0, strict=True)
        if out["ci_target"] >= 1:
            raise ck.fail(k("ci_target"), f"is a fraction (0.015 = +-1.5 %), got "
                                          f"{raw['ci_target']!r}")
    if "max_rounds" in raw:
        out["max_rounds"] = ck.int_(raw["max_rounds"], k("max_rounds"), 1)
    if "budget_s" in raw:
        out["budget_s"] = ck.num(raw["budget_s"], k("budget_s"), 0.0, strict=True)
    if "block_rounds" in raw:
        out["block_rounds"] = ck.int_(raw["block_rounds"], k("block_rounds"), 1)


def _settings(ck: _Checker, raw: Any) -> Dict[str, Any]:
    """The ``[settings]`` table over :data:`SETTING_DEFAULTS`; ``tf32_matmul`` is another
    name for ``matmul_precision`` "highest" (false) or "high" (true)."""
    if not isinstance(raw, dict):
        raise ck.fail("settings", "must be a table")
    ck.keys(raw, SETTINGS_KEYS, "settings")
    out = dict(SETTING_DEFAULTS)
    for key in ("cudnn_benchmark", "tf32_cudnn"):
        if key in raw:
            out[key] = ck.bool_(raw[key], f"settings.{key}")
    if "matmul_precision" in raw:
        if raw["matmul_precision"] not in MATMUL_PRECISIONS:
            raise ck.fail("settings.matmul_precision", f"must be one of "
                          f"{', '.join(MATMUL_PRECISIONS)}, got {raw['matmul_precision']!r}")
        out["matmul_precision"] = raw["matmul_precision"]
    if "tf32_matmul" in raw:
        tf32 = ck.bool_(raw["tf32_matmul"], "settings.tf32_matmul")
        if "matmul_precision" in raw and tf32 != (out["matmul_precision"] != "highest"):
            raise ck.fail("settings.tf32_matmul", f"contradicts matmul_precision = "
                          f"{out['matmul_precision']!r} (TF32 matmuls are precision 'high' "
                          f"or 'medium'); give one of the two")
        if "matmul_precision" not in raw:
            out["matmul_precision"] = "high" if tf32 else "highest"
    return out


def _module_entry(ck: _Checker, m: Mapping[str, Any], key: str,
                  backbones: List[str]) -> ModuleEntry:
    """One ``[[modules]]`` table: a known name, valid options and stages, its label."""
    from attnbench.modules.registry import REGISTRY
    ck.keys(m, MODULE_KEYS, key)
    name = _module_name(ck, m, key)
    options = m.get("options", {})
    if not isinstance(options, dict):
        raise ck.fail(f"{key}.options", f"must be a table, got {options!r}")
    only_on = None
    if "backbones" in m:
        only_on = [b.lower() for b in ck.str_list(m["backbones"], f"{key}.backbones")]
        for b in only_on:
            if b not in backbones:
                raise ck.fail(f"{key}.backbones", f"{b!r} is not one of the config's "
                                                  f"backbones ({', '.join(backbones)})")
        backbones = only_on
    try:
        if name != "none":
            REGISTRY.get(name)
    except AttnbenchError as err:
        raise ck.fail(f"{key}.name", str(err)) from None
    try:
        full, label = canonical_options(name, options)
    except AttnbenchError as err:
        raise ck.fail(f"{key}.options", str(err)) from None
    stages = m.get("stages")
    if stages is not None:
        _check_stages(ck, f"{key}.stages", name, stages, backbones)
    for b in backbones if name != "none" else ():
        error = model_error(b, name, full, stages)
        if error:
            raise ck.fail(f"{key}.options", f"{error} (backbone {b})")
    if "label" in m:
        if not isinstance(m["label"], str) or not m["label"].strip():
            raise ck.fail(f"{key}.label", f"must be a non-empty string, got {m['label']!r}")
        label = m["label"].strip()
    return ModuleEntry(name=name, options=full, stages=stages, label=label, backbones=only_on)


def _module_name(ck: _Checker, m: Mapping[str, Any], key: str) -> str:
    """The entry's module name, lower-cased."""
    if "name" not in m:
        raise ck.fail(key, "missing 'name' (a registered module or \"none\")")
    name = m["name"]
    if not isinstance(name, str):
        raise ck.fail(f"{key}.name", f"must be a string, got {name!r}")
    return name.lower()


def _check_stages(ck: _Checker, key: str, name: str, stages: Any,
                  backbones: List[str]) -> None:
    """``stages`` of module ``name`` resolve on every one of ``backbones``."""
    from attnbench.modules.builder import resolve_stages
    from attnbench.modules.registry import REGISTRY
    if name == "none":
        raise ck.fail(key, "the plain backbone takes no stages")
    spec = REGISTRY.get(name)
    if spec.kind in ("network", "head"):
        raise ck.fail(key, f"a {spec.kind}-kind module ({name}) takes no stages")
    for b in backbones:
        counts = _block_counts(b)
        fake = SimpleNamespace(**{f"layer{i + 1}": range(n) for i, n in enumerate(counts)})
        try:
            resolve_stages(fake, stages, spec, b)
        except AttnbenchError as err:
            raise ck.fail(key, f"{err} (backbone {b})") from None
        except Exception as err:  # noqa: BLE001 - a preset failing on its own
            raise ck.fail(key, f"{type(err).__name__}: {err} (backbone {b})") from None


_BUILT: Dict[str, Tuple[Any, Optional[str]]] = {}  # model key -> (its spec, why it fails)


def model_error(backbone: str, name: str, options: Mapping[str, Any],
                stages: Any) -> Optional[str]:
    """Why ``build_model(backbone, name, stages, **options)`` fails, or None: the module
    factory's own checks of its options (td ``m=9``, se ``reduction=0`` or larger than a
    layer's channels...), made once per model at config load instead of in every cell.
    Built on the meta device (no memory, no initialisation), on the CPU if that fails."""
    import torch

    from attnbench.modules.builder import build_model
    from attnbench.modules.registry import REGISTRY
    spec = REGISTRY.get(name)
    key = canonical_json([backbone, name, dict(options), stages])
    if key in _BUILT and _BUILT[key][0] is spec:
        return _BUILT[key][1]
    error = None
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                build_model(backbone, name, stages, **dict(options))
            error = None
            break
        except AttnbenchError as err:
            error = str(err)
            break
        except Exception as err:  # noqa: BLE001 - a factory that fails for these options
            error = f"{type(err).__name__}: {err}"
    _BUILT[key] = (spec, error)
    return error


# --------------------------------------------------------------------------- expansion

def expand(config: Config, only: Optional[Sequence[str]] = None) -> List[Cell]:
    """Every cell of ``config`` (deduplicated by id, in sweep order), filtered by
    ``only`` (``["module=se,td", "resolution=224"]``)."""
    cells: List[Cell] = []
    seen = set()
    for sweep in config.sweeps:
        for cell in _sweep_cells(config, sweep):
            if cell.id not in seen:
                seen.add(cell.id)
                cells.append(cell)
    for cell in _train_flop_cells(cells):
        if cell.id not in seen:
            seen.add(cell.id)
            cells.append(cell)
    if only:
        cells = apply_filters(cells, parse_filters(only), config.where)
    return cells


def _train_flop_cells(cells: List[Cell]) -> Iterator[Cell]:
    """Where a config counts FLOPs and times (or measures the memory of) a training step:
    a ``flops`` cell in mode ``train`` at that resolution (batch 1: forward + backward
    per image, torch's counter), made from the model's forward ``flops`` cell."""
    def model(c: Cell):
        return (c.backbone, c.module, short_hash(c.options), short_hash(c.stages))
    counted = {model(c): c for c in cells if c.metrics == ("flops",) and c.mode is None}
    for c in cells:
        if c.mode == "train" and c.metrics[0] in ("latency", "memory") and model(c) in counted:
            yield counted[model(c)].replace(resolution=c.resolution, mode="train")


def _points(sweep: Sweep) -> Iterator[Tuple[str, str, int, int, Optional[str]]]:
    """``(backbone, metric, resolution, batch, mode)`` of a sweep, in order; ``params``
    and ``flops`` at batch 1, mode null."""
    for backbone in sweep.backbones:
        for metric in sweep.metrics:
            static = metric in STATIC_METRICS
            for resolution in sweep.resolutions:
                for batch in ([1] if static else sweep.batches):
                    for mode in ([None] if static else sweep.modes):
                        yield backbone, metric, resolution, batch, mode


def _axes(sweep: Sweep, metric: str) -> List[Tuple[str, bool, bool]]:
    """``(precision, channels_last, compile)`` of a metric's cells: every combination
    for latency and memory; the first precision and channels_last, eager, for params
    and FLOPs (they do not depend on them)."""
    if metric in STATIC_METRICS:
        return [(sweep.precisions[0], sweep.channels_last[0], False)]
    return list(itertools.product(sweep.precisions, sweep.channels_last, sweep.compile))


def _group_name(config: Config, t: Mapping[str, Any], point: Tuple, axes: Tuple,
                threads: Optional[int]) -> str:
    """The interleaved group of a latency point in one execution mode (the keys for
    precision and compile added only where they are not the default: names as before)."""
    backbone, _, resolution, batch, mode = point
    precision, channels_last, compiled = axes
    amp = precision != "fp32"
    timing = {k: v for k, v in t.items() if k != "oom_backoff"}  # not a measurement setting
    keys = ([backbone, resolution, batch, mode, config.device, timing, amp, channels_last,
             threads, config.num_classes]
            + [v for k, v in config.settings.items() if v != SETTING_DEFAULTS[k]])
    if precision != (amp_precision(config.device) if amp else "fp32"):
        keys.append({"precision": precision})
    if compiled:
        keys.append({"compile": True})
    return "g" + short_hash(keys, 10)


def _sweep_cells(config: Config, sweep: Sweep) -> Iterator[Cell]:
    """The cells of one sweep: each point and execution mode (:func:`_axes`) for each
    module entry on its backbone."""
    t, threads = sweep.timing, sweep.threads
    for point, axes in ((p, a) for p in _points(sweep) for a in _axes(sweep, p[1])):
        backbone, metric, resolution, batch, mode = point
        timed = metric == "latency"  # timing settings apply to latency cells only
        group = (_group_name(config, t, point, axes, threads) if timed and t["interleave"]
                 else None)
        for entry in config.modules:
            if entry.backbones is not None and backbone not in entry.backbones:
                continue
            yield Cell(
                backbone=backbone, module=entry.name, label=entry.label,
                options=dict(entry.options), stages=entry.stages, resolution=resolution,
                batch=batch, mode=mode, device=config.device, metrics=(metric,),
                warmup=t["warmup"] if timed else None,
                repeats=t["repeats"] if timed else None,
                min_run_time=t["min_run_time"] if timed else None,
                ci_target=t.get("ci_target") if timed else None,
                max_rounds=t.get("max_rounds") if timed else None,
                budget_s=t.get("budget_s") if timed else None,
                block_rounds=t.get("block_rounds") if timed else None,
                amp=axes[0] != "fp32", precision=axes[0], channels_last=axes[1],
                compile=axes[2], oom_backoff=t.get("oom_backoff", True), threads=threads,
                num_classes=config.num_classes, timeout_s=t["timeout_s"], group=group,
                **(config.settings if metric in ("latency", "memory") else {}))


def parse_filters(only: Sequence[str]) -> Dict[str, List[str]]:
    """``["module=se,td", "resolution=224"]`` -> ``{"module": ["se", "td"], ...}``
    (repeated keys add values)."""
    out: Dict[str, List[str]] = {}
    for item in only:
        key, sep, values = str(item).partition("=")
        key = key.strip().lower()
        if key.endswith("s") and key[:-1] in FILTER_KEYS:
            key = key[:-1]
        if not sep or not key or not values.strip():
            raise ConfigError(f"--only {item!r}: expected KEY=VALUE[,VALUE...] "
                              f"(keys: {', '.join(FILTER_KEYS)})")
        if key not in FILTER_KEYS:
            raise ConfigError(f"--only {item!r}: unknown key {key!r} "
                              f"(keys: {', '.join(FILTER_KEYS)})")
        out.setdefault(key, []).extend(v.strip() for v in values.split(",") if v.strip())
    return out


def _value(cell: Cell, key: str) -> Any:
    """The value of filter key ``key`` in ``cell`` (``metric``: its metric)."""
    return cell.metrics[0] if key == "metric" else getattr(cell, key)


def _matches(cell: Cell, key: str, values: List[str]) -> bool:
    actual = _value(cell, key)
    if key == "mode" and actual is None:
        return any(v.lower() in ("none", "null", "-") for v in values)
    return str(actual).lower() in {v.lower() for v in values}


def apply_filters(cells: List[Cell], filters: Mapping[str, List[str]],
                  where: str = "<config>") -> List[Cell]:
    """Keep the cells matching every filter (any of its values). A module filter keeps
    the plain backbone of interleaved groups, their speed ratios' reference."""
    for key, values in filters.items():
        present = {str(_value(c, key)).lower() for c in cells}
        missing = [v for v in values if v.lower() not in present
                   and not (key == "mode" and v.lower() in ("none", "null", "-"))]
        if missing:
            raise ConfigError(f"{where}: --only {key}={','.join(missing)} matches no cell "
                              f"(present: {', '.join(sorted(present))})")
    kept = [c for c in cells if all(
        _matches(c, key, values) for key, values in filters.items()
        if not (key in ("module", "label") and c.plain and c.group))]
    # drop groups left with their baseline alone
    groups: Dict[str, int] = {}
    for c in kept:
        if c.group and not c.plain:
            groups[c.group] = groups.get(c.group, 0) + 1
    if any(k in filters for k in ("module", "label")):
        kept = [c for c in kept if not (c.group and c.plain and not groups.get(c.group)
                                        and not _module_selected(c, filters))]
    return kept


def _module_selected(cell: Cell, filters: Mapping[str, List[str]]) -> bool:
    return all(_matches(cell, k, filters[k]) for k in ("module", "label") if k in filters)


def units(cells: List[Cell]) -> List[List[Cell]]:
    """Cells grouped into units of work: one interleaved group, or one cell."""
    out: List[List[Cell]] = []
    index: Dict[str, int] = {}
    for cell in cells:
        g = cell.group
        if g:
            if g in index:
                out[index[g]].append(cell)
                continue
            index[g] = len(out)
        out.append([cell])
    return out
