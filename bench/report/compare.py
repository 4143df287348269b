"""Two runs' speed ratios side by side (``attnbench compare``): the reproducibility check.

For each (backbone, module, resolution, batch, mode) timed in both runs: both ratios
with their 95 % intervals, the difference in percent of the first, whether each ratio
lies inside the other run's interval, and the difference B - A with its own 95 %
interval, +-sqrt(h_A^2 + h_B^2) from the two half-widths (normal approximation for
independent runs): the runs agree when it contains 0. The right test of two runs is
the last one: for two valid 95 % intervals of one true value, the other run's estimate
lies inside an interval only about 83 % of the time (P(|Z| < 1.96 / sqrt 2)); plus the
A/A control of each run.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Tuple

from attnbench.results import load_rows

Key = Tuple[str, str, str, Any, Any, Any]


def ratio_rows(run_dir: Path) -> Dict[Key, Dict[str, Any]]:
    """key -> the last ok ``speed_ratio`` row of a run (key: backbone, label, options,
    resolution, batch, mode)."""
    out: Dict[Key, Dict[str, Any]] = {}
    for r in load_rows(Path(run_dir) / "rows.jsonl"):
        if r["metric"] == "speed_ratio" and r["status"] == "ok":
            out[(r["backbone"], r["label"], r["options"], r["resolution"], r["batch"],
                 r["mode"])] = r
    return out


def compare(run_a: Path, run_b: Path) -> List[Dict[str, Any]]:
    """One record per speed ratio present in both runs (the control as label 'control')."""
    a, b = ratio_rows(run_a), ratio_rows(run_b)
    out = []
    for key in [k for k in a if k in b]:
        ra, rb = a[key], b[key]
        pairs = [(key[1], ra["value"], ra.get("ratio_lo"), ra.get("ratio_hi"), rb["value"],
                  rb.get("ratio_lo"), rb.get("ratio_hi"))]
        if key[1] == "none" and ra.get("control_ratio") is not None \
                and rb.get("control_ratio") is not None:
            pairs = [("control (A/A)", ra["control_ratio"], ra["control_lo"], ra["control_hi"],
                      rb["control_ratio"], rb["control_lo"], rb["control_hi"])]
        for label, va, la, ha, vb, lb, hb in pairs:
            out.append({"backbone": key[0], "label": label, "resolution": key[3],
                        "batch": key[4], "mode": key[5], "a": va, "a_lo": la, "a_hi": ha,
                        "b": vb, "b_lo": lb, "b_hi": hb, "diff_pct": 100 * (vb - va) / va,
                        "a_in_b": _inside(va, lb, hb), "b_in_a": _inside(vb, la, ha),
                        **_difference(va, la, ha, vb, lb, hb)})
    return out


def _difference(va, la, ha, vb, lb, hb) -> Dict[str, Any]:
    """B - A with its 95 % interval from the two half-widths, and whether it holds 0."""
    if None in (la, ha, lb, hb):
        return {"diff": vb - va, "diff_half": None, "agree": None}
    half = math.hypot((ha - la) / 2, (hb - lb) / 2)
    return {"diff": vb - va, "diff_half": half, "agree": bool(abs(vb - va) <= half)}


def _inside(value: float, lo, hi) -> Any:
    return None if lo is None or hi is None else bool(lo <= value <= hi)


def compare_text(records: List[Dict[str, Any]], name_a: str, name_b: str) -> str:
    """A Markdown table of :func:`compare` and a one-line summary."""
    from tabulate import tabulate
    rows = [[r["label"], f"{r['resolution']}² b{r['batch']} {r['mode']}",
             _iv(r["a"], r["a_lo"], r["a_hi"]), _iv(r["b"], r["b_lo"], r["b_hi"]),
             f"{r['diff_pct']:+.2f} %", _yes(r["b_in_a"]), _yes(r["a_in_b"]), _diff(r),
             _yes(r.get("agree"))] for r in records]
    headers = ["module", "cell", f"run A ({name_a})", f"run B ({name_b})", "B vs A",
               "B in A's CI", "A in B's CI", "B - A [95 % CI]", "agree"]
    worst = max((abs(r["diff_pct"]) for r in records), default=float("nan"))
    inside = sum(bool(r["b_in_a"]) and bool(r["a_in_b"]) for r in records)
    agree = sum(bool(r.get("agree")) for r in records)
    return (tabulate(rows, headers, tablefmt="github") +
            f"\n\n{len(records)} ratios; largest difference {worst:.2f} %; "
            f"{inside} of {len(records)} inside the other run's interval both ways "
            f"(expected for about 83 % even without drift); {agree} of {len(records)} "
            f"agree (the difference's 95 % interval contains 0; expected for about 95 %).")


def _diff(r) -> str:
    if r.get("diff_half") is None:
        return "n/a"
    return f"{r['diff']:+.3f} ± {r['diff_half']:.3f}"


def _iv(v, lo, hi) -> str:
    return f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def _yes(x) -> str:
    return "n/a" if x is None else ("yes" if x else "NO")
