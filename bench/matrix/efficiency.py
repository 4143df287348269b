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

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from attnbench.matrix import measure
from attnbench.matrix.config import load_config
from attnbench.modules.registry import OptionError
from attnbench.profilers.speed import time_interleaved
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


def combine_runs(runs: Sequence[Sequence[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """The rows of K separate runs of :func:`ratio_rows` (fresh processes, one after
    another: ``efficiency --runs K``) as one set. A run's interval covers its rounds and
    blocks, not what changes between processes and over minutes (measured here: the same
    command 0.906 [0.901, 0.911] and, 30 minutes later, 0.891 [0.883, 0.899]). So each
    speed ratio (and its A/A control) becomes the mean of the K run estimates with a
    Student-t 95 % interval over runs (:func:`~attnbench.profilers.stats.mean_interval`,
    K - 1 degrees of freedom); ``runs`` keeps the run estimates, ``rounds`` and ``blocks``
    are summed. A ratio missing or failed in any run is failed here. The other rows
    (latency) are the first run's."""
    from attnbench.profilers.stats import mean_interval

    def key(r):
        return (r["label"], r["batch"], r["mode"])

    ok = [{key(r): r for r in run if r["metric"] == "speed_ratio" and r["status"] == "ok"}
          for run in runs]
    rows = []
    for r in runs[0]:
        if r["metric"] != "speed_ratio":
            rows.append(r)
            continue
        same = [run.get(key(r)) for run in ok]
        out = dict(r, runs=[x["value"] if x else None for x in same])
        if any(x is None for x in same):
            out.update(status="failed", error=f"speed ratio missing or failed in "
                                              f"{sum(x is None for x in same)} of {len(runs)} runs")
            rows.append(out)
            continue
        iv = mean_interval([x["value"] for x in same])
        out.update(value=iv.estimate, ratio_lo=iv.lo, ratio_hi=iv.hi, distinct=None,
                   rounds=sum(x["rounds"] for x in same),
                   blocks=sum(x.get("blocks") or 1 for x in same),
                   stop=" / ".join(dict.fromkeys(str(x["stop"]) for x in same)))
        if all(x.get("control_ratio") is not None for x in same):
            civ = mean_interval([x["control_ratio"] for x in same])
            out.update(control_ratio=civ.estimate, control_lo=civ.lo, control_hi=civ.hi)
        rows.append(out)
    return rows


def flops_limits(rows: Sequence[Dict[str, Any]]) -> Dict[str, Tuple[float, float]]:
    """label -> (fvcore GMac, plain GMac / module GMac)."""
    fv = {r["label"]: r["value"] for r in rows
          if r["metric"] == "flops" and r["status"] == "ok"
          and str(r["method"]).startswith("fvcore")}
    plain = fv.get("none")
    return {k: (v, plain / v if plain and v else float("nan")) for k, v in fv.items()}


# --------------------------------------------------------------- AW per layer shape

class LayerProbe(nn.Module):
    """One convolution on a fixed feature map (a buffer), for timing a layer alone in
    the suite's :class:`~attnbench.profilers.speed.Step`: it ignores the image the step
    feeds it and returns the output's channel means, so a training step's loss and
    gradients reach the layer and nothing else costs time."""

    def __init__(self, layer: nn.Module, feature: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.register_buffer("feature", feature)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.layer(self.feature).mean((2, 3))


def module_inputs(backbone: str, name: str, resolution: int) -> List[Tuple[Any, int]]:
    """The distinct modules registered ``name`` puts into ``backbone`` (instances of its
    factory) and the maps they see at ``resolution``: [((input C x H x W, the module),
    how many the network has)], in network order; modules differ by input shape and
    settings (their repr)."""
    from attnbench.modules.builder import build_model
    from attnbench.modules.registry import REGISTRY
    factory = REGISTRY.get(name).factory
    model = build_model(backbone, name).eval()
    seen: Dict[Any, List[Any]] = {}

    def hook(module, args):
        seen.setdefault((tuple(args[0].shape[1:]), repr(module)), [module, 0])[1] += 1
    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, factory)]
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    for h in handles:
        h.remove()
    return [((key[0], m), count) for key, (m, count) in seen.items()]


def aw_layer_shapes(backbone: str, resolution: int) -> List[Tuple[Any, int]]:
    """The distinct AW-convolutions of AW-``backbone`` (:func:`module_inputs`)."""
    return module_inputs(backbone, "aw", resolution)


def _probe_group(s: Settings, models: Dict[str, nn.Module], mode: str, batch: int,
                 baseline: str):
    return time_interleaved(models, mode, batch, 8, s.device, s.warmup, s.min_rounds,
                            threads=s.threads, baseline=baseline, ci_target=s.ci_target,
                            max_rounds=s.max_rounds, budget_s=s.budget_s,
                            block_rounds=s.block_rounds)


def _scheme(res) -> str:
    """The group's method without its round count and stop reason (rows carry those)."""
    return res.describe(rounds="rounds", stop="stopped as the rounds column says")


def versus_rows(s: Settings, ours: str, theirs: str, progress=None) -> List[Dict[str, Any]]:
    """Our module against another implementation of it (e.g. a plugin wrapping the
    authors' or timm's code), module by module on the maps they see in the backbone,
    in interleaved rounds: ratio = their time / our time per round (above 1: ours is
    faster), beside an A/A control (a second instance of theirs) that shows the noise
    floor."""
    mine, other = module_inputs(s.backbone, ours, s.resolution), \
        module_inputs(s.backbone, theirs, s.resolution)
    if [(sh, c) for (sh, _), c in mine] != [(sh, c) for (sh, _), c in other]:
        raise OptionError(f"--versus {ours}={theirs}: the two modules do not sit on the same "
                         f"maps in {s.backbone}")
    rows = []
    for ((shape, m_ours), count), ((_, m_theirs), _) in zip(mine, other):
        for batch in s.batches:
            feature = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
            models = {theirs: LayerProbe(copy.deepcopy(m_theirs), feature),
                      ours: LayerProbe(copy.deepcopy(m_ours), feature),
                      "control": LayerProbe(copy.deepcopy(m_theirs), feature)}  # A/A
            for mode in s.modes:
                name = f"{'x'.join(map(str, shape))} b{batch} {mode}"
                if progress:
                    progress(f"timing {ours} vs {theirs} on {name} (x{count})")
                res = _probe_group(s, models, mode, batch, theirs)
                rows.append({"pair": f"{ours} vs {theirs}", "layer": name, "count": count,
                             "method": res.method, "scheme": _scheme(res),
                             "rounds": len(res.orders), "stop": res.stop,
                             "ours_ms": res.stats[ours].median_ms
                             if ours in res.stats else float("nan"),
                             "theirs_ms": res.stats[theirs].median_ms
                             if theirs in res.stats else float("nan"),
                             "ratio": res.ratios[ours].interval
                             if res.ratios.get(ours) else None,
                             "control": res.ratios["control"].interval
                             if res.ratios.get("control") else None})
    return rows


def aw_layer_rows(s: Settings, progress=None) -> List[Dict[str, Any]]:
    """Every AW-conv shape of the backbone, each batch x mode: the dense convolution it
    replaces and every exact formulation, timed in interleaved rounds through the
    suite's timer (:func:`~attnbench.profilers.speed.time_interleaved`, blocks with fresh
    instances); ratio = dense conv time / formulation time, per round."""
    from attnbench.modules.aw import FORMULATIONS
    rows = []
    for (shape, aw), count in aw_layer_shapes(s.backbone, s.resolution):
        for batch in s.batches:
            feature = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
            dense = nn.Conv2d(aw.in_channels, aw.out_channels, aw.kernel_size, aw.stride,
                              aw.padding, aw.dilation, aw.groups, aw.bias is not None)
            models = {"dense conv": LayerProbe(dense, feature)}
            for form in FORMULATIONS[1:]:
                layer = copy.deepcopy(aw)
                layer.formulation = form
                models[form] = LayerProbe(layer, feature)
            for mode in s.modes:
                with torch.set_grad_enabled(mode == "train"):  # the choice depends on it
                    auto = aw.formulation_for(feature.to(s.device), aw.padding)
                name = f"{shape[0]}x{shape[1]}x{shape[2]} s{aw.stride[0]} b{batch} {mode}"
                if progress:
                    progress(f"timing AW layer {name} (x{count}): dense conv and "
                             f"{', '.join(FORMULATIONS[1:])}")
                res = _probe_group(s, models, mode, batch, "dense conv")
                rows.append({"layer": name, "count": count, "auto": auto, "mode": mode,
                             "batch": batch, "stop": res.stop, "rounds": len(res.orders),
                             "method": res.method, "scheme": _scheme(res),
                             "median_ms": {k: v.median_ms for k, v in res.stats.items()},
                             "ratio": {k: r.interval for k, r in res.ratios.items() if r},
                             "errors": {k: str(e) for k, e in res.errors.items()}})
    return rows
