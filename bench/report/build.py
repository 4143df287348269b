"""``attnbench report``: turn ``results/`` into ``reports/`` (tables and plots); measures nothing.

The pieces: :mod:`~attnbench.report.load` (rows and groups), :mod:`~attnbench.report.tables`,
:mod:`~attnbench.report.figures` (which plots, drawn by :mod:`~attnbench.report.plots`) and
:mod:`~attnbench.report.markdown` (the files); this module puts them together
(:func:`generate`). The command line is :mod:`attnbench.cli.report`.

Layout of the output folder::

    reports/README.md                              index: runs, devices, software, conventions
    reports/<run_id>/<device>/report.md            every table of that run on that device
    reports/<run_id>/<device>/plots/<name>.png|svg
    reports/<run_id>/<device>/tables/<key>.tex     with --latex

No mixing: the unit of a report is a *group*, the rows of one run on one device (the
``device`` column of the rows). Every table and every plot is drawn from one group only,
and names its device; comparing devices or runs means reading two reports side by side.

Determinism: rows are sorted, floats formatted with fixed decimals, and the only dates
written are the ``created`` times of ``env.json``, so the same results always give
byte-identical Markdown. The folders of a previous report (marked with a
``.attnbench-report`` file) are removed first, so nothing stale survives.
"""
from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from attnbench.report import tables as T
from attnbench.results import atomic_write_text
from attnbench.report.figures import build_plots
from attnbench.report.load import Group, ReportError, groups, load, load_checked
from attnbench.report.markdown import write_group, write_readme

__all__ = ["DEFAULT_FORMATS", "MARKER", "Group", "ReportError", "Result", "build_plots",
           "build_tables", "command_line", "generate", "groups", "load", "parse_formats"]

MARKER = ".attnbench-report"
DEFAULT_FORMATS = ("png", "svg")


def parse_formats(text: str) -> Tuple[str, ...]:
    """``"png,svg"`` -> ``("png", "svg")``; ``"none"`` -> ``()``; an unknown format raises
    :class:`ReportError`."""
    from attnbench.report.plots import FORMATS
    items = [f.strip().lower().lstrip(".") for f in (text or "").split(",") if f.strip()]
    if items == ["none"]:
        return ()
    bad = [f for f in items if f not in FORMATS]
    if bad:
        raise ReportError(f"unknown plot format(s) {', '.join(bad)}; choose from "
                          f"{', '.join(FORMATS)} (or 'none')")
    return tuple(dict.fromkeys(items))


def command_line(results_dir, out_dir, runs=None, latex=False, formats=DEFAULT_FORMATS) -> str:
    """The normalised command that regenerates a report."""
    args = ["attnbench", "report", "--results", str(results_dir), "--out", str(out_dir)]
    if latex:
        args.append("--latex")
    if runs:
        args += ["--run", *sorted(runs)]
    if tuple(formats) != DEFAULT_FORMATS:
        args += ["--formats", ",".join(formats) or "none"]
    return shlex.join(args)


def build_tables(g: Group) -> List[Tuple[str, List[T.Table]]]:
    """[(section title, tables)] of one group."""
    idx = T.Index(g.records)
    notes = T.Notes()
    sections = []
    cost = []
    for backbone, res, batch in T.cost_keys(idx):
        cost.extend(T.cost_table(idx, notes, backbone, res, batch, g.device))
    if cost:
        sections.append(("Cost (TDAM Table 1 layout) and overhead relative to the plain backbone",
                         cost))
    rkeys = T.resolution_keys(idx)
    restabs = [T.resolution_table(idx, notes, *k, device=g.device) for k in rkeys]
    if restabs:
        sections.append(("Cost across input resolutions", restabs))
    acc = [T.accuracy_table(idx, notes, b, ds, m, g.device) for b, ds, m in T.accuracy_keys(idx)]
    if acc:
        sections.append(("Accuracy across test resolutions (TDAM Table 2 layout)", acc))
    full = []
    for k, short in zip(rkeys, restabs):
        t = T.resolution_table(idx, notes, *k, device=g.device, full=True)
        if len(t.headers) > len(short.headers):   # more than the main table shows
            full.append(t)
    for b, ds, m in T.accuracy_keys(idx):
        series = T.accuracy_series(idx, b, ds, m)
        if m == "top1" and any(x.seeds > 1 for _, _, ser in series for x in ser.values()):
            full.append(T.accuracy_sweep_table(idx, notes, b, ds, m, g.device))
    if full:
        sections.append(("Appendix: every measured resolution", full))
    uncounted = T.uncounted_table(idx, g.device)
    if uncounted is not None:
        sections.append(("FLOP counting: operators no counter counts", [uncounted]))
    failed = T.failures_table(idx, g.device)
    if failed is not None:
        sections.append(("Failed measurements", [failed]))
    return sections


def _clear_previous(out: Path) -> None:
    """Remove the folders of a previous report (those holding the marker file)."""
    if not out.is_dir():
        return
    for marker in sorted(out.glob(f"*/*/{MARKER}")):
        gdir = marker.parent
        shutil.rmtree(gdir)
        try:
            gdir.parent.rmdir()  # the run folder, once empty
        except OSError:
            pass


@dataclass
class Result:
    """What :func:`generate` wrote."""

    readme: Path
    groups: List[Group]
    reports: List[Path]
    tables: List[T.Table]
    plots: List[Path]
    notes: List[str] = field(default_factory=list)  # runs skipped, rows not taken as they are


def generate(results_dir="results", out_dir="reports", runs: Optional[Sequence[str]] = None,
             latex: bool = False, formats: Sequence[str] = DEFAULT_FORMATS,
             command: Optional[str] = None) -> Result:
    """Write the report of ``results_dir`` into ``out_dir`` (see the module docstring)."""
    formats = tuple(formats)
    out = Path(out_dir)
    _check_out(out)
    records, envs, notes = load_checked(results_dir)
    gs = groups(records, envs, runs)
    if not gs:
        raise ReportError(f"nothing to report in '{results_dir}'")
    for g in gs:
        g.notes = list(notes.get(g.run_id, []))
    general = list(notes.get("", []))
    command = command or command_line(results_dir, out_dir, runs, latex, formats)
    _clear_previous(out)
    all_sections, reports, tables, plots = [], [], [], []
    for g in gs:
        sections = build_tables(g)
        (out / g.folder).mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / g.folder / MARKER,
                          "written by `attnbench report`; this folder is deleted and rewritten "
                          "on the next report\n")
        g.plots = build_plots(g, out, formats)
        reports.append(write_group(g, sections, out, command, latex, results_dir))
        all_sections.append(sections)
        tables += [t for _, ts in sections for t in ts]
        plots += [f for _, fs in g.plots for f in fs]
    readme = write_readme(gs, all_sections, out, command, results_dir, general)
    every = general + [n for run in sorted({g.run_id for g in gs}) for n in notes.get(run, [])]
    return Result(readme, gs, reports, tables, plots, every)


def _check_out(out: Path) -> None:
    """:class:`ReportError` unless ``out`` is (or can be made) a folder files can be
    written in; checked before anything is removed or drawn."""
    from attnbench.results import ResultsError, check_writable
    try:
        check_writable(out, "--out", folder=True)
    except ResultsError as err:
        raise ReportError(str(err)) from None
