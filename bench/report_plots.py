"""Plots of ``attnbench report`` (seaborn on matplotlib ``Figure`` objects, no pyplot state).

Each function draws the figures of ONE group (one run on one device; the device is named in
the title) and writes one file per requested format (``png``, ``svg``, ``pdf``). SVG output
is made deterministic (fixed ``svg.hashsalt``, no date in the metadata).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

FORMATS = ("png", "svg", "pdf")

_RC = {
    "svg.hashsalt": "attnbench-report",
    "svg.fonttype": "path",
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
}


def palette(labels: Sequence[str]) -> Dict[str, tuple]:
    """One stable colour per method label (sorted order), shared by every plot of a group."""
    import seaborn as sns
    labels = list(dict.fromkeys(labels))
    colours = sns.color_palette("colorblind", max(len(labels), 1))
    if len(labels) > len(set(colours)):
        colours = sns.color_palette("husl", len(labels))
    return {lab: colours[i] for i, lab in enumerate(labels)}


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p")


def markers(labels: Sequence[str]) -> Dict[str, str]:
    """One stable marker per method label, so overlapping lines stay distinguishable."""
    labels = list(dict.fromkeys(labels))
    return {lab: _MARKERS[i % len(_MARKERS)] for i, lab in enumerate(labels)}


def dashes(labels: Sequence[str]) -> Dict[str, tuple]:
    pats = ((), (5, 2), (1, 1.5), (4, 1.5, 1, 1.5), (7, 2, 2, 2), (3, 3))
    labels = list(dict.fromkeys(labels))
    return {lab: pats[i % len(pats)] for i, lab in enumerate(labels)}


class _Style:
    def __enter__(self):
        import seaborn as sns
        self._ctx = [matplotlib.rc_context(), sns.axes_style("whitegrid"),
                     sns.plotting_context("notebook"), matplotlib.rc_context(_RC)]
        for c in self._ctx:
            c.__enter__()
        return self

    def __exit__(self, *exc):
        for c in reversed(self._ctx):
            c.__exit__(*exc)
        return False


def _save(fig: Figure, base: Path, formats: Sequence[str]) -> List[Path]:
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        path = base.with_suffix("." + fmt)
        tmp = path.with_name("." + path.name + ".tmp")
        kwargs = {"format": fmt, "bbox_inches": "tight"}
        if fmt == "png":
            kwargs["dpi"] = 150
        elif fmt == "svg":
            kwargs["metadata"] = {"Date": None}
        elif fmt == "pdf":
            kwargs["metadata"] = {"CreationDate": None, "ModDate": None}
        fig.savefig(tmp, **kwargs)
        tmp.replace(path)
        out.append(path)
    return out


def _title(fig: Figure, title: str, subtitle: str) -> None:
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)


def _res_axis(ax, resolutions: Sequence[int], label: str = "input resolution (px, square)"):
    ax.set_xlabel(label)
    res = sorted(set(int(r) for r in resolutions))
    ax.xaxis.set_major_locator(FixedLocator(res))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(r) for r in res], rotation=45 if len(res) > 6 else 0)


def _footer(fig: Figure, lines: Sequence[str]) -> None:
    if lines:
        fig.text(0.01, -0.01, "\n".join(lines), ha="left", va="top", fontsize=8, color="0.3")


def throughput_vs_params(points, base: Path, formats: Sequence[str], title: str,
                         subtitle: str, colours: Dict[str, tuple],
                         flops_label: str = "FLOPs (G)", failed: Sequence[str] = ()) -> List[Path]:
    """Scatter of throughput (img/s) against parameters (M), one panel per mode present
    (train, eval); marker AREA proportional to FLOPs (the same scale in every panel), each
    point labelled with its method. ``points``: DataFrame with columns ``method``,
    ``params_M``, ``fps``, ``flops_G`` (may be NaN), ``mode``."""
    import seaborn as sns
    modes = [m for m in ("train", "eval") if m in set(points["mode"])]
    with _Style():
        fig = Figure(figsize=(5.2 * len(modes) + 2.8, 4.6), layout="constrained")
        axes = fig.subplots(1, len(modes), squeeze=False)[0]
        has_size = bool(points["flops_G"].notna().any())
        top = float(points["flops_G"].max()) if has_size else 1.0
        data = points.copy()
        data[flops_label] = data["flops_G"].round(3)
        for i, (ax, mode) in enumerate(zip(axes, modes)):
            d = data[data["mode"] == mode]
            last = i == len(modes) - 1
            sns.scatterplot(data=d, x="params_M", y="fps", hue="method", palette=colours,
                            hue_order=[k for k in colours if k in set(data["method"])],
                            size=flops_label if has_size else None,
                            sizes=(0, 420) if has_size else None,
                            size_norm=(0, top) if has_size else None,
                            alpha=0.8, edgecolor="0.2", linewidth=0.6,
                            legend="full" if last else False, ax=ax)
            for _, p in d.sort_values("method").iterrows():
                ax.annotate(p["method"], (p["params_M"], p["fps"]), xytext=(0, 11),
                            textcoords="offset points", ha="center", va="bottom", fontsize=8,
                            color="0.25")
            ax.set_xlabel("parameters (M)")
            ax.set_ylabel(f"throughput, {mode} (img/s)")
            ax.set_title({"train": "training step (forward + backward + update)",
                          "eval": "inference (eval, no grad)"}[mode])
            ax.margins(x=0.2, y=0.2)
            if last and ax.get_legend() is not None:
                sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
                for text in ax.get_legend().get_texts():   # FLOPs with fixed decimals
                    try:
                        text.set_text(f"{float(text.get_text()):.3f}")
                    except ValueError:
                        pass
        _title(fig, title, subtitle)
        _footer(fig, ([f"marker area proportional to {flops_label}"] if has_size else [])
                + [f"not plotted, failed: {f}" for f in failed])
        return _save(fig, base, formats)


def vs_resolution(data, base: Path, formats: Sequence[str], title: str, subtitle: str,
                  ylabel: str, colours: Dict[str, tuple], failed: Sequence[str] = (),
                  panel_titles: Optional[Dict[str, str]] = None,
                  relative_to: Optional[str] = None) -> List[Path]:
    """One line per method of ``value`` against ``resolution``; one panel per value of
    ``panel`` (e.g. eval / train). ``data``: DataFrame ``method, resolution, value, panel``.
    ``relative_to``: a method label; adds a panel with each method's change relative to it
    (in %), which shows overheads that vanish at the scale of the absolute figures."""
    import pandas as pd
    import seaborn as sns
    data = data.copy()
    panels = list(dict.fromkeys(data["panel"]))
    ylabels = {p: ylabel for p in panels}
    if relative_to is not None and relative_to in set(data["method"]) and len(panels) == 1:
        ref = data[data["method"] == relative_to].set_index(["panel", "resolution"])["value"]
        rel = data[data["method"] != relative_to].copy()
        keys = list(zip(rel["panel"], rel["resolution"]))
        base_vals = [ref.get(k, float("nan")) for k in keys]
        rel["value"] = [100.0 * (v / b - 1.0) if b == b and b else float("nan")
                        for v, b in zip(rel["value"], base_vals)]
        rel = rel.dropna(subset=["value"])
        if len(rel):
            rel["panel"] = "relative"
            data = pd.concat([data, rel], ignore_index=True)
            panels.append("relative")
            ylabels["relative"] = f"change relative to {relative_to} (%)"
            panel_titles = dict(panel_titles or {})
            panel_titles.setdefault(panels[0], "absolute")
            panel_titles["relative"] = f"relative to {relative_to}"
    order = [k for k in colours if k in set(data["method"])]
    with _Style():
        fig = Figure(figsize=(5.6 * len(panels) + 2.6, 4.4), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for i, (ax, panel) in enumerate(zip(axes, panels)):
            d = data[data["panel"] == panel].sort_values(["method", "resolution"])
            last = i == len(panels) - 1
            sns.lineplot(data=d, x="resolution", y="value", hue="method", palette=colours,
                         hue_order=order, style="method", style_order=order,
                         markers=markers(order), dashes=dashes(order), markersize=6,
                         linewidth=1.6, estimator=None, sort=True,
                         legend="full" if last else False, ax=ax)
            _res_axis(ax, d["resolution"])
            ax.set_ylabel(ylabels[panel])
            if panel_titles and panel in panel_titles:
                ax.set_title(panel_titles[panel])
            if last and ax.get_legend() is not None:
                sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                                title="method")
        _title(fig, title, subtitle)
        _footer(fig, [f"not plotted, failed: {f}" for f in failed])
        return _save(fig, base, formats)


def accuracy_vs_resolution(data, base: Path, formats: Sequence[str], title: str,
                           subtitle: str, ylabel: str, colours: Dict[str, tuple],
                           failed: Sequence[str] = (), xlabel: str = "test resolution (px, square)"
                           ) -> List[Path]:
    """Fig. 3 of the TDAM paper: accuracy against test resolution, one line per method,
    best accuracy in the legend. ``data``: DataFrame ``method, legend, resolution, value``."""
    import seaborn as sns
    with _Style():
        fig = Figure(figsize=(8.6, 4.8), layout="constrained")
        ax = fig.subplots()
        legend_colours = {}
        for method, leg in dict(zip(data["method"], data["legend"])).items():
            legend_colours[leg] = colours[method]
        order = [leg for m, leg in dict(zip(data["method"], data["legend"])).items()]
        order = sorted(order, key=lambda leg: list(colours).index(
            data.loc[data["legend"] == leg, "method"].iloc[0]))
        sns.lineplot(data=data.sort_values(["legend", "resolution"]), x="resolution", y="value",
                     hue="legend", hue_order=order, palette=legend_colours, style="legend",
                     style_order=order, markers=dict(zip(order, _MARKERS * 4)), dashes=False,
                     markersize=6, linewidth=1.6, estimator=None, sort=True, ax=ax)
        _res_axis(ax, data["resolution"], xlabel)
        ax.set_ylabel(ylabel)
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                        title="method (best accuracy)")
        _title(fig, title, subtitle)
        _footer(fig, [f"not plotted, failed: {f}" for f in failed])
        return _save(fig, base, formats)
