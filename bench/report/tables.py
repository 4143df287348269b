"""Tables of ``attnbench report``: tidy result rows in, Markdown / LaTeX tables out.

Every table holds the figures of ONE group -- one run on one device (see
:func:`attnbench.report.load.groups`) -- so figures from different devices or runs never share a
table. Inside a group the tables are modelled on the TDAM paper:

* cost table (Table 1): method, backbone, params (M), FLOPs (G; one column per counter,
  fvcore first), peak memory train/eval (MiB), throughput train/eval (img/s) and the
  interleaved speed ratio when measured, at one resolution and batch;
* overhead table: the same figures relative to the plain backbone (module ``none``) of
  the same run, backbone, device, resolution and batch, as ``+x.xx % (y.yyy×)``;
* resolution tables: FLOPs, latency and peak memory at 168², 224², 448²;
* accuracy tables (Table 2): Best (and where), 224², 168², 448².

Cells: a number formatted with a fixed number of decimals; ``–`` plus a footnote with the
reason when the measurement failed; ``n/a`` when nothing was measured. Everything is
sorted, so the same rows always give the same bytes.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from tabulate import tabulate

DASH = "–"          # a failed measurement (en dash)
MISSING = "n/a"     # not measured
REF = "ref."        # the reference row of an overhead table
STANDARD_RES = (168, 224, 448)   # the TDAM paper's Table 2 columns (besides Best)
REFERENCE_RES = 224

#: memory figures and the stem of their columns: CPU and CUDA figures have names (and so
#: columns) of their own; ``peak_memory`` is what runs recorded before they were split
MEMORY_METRICS = {"peak_memory": "mem.", "peak_tensor_memory": "tensor peak",
                  "rss_increase": "RSS increase", "cuda_max_allocated": "CUDA max allocated",
                  "cuda_max_reserved": "CUDA max reserved"}
TIMING_METRICS = ("latency", "throughput", "speed_ratio") + tuple(MEMORY_METRICS)

# decimals per kind of figure (fixed: stable bytes)
DECIMALS = {"params": 3, "flops": 3, "peak_memory": 1, "throughput": 1, "latency": 2,
            "speed_ratio": 3, "top1": 2, "top5": 2, "ratio": 3, "pct": 2, "growth": 2}


# --------------------------------------------------------------------------- rows

Variant = Tuple[str, str, str, str]   # (module, label, options, stages)


def variant_of(row: Dict[str, Any]) -> Variant:
    return (row["module"], row["label"], row["options"], row["stages"])


def variant_sort_key(v: Variant):
    """The plain backbone first, then by label (case-insensitive), options, stages."""
    module, label, options, stages = v
    return (module != "none", label.casefold(), label, module, options, stages)


def counter_of(method: str) -> str:
    """The FLOP counter (and backend) a ``flops`` row was counted with: the leading name of
    its method (``fvcore``, ``ptflops-pytorch``; rules such as ``+rules(...)`` and notes
    after it are dropped). ``""`` when the method is empty (a failed cell)."""
    m = re.match(r"[A-Za-z0-9_.-]+", (method or "").strip())
    return m.group(0) if m else ""


def counter_sort_key(counter: str):
    return (not counter.startswith("fvcore"), counter)


def res_text(res: Optional[int]) -> str:
    return "?" if res is None else f"{res}²"


@dataclass
class Measure:
    """The measurement chosen for one table cell."""

    status: str                      # "ok", "failed" or "missing"
    value: Optional[float] = None
    error: str = ""
    row: Optional[Dict[str, Any]] = None
    #: several seeds (accuracy): each seed's value; ``value`` is their mean and
    #: ``lo``, ``hi`` its 95 % t-interval across seeds (:func:`seed_measure`)
    values: Tuple[float, ...] = ()
    lo: Optional[float] = None
    hi: Optional[float] = None

    @property
    def seeds(self) -> int:
        return len(self.values) if self.values else int(self.ok)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.value is not None and math.isfinite(self.value)


def choose(rows: Sequence[Dict[str, Any]]) -> Measure:
    """One measurement from rows of the same quantity: the last ``ok`` row in file order
    (a resumed run may have re-measured a failed cell), else the last failed one."""
    if not rows:
        return Measure("missing")
    ok = [r for r in rows if r["status"] == "ok" and r["value"] is not None]
    if ok:
        r = max(ok, key=lambda r: r["_order"])
        return Measure("ok", float(r["value"]), "", r)
    r = max(rows, key=lambda r: r["_order"])
    return Measure("failed", None, r.get("error") or "failed (no reason recorded)", r)


class Index:
    """The rows of one group, looked up by what a table cell needs."""

    def __init__(self, records: Iterable[Dict[str, Any]]):
        self.records = list(records)
        self._by: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
        for r in self.records:
            self._by[(r["backbone"], variant_of(r), r["metric"])].append(r)

    @property
    def labels(self) -> Dict[Variant, str]:
        """Display label of every variant of the group (the same in every table)."""
        if not hasattr(self, "_labels"):
            self._labels = display_labels(sorted({variant_of(r) for r in self.records},
                                                 key=variant_sort_key))
        return self._labels

    def rows(self, backbone: str, variant: Variant, metric: str) -> List[Dict[str, Any]]:
        return self._by.get((backbone, variant, metric), [])

    def get(self, backbone: str, variant: Variant, metric: str, *, mode: Optional[str] = None,
            resolution: Optional[int] = None, batch: Optional[int] = None,
            counter: Optional[str] = None, train_resolution: Optional[int] = None,
            dataset: Optional[str] = None, any_resolution: bool = False) -> Measure:
        """The measurement for one cell. ``mode``/``resolution``/``batch``/``counter``/
        ``train_resolution``/``dataset`` given: rows must match. ``batch=None``: the
        smallest batch measured (params and FLOPs are counted per image).
        ``any_resolution``: fall back to any resolution (parameter counts)."""
        cand = self.rows(backbone, variant, metric)
        if mode is not None:   # a failed cell without a mode failed for every mode
            cand = [r for r in cand if r["mode"] == mode
                    or (r["mode"] is None and r["status"] == "failed")]
        if counter is not None:   # a failed row without a method failed for every counter
            cand = [r for r in cand if counter_of(r["method"]) == counter
                    or (counter_of(r["method"]) == "" and r["status"] == "failed")]
        if train_resolution is not None:
            cand = [r for r in cand if r.get("train_resolution") == train_resolution]
        if dataset is not None:
            cand = [r for r in cand if (r.get("dataset") or "") == dataset]
        if resolution is not None:
            exact = [r for r in cand if r["resolution"] == resolution]
            cand = exact if (exact or not any_resolution) else cand
        if batch is not None:
            cand = [r for r in cand if r["batch"] == batch]
        elif cand:
            batches = sorted({r["batch"] for r in cand}, key=lambda b: (b is None, b or 0))
            cand = [r for r in cand if r["batch"] == batches[0]]
        if any_resolution and resolution is None and cand:
            res = sorted({r["resolution"] for r in cand}, key=lambda x: (x is None, x or 0))
            cand = [r for r in cand if r["resolution"] == res[0]]
        return choose(cand)

    # what was measured -----------------------------------------------------------
    def backbones(self) -> List[str]:
        return sorted({r["backbone"] for r in self.records})

    def variants(self, backbone: str, metrics: Optional[Iterable[str]] = None) -> List[Variant]:
        metrics = set(metrics) if metrics is not None else None
        found = {variant_of(r) for r in self.records if r["backbone"] == backbone
                 and (metrics is None or r["metric"] in metrics)}
        return sorted(found, key=variant_sort_key)

    def values(self, column: str, backbone: Optional[str] = None,
               metrics: Optional[Iterable[str]] = None, **match) -> List[Any]:
        metrics = set(metrics) if metrics is not None else None
        out = set()
        for r in self.records:
            if backbone is not None and r["backbone"] != backbone:
                continue
            if metrics is not None and r["metric"] not in metrics:
                continue
            if any(r.get(k) != v for k, v in match.items()):
                continue
            out.add(r.get(column))
        return sorted(out, key=lambda x: (x is None, x if x is not None else 0))

    def counters(self, backbone: Optional[str] = None) -> List[str]:
        found = {counter_of(r["method"]) for r in self.records
                 if r["metric"] == "flops" and (backbone is None or r["backbone"] == backbone)}
        return sorted(found - {""}, key=counter_sort_key)

    def flop_methods(self) -> List[str]:
        return sorted({r["method"] for r in self.records if r["metric"] == "flops"
                       and r["method"]},
                      key=lambda m: (counter_sort_key(counter_of(m)), m))


def display_labels(variants: Sequence[Variant]) -> Dict[Variant, str]:
    """The variant label; disambiguated (stages, then options) where two variants share it."""
    by_label: Dict[str, List[Variant]] = defaultdict(list)
    for v in variants:
        by_label[v[1]].append(v)
    out = {}
    for label, vs in by_label.items():
        for v in vs:
            text = label
            if len(vs) > 1:
                if len({x[3] for x in vs}) == len(vs):
                    text += f" [stages {v[3] or 'default'}]"
                else:
                    text += f" [{v[0]} {v[2]}" + (f", stages {v[3]}" if v[3] else "") + "]"
            out[v] = text
    return out


# --------------------------------------------------------------------------- cells and tables

@dataclass
class Cell:
    text: str
    notes: Tuple[int, ...] = ()

    def markdown(self) -> str:
        return self.text.replace("|", "\\|") + "".join(f"[^{n}]" for n in self.notes)

    def latex(self) -> str:
        text = latex_escape(self.text)
        if self.notes:
            text += "\\textsuperscript{" + ",".join(str(n) for n in self.notes) + "}"
        return text


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
          "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
          "^": r"\textasciicircum{}", DASH: "--", "—": "---", "²": r"$^2$", "×": r"$\times$",
          "±": r"$\pm$", "−": r"$-$", "·": r"$\cdot$", "↔": r"$\leftrightarrow$",
          "≠": r"$\neq$"}


def latex_escape(text: str) -> str:
    """LaTeX for a plain text (Markdown code spans become ``\\texttt``)."""
    parts = str(text).split("`")
    out = []
    for i, part in enumerate(parts):
        esc = "".join(_LATEX.get(ch, ch) for ch in part)
        out.append(f"\\texttt{{{esc}}}" if i % 2 == 1 and i < len(parts) - 1 else esc)
    return "".join(out)


class Notes:
    """Footnotes of one report file: numbered in order of first use, one number per
    distinct text within a table (numbers are unique across the file)."""

    def __init__(self) -> None:
        self.next = 1

    def start_table(self) -> "TableNotes":
        return TableNotes(self)


class TableNotes:
    def __init__(self, notes: Notes) -> None:
        self._notes = notes
        self.items: List[Tuple[int, str]] = []
        self._by_text: Dict[str, int] = {}

    def add(self, text: str) -> int:
        if text not in self._by_text:
            n = self._notes.next
            self._notes.next += 1
            self._by_text[text] = n
            self.items.append((n, text))
        return self._by_text[text]


@dataclass
class Table:
    key: str                 # anchor and file stem, e.g. "cost-resnet50-r224-b8"
    title: str
    headers: List[str]
    rows: List[List[Cell]]
    align: List[str]
    intro: List[str] = field(default_factory=list)      # sentences above the table
    notes: List[Tuple[int, str]] = field(default_factory=list)

    def markdown(self) -> str:
        body = tabulate([[c.markdown() for c in row] for row in self.rows],
                        headers=self.headers, tablefmt="pipe", disable_numparse=True,
                        colalign=self.align)
        parts = [f'<a id="{self.key}"></a>', "", f"### {self.title}", ""]
        if self.intro:
            parts += [" ".join(self.intro), ""]
        parts.append(body)
        if self.notes:
            parts.append("")
            parts += [f"[^{n}]: {text}" for n, text in self.notes]
        return "\n".join(parts) + "\n"

    def latex(self, header: str) -> str:
        body = tabulate([[c.latex() for c in row] for row in self.rows],
                        headers=[latex_escape(h) for h in self.headers], tablefmt="latex_raw",
                        disable_numparse=True, colalign=self.align)
        body = body.replace("\\hline", "\\midrule", 2).replace("\\midrule", "\\toprule", 1)
        body = body.replace("\\hline", "\\bottomrule")
        lines = [f"% {header}", "% needs \\usepackage{booktabs}", "\\begin{table}[t]",
                 "\\centering", f"\\caption{{{latex_escape(self.title)}}}",
                 f"\\label{{tab:{self.key}}}", "\\small", body]
        if self.intro or self.notes:
            lines.append("\\par\\footnotesize")
            lines += [latex_escape(" ".join(self.intro)) + "\\par"] if self.intro else []
            lines += [f"\\textsuperscript{{{n}}}{latex_escape(t)}\\par" for n, t in self.notes]
        lines.append("\\end{table}")
        return "\n".join(lines) + "\n"


def fmt(value: float, kind: str, sign: bool = False) -> str:
    """``value`` with the fixed decimals of ``kind`` (no negative zero)."""
    if kind == "count":   # whole numbers with thousands separators
        return f"{int(round(value)):+,}" if sign else f"{int(round(value)):,}"
    d = DECIMALS[kind]
    v = round(value, d)
    if v == 0:
        v = 0.0
    return f"{v:+.{d}f}" if sign else f"{v:.{d}f}"


def failure_text(label: str, m: Measure) -> str:
    r = m.row or {}
    where = []
    if r.get("mode"):
        where.append(r["mode"])
    if r.get("resolution") is not None:
        where.append(f"at {r['resolution']}²")
    if r.get("batch") is not None:
        where.append(f"batch {r['batch']}")
    return f"{label} ({', '.join(where)}) failed: {m.error}" if where else \
        f"{label} failed: {m.error}"


def value_cell(m: Measure, kind: str, label: str, notes: TableNotes, scale: float = 1.0,
               suffix: str = "") -> Cell:
    if m.ok:
        return Cell(fmt(m.value / scale, kind) + suffix)
    if m.status == "failed":
        return Cell(DASH, (notes.add(failure_text(label, m)),))
    return Cell(MISSING)


def _overhead_head(m: Measure, is_ref: bool, label: str, notes: TableNotes) -> Optional[Cell]:
    """The cell of an overhead figure that is failed, missing or the reference; None
    when ``m`` is a figure to compare."""
    if m.status == "failed":
        return Cell(DASH, (notes.add(failure_text(label, m)),))
    if not m.ok:
        return Cell(MISSING)
    if is_ref:
        return Cell(REF)
    return None


def overhead_cell(m: Measure, ref: Measure, is_ref: bool, label: str, ref_label: str,
                  notes: TableNotes) -> Cell:
    head = _overhead_head(m, is_ref, label, notes)
    if head is not None:
        return head
    if ref.status == "failed":
        return Cell(DASH, (notes.add(failure_text(ref_label, ref)),))
    if not ref.ok or ref.value == 0:
        return Cell(MISSING)
    ratio = m.value / ref.value
    return Cell(f"{fmt(100 * (ratio - 1), 'pct', sign=True)} % ({fmt(ratio, 'ratio')}×)")


def _drop_empty_columns(headers, align, rows, keep: int):
    """Drop columns (after the first ``keep``) where no row has a figure."""
    cols = [i for i in range(len(headers))
            if i < keep or any(row[i].text != MISSING for row in rows)]
    return ([headers[i] for i in cols], [align[i] for i in cols],
            [[row[i] for i in cols] for row in rows])


# --------------------------------------------------------------------------- cost (Table 1)

def reference_resolution(idx: Index, backbone: str) -> Optional[int]:
    """224² when timed there, else the resolution timed most often (ties: the smallest);
    without timings, 224² or the smallest resolution with FLOPs."""
    timed = [r["resolution"] for r in idx.records
             if r["backbone"] == backbone and r["metric"] in TIMING_METRICS
             and r["resolution"] is not None]
    if timed:
        if REFERENCE_RES in timed:
            return REFERENCE_RES
        return sorted(set(timed), key=lambda x: (-timed.count(x), x))[0]
    counted = idx.values("resolution", backbone, ["flops", "params"])
    counted = [x for x in counted if x is not None]
    if REFERENCE_RES in counted or not counted:
        return REFERENCE_RES
    return counted[0]


def cost_keys(idx: Index) -> List[Tuple[str, int, Optional[int]]]:
    """(backbone, resolution, batch) of each cost table of a group."""
    keys = []
    for backbone in idx.backbones():
        if not idx.variants(backbone, ["params", "flops"] + list(TIMING_METRICS)):
            continue
        res = reference_resolution(idx, backbone)
        batches = [b for b in idx.values("batch", backbone, TIMING_METRICS, resolution=res)]
        for b in batches or [None]:
            keys.append((backbone, res, b))
    return keys


def _cost_columns(idx: Index, backbone: str):
    """[(header, metric, mode, counter, kind, scale)] of a cost table."""
    cols = [("params (M)", "params", None, None, "params", 1e6)]
    for c in idx.counters(backbone):
        cols.append((f"FLOPs (G) {c}", "flops", None, c, "flops", 1.0))
    if idx.variants(backbone, ["flops_train"]):   # forward + backward per image
        cols.append(("FLOPs train step (G)", "flops_train", None, None, "flops", 1.0))
    memory = [m for m in MEMORY_METRICS if idx.variants(backbone, [m])] or ["peak_memory"]
    for m in memory:
        cols += [(f"{MEMORY_METRICS[m]} {mode} (MiB)", m, mode, None, "peak_memory", 1.0)
                 for mode in ("train", "eval")]
    cols += [("FPS train, absolute (img/s)", "throughput", "train", None, "throughput", 1.0),
             ("FPS eval, absolute (img/s)", "throughput", "eval", None, "throughput", 1.0),
             ("speed ratio train (×)", "speed_ratio", "train", None, "speed_ratio", 1.0),
             ("speed ratio eval (×)", "speed_ratio", "eval", None, "speed_ratio", 1.0)]
    return cols


def cost_measure(idx, backbone, v, metric, mode, counter, res, batch) -> Measure:
    if metric == "params":
        return idx.get(backbone, v, "params", resolution=res, any_resolution=True)
    if metric == "flops":
        return idx.get(backbone, v, "flops", resolution=res, counter=counter)
    if metric == "flops_train":
        return idx.get(backbone, v, "flops_train", resolution=res)
    m = idx.get(backbone, v, metric, mode=mode, resolution=res, batch=batch)
    if m.status == "missing" and metric in ("throughput", "speed_ratio"):
        # a cell that failed as a whole is recorded under its first metric (latency)
        lat = idx.get(backbone, v, "latency", mode=mode, resolution=res, batch=batch)
        if lat.status == "failed":
            return lat
    return m


def _disagreement_note(idx, backbone, v, res, label, counter) -> Optional[str]:
    m = idx.get(backbone, v, "flops_disagreement", resolution=res)
    if m.ok and "DISAGREE" in ((m.row or {}).get("method") or "") and counter != "fvcore":
        return (f"{label}: the FLOP counters disagree by {fmt(m.value, 'pct')} % at {res}² "
                f"(over 2 %; fvcore is the main figure)")
    return None


def cost_table(idx: Index, notes: Notes, backbone: str, res: int, batch: Optional[int],
               device: str) -> Tuple[Table, Table]:
    """The Table 1 figures and their overhead relative to ``none``."""
    variants = idx.variants(backbone, ["params", "flops"] + list(TIMING_METRICS))
    cols = _cost_columns(idx, backbone)
    table = _figures_table(idx, notes, backbone, variants, cols, res, batch, device)
    return table, _overhead_table(idx, notes, backbone, variants, cols, res, batch, device)


def _batch_text(batch: Optional[int]) -> str:
    return f", batch {batch}" if batch is not None else ""


def _key_suffix(res: Optional[int], batch: Optional[int]) -> str:
    return f"-r{res}" + (f"-b{batch}" if batch is not None else "")


def ratio_cell(m: Measure, is_plain: bool = False) -> Cell:
    """``0.772 [0.760, 0.784]``: a paired speed ratio with its 95 % interval (rows that
    carry one), ``≈`` when the run cannot tell it from the plain backbone."""
    row = m.row or {}
    text = fmt(m.value, "speed_ratio")
    if is_plain:
        return Cell(text)
    lo, hi = row.get("ratio_lo"), row.get("ratio_hi")
    if lo is not None and hi is not None:
        text += f" [{fmt(lo, 'speed_ratio')}, {fmt(hi, 'speed_ratio')}]"
    if row.get("distinct") is False:
        text += " ≈"
    return Cell(text)


def _control_row(idx: Index, backbone: str, variants: List[Variant], cols, res: int,
                 batch: Optional[int]) -> Optional[List[Cell]]:
    """The A/A control's speed ratios (from the plain backbone's rows), if recorded."""
    ref = next((v for v in variants if v[0] == "none"), None)
    if ref is None:
        return None
    row, found = [Cell("control (A/A)"), Cell(backbone)], False
    for header, metric, mode, counter, kind, scale in cols:
        m = cost_measure(idx, backbone, ref, metric, mode, counter, res, batch) \
            if metric == "speed_ratio" else Measure("missing")
        r = m.row or {}
        if m.ok and r.get("control_ratio") is not None:
            found = True
            text = fmt(r["control_ratio"], "speed_ratio")
            if r.get("control_lo") is not None and r.get("control_hi") is not None:
                text += (f" [{fmt(r['control_lo'], 'speed_ratio')}, "
                         f"{fmt(r['control_hi'], 'speed_ratio')}]")
            row.append(Cell(text))
        else:
            row.append(Cell(MISSING))
    return row if found else None


def _figures_table(idx: Index, notes: Notes, backbone: str, variants: List[Variant], cols,
                   res: int, batch: Optional[int], device: str) -> Table:
    """The cost figures (Table 1 layout), one row per variant."""
    labels = idx.labels
    tn = notes.start_table()
    rows = []
    for v in variants:
        row = [Cell(labels[v]), Cell(backbone)]
        for header, metric, mode, counter, kind, scale in cols:
            m = cost_measure(idx, backbone, v, metric, mode, counter, res, batch)
            cell = value_cell(m, kind, labels[v], tn, scale)
            if metric == "speed_ratio" and m.ok:
                cell = ratio_cell(m, v[0] == "none")
            if metric == "flops" and m.ok:
                note = _disagreement_note(idx, backbone, v, res, labels[v], counter)
                if note:
                    cell = Cell(cell.text, (tn.add(note),))
            row.append(cell)
        rows.append(row)
    control = _control_row(idx, backbone, variants, cols, res, batch)
    if control:
        rows.append(control)
    headers = ["method", "backbone"] + [c[0] for c in cols]
    align = ["left", "left"] + ["right"] * len(cols)
    headers, align, rows = _drop_empty_columns(headers, align, rows, 2)
    counters = idx.counters(backbone)
    intro = [f"{backbone} at {res_text(res)}{_batch_text(batch)} on `{device}`.",
             "FLOPs are multiply-adds (GMac) per image"
             + (f", {counters[0]} as the main column" if counters else "") + ";",
             "memory is the peak of one eval forward / one train step;",
             "FPS = batch / median latency (absolute);"
             " speed ratio = paired per-round ratio `none` time / module time, the mean of"
             " its block medians with the 95 % interval `[lo, hi]` over blocks of fresh"
             " instances (see Conventions);"
             " `≈` = indistinguishable from `none` (the interval contains 1 or overlaps the"
             " A/A control's: a second plain backbone timed in the same rounds).",
             f"{DASH} = failed (reason in the note), {MISSING} = not measured."]
    return Table(f"cost-{backbone}{_key_suffix(res, batch)}",
                 f"Cost of {backbone} at {res_text(res)}{_batch_text(batch)}", headers, rows,
                 align, intro, tn.items)


def _overhead_table(idx: Index, notes: Notes, backbone: str, variants: List[Variant], cols,
                    res: int, batch: Optional[int], device: str) -> Table:
    """Each figure relative to the plain backbone's, and the parameters added."""
    labels = idx.labels
    ref_v = next((v for v in variants if v[0] == "none"), None)
    ref_label = labels.get(ref_v, "none") if ref_v else "none"
    tn = notes.start_table()
    # relative speed is the paired ratio itself, never a ratio of two FPS medians
    ocols = [c for c in cols if c[1] != "throughput"]
    rows = []
    for v in variants:
        added = idx.get(backbone, v, "params_attention", resolution=res, any_resolution=True)
        row = [Cell(labels[v]), Cell(backbone), value_cell(added, "count", labels[v], tn)]
        for header, metric, mode, counter, kind, scale in ocols:
            m = cost_measure(idx, backbone, v, metric, mode, counter, res, batch)
            if metric == "speed_ratio":
                row.append(_speed_overhead_cell(m, v == ref_v, labels[v], tn))
                continue
            if ref_v is None:
                ref = Measure("missing")
            else:
                ref = cost_measure(idx, backbone, ref_v, metric, mode, counter, res, batch)
            row.append(overhead_cell(m, ref, v == ref_v, labels[v], ref_label, tn))
        rows.append(row)
    headers = ["method", "backbone", "params added"] + [
        c[0].split(" (")[0] + (" " + c[3] if c[3] else "") for c in ocols]
    align = ["left", "left"] + ["right"] * (len(ocols) + 1)
    headers, align, rows = _drop_empty_columns(headers, align, rows, 2)
    return Table(f"overhead-{backbone}{_key_suffix(res, batch)}",
                 f"Overhead of {backbone} variants relative to `none` at "
                 f"{res_text(res)}{_batch_text(batch)}", headers, rows, align,
                 _overhead_intro(backbone, res, batch, device, ref_v is not None), tn.items)


def _speed_overhead_cell(m: Measure, is_ref: bool, label: str, notes: TableNotes) -> Cell:
    """The paired speed ratio as an overhead, ``-22.8 % (0.772×)`` (``≈``: not
    distinguishable from the plain backbone)."""
    head = _overhead_head(m, is_ref, label, notes)
    if head is not None:
        return head
    text = f"{fmt(100 * (m.value - 1), 'pct', sign=True)} % ({fmt(m.value, 'ratio')}×)"
    return Cell(text + (" ≈" if (m.row or {}).get("distinct") is False else ""))


def _overhead_intro(backbone: str, res: int, batch: Optional[int], device: str,
                    has_ref: bool) -> List[str]:
    """The sentences above an overhead table."""
    intro = [f"Change relative to the plain {backbone} (`none`) of the same run, device "
             f"(`{device}`), resolution ({res_text(res)}) and batch"
             f"{f' ({batch})' if batch is not None else ''}:",
             "`+x.xx % (y.yyy×)` = (figure / plain − 1) in percent and figure / plain.",
             "For speed (the paired speed ratio of the cost table) below 1.000× means "
             "slower; `≈`: indistinguishable from the plain backbone.",
             "`params added` = parameters the module adds to the plain backbone (count)."]
    if not has_ref:
        intro.append("No plain backbone (`none`) was measured in this group, "
                     "so no overhead can be given.")
    return intro


# --------------------------------------------------------------------------- cost vs resolution

RES_METRICS = {  # metric: (title, unit header, kind)
    "flops": ("FLOPs", "G", "flops"),
    "latency": ("Latency", "ms", "latency"),
    "peak_memory": ("Peak memory", "MiB", "peak_memory"),
    "peak_tensor_memory": ("Peak tensor memory (CPU)", "MiB", "peak_memory"),
    "rss_increase": ("Resident-memory increase of a step (CPU)", "MiB", "peak_memory"),
    "cuda_max_allocated": ("CUDA max allocated", "MiB", "peak_memory"),
    "cuda_max_reserved": ("CUDA max reserved", "MiB", "peak_memory"),
}


ResKey = Tuple[str, str, Optional[str], Optional[int], Optional[str]]


def resolution_keys(idx: Index) -> List[ResKey]:
    """(backbone, metric, mode, batch, counter) of each cost-vs-resolution table (only where
    two or more resolutions were measured)."""
    keys = []
    for backbone in idx.backbones():
        for metric in RES_METRICS:
            if metric == "flops":
                counters = idx.counters(backbone)
                combos = [(None, None, counters[0])] if counters else []
            else:
                combos = []
                for mode in [m for m in idx.values("mode", backbone, [metric]) if m]:
                    for b in idx.values("batch", backbone, [metric], mode=mode):
                        combos.append((mode, b, None))
            for mode, b, counter in combos:
                res = [r for r in idx.records if r["backbone"] == backbone and r["metric"] == metric
                       and (mode is None or r["mode"] == mode) and (b is None or r["batch"] == b)
                       and (counter is None or counter_of(r["method"]) in (counter, ""))]
                if len({r["resolution"] for r in res}) >= 2:
                    keys.append((backbone, metric, mode, b, counter))
    return keys


def resolution_table(idx: Index, notes: Notes, backbone: str, metric: str, mode: Optional[str],
                     batch: Optional[int], counter: Optional[str], device: str,
                     full: bool = False) -> Table:
    """``metric`` per variant at 168², 224², 448² (``full``: at every measured resolution),
    with the growth 448²/224²."""
    title, unit, kind = RES_METRICS[metric]
    variants = idx.variants(backbone, [metric])
    labels = idx.labels
    match = {k: v for k, v in (("mode", mode), ("batch", batch)) if v is not None}
    measured = [r for r in idx.values("resolution", backbone, [metric], **match) if r is not None]
    cols = [r for r in STANDARD_RES if r in measured]
    if full or len(cols) < 2:
        cols = measured
    growth = (not full) and REFERENCE_RES in cols and max(cols) > REFERENCE_RES
    tn = notes.start_table()
    rows = []
    for v in variants:
        row = [Cell(labels[v])]
        ms = {}
        for r in cols:
            if metric == "flops":
                ms[r] = idx.get(backbone, v, metric, resolution=r, counter=counter)
            else:
                ms[r] = idx.get(backbone, v, metric, mode=mode, resolution=r, batch=batch)
            row.append(value_cell(ms[r], kind, labels[v], tn))
        if growth:
            hi, lo = ms[max(cols)], ms[REFERENCE_RES]
            row.append(Cell(fmt(hi.value / lo.value, "growth") + "×") if hi.ok and lo.ok
                       and lo.value else Cell(MISSING))
        rows.append(row)
    headers = ["method"] + [f"{res_text(r)} ({unit})" for r in cols]
    if growth:
        headers.append(f"{res_text(max(cols))} / {res_text(REFERENCE_RES)}")
    align = ["left"] + ["right"] * (len(headers) - 1)
    what = [f"{backbone}"]
    if mode:
        what.append(mode)
    if batch is not None:
        what.append(f"batch {batch}")
    if counter:
        what.append(f"{counter}, multiply-adds per image")
    key = "-".join(["full" if full else "res", slug(metric), backbone] + ([mode] if mode else [])
                   + ([f"b{batch}"] if batch is not None else []))
    intro = [f"{title} ({unit}) on `{device}` at each input resolution (square inputs)."]
    if growth:
        intro.append(f"The last column is the growth from {res_text(REFERENCE_RES)} to "
                     f"{res_text(max(cols))}.")
    if not full and len(measured) > len(cols):
        intro.append("Every measured resolution is in the appendix and the plot.")
    intro.append(f"{DASH} = failed (reason in the note), {MISSING} = not measured.")
    return Table(key, f"{title} vs input resolution ({', '.join(what)})"
                 + (", every measured resolution" if full else ""), headers, rows, align,
                 intro, tn.items)


# --------------------------------------------------------------------------- accuracy (Table 2)

ACC_METRICS = ("top1", "top5")


def accuracy_keys(idx: Index) -> List[Tuple[str, str, str]]:
    """(backbone, dataset, metric) of each accuracy table."""
    keys = []
    for backbone in idx.backbones():
        for metric in ACC_METRICS:
            for ds in idx.values("dataset", backbone, [metric]):
                keys.append((backbone, ds or "", metric))
    return keys


def seed_measure(rows: Sequence[Dict[str, Any]]) -> Measure:
    """One accuracy cell from the rows of one variant at one test size: per checkpoint
    (one per seed) the row :func:`choose` picks; with several ok seeds the mean and its
    95 % Student-t interval across seeds, ``mean +- t(0.975, n-1) s / sqrt(n)`` (the same
    as :func:`attnbench.accuracy.seeds.seed_interval`)."""
    by_ckpt: Dict[Any, List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_ckpt[r.get("checkpoint")].append(r)
    chosen = [choose(rs) for _, rs in sorted(by_ckpt.items(), key=lambda kv: str(kv[0]))]
    ok = [m for m in chosen if m.ok]
    if len(ok) <= 1:
        return ok[0] if ok else choose(rows)
    xs = tuple(m.value for m in ok)
    from attnbench.profilers.stats import mean_interval
    iv = mean_interval(xs)
    mean, lo, hi = iv.estimate, iv.lo, iv.hi
    return Measure("ok", mean, "", ok[-1].row, xs, lo, hi)


def within_noise(a: Measure, b: Measure) -> Optional[bool]:
    """Whether the difference of two several-seed means does NOT clear the seed noise:
    its Welch 95 % t-interval contains 0 (None with < 2 seeds on a side)."""
    from attnbench.profilers.stats import clears_noise
    clears = clears_noise(a.values, b.values)
    return None if clears is None else not clears


def accuracy_series(idx: Index, backbone: str, dataset: str, metric: str):
    """[(variant, train_resolution, {test resolution: Measure})], sorted; the seeds of a
    variant (one checkpoint each) are one series (:func:`seed_measure`)."""
    out = []
    for v in idx.variants(backbone, [metric]):
        trs = idx.values("train_resolution", backbone, [metric], dataset=dataset or None) \
            if dataset else idx.values("train_resolution", backbone, [metric])
        for tr in trs:
            rows = [r for r in idx.rows(backbone, v, metric) if r.get("train_resolution") == tr
                    and (r.get("dataset") or "") == dataset]
            if not rows:
                continue
            by_res: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
            for r in rows:
                by_res[r["resolution"]].append(r)
            out.append((v, tr, {res: seed_measure(rs) for res, rs in sorted(by_res.items())}))
    return sorted(out, key=lambda x: (variant_sort_key(x[0]), x[1] != REFERENCE_RES,
                                      x[1] or 0))


def best_of(series: Dict[int, Measure]) -> Optional[Tuple[int, float]]:
    ok = [(res, m.value) for res, m in series.items() if m.ok]
    if not ok:
        return None
    return sorted(ok, key=lambda x: (-x[1], x[0]))[0]


def scaled(res: int, train_res: Optional[int], measured: Iterable[int] = ()) -> Optional[int]:
    """The test size standing for ``res`` (a column of a 224²-trained model) for a model
    trained at ``train_res``: the measured size nearest to res × train_res / 224 (the
    robustness sweep rounds scaled sizes to multiples of 4), within 3 % or 2 px."""
    if train_res is None or train_res == REFERENCE_RES:
        return res
    target = res * train_res / REFERENCE_RES
    near = sorted((abs(m - target), m) for m in measured if m is not None)
    if near and near[0][0] <= max(2.0, 0.03 * target):
        return near[0][1]
    return None


def _bn_stats(ser: Dict[int, Measure]) -> str:
    """``train`` or ``test`` (FixRes re-estimation): the BN statistics of a series."""
    for m in ser.values():
        if m.row:
            return m.row.get("bn_stats") or "train"
    return "train"


def _acc_reference(series, tr, ser) -> Optional[Dict[int, Measure]]:
    """The plain backbone's series trained at ``tr`` with the same BN statistics."""
    for v, tr_, other in series:
        if v[0] == "none" and tr_ == tr and _bn_stats(other) == _bn_stats(ser):
            return None if other is ser else other
    return None


def _acc_cell(m: Measure, ref: Optional[Measure], metric: str, label: str,
              tn: TableNotes) -> Cell:
    """``mean [lo, hi]`` for several seeds, ``≈`` when within the seed noise of ``ref``."""
    cell = value_cell(m, metric, label, tn)
    if not m.ok or len(m.values) < 2:
        return cell
    text = f"{cell.text} [{fmt(m.lo, metric)}, {fmt(m.hi, metric)}]"
    if ref is not None and within_noise(m, ref):
        text += " ≈"
    return Cell(text, cell.notes)


def accuracy_table(idx: Index, notes: Notes, backbone: str, dataset: str, metric: str,
                   device: str) -> Table:
    series = accuracy_series(idx, backbone, dataset, metric)
    labels = idx.labels
    tn = notes.start_table()
    rows = []
    any_scaled = False
    seeds = max((m.seeds for _, _, ser in series for m in ser.values()), default=0) > 1
    for v, tr, ser in series:
        label = labels[v]
        ref = _acc_reference(series, tr, ser)
        row = [Cell(label), Cell(res_text(tr) if tr is not None else "?")]
        if seeds:
            row.append(Cell(str(max((m.seeds for m in ser.values()), default=0))))
        best = best_of(ser)
        if best is None:
            failed = [m for m in ser.values() if m.status == "failed"]
            row += [value_cell(failed[-1], metric, label, tn) if failed else Cell(MISSING),
                    Cell(MISSING)]
        else:
            row += [_acc_cell(ser[best[0]], ref and ref.get(best[0]), metric, label, tn),
                    Cell(res_text(best[0]))]
        for col in (224, 168, 448):
            actual = scaled(col, tr, ser.keys())
            m = ser.get(actual, Measure("missing")) if actual is not None else Measure("missing")
            cell = _acc_cell(m, ref and ref.get(actual), metric, label, tn)
            if tr is not None and tr != REFERENCE_RES:
                any_scaled = True
                if m.ok:
                    cell = Cell(f"{cell.text} ({res_text(actual)})", cell.notes)
            row.append(cell)
        rows.append(row)
    headers = ["method", "trained at"] + (["seeds"] if seeds else []) + [
        f"Best {metric} (%)", "best at", "224²", "168²", "448²"]
    align = ["left"] + ["right"] * (len(headers) - 1)
    ds = f" on {dataset}" if dataset else ""
    key = f"acc-{metric}-{backbone}" + (f"-{slug(dataset)}" if dataset else "")
    return Table(key, f"{metric_name(metric)} accuracy vs test resolution, {backbone}{ds}",
                 headers, rows, align, _acc_intro(backbone, ds, device, metric, any_scaled,
                                                  seeds), tn.items)


def accuracy_sweep_table(idx: Index, notes: Notes, backbone: str, dataset: str, metric: str,
                         device: str) -> Table:
    """Every tested size of each variant (the data of Fig. 3), ``mean [lo, hi]`` over
    seeds with ``≈`` as in :func:`accuracy_table`; one table per training size."""
    series = accuracy_series(idx, backbone, dataset, metric)
    tn = notes.start_table()
    sizes = sorted({res for _, _, ser in series for res in ser})
    rows = []
    for v, tr, ser in series:
        ref = _acc_reference(series, tr, ser)
        n = max((m.seeds for m in ser.values()), default=0)
        rows.append([Cell(idx.labels[v]), Cell(res_text(tr)), Cell(str(n))]
                    + [_acc_cell(ser.get(res, Measure("missing")), ref and ref.get(res),
                                 metric, idx.labels[v], tn) for res in sizes])
    headers = ["method", "trained at", "seeds"] + [res_text(r) for r in sizes]
    ds = f" on {dataset}" if dataset else ""
    intro = [f"{metric_name(metric)} accuracy (%) of {backbone}{ds} at every tested size "
             f"(evaluated on `{device}`; the data of the accuracy plot): mean over seeds "
             f"[95 % Student-t interval across seeds]; ≈ = difference from the plain "
             f"backbone within the seed noise.",
             f"{DASH} = failed (reason in the note), {MISSING} = not measured."]
    key = f"acc-sweep-{metric}-{backbone}" + (f"-{slug(dataset)}" if dataset else "")
    return Table(key, f"{metric_name(metric)} accuracy at every test size, {backbone}{ds}",
                 headers, rows, ["left"] + ["right"] * (len(headers) - 1), intro, tn.items)


def _acc_intro(backbone: str, ds: str, device: str, metric: str, any_scaled: bool,
               seeds: bool) -> List[str]:
    """The lines above an accuracy table."""
    intro = [f"{metric_name(metric)} accuracy (%) of {backbone}{ds}, single crop, at several "
             f"test resolutions (evaluated on `{device}`), laid out as Table 2 of the TDAM paper;",
             "Best is the highest over every tested resolution and `best at` where it was reached."]
    if seeds:
        intro.append("With several seeds (one checkpoint each) a cell is the mean over seeds "
                     "with its 95 % Student-t interval across seeds [lo, hi]; ≈ marks a "
                     "module whose difference from the plain backbone (same training size "
                     "and BN statistics) does not clear the seed noise (the Welch 95 % "
                     "interval of the difference contains 0).")
    if any_scaled:
        intro.append("Rows trained at R² other than 224² are scaled: their columns are the test "
                     "sizes 0.75·R, R and 2·R (224² ↔ R², 168² ↔ 0.75·R, 448² ↔ 2·R); "
                     "the actual size is in parentheses.")
    intro.append(f"{DASH} = failed (reason in the note), {MISSING} = not measured.")
    return intro


def metric_name(metric: str) -> str:
    return {"top1": "Top-1", "top5": "Top-5"}.get(metric, metric)


def slug(text: str) -> str:
    out = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in str(text).lower())
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "x"


# --------------------------------------------------------------------------- every failure

def failures_table(idx: Index, device: str) -> Optional[Table]:
    """Every failed measurement of the group, one line per cell and reason, so that no
    failure is hidden by a table that does not show its metric."""
    groups: Dict[tuple, List[str]] = defaultdict(list)
    for r in idx.records:
        if r["status"] != "failed":
            continue
        mode = r["mode"] or ("all" if r["metric"] in TIMING_METRICS else "")
        key = (r["backbone"], variant_of(r), mode, r["resolution"], r["batch"],
               r.get("error") or "failed (no reason recorded)")
        if r["metric"] not in groups[key]:
            groups[key].append(r["metric"])
    if not groups:
        return None
    labels = idx.labels

    def order(k):
        return (k[0], variant_sort_key(k[1]), k[2], k[3] is None, k[3] or 0, k[4] is None,
                k[4] or 0, k[5])
    rows = []
    for k in sorted(groups, key=order):
        backbone, v, mode, res, batch, error = k
        rows.append([Cell(labels[v]), Cell(backbone), Cell(mode),
                     Cell(res_text(res) if res is not None else ""),
                     Cell(str(batch) if batch is not None else ""),
                     Cell(", ".join(sorted(groups[k]))), Cell(error)])
    return Table("failures", f"Failed measurements on `{device}`",
                 ["method", "backbone", "mode", "resolution", "batch", "metrics", "reason"],
                 rows, ["left"] * 7,
                 [f"Every measurement of this run on `{device}` that failed, with the reason "
                  "recorded by the runner (the tables show these cells as "
                  f"`{DASH}`; mode `all`: the whole cell failed, for every mode; an empty mode, "
                  "resolution or batch means not applicable)."])


# --------------------------------------------------------------------------- uncounted ops

#: the counter whose rows make the "no counter counts" table worth showing (with fvcore
#: and ptflops, the three conventions of attnbench.profilers.flops)
TORCH_COUNTER = "torch.utils.flop_counter"
_DUNDER = {"__mul__": "mul", "__rmul__": "mul", "__add__": "add", "__radd__": "add",
           "__sub__": "sub", "__rsub__": "sub", "__truediv__": "div", "__matmul__": "matmul"}


def op_name(item: str) -> Tuple[str, int]:
    """``("mul", 16)`` of an ``uncounted`` item of any counter (``aten::mul x16``,
    ``__mul__ x16``, ``aten.mul x16``): the op without namespace, in-place mark or
    ``_with_indices``."""
    name, _, n = item.strip().rpartition(" x")
    if not name or not n.isdigit():
        name, n = item.strip(), "1"
    name = name.split("::")[-1].split("aten.")[-1]
    name = _DUNDER.get(name, name).rstrip("_").replace("_with_indices", "")
    return name, int(n)


def _uncounted_by_counter(rows: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, int]]:
    """``{counter: {op: calls}}`` of ok ``flops`` rows (the smallest resolution's)."""
    out: Dict[str, Dict[str, int]] = {}
    res = min((r["resolution"] for r in rows if r["resolution"] is not None), default=None)
    for r in rows:
        if r["status"] != "ok" or r["resolution"] != res:
            continue
        ops: Dict[str, int] = {}
        for item in str(r.get("uncounted") or "").split(";"):
            if item.strip():
                name, n = op_name(item)
                ops[name] = ops.get(name, 0) + n
        out[counter_of(r["method"])] = ops
    return out


def uncounted_table(idx: Index, device: str) -> Optional[Table]:
    """Per module, the operators that none of the FLOP counters counts (each counter's
    ``uncounted`` list, intersected); only for runs counted with torch's counter too."""
    if TORCH_COUNTER not in idx.counters():
        return None
    rows = []
    for backbone in idx.backbones():
        for v in idx.variants(backbone, ["flops"]):
            by = _uncounted_by_counter(idx.rows(backbone, v, "flops"))
            if len(by) < 2:
                continue
            common = set.intersection(*(set(ops) for ops in by.values()))
            text = ", ".join(f"{op} ×{min(ops[op] for ops in by.values())}"
                             for op in sorted(common)) or "none"
            rows.append([Cell(idx.labels[v]), Cell(backbone), Cell(text),
                         Cell(", ".join(sorted(by, key=counter_sort_key)))])
    if not rows:
        return None
    return Table("uncounted-ops", f"Operators no FLOP counter counts on `{device}`",
                 ["method", "backbone", "operators (calls per image)", "counters"], rows,
                 ["left"] * 4,
                 ["The operators that every counter listed as uncounted (the `uncounted` "
                  "column of the `flops` rows, at the smallest resolution counted): their "
                  "arithmetic is in none of the FLOP figures above. Element-wise ops "
                  "(gating products, sigmoid, residual additions) have no multiply-adds "
                  "by the papers' convention; calls: the fewest any counter saw."])
