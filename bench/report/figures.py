"""Which plots a group's report gets, and the data of each; :mod:`attnbench.report.plots`
draws them. Every plot holds the figures of one group (one run on one device)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from attnbench.report import tables as T
from attnbench.report.load import Group

Plot = Tuple[str, List[Path]]   # (title, files)

# cost-vs-resolution plots: (metric, y label, name in the title)
_RES_PLOTS = (("latency", "latency (ms per batch)", "Latency"),
              ("flops", "FLOPs (GMac per image)", "FLOPs"),
              ("peak_memory", "peak memory (MiB)", "Peak memory"))
_PANEL_TITLES = {"eval": "inference (eval)", "train": "training step"}


@dataclass
class _Plotting:
    """What every plot of one group shares."""

    idx: T.Index
    pdir: Path
    formats: Sequence[str]
    subtitle: str
    colours: Dict[str, tuple]
    plain: Optional[str]          # label of the plain backbone (``none``), if measured

    @property
    def labels(self) -> Dict[T.Variant, str]:
        return self.idx.labels


def build_plots(g: Group, out: Path, formats: Sequence[str]) -> List[Plot]:
    """Draw every plot of ``g`` into ``out/<run>/<device>/plots``; [(title, files)]."""
    from attnbench.report import plots as P
    if not formats:
        return []
    idx = T.Index(g.records)
    all_variants = sorted({T.variant_of(r) for r in g.records}, key=T.variant_sort_key)
    labels = idx.labels
    ctx = _Plotting(idx, out / g.folder / "plots", formats, g.plot_subtitle,
                    P.palette([labels[v] for v in all_variants]),
                    next((labels[v] for v in all_variants if v[0] == "none"), None))
    plots: List[Plot] = []
    for backbone in idx.backbones():
        plots += _throughput_plots(ctx, backbone)
        plots += _resolution_plots(ctx, backbone)
        plots += _accuracy_plots(ctx, backbone)
    return plots


# --------------------------------------------------------------------------- throughput

def _throughput_plots(ctx: _Plotting, backbone: str) -> List[Plot]:
    """Throughput vs parameters (marker size = FLOPs) at the cost tables' resolution,
    one plot per batch."""
    import pandas as pd
    from attnbench.report import plots as P
    res = T.reference_resolution(ctx.idx, backbone)
    counters = ctx.idx.counters(backbone)
    plots = []
    for batch in ctx.idx.values("batch", backbone, ["throughput"], resolution=res):
        pts, failed = _throughput_points(ctx, backbone, res, batch, counters)
        if not pts:
            continue
        title = f"Throughput vs parameters — {backbone}, {res}², batch {batch}"
        files = P.throughput_vs_params(
            pd.DataFrame(pts), ctx.pdir / f"throughput-vs-params-{backbone}-r{res}-b{batch}",
            ctx.formats, title, ctx.subtitle, ctx.colours,
            flops_label=f"FLOPs (G, {counters[0]})" if counters else "FLOPs (G)",
            failed=failed)
        plots.append((title + " (marker size = FLOPs)", files))
    return plots


def _throughput_points(ctx: _Plotting, backbone: str, res: Optional[int], batch: int,
                       counters: List[str]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The points (parameters, FPS, FLOPs per variant and mode) and the failures."""
    idx, labels = ctx.idx, ctx.labels
    pts, failed = [], []
    for v in idx.variants(backbone, ["throughput"]):
        p = idx.get(backbone, v, "params", resolution=res, any_resolution=True)
        f = (idx.get(backbone, v, "flops", resolution=res, counter=counters[0])
             if counters else T.Measure("missing"))
        for mode in ("train", "eval"):
            t = T.cost_measure(idx, backbone, v, "throughput", mode, None, res, batch)
            if t.status == "failed":
                failed.append(f"{labels[v]} ({mode}): {t.error}")
            if p.ok and t.ok:
                pts.append({"method": labels[v], "params_M": p.value / 1e6,
                            "fps": t.value, "mode": mode,
                            "flops_G": f.value if f.ok else float("nan")})
    return pts, failed


# --------------------------------------------------------------------------- cost vs resolution

def _resolution_plots(ctx: _Plotting, backbone: str) -> List[Plot]:
    """Latency, FLOPs and peak memory against the input resolution (one plot per batch)."""
    counters = ctx.idx.counters(backbone)
    plots = []
    for metric, ylabel, name in _RES_PLOTS:
        keys = [k for k in T.resolution_keys(ctx.idx) if k[0] == backbone and k[1] == metric]
        if metric == "flops":
            batches = [None] if keys else []
        else:
            batches = sorted({k[3] for k in keys}, key=lambda b: (b is None, b or 0))
        for batch in batches:
            modes = [k[2] for k in keys if k[3] == batch] if metric != "flops" else [None]
            rows, failed = _resolution_points(ctx, backbone, metric, modes, batch, counters)
            if rows:
                plots.append(_resolution_plot(ctx, backbone, metric, ylabel, name, batch,
                                              counters, rows, failed))
    return plots


def _resolution_points(ctx: _Plotting, backbone: str, metric: str,
                       modes: Sequence[Optional[str]], batch: Optional[int],
                       counters: List[str]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """One point per mode, variant and measured resolution, and the failures."""
    idx, labels = ctx.idx, ctx.labels
    rows, failed = [], []
    for mode in modes:
        match = {"mode": mode, "batch": batch} if mode else {}
        for v in idx.variants(backbone, [metric]):
            for res in idx.values("resolution", backbone, [metric], **match):
                if metric == "flops":
                    m = idx.get(backbone, v, metric, resolution=res, counter=counters[0])
                else:
                    m = idx.get(backbone, v, metric, mode=mode, resolution=res, batch=batch)
                if m.ok:
                    rows.append({"method": labels[v], "resolution": res,
                                 "value": m.value, "panel": mode or "all"})
                elif m.status == "failed":
                    failed.append(f"{labels[v]}{f' ({mode})' if mode else ''} at "
                                  f"{res}²: {m.error}")
    return rows, failed


def _resolution_plot(ctx: _Plotting, backbone: str, metric: str, ylabel: str, name: str,
                     batch: Optional[int], counters: List[str], rows, failed) -> Plot:
    """Draw one cost-vs-resolution plot; FLOPs get a panel relative to the plain backbone."""
    import pandas as pd
    from attnbench.report import plots as P
    what = f"{backbone}" + (f", batch {batch}" if batch is not None else "")
    if metric == "flops":
        what += f", {counters[0]}"
    title = f"{name} vs input resolution — {what}"
    stem = f"{metric.replace('_', '-')}-vs-resolution-{backbone}" + (
        f"-b{batch}" if batch is not None else "")
    files = P.vs_resolution(
        pd.DataFrame(rows), ctx.pdir / stem, ctx.formats, title, ctx.subtitle, ylabel,
        ctx.colours, failed, panel_titles=dict(_PANEL_TITLES),
        relative_to=ctx.plain if metric == "flops" else None)
    return title, files


# --------------------------------------------------------------------------- accuracy

def _accuracy_plots(ctx: _Plotting, backbone: str) -> List[Plot]:
    """Accuracy vs test resolution (TDAM Fig. 3), one plot per train resolution; top-1,
    top-5 only when it is all there is."""
    keys = [k for k in T.accuracy_keys(ctx.idx) if k[0] == backbone]
    plots = []
    for _, dataset, metric in keys:
        if metric != "top1" and any(k[2] == "top1" and k[1] == dataset for k in keys):
            continue
        series = T.accuracy_series(ctx.idx, backbone, dataset, metric)
        for tr in sorted({s[1] for s in series},
                         key=lambda x: (x != T.REFERENCE_RES, x is None, x or 0)):
            rows, failed = _accuracy_points(ctx, series, tr, metric)
            if rows:
                plots.append(_accuracy_plot(ctx, backbone, dataset, metric, tr, rows, failed))
    return plots


def _accuracy_points(ctx: _Plotting, series, tr: Optional[int],
                     metric: str) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The points of the variants trained at ``tr`` (best accuracy in the legend)."""
    rows, failed = [], []
    for v, tr_, ser in series:
        if tr_ != tr:
            continue
        best = T.best_of(ser)
        n = max((m.seeds for m in ser.values()), default=0)
        legend = ctx.labels[v] + (f" ({T.fmt(best[1], metric)} % at {best[0]}²"
                                  + (f", {n} seeds" if n > 1 else "") + ")" if best else "")
        for res, m in ser.items():
            if m.ok:
                several = len(m.values) > 1
                rows.append({"method": ctx.labels[v], "legend": legend,
                             "resolution": res, "value": m.value,
                             "lo": m.lo if several else m.value,
                             "hi": m.hi if several else m.value})
            elif m.status == "failed":
                failed.append(f"{ctx.labels[v]} at {res}²: {m.error}")
    return rows, failed


def _accuracy_plot(ctx: _Plotting, backbone: str, dataset: str, metric: str,
                   tr: Optional[int], rows, failed) -> Plot:
    """Draw one accuracy-vs-test-resolution plot."""
    import pandas as pd
    from attnbench.report import plots as P
    ds = f" on {dataset}" if dataset else ""
    tr_text = f"{tr}²" if tr is not None else "unknown resolution"
    name = T.metric_name(metric)
    title = f"{name} accuracy vs test resolution — {backbone}{ds}, trained at {tr_text}"
    stem = f"{metric}-vs-resolution-{backbone}" + (
        f"-{T.slug(dataset)}" if dataset else "") + f"-train{tr}"
    files = P.accuracy_vs_resolution(
        pd.DataFrame(rows), ctx.pdir / stem, ctx.formats, title, ctx.subtitle,
        f"{name.lower()} accuracy (%)", ctx.colours, failed)
    return title, files
