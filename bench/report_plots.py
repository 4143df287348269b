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
                         flops_label: str = "FLOPs (G)") -> List[Path]:
    """Scatter of throughput (img/s) against parameters (M), one panel per mode present
    (train, eval), marker size = FLOPs. ``points``: DataFrame with columns ``method``,
    ``params_M``, ``fps``, ``flops_G`` (may be NaN), ``mode``."""
    import seaborn as sns
    modes = [m for m in ("train", "eval") if m in set(points["mode"])]
    with _Style():
        fig = Figure(figsize=(5.2 * len(modes) + 2.6, 4.4), layout="constrained")
        axes = fig.subplots(1, len(modes), squeeze=False)[0]
        has_size = points["flops_G"].notna().any()
        data = points.rename(columns={"method": "method", "flops_G": flops_label})
        for i, (ax, mode) in enumerate(zip(axes, modes)):
            d = data[data["mode"] == mode]
            last = i == len(modes) - 1
            sns.scatterplot(data=d, x="params_M", y="fps", hue="method", palette=colours,
                            hue_order=[k for k in colours if k in set(data["method"])],
                            size=flops_label if has_size else None,
                            sizes=(50, 400) if has_size else None,
                            alpha=0.85, edgecolor="0.2", linewidth=0.6,
                            legend="brief" if last else False, ax=ax)
            ax.set_xlabel("parameters (M)")
            ax.set_ylabel(f"throughput, {mode} (img/s)")
            ax.set_title({"train": "training step (forward + backward + update)",
                          "eval": "inference (eval, no grad)"}[mode])
            ax.margins(x=0.15, y=0.15)
            if last and ax.get_legend() is not None:
                sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        _title(fig, title, subtitle)
        return _save(fig, base, formats)


def vs_resolution(data, base: Path, formats: Sequence[str], title: str, subtitle: str,
                  ylabel: str, colours: Dict[str, tuple], failed: Sequence[str] = (),
                  panel_titles: Optional[Dict[str, str]] = None) -> List[Path]:
    """One line per method of ``value`` against ``resolution``; one panel per value of
    ``panel`` (e.g. eval / train). ``data``: DataFrame ``method, resolution, value, panel``."""
    import seaborn as sns
    panels = list(dict.fromkeys(data["panel"]))
    with _Style():
        fig = Figure(figsize=(5.6 * len(panels) + 2.6, 4.4), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for i, (ax, panel) in enumerate(zip(axes, panels)):
            d = data[data["panel"] == panel].sort_values(["method", "resolution"])
            last = i == len(panels) - 1
            sns.lineplot(data=d, x="resolution", y="value", hue="method", palette=colours,
                         hue_order=[k for k in colours if k in set(data["method"])],
                         marker="o", markersize=6, linewidth=1.6, estimator=None,
                         sort=True, legend="full" if last else False, ax=ax)
            _res_axis(ax, d["resolution"])
            ax.set_ylabel(ylabel)
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
                     hue="legend", hue_order=order, palette=legend_colours, marker="o",
                     markersize=6, linewidth=1.6, estimator=None, sort=True, ax=ax)
        _res_axis(ax, data["resolution"], xlabel)
        ax.set_ylabel(ylabel)
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                        title="method (best accuracy)")
        _title(fig, title, subtitle)
        _footer(fig, [f"not plotted, failed: {f}" for f in failed])
        return _save(fig, base, formats)
