"""``attnbench report``: turn ``results/`` into ``reports/`` (tables and plots); measures nothing.

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

import math
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from attnbench.modules.registry import AttnbenchError

from attnbench.report import tables as T

MARKER = ".attnbench-report"
DEFAULT_FORMATS = ("png", "svg")


class ReportError(AttnbenchError):
    """The report cannot be written (no results, unknown run, bad option)."""


# --------------------------------------------------------------------------- CLI

def register_cli(sub, parent) -> None:
    p = sub.add_parser(
        "report", parents=[parent], help="write tables and plots from results/ into reports/",
        description="Turn the measurements in results/ into Markdown (and LaTeX) tables, "
                    "seaborn plots and an index (reports/README.md). Measures nothing; one "
                    "report per run and device, never mixing devices or runs.")
    p.add_argument("--results", default="results", metavar="DIR",
                   help="results folder to read (default: results)")
    p.add_argument("--out", default="reports", metavar="DIR",
                   help="folder to write the report into (default: reports)")
    p.add_argument("--latex", action="store_true", help="also write each table as LaTeX (.tex)")
    p.add_argument("--run", nargs="+", action="extend", default=None, metavar="RUN_ID",
                   help="report only these runs (default: every run in --results)")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS), metavar="FMT[,FMT]",
                   help="plot file formats, comma-separated, from png, svg, pdf "
                        "(default: png,svg; 'none' for no plots)")
    p.set_defaults(func=run)


def parse_formats(text: str) -> Tuple[str, ...]:
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


def run(args) -> int:
    result = generate(args.results, args.out, runs=args.run, latex=args.latex,
                      formats=parse_formats(args.formats))
    print(f"wrote {result.readme} ({len(result.groups)} report(s), {len(result.tables)} "
          f"table(s), {len(result.plots)} plot file(s))")
    return 0


# --------------------------------------------------------------------------- loading

def load(results_dir) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    """Normalised rows (``None`` for nulls, ints for sizes, ``_order`` = file order) and
    ``{run_id: env}``. Raises :class:`ReportError` when there is nothing to report."""
    from attnbench.results import ROWS_FILE, ResultsError, load_all, run_dirs
    root = Path(results_dir)
    if not root.exists():
        raise ReportError(f"results folder '{root}' does not exist: run `attnbench run CONFIG` "
                          f"first, or pass --results DIR")
    if not root.is_dir():
        raise ReportError(f"'{root}' is not a folder (--results wants the results folder)")
    if not run_dirs(root):
        raise ReportError(f"no runs in '{root}': expected {root}/<run_id>/{ROWS_FILE} "
                          f"(run `attnbench run CONFIG` first)")
    try:
        df, envs = load_all(root)
    except ResultsError:
        raise
    except (OSError, ValueError) as err:
        raise ReportError(f"cannot read results in '{root}': {err}") from err
    if len(df) == 0:
        raise ReportError(f"the runs in '{root}' hold no measurements (empty {ROWS_FILE})")
    records = []
    for i, rec in enumerate(df.to_dict("records")):
        r = {k: _none(v) for k, v in rec.items()}
        for col in ("mode", "options", "stages", "error", "method", "label", "module",
                    "backbone", "device", "run_id", "dataset"):
            r[col] = "" if r.get(col) is None else str(r[col])
        for col in ("resolution", "batch", "train_resolution"):
            r[col] = None if r.get(col) is None else int(r[col])
        r["value"] = None if r.get("value") is None else float(r["value"])
        r["backbone"] = r["backbone"] or "unknown-backbone"   # e.g. an unreadable checkpoint
        r["label"] = r["label"] or r["module"] or "unknown"
        r["mode"] = r["mode"] or None
        r["_order"] = i
        records.append(r)
    return records, envs


def _none(v):
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


# --------------------------------------------------------------------------- groups

@dataclass
class Group:
    run_id: str
    device: str
    env: Dict[str, Any]
    records: List[Dict[str, Any]]
    tables: List[T.Table] = field(default_factory=list)
    plots: List[Tuple[str, List[Path]]] = field(default_factory=list)   # (title, files)
    tex: Dict[str, Path] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return Path(T.slug(self.run_id)) / T.slug(self.device)

    @property
    def device_name(self) -> str:
        env = self.env
        kind = self.device.split(":")[0]
        if kind == "cpu":
            return str(env.get("cpu_model") or (env.get("device_name") if
                       str(env.get("device", "cpu")).startswith("cpu") else None) or "CPU")
        if str(env.get("device", "")).split(":")[0] == kind and env.get("device_name"):
            return str(env["device_name"])
        return self.device

    @property
    def where(self) -> str:
        return f"{self.device_name} (`{self.device}`), run `{self.run_id}`"

    @property
    def plot_subtitle(self) -> str:
        return f"{self.device_name} ({self.device}) · run {self.run_id}"


def groups(records, envs, runs: Optional[Sequence[str]] = None) -> List[Group]:
    """The rows split by (run_id, device), sorted; only ``runs`` if given."""
    known = sorted({r["run_id"] for r in records})
    if runs:
        unknown = sorted(set(runs) - set(known))
        if unknown:
            raise ReportError(f"unknown run(s) {', '.join(unknown)}; known: {', '.join(known)}")
        records = [r for r in records if r["run_id"] in set(runs)]
    by: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in records:
        by.setdefault((r["run_id"], r["device"]), []).append(r)
    return [Group(run, dev, envs.get(run, {}), rows) for (run, dev), rows in sorted(by.items())]


# --------------------------------------------------------------------------- tables of a group

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
    if full:
        sections.append(("Appendix: every measured resolution", full))
    failed = T.failures_table(idx, g.device)
    if failed is not None:
        sections.append(("Failed measurements", [failed]))
    return sections


# --------------------------------------------------------------------------- plots of a group

def build_plots(g: Group, out: Path, formats: Sequence[str]) -> List[Tuple[str, List[Path]]]:
    import pandas as pd
    from attnbench.report import plots as P
    if not formats:
        return []
    idx = T.Index(g.records)
    plots: List[Tuple[str, List[Path]]] = []
    pdir = out / g.folder / "plots"
    all_variants = sorted({T.variant_of(r) for r in g.records}, key=T.variant_sort_key)
    labels = idx.labels
    colours = P.palette([labels[v] for v in all_variants])

    for backbone in idx.backbones():
        # throughput vs parameters (marker size = FLOPs), at the cost tables' resolution
        res = T.reference_resolution(idx, backbone)
        counters = idx.counters(backbone)
        for batch in idx.values("batch", backbone, ["throughput"], resolution=res):
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
            if pts:
                title = f"Throughput vs parameters — {backbone}, {res}², batch {batch}"
                files = P.throughput_vs_params(
                    pd.DataFrame(pts), pdir / f"throughput-vs-params-{backbone}-r{res}-b{batch}",
                    formats, title, g.plot_subtitle, colours,
                    flops_label=f"FLOPs (G, {counters[0]})" if counters else "FLOPs (G)",
                    failed=failed)
                plots.append((title + " (marker size = FLOPs)", files))

        # cost vs resolution
        specs = [("latency", "latency (ms per batch)", "Latency"),
                 ("flops", "FLOPs (GMac per image)", "FLOPs"),
                 ("peak_memory", "peak memory (MiB)", "Peak memory")]
        for metric, ylabel, name in specs:
            keys = [k for k in T.resolution_keys(idx) if k[0] == backbone and k[1] == metric]
            if metric == "flops":
                batches = [None] if keys else []
            else:
                batches = sorted({k[3] for k in keys}, key=lambda b: (b is None, b or 0))
            for batch in batches:
                rows, failed = [], []
                modes = [k[2] for k in keys if k[3] == batch]
                for mode in (modes if metric != "flops" else [None]):
                    for v in idx.variants(backbone, [metric]):
                        for res_ in idx.values("resolution", backbone, [metric],
                                               **({"mode": mode, "batch": batch}
                                                  if mode else {})):
                            if metric == "flops":
                                m = idx.get(backbone, v, metric, resolution=res_,
                                            counter=counters[0])
                            else:
                                m = idx.get(backbone, v, metric, mode=mode, resolution=res_,
                                            batch=batch)
                            if m.ok:
                                rows.append({"method": labels[v], "resolution": res_,
                                             "value": m.value, "panel": mode or "all"})
                            elif m.status == "failed":
                                failed.append(f"{labels[v]}{f' ({mode})' if mode else ''} at "
                                              f"{res_}²: {m.error}")
                if not rows:
                    continue
                what = f"{backbone}" + (f", batch {batch}" if batch is not None else "")
                if metric == "flops":
                    what += f", {counters[0]}"
                title = f"{name} vs input resolution — {what}"
                stem = f"{metric.replace('_', '-')}-vs-resolution-{backbone}" + (
                    f"-b{batch}" if batch is not None else "")
                files = P.vs_resolution(
                    pd.DataFrame(rows), pdir / stem, formats, title, g.plot_subtitle, ylabel,
                    colours, failed,
                    panel_titles={"eval": "inference (eval)", "train": "training step"},
                    relative_to=next((labels[v] for v in all_variants if v[0] == "none"), None)
                    if metric == "flops" else None)
                plots.append((title, files))

        # accuracy vs test resolution (TDAM Fig. 3), one plot per train resolution
        for _, dataset, metric in [k for k in T.accuracy_keys(idx) if k[0] == backbone]:
            if metric != "top1" and any(k[2] == "top1" and k[1] == dataset
                                        for k in T.accuracy_keys(idx) if k[0] == backbone):
                continue  # Fig. 3 shows top-1; top-5 only when it is all there is
            series = T.accuracy_series(idx, backbone, dataset, metric)
            for tr in sorted({s[1] for s in series},
                             key=lambda x: (x != T.REFERENCE_RES, x is None, x or 0)):
                rows, failed = [], []
                for v, tr_, ser in series:
                    if tr_ != tr:
                        continue
                    best = T.best_of(ser)
                    legend = labels[v] + (f" ({T.fmt(best[1], metric)} % at {best[0]}²)"
                                          if best else "")
                    for res_, m in ser.items():
                        if m.ok:
                            rows.append({"method": labels[v], "legend": legend,
                                         "resolution": res_, "value": m.value})
                        elif m.status == "failed":
                            failed.append(f"{labels[v]} at {res_}²: {m.error}")
                if not rows:
                    continue
                ds = f" on {dataset}" if dataset else ""
                tr_text = f"{tr}²" if tr is not None else "unknown resolution"
                name = T.metric_name(metric)
                title = (f"{name} accuracy vs test resolution — {backbone}{ds}, "
                         f"trained at {tr_text}")
                stem = f"{metric}-vs-resolution-{backbone}" + (
                    f"-{T.slug(dataset)}" if dataset else "") + f"-train{tr}"
                files = P.accuracy_vs_resolution(
                    pd.DataFrame(rows), pdir / stem, formats, title, g.plot_subtitle,
                    f"{name.lower()} accuracy (%)", colours, failed)
                plots.append((title, files))
    return plots


# --------------------------------------------------------------------------- writing

def _env_items(env: Dict[str, Any]) -> List[Tuple[str, str]]:
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
    for metric, name in (("latency", "timing"), ("peak_memory", "memory")):
        found = sorted({r["method"] for r in g.records
                        if r["metric"] == metric and r["status"] == "ok" and r["method"]})
        if found:
            out.append(f"- **{name}** (method as recorded): " + "; ".join(f"`{m}`" for m in found))
    return out


def _header(command: str, source: str) -> List[str]:
    return [f"<!-- Generated by `attnbench report` from {source}. Do not edit: regenerate "
            f"with `{command}` -->",
            ""]


def _banner(command: str, source: str) -> str:
    return (f"> Generated by `attnbench report` from {source}; do not edit by hand.  \n"
            f"> Regenerate with: `{command}`")


def _rel(path: Path, start: Path) -> str:
    import os
    return Path(os.path.relpath(path, start)).as_posix()


def write_group(g: Group, sections, out: Path, command: str, latex: bool,
                results_dir) -> Path:
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
    for title, tables in sections:
        lines += [f"## {title}", ""]
        for t in tables:
            lines.append(t.markdown())
            if latex:
                lines += [f"LaTeX: [tables/{t.key}.tex](tables/{t.key}.tex)", ""]
    if g.plots:
        lines += ["## Plots", ""]
        for title, files in g.plots:
            lines += [f"### {title}", ""]
            png = [f for f in files if f.suffix == ".png"]
            if png:
                lines += [f"![{title}]({_rel(png[0], gdir)})", ""]
            lines += [" · ".join(f"[{f.suffix[1:].upper()}]({_rel(f, gdir)})" for f in files), ""]
    text = "\n".join(lines).rstrip("\n") + "\n"
    from attnbench.results import atomic_write_text
    path = gdir / "report.md"
    atomic_write_text(path, text)
    if latex:
        for _, tables in sections:
            for t in tables:
                p = gdir / "tables" / f"{t.key}.tex"
                atomic_write_text(p, t.latex(f"Generated by `attnbench report`; regenerate with "
                                             f"`{command}`. {g.where}."))
                g.tex[t.key] = p
    return path


def write_readme(gs: List[Group], all_sections, out: Path, command: str, results_dir) -> Path:
    source = f"`{Path(results_dir).as_posix()}/`"
    lines = _header(command, source)
    lines += ["# attnbench reports", "", _banner(command, source), ""]
    lines += [
        "## How to read these reports", "",
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
        "(img/s) = batch / median latency; **speed ratio** = throughput relative to `none` timed "
        "in the same interleaved rounds (robust to machine drift).",
        f"- **Cells**: `{T.DASH}` = the measurement failed (the reason is in the numbered note "
        f"under the table); `{T.MISSING}` = not measured.",
        "- Nothing here is measured by the report; every figure is copied from "
        "`rows.jsonl` (rounded for display).", ""]
    lines += ["## Runs", ""]
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
    lines += [tabulate(rows, headers=["run", "device", "device name", "measured (UTC)", "torch",
                                      "CUDA", "Python", "commit"], tablefmt="pipe",
                       disable_numparse=True), ""]
    for g, sections in zip(gs, all_sections):
        rep = (g.folder / "report.md").as_posix()
        lines += [f"## Run `{g.run_id}` on `{g.device}` — {g.device_name}", "",
                  f"Report: [{rep}]({rep})", ""]
        lines += [f"- **{k}**: {v}" for k, v in _env_items(g.env)]
        methods = T.Index(g.records).flop_methods()
        lines.append("- **FLOP convention**: multiply-adds per image; " + (
            "counters: " + ", ".join(f"`{m}`" for m in methods) if methods else "no FLOPs counted"))
        lines += _method_lines(g)
        lines += ["", "Tables:", ""]
        for title, tables in sections:
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
    text = "\n".join(lines).rstrip("\n") + "\n"
    from attnbench.results import atomic_write_text
    path = out / "README.md"
    atomic_write_text(path, text)
    return path


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
    readme: Path
    groups: List[Group]
    reports: List[Path]
    tables: List[T.Table]
    plots: List[Path]


def generate(results_dir="results", out_dir="reports", runs: Optional[Sequence[str]] = None,
             latex: bool = False, formats: Sequence[str] = DEFAULT_FORMATS,
             command: Optional[str] = None) -> Result:
    """Write the report of ``results_dir`` into ``out_dir`` (see the module docstring)."""
    formats = tuple(formats)
    records, envs = load(results_dir)
    gs = groups(records, envs, runs)
    if not gs:
        raise ReportError(f"nothing to report in '{results_dir}'")
    command = command or command_line(results_dir, out_dir, runs, latex, formats)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out '{out}' exists and is not a folder")
    _clear_previous(out)
    all_sections, reports, tables, plots = [], [], [], []
    for g in gs:
        sections = build_tables(g)
        (out / g.folder).mkdir(parents=True, exist_ok=True)
        (out / g.folder / MARKER).write_text(
            "written by `attnbench report`; this folder is deleted and rewritten on the next "
            "report\n", encoding="utf-8")
        g.plots = build_plots(g, out, formats)
        reports.append(write_group(g, sections, out, command, latex, results_dir))
        all_sections.append(sections)
        tables += [t for _, ts in sections for t in ts]
        plots += [f for _, fs in g.plots for f in fs]
    readme = write_readme(gs, all_sections, out, command, results_dir)
    return Result(readme, gs, reports, tables, plots)
