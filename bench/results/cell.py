"""A cell: what one measurement is of (docs/results-schema.md).

The matrix config expands into cells, the runner sends them to its workers (as dicts,
:meth:`Cell.to_dict` / :meth:`Cell.from_dict`), the measurement consumes them and
builds its rows from them (:meth:`Cell.base_row`); ``attnbench profile`` measures one
built from its flags. The fields, their defaults and the cell id are defined here once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from attnbench.results.rows import base_row, short_hash

#: what a cell can measure
METRICS = ("params", "flops", "latency", "memory")
#: metrics taken once per model (batch 1, mode null), not per batch and mode
STATIC_METRICS = ("params", "flops")
#: the steps latency and memory are measured for
MODES = ("eval", "train")
#: the precisions a cell can be measured in: fp32, or autocast to bfloat16 / float16
PRECISIONS = ("fp32", "bf16", "fp16")
#: the fields a cell id is the hash of (with whether the cell is timed interleaved)
MEASURE_KEYS = ("backbone", "module", "options", "stages", "resolution", "batch", "mode",
                "device", "metrics", "warmup", "repeats", "min_run_time", "amp",
                "channels_last", "threads", "num_classes")


#: settings of the adaptive interleaved rounds (part of the id only when set)
ROUNDS_KEYS = ("ci_target", "max_rounds", "budget_s", "block_rounds")
#: backend settings the worker applies before measuring (config ``[settings]``), with
#: their defaults; part of the id only when set to something else, so older ids stay valid
SETTING_DEFAULTS = {"cudnn_benchmark": True, "tf32_cudnn": False, "matmul_precision": "highest"}
#: the row columns that change a timed measurement: rows that differ in one of them are
#: different measurements (the report never puts them in one table)
ROW_SETTING_COLUMNS = ("amp", "precision", "channels_last", "compile", "threads",
                       "cudnn_benchmark", "tf32_cudnn", "tf32_matmul", "matmul_precision")


def amp_precision(device: str) -> str:
    """The precision ``amp = true`` means on ``device``: fp16 on CUDA, bf16 elsewhere."""
    return "fp16" if str(device).startswith("cuda") else "bf16"


@dataclass(frozen=True)
class Cell:
    """One model (backbone, module, options, stages) measured at one resolution, batch,
    mode (``None``: eval and train) and device, for ``metrics``, with its timing settings.

    ``group`` names the interleaved latency group of a matrix cell, ``timeout_s`` the
    runner's limit; ``id`` (computed when not given) is :func:`cell_id`. Treat
    ``options`` as read-only.

    ``amp`` and ``precision`` say one thing: a precision other than fp32 turns ``amp``
    on, and ``amp`` with precision fp32 means the device's autocast dtype
    (:func:`amp_precision`: fp16 on CUDA, bf16 on the CPU), as ``amp`` always did.
    """

    backbone: str
    module: str
    resolution: int
    batch: int
    metrics: Tuple[str, ...]
    options: Dict[str, Any] = field(default_factory=dict)
    stages: Any = None
    label: Optional[str] = None
    mode: Optional[str] = None
    device: str = "cpu"
    warmup: Optional[int] = 2
    repeats: Optional[int] = 5
    min_run_time: Optional[float] = 0.0
    ci_target: Optional[float] = None   # interleaved: stop at this relative CI half-width
    max_rounds: Optional[int] = None    # interleaved: at most this many rounds
    budget_s: Optional[float] = None    # interleaved: stop adding rounds after this time
    block_rounds: Optional[int] = None  # interleaved: rounds per block of fresh instances
    amp: bool = False                   # autocast on (precision bf16 or fp16)
    channels_last: bool = False
    precision: str = "fp32"             # "fp32", "bf16" or "fp16" (autocast dtype)
    compile: bool = False               # torch.compile(model) before timing
    oom_backoff: bool = True            # halve the batch on out-of-memory (not in the id)
    threads: Optional[int] = None
    cudnn_benchmark: Optional[bool] = None   # None: SETTING_DEFAULTS (untimed cells)
    tf32_cudnn: Optional[bool] = None
    matmul_precision: Optional[str] = None   # "highest" (fp32), "high" (TF32), "medium"
    num_classes: int = 1000
    timeout_s: float = 600.0
    group: Optional[str] = None
    id: str = ""

    def __post_init__(self) -> None:
        metrics = (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics)
        object.__setattr__(self, "metrics", metrics)
        object.__setattr__(self, "options", dict(self.options or {}))
        object.__setattr__(self, "module", self.module or "none")
        if self.precision in (None, "fp32") and self.amp:
            object.__setattr__(self, "precision", amp_precision(self.device))
        elif self.precision is None:
            object.__setattr__(self, "precision", "fp32")
        object.__setattr__(self, "amp", self.precision != "fp32")
        self._check()
        if not self.id:
            object.__setattr__(self, "id", cell_id(self))

    def _check(self) -> None:
        """ValueError for unknown metrics, a bad resolution, batch or mode."""
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ValueError(f"cell: unknown metric(s) {bad}; known: {', '.join(METRICS)}")
        for key in ("resolution", "batch"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"cell: {key} must be a positive integer, got {value!r}")
        if self.mode not in (None,) + MODES:
            raise ValueError(f"cell: mode must be eval, train or null, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"cell: precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def plain(self) -> bool:
        """Whether the cell is the plain backbone."""
        return self.module == "none"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Cell":
        """The cell of a dict with the field names (as :meth:`to_dict` writes it)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"cell: unknown key(s) {unknown}")
        for key in ("backbone", "module", "resolution", "batch", "metrics"):
            if key not in data:
                raise ValueError(f"cell: the cell has no {key!r} key")
        return cls(**dict(data))

    @classmethod
    def of(cls, cell: Any) -> "Cell":
        """``cell`` itself, or the cell of a dict."""
        return cell if isinstance(cell, Cell) else cls.from_dict(cell)

    def to_dict(self) -> Dict[str, Any]:
        """Every field (``metrics`` as a list): what goes to a worker process."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["metrics"] = list(self.metrics)
        out["options"] = dict(self.options)
        return out

    def replace(self, **changes: Any) -> "Cell":
        """A copy with ``changes``; its id is computed afresh unless ``id`` is given."""
        changes.setdefault("id", "")
        return dataclasses.replace(self, **changes)

    def resolved(self) -> "Cell":
        """The cell with ``None`` settings (as matrix cells have for untimed metrics)
        replaced by the defaults; the id is kept."""
        fill = {f.name: f.default for f in dataclasses.fields(self)
                if getattr(self, f.name) is None and f.default is not None
                and f.default is not dataclasses.MISSING}
        return dataclasses.replace(self, **fill) if fill else self

    def settings(self) -> Dict[str, Any]:
        """The backend settings to measure with (:data:`SETTING_DEFAULTS` where unset)."""
        return {k: default if getattr(self, k) is None else getattr(self, k)
                for k, default in SETTING_DEFAULTS.items()}

    def base_row(self, mode: Optional[str], label: Optional[str], **ids: Any) -> Dict[str, Any]:
        """The identity columns of this cell's rows in ``mode`` with ``label`` (plus
        ``ids`` such as ``run_id`` and ``cell``)."""
        return base_row(backbone=self.backbone, module=self.module, label=label,
                        options=self.options, stages=self.stages, resolution=self.resolution,
                        batch=self.batch, mode=mode, device=self.device, **ids)

    def describe(self) -> str:
        """One line naming the cell: backbone, label, size, batch, mode, execution mode
        (where not the default), first metric."""
        mode = f" {self.mode}" if self.mode else ""
        how = "".join([f" {self.precision}" if self.precision != "fp32" else "",
                       " channels_last" if self.channels_last else "",
                       " compiled" if self.compile else ""])
        return (f"{self.backbone} {self.label} {self.resolution}px "
                f"b{self.batch}{mode}{how} {self.metrics[0]}")


def cell_id(cell: Cell) -> str:
    """Stable id of a cell: short sha of the canonical JSON of its :data:`MEASURE_KEYS`
    (plus whether its latency is timed in an interleaved group)."""
    keys = {k: getattr(cell, k) for k in MEASURE_KEYS}
    # the adaptive-rounds settings join the id only when set, so older ids stay valid
    keys.update({k: getattr(cell, k) for k in ROUNDS_KEYS if getattr(cell, k) is not None})
    keys.update({k: getattr(cell, k) for k, default in SETTING_DEFAULTS.items()
                 if getattr(cell, k) not in (None, default)})
    # the precision only where ``amp`` does not imply it (bf16 on CUDA), compile when on
    if cell.precision != (amp_precision(cell.device) if cell.amp else "fp32"):
        keys["precision"] = cell.precision
    if cell.compile:
        keys["compile"] = True
    keys["interleaved"] = bool(cell.group)
    return short_hash(keys)


def canonical_options(name: str, options: Mapping[str, Any]) -> Tuple[Dict[str, Any], str]:
    """``(full options with defaults filled in, label)`` of module ``name`` as
    :func:`attnbench.modules.builder.build_model` would build it (``gate`` combinations
    included). Raises the registry's errors for unknown names and bad options."""
    from attnbench.modules.builder import split_gate_options
    from attnbench.modules.registry import REGISTRY, OptionError
    if name == "none":
        if options:
            raise OptionError(f"the plain backbone takes no options; got {sorted(options)}")
        return {}, "none"
    spec = REGISTRY.get(name)
    rest = dict(options)
    gate, gate_options = split_gate_options(rest)
    if gate is not None and spec.kind != "conv":
        raise OptionError(f"{spec.name}: option 'gate' combines a gate with a conv-kind "
                          f"module (e.g. aw); {spec.name!r} is of kind {spec.kind!r}")
    opts = spec.options(rest)
    label = spec.display(opts)
    if gate is not None:
        gate_spec = REGISTRY.get(gate)
        if gate_spec.kind != "gate":
            raise OptionError(f"{spec.name}: gate={gate!r} is of kind {gate_spec.kind!r}, "
                              f"not 'gate'")
        gate_opts = gate_spec.options(gate_options)
        label = f"{label}-{gate_spec.display(gate_opts)}"
        opts["gate"] = gate_spec.name
        if gate_opts:
            opts["gate_options"] = gate_opts
    return opts, label
