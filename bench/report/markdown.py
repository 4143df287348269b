"""Writing a report's Markdown: one ``report.md`` per group, the ``README.md`` index, and
the LaTeX file of each table (with ``--latex``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from attnbench.report import tables as T
from attnbench.report.load import Group

# how to read the reports: the conventions section of the index
CONVENTIONS = [
    "- **One report per run and device; nothing is mixed.** Each (run, device) pair has its "
    "own folder `<run_id>/<device>/` and `report.md`; every table and plot in it holds "
    "figures of that run on that device only, and names the device. Compare devices or runs "
    "by reading two reports side by side.",
    "- **FLOPs** are multiply-adds (GMac) per image — what the papers call FLOPs. The main "
    "column is fvcore; ptflops is shown beside it (counter and backend as recorded in the "
    "`method` of each row, listed per run below). A note marks counters disagreeing by "
    "over 2 %.",
    "- **Overhead** is relative to the plain backbone (module `none`) of the same run, "
    "backbone, device, resolution and batch: `+x.xx % (y.yyy×)`.",
    "- **Memory** (MiB) is the peak of one eval forward / one train step, measured as the "
    "row's "
    "`method` says (CUDA allocator on a GPU, the named CPU method otherwise); **FPS** "
    "(img/s, absolute) = batch / median latency.",
    "- **Speed ratio** (the one relative speed in every table and plot): in each "
    "interleaved round the plain backbone and the module are timed once, in a seeded random "
    "order, and r = plain time / module time. The rounds come in blocks, and before each "
    "block every model is built afresh (new copies of its weights and inputs), because two "
    "instances of one model, or two stretches of minutes, differ by a few per cent on a "
    "shared machine. The figure is the mean over blocks of each block's median r, and "
    "`[lo, hi]` its 95 % confidence interval over blocks (Student t); a group timed in one "
    "block shows the median of r with its order-statistic interval instead (the row's "
    "`method` says which). Below 1 is slower than the plain backbone. Rounds are added until "
    "every interval is within the run's target (e.g. ±1.5 %) or the group's time budget "
    "ends; the interval shown is the one achieved. **Control (A/A)** is a second, "
    "independently built plain backbone timed in the same rounds: its ratio should be 1 and "
    "its interval is the measured noise floor. A module marked `≈` is indistinguishable "
    "from the plain backbone: its interval contains 1 or overlaps the control's. Two "
    "modules whose intervals overlap are not ranked by this run.",
    f"- **Cells**: `{T.DASH}` = the measurement failed (the reason is in the numbered note "
    f"under the table); `{T.MISSING}` = not measured.",
    "- Nothing here is measured by the report; every figure is copied from "
    "`rows.jsonl` (rounded for display).",
]
RUNS_HEADERS = ["run", "device", "device name", "measured (UTC)", "torch", "CUDA", "Python",
                "commit"]


def _env_items(env: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(name, text) of what ``env.json`` says about where and how a run was measured."""
    def get(k):
        v = env.get(k)
        if v is None or v == "":
            return "none" if k in ("cuda", "cudnn") and env else "unknown"
        return str(v)
    commit = env.get("commit")
    commit_text = "unknown" if not commit else str(commit)[:12] + (
        " (uncommitted changes)" if env.get("dirty") else "")
    return [("measured (env.json `created`, UTC)", get("created")),
            ("device", f"{get('device')} — {get('device_name')}"),
            ("CPU", f"{get('cpu_model')}, {get('threads')} thread(s)"),
            ("software", f"torch {get('torch')}, torchvision {get('torchvision')}, "
                         f"CUDA {get('cuda')}, cuDNN {get('cudnn')}, Python {get('python')}, "
                         f"attnbench {get('attnbench_version')}"),
            ("platform", get("platform")),
            ("commit", commit_text),
            ("config", f"{get('config_path')} (sha256 {str(env.get('config_hash') or '?')[:12]})")]


def _method_lines(g: Group) -> List[str]:
    """How latency and memory were measured (the rows' ``method``, as recorded)."""
    out = []
    for metric, name in (("latency", "timing"), ("peak_memory", "memory"),
                         *((m, f"memory, {stem}") for m, stem in T.MEMORY_METRICS.items()
                           if m != "peak_memory")):
        found = sorted({r["method"] for r in g.records
                        if r["metric"] == metric and r["status"] == "ok" and r["method"]})
        if found:
            out.append(f"- **{name}** (method as recorded): " + "; ".join(f"`{m}`" for m in found))
    from attnbench.report.settings import settings_line
    settings = settings_line(g.records)
    if settings:
        out.append(f"- **settings** (as recorded in the timed rows): {settings}")
    return out


def _header(command: str, source: str) -> List[str]:
    """The HTML comment opening every generated Markdown file."""
    return [f"<!-- Generated by `attnbench report` from {source}. Do not edit: regenerate "
            f"with `{command}` -->",
            ""]


def _banner(command: str, source: str) -> str:
    """The visible 'generated, do not edit' quote under a file's title."""
    return (f"> Generated by `attnbench report` from {source}; do not edit by hand.  \n"
            f"> Regenerate with: `{command}`")


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _text(lines: List[str]) -> str:
    """The lines as a file's text: one trailing newline."""
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- report.md

def write_group(g: Group, sections, out: Path, command: str, latex: bool,
                results_dir) -> Path:
    """Write ``report.md`` of one group (and its ``tables/*.tex`` with ``latex``)."""
    from attnbench.results import atomic_write_text
    gdir = out / g.folder
    source = f"`{Path(results_dir).as_posix()}/{g.run_id}/rows.jsonl`"
    lines = _header(command, source)
    lines += [f"# Run `{g.run_id}` on `{g.device}` — {g.device_name}", "",
              _banner(command, source), ""]
    lines += [f"All figures below come from this run on this device only ({g.where}); "
              "other runs and devices have their own reports (see [the index](../../README.md)).",
              ""]
    lines += [f"- **{k}**: {v}" for k, v in _env_items(g.env)]
    methods = T.Index(g.records).flop_methods()
    if methods:
        lines.append("- **FLOPs**: multiply-adds (GMac) per image; counters (method as recorded): "
                     + ", ".join(f"`{m}`" for m in methods))
    lines += _method_lines(g)
    lines.append("")
    lines += _note_lines(g.notes, "Read this first: rows of this run not taken as they stand")
    lines += _section_lines(sections, latex)
    lines += _plot_lines(g, gdir)
    path = gdir / "report.md"
    atomic_write_text(path, _text(lines))
    if latex:
        _write_latex(g, sections, gdir, command)
    return path


def _section_lines(sections, latex: bool) -> List[str]:
    """Each section's title and tables (with a link to the LaTeX file)."""
    lines = []
    for title, tables in sections:
        lines += [f"## {title}", ""]
        for t in tables:
            lines.append(t.markdown())
            if latex:
                lines += [f"LaTeX: [tables/{t.key}.tex](tables/{t.key}.tex)", ""]
    return lines


def _plot_lines(g: Group, gdir: Path) -> List[str]:
    """The Plots section: each plot's PNG inline and links to every format."""
    if not g.plots:
        return []
    lines = ["## Plots", ""]
    for title, files in g.plots:
        lines += [f"### {title}", ""]
        png = [f for f in files if f.suffix == ".png"]
        if png:
            lines += [f"![{title}]({_rel(png[0], gdir)})", ""]
        lines += [" · ".join(f"[{f.suffix[1:].upper()}]({_rel(f, gdir)})" for f in files), ""]
    return lines


def _write_latex(g: Group, sections, gdir: Path, command: str) -> None:
    """Write ``tables/<key>.tex`` of every table; recorded in ``g.tex``."""
    from attnbench.results import atomic_write_text
    for _, tables in sections:
        for t in tables:
            p = gdir / "tables" / f"{t.key}.tex"
            atomic_write_text(p, t.latex(f"Generated by `attnbench report`; regenerate with "
                                         f"`{command}`. {g.where}."))
            g.tex[t.key] = p


# --------------------------------------------------------------------------- README.md

def _note_lines(notes: List[str], title: str) -> List[str]:
    """A section listing ``notes`` (nothing when there are none)."""
    if not notes:
        return []
    return [f"## {title}", ""] + [f"- {n}" for n in notes] + [""]


def write_readme(gs: List[Group], all_sections, out: Path, command: str, results_dir,
                 notes: Optional[List[str]] = None) -> Path:
    """Write the index ``README.md``: conventions, the runs (and the run folders skipped),
    and each group's contents."""
    from attnbench.results import atomic_write_text
    source = f"`{Path(results_dir).as_posix()}/`"
    lines = _header(command, source)
    lines += ["# attnbench reports", "", _banner(command, source), ""]
    lines += ["## How to read these reports", ""] + CONVENTIONS + [""]
    lines += ["## Runs", ""] + _runs_table(gs)
    lines += _note_lines(list(notes or []) + [n for g in _first_per_run(gs) for n in g.notes],
                         "Not reported as they stand")
    for g, sections in zip(gs, all_sections):
        lines += _readme_group(g, sections, out)
    path = out / "README.md"
    atomic_write_text(path, _text(lines))
    return path


def _first_per_run(gs: List[Group]) -> List[Group]:
    """One group per run (a run's notes are shared by its devices)."""
    seen, out = set(), []
    for g in gs:
        if g.run_id not in seen:
            seen.add(g.run_id)
            out.append(g)
    return out


def _runs_table(gs: List[Group]) -> List[str]:
    """One line per group: where, when and with what it was measured."""
    from tabulate import tabulate
    rows = []
    for g in gs:
        e = g.env
        rows.append([f"[`{g.run_id}`]({(g.folder / 'report.md').as_posix()})", f"`{g.device}`",
                     g.device_name, str(e.get("created") or "unknown"),
                     str(e.get("torch") or "unknown"), str(e.get("cuda") or "–"),
                     str(e.get("python") or "unknown"),
                     (str(e.get("commit"))[:12] + ("+dirty" if e.get("dirty") else ""))
                     if e.get("commit") else "unknown"])
    return [tabulate(rows, headers=RUNS_HEADERS, tablefmt="pipe", disable_numparse=True), ""]


def _readme_group(g: Group, sections, out: Path) -> List[str]:
    """A group's section of the index: environment, then links to its tables and plots."""
    rep = (g.folder / "report.md").as_posix()
    lines = [f"## Run `{g.run_id}` on `{g.device}` — {g.device_name}", "",
             f"Report: [{rep}]({rep})", ""]
    lines += [f"- **{k}**: {v}" for k, v in _env_items(g.env)]
    methods = T.Index(g.records).flop_methods()
    lines.append("- **FLOP convention**: multiply-adds per image; " + (
        "counters: " + ", ".join(f"`{m}`" for m in methods) if methods else "no FLOPs counted"))
    lines += _method_lines(g)
    lines += ["", "Tables:", ""]
    for _, tables in sections:
        for t in tables:
            entry = f"- [{t.title}]({rep}#{t.key})"
            if t.key in g.tex:
                entry += f" · [LaTeX]({g.tex[t.key].relative_to(out).as_posix()})"
            lines.append(entry)
    if not sections:
        lines.append("- (none)")
    lines += ["", "Plots:", ""]
    for title, files in g.plots:
        lines.append(f"- {title}: " + " · ".join(
            f"[{f.suffix[1:].upper()}]({f.relative_to(out).as_posix()})" for f in files))
    if not g.plots:
        lines.append("- (none)")
    lines.append("")
    return lines
