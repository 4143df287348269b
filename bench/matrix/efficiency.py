"""The efficiency benchmark (issue 13, ``attnbench efficiency``): each module's paired
speed ratio to the plain backbone beside the ratio its FLOPs allow.

The FLOPs limit of a module is plain FLOPs / module FLOPs (fvcore, with the suite's
counting rules): the speed ratio an implementation would reach if time were
proportional to multiply-adds. A ratio well below its limit points at the
implementation (memory traffic, small kernels, copies) rather than the method.

Measured through the one measurement path (:func:`attnbench.matrix.measure.measure_group`
for the interleaved ratios with their 95 % intervals and the A/A control,
:func:`~attnbench.matrix.measure.measure_cell` for the FLOPs); nothing is timed here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from attnbench.matrix import measure
from attnbench.matrix.config import load_config
from attnbench.results import Cell, canonical_options

#: (name, options, stages) of one compared module
ModuleSpec = Tuple[str, Dict[str, Any], Any]


@dataclass(frozen=True)
class Settings:
    """What the benchmark times: one backbone and resolution, each batch x mode."""

    backbone: str = "resnet50"
    resolution: int = 224
    batches: Tuple[int, ...] = (1, 8)
    modes: Tuple[str, ...] = ("eval", "train")
    device: str = "cpu"
    threads: Optional[int] = None
    warmup: int = 2
    min_rounds: int = 10
    ci_target: float = 0.015
    max_rounds: int = 400
    budget_s: float = 120.0
    block_rounds: Optional[int] = 10


def default_modules() -> List[ModuleSpec]:
    """The modules of ``configs/default.toml`` (every built-in module as the matrix
    runs it), the plain backbone excluded."""
    return [(m.name, dict(m.options), m.stages) for m in load_config("default").modules
            if m.name != "none"]


def _cell(s: Settings, module: ModuleSpec, batch: int, mode: Optional[str],
          metric: str) -> Cell:
    name, options, stages = module
    full, label = canonical_options(name, options)
    return Cell(backbone=s.backbone, module=name, options=full, stages=stages, label=label,
                resolution=s.resolution, batch=batch, mode=mode, device=s.device,
                metrics=(metric,), warmup=s.warmup, repeats=s.min_rounds,
                ci_target=s.ci_target, max_rounds=s.max_rounds, budget_s=s.budget_s,
                block_rounds=s.block_rounds, threads=s.threads, group="efficiency")


def flops_rows(s: Settings, modules: Sequence[ModuleSpec]) -> List[Dict[str, Any]]:
    """fvcore/ptflops rows (batch 1) of the plain backbone and every module."""
    rows = []
    for m in [("none", {}, None)] + list(modules):
        rows += measure.measure_cell(_cell(s, m, 1, None, "flops"))
    return rows


def ratio_rows(s: Settings, modules: Sequence[ModuleSpec], progress=None
               ) -> List[Dict[str, Any]]:
    """Interleaved latency and speed-ratio rows, one group per batch x mode."""
    rows = []
    for batch in s.batches:
        for mode in s.modes:
            if progress:
                progress(f"timing batch {batch} {mode}: {len(modules) + 2} models "
                         f"(plain, control, {len(modules)} modules)")
            cells = [_cell(s, m, batch, mode, "latency")
                     for m in [("none", {}, None)] + list(modules)]
            rows += measure.measure_group(cells)
    return rows


def flops_limits(rows: Sequence[Dict[str, Any]]) -> Dict[str, Tuple[float, float]]:
    """label -> (fvcore GMac, plain GMac / module GMac)."""
    fv = {r["label"]: r["value"] for r in rows
          if r["metric"] == "flops" and r["status"] == "ok"
          and str(r["method"]).startswith("fvcore")}
    plain = fv.get("none")
    return {k: (v, plain / v if plain and v else float("nan")) for k, v in fv.items()}
