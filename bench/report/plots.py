"""Plots of ``attnbench report`` (seaborn on matplotlib ``Figure`` objects, no pyplot state).

Each function draws the figures of ONE group (one run on one device; the device is named in
the title) and writes one file per requested format (``png``, ``svg``, ``pdf``). SVG output
is made deterministic (fixed ``svg.hashsalt``, no date in the metadata).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

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
    """Caption lines right under the axes (and any legend below them), left-aligned; as the
    figure's ``supxlabel`` the constrained layout makes room for it."""
    if lines:
        fig.supxlabel("\n".join(lines), x=0.01, ha="left", fontsize=8, color="0.3")


def _flops_unit(label: str) -> str:
    """'FLOPs (G, fvcore)' -> 'FLOPs (GMac, fvcore)': the counters count multiply-adds."""
    return re.sub(r"^FLOPs \(G(?=[,)])", "FLOPs (GMac", label)


def _size_ticks(lo: float, hi: float) -> List[Tuple[float, str]]:
    """Representative FLOPs values for the size key, as ``(value, text)``: min, middle and
    max rounded to the precision that their spread calls for; min and max only when they
    differ by less than 5 %; one value when they are (nearly) equal."""
    if not (hi > lo * (1 + 1e-6)):
        v = float(f"{hi:.3g}")
        return [(v, f"{v:g}")]
    dec = max(0, int(-math.floor(math.log10((hi - lo) / 3.0))))
    out: Dict[str, float] = {}
    close = hi - lo < 0.05 * hi            # markers would look alike: the two ends only
    for v in ((lo, hi) if close else (lo, (lo + hi) / 2.0, hi)):
        r = round(v, dec)
        if r <= 0:
            r = float(f"{v:.2g}")
            out.setdefault(f"{r:g}", r)
        else:
            out.setdefault(f"{r:.{dec}f}", r)
    return [(v, t) for t, v in out.items()]


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _label_points(fig: Figure, ax, pts: Sequence[Tuple[str, float, float, float]],
                  renderer) -> None:
    """Label each point ``(text, x, y, marker_area_pt2)`` so that labels overlap neither each
    other nor the markers: points are taken top to bottom (then left to right); each label
    tries above, below, right, left, the four diagonals, then further above/below (with a
    leader line), and takes the first spot that collides with nothing placed so far and stays
    inside the axes, else the spot with the least overlap. Deterministic (no randomness)."""
    from matplotlib.transforms import Bbox
    px = fig.dpi / 72.0
    frame = ax.get_window_extent(renderer)
    markers_bb = []
    for _, x, y, s in pts:
        cx, cy = ax.transData.transform((x, y))
        r = 0.886 * (math.sqrt(max(s, 0.0)) / 2.0 + 0.6) * px   # square of the disc's area
        markers_bb.append(Bbox.from_extents(cx - r, cy - r, cx + r, cy + r))
    order = sorted(range(len(pts)), key=lambda i: (-pts[i][2], pts[i][1], pts[i][0]))
    placed: List = []
    for i in order:
        text, x, y, s = pts[i]
        r = math.sqrt(max(s, 0.0)) / 2.0 + 2.0          # points, marker radius + gap
        d = r * 0.72
        cands = [((0, r), "center", "bottom"), ((0, -r), "center", "top"),
                 ((r + 1, 0), "left", "center"), ((-r - 1, 0), "right", "center"),
                 ((d, d), "left", "bottom"), ((-d, d), "right", "bottom"),
                 ((d, -d), "left", "top"), ((-d, -d), "right", "top")]
        cands += [((0, sgn * (r + 10 * k)), "center", "bottom" if sgn > 0 else "top")
                  for k in (1, 2, 3, 4) for sgn in (1, -1)]
        ann = ax.annotate(text, (x, y), xytext=cands[0][0], textcoords="offset points",
                          fontsize=8, color="0.25", ha="center", va="bottom")
        best = None
        for j, (off, ha, va) in enumerate(cands):
            ann.xyann = off
            ann.set_ha(ha)
            ann.set_va(va)
            bb = ann.get_window_extent(renderer).padded(2.5 * px)
            cost = sum(_overlap(bb, o) for o in placed)
            cost += sum(_overlap(bb, m) for k, m in enumerate(markers_bb) if k != i)
            cost += bb.width * bb.height - _overlap(bb, frame)     # outside the axes
            if best is None or cost < best[0]:
                best = (cost, j, bb)
            if cost <= 0.02 * bb.width * bb.height:               # grazing counts as free
                break
        cost, j, bb = best
        (off, ha, va) = cands[j]
        if j >= 8:   # far from its point: redraw with a leader line
            ann.remove()
            ann = ax.annotate(text, (x, y), xytext=off, textcoords="offset points",
                              fontsize=8, color="0.25", ha=ha, va=va,
                              arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6,
                                          "shrinkA": 0, "shrinkB": r - 2.0})
        else:
            ann.xyann = off
            ann.set_ha(ha)
            ann.set_va(va)
        placed.append(bb)


class _MarkerSizes:
    """Marker areas of a throughput plot: proportional to FLOPs (the largest gets
    ``MAX``, the same scale in every panel); hollow markers of a fixed size where the
    FLOPs are unknown; one size for all when no FLOPs are known at all."""

    MAX, UNKNOWN, UNIFORM = 420.0, 110.0, 150.0

    def __init__(self, flops) -> None:
        known = flops.dropna()
        known = known[known > 0]
        self.has_size = bool(len(known))
        self.top = float(known.max()) if self.has_size else 1.0
        self.low = float(known.min()) if self.has_size else None
        self.any_unknown = bool(flops.isna().any()) and self.has_size

    def filled(self, f) -> bool:
        """Whether a point with FLOPs ``f`` is drawn filled (known FLOPs, or no sizes)."""
        return (self.has_size and f == f and f > 0) or not self.has_size

    def area(self, f) -> float:
        if self.has_size and f == f and f > 0:
            return self.MAX * float(f) / self.top
        return self.UNKNOWN if self.has_size else self.UNIFORM

    def key(self) -> Tuple[list, List[str]]:
        """Handles and texts of the size key: a few representative FLOPs (and unknown)."""
        from matplotlib.lines import Line2D
        ticks = _size_ticks(self.low, self.top)
        handles = [Line2D([], [], linestyle="", marker="o", alpha=0.8,
                          markersize=math.sqrt(self.MAX * v / self.top), markerfacecolor="0.35",
                          markeredgecolor="0.2", markeredgewidth=0.6) for v, _ in ticks]
        texts = [t for _, t in ticks]
        if self.any_unknown:
            handles.append(Line2D([], [], linestyle="", marker="o", markerfacecolor="none",
                                  markeredgecolor="0.35", markeredgewidth=1.6,
                                  markersize=math.sqrt(self.UNKNOWN)))
            texts.append("unknown")
        return handles, texts


_MODE_TITLES = {"train": "training step (forward + backward + update)",
                "eval": "inference (eval, no grad)"}


def _scatter_panel(ax, d, mode: str, order: Sequence[str], colours: Dict[str, tuple],
                   sizes: _MarkerSizes) -> List[Tuple[str, float, float, float]]:
    """One mode's points, method by method (then by parameters and FPS); returns them as
    ``(text, x, y, area)`` for :func:`_label_points`."""
    pts = []
    for method in order:
        dm = d[d["method"] == method].sort_values(["params_M", "fps"])
        col = colours.get(method, (0.4, 0.4, 0.4))
        for _, p in dm.iterrows():
            f = p["flops_G"]
            area, filled = sizes.area(f), sizes.filled(f)
            ax.scatter([p["params_M"]], [p["fps"]], s=area, marker="o",
                       facecolors=col if filled else "none",
                       edgecolors="0.2" if filled else col,
                       linewidths=0.6 if filled else 1.6, alpha=0.8, zorder=3)
            pts.append((method, float(p["params_M"]), float(p["fps"]), area))
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"absolute throughput, {mode} (img/s)")
    ax.set_title(_MODE_TITLES[mode])
    ax.margins(x=0.2, y=0.2)
    return pts


def _method_legend(ax, order: Sequence[str], colours: Dict[str, tuple]) -> None:
    """The method colours, right of ``ax``."""
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], linestyle="", marker="o", markersize=8, alpha=0.8,
                      markerfacecolor=colours.get(m, (0.4, 0.4, 0.4)),
                      markeredgecolor="0.2", markeredgewidth=0.6) for m in order]
    ax.legend(handles, order, title="method", loc="upper left", bbox_to_anchor=(1.02, 1.0),
              frameon=False)


def _size_key(fig: Figure, canvas, ax, sizes: _MarkerSizes, flops_label: str) -> None:
    """The FLOPs size key right under ``ax``'s x label (an axes artist, so that the
    constrained layout makes room for it and puts the caption below it)."""
    from matplotlib.legend import Legend
    from matplotlib.transforms import ScaledTranslation
    handles, texts = sizes.key()
    canvas.draw()
    r = canvas.get_renderer()
    low = min(ax.xaxis.label.get_window_extent(r).y0, ax.xaxis.get_tightbbox(r).y0)
    drop = (ax.bbox.y0 - low) / fig.dpi + 0.05
    key = Legend(ax, handles, texts, title=flops_label, loc="upper left",
                 bbox_to_anchor=(0.0, 0.0), ncol=len(handles), frameon=False,
                 bbox_transform=ax.transAxes + ScaledTranslation(0, -drop, fig.dpi_scale_trans),
                 handletextpad=0.5, columnspacing=1.8, handleheight=2.0,
                 borderaxespad=0.0, alignment="left")
    ax.add_artist(key)
    key.set_clip_on(False)


def throughput_vs_params(points, base: Path, formats: Sequence[str], title: str,
                         subtitle: str, colours: Dict[str, tuple],
                         flops_label: str = "FLOPs (G)", failed: Sequence[str] = ()) -> List[Path]:
    """Scatter of throughput (img/s) against parameters (M), one panel per mode present
    (train, eval); marker AREA proportional to FLOPs (the same scale in every panel; a few
    representative sizes in a legend under the axes), each point labelled with its method
    (labels moved apart so that they do not overlap). ``points``: DataFrame with columns
    ``method``, ``params_M``, ``fps``, ``flops_G`` (may be NaN), ``mode``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    flops_label = _flops_unit(flops_label)
    modes = [m for m in ("train", "eval") if m in set(points["mode"])]
    present = set(points["method"])
    order = [k for k in colours if k in present] + sorted(present - set(colours))
    with _Style():
        fig = Figure(figsize=(5.2 * len(modes) + 2.8, 4.9), layout="constrained")
        canvas = FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(modes), squeeze=False)[0]
        sizes = _MarkerSizes(points["flops_G"])
        labels_per_ax = [_scatter_panel(ax, points[points["mode"] == mode], mode, order,
                                        colours, sizes) for ax, mode in zip(axes, modes)]
        _method_legend(axes[-1], order, colours)
        caption = [f"marker area proportional to {flops_label} (same scale in every panel)"
                   ] if sizes.has_size else []
        _title(fig, title, subtitle)
        _footer(fig, caption + [f"not plotted, failed: {f}" for f in failed])
        if sizes.has_size:
            _size_key(fig, canvas, axes[0], sizes, flops_label)
        canvas.draw()                                   # lays the figure out
        renderer = canvas.get_renderer()
        for ax, pts in zip(axes, labels_per_ax):
            _label_points(fig, ax, pts, renderer)
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


def _interval_bands(ax, data, colours: Dict[str, tuple]) -> bool:
    """Shade each method's 95 % interval across seeds (columns ``lo``, ``hi``) with
    ``fill_between``; True if any band has a width."""
    if "lo" not in data or "hi" not in data:
        return False
    banded = False
    for leg, part in data.sort_values("resolution").groupby("legend", sort=True):
        if (part["hi"] - part["lo"]).abs().max() <= 0:
            continue
        ax.fill_between(part["resolution"], part["lo"], part["hi"], color=colours[leg],
                        alpha=0.18, linewidth=0)
        banded = True
    return banded


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
        banded = _interval_bands(ax, data, legend_colours)
        _res_axis(ax, data["resolution"], xlabel)
        ax.set_ylabel(ylabel)
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                        title="method (best accuracy)")
        if banded:
            subtitle = (subtitle + "; " if subtitle else "") + \
                "line: mean over seeds, band: 95 % t-interval across seeds"
        _title(fig, title, subtitle)
        _footer(fig, [f"not plotted, failed: {f}" for f in failed])
        return _save(fig, base, formats)
