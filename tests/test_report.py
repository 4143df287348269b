"""``attnbench report`` on the hand-written fixture in tests/fixtures/results/.

The fixture holds two runs:
* ``20261122-101500-default`` on the CPU: none / SE / TDjoint(T=2,m=1) on resnet50, params,
  FLOPs (fvcore + ptflops) over the 168..448 sweep, latency/throughput/peak memory eval over
  the sweep and train at 224², speed ratios, top-1/top-5 over test resolutions (plus a
  model trained at 128²); TDjoint's train cell fails (timeout) and so does its eval at 448²;
  CBAM fails as the runner records it (FLOP count raised; latency cell crashed, mode null);
* ``20261123-090000-gpu`` on CUDA (H100): none / SE at 168, 224, 448, batch 32.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from attnbench.report import build as R
from attnbench.cli import main as cli_main

FIXTURE = Path(__file__).parent / "fixtures" / "results"
CPU_RUN = "20261122-101500-default"
GPU_RUN = "20261123-090000-gpu"
TD = "TDjoint(T=2,m=1)"


# --------------------------------------------------------------------------- helpers

def stored_rows(run):
    with open(FIXTURE / run / "rows.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def stored(run, label, metric, **match):
    """The single stored row of ``run`` for ``label``/``metric`` matching ``match``."""
    rows = [r for r in stored_rows(run) if r["label"] == label and r["metric"] == metric
            and all(r.get(k) == v for k, v in match.items())]
    assert len(rows) == 1, (label, metric, match, len(rows))
    return rows[0]


def tables(md: str):
    """{anchor: (headers, [row cells])} of every pipe table in a report.md."""
    out = {}
    for m in re.finditer(r'<a id="([^"]+)"></a>\n(.*?)(?=\n<a id=|\n## |\Z)', md, re.S):
        lines = [ln for ln in m.group(2).splitlines() if ln.startswith("|")]
        split = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
        out[m.group(1)] = (split[0], split[2:])
    return out


def row_of(table, label, col=0):
    headers, rows = table
    matches = [dict(zip(headers, r)) for r in rows if r[col] == label]
    assert len(matches) == 1, (label, matches)
    return matches[0]


def footnotes(md: str):
    return dict(re.findall(r"^\[\^(\d+)\]: (.*)$", md, re.M))


def num(cell: str) -> float:
    return float(re.sub(r"\[\^\d+\]", "", cell).split(" ")[0].rstrip("×"))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The fixture reported once (plots, LaTeX), then a second time into the same folder;
    yields the folder and the Markdown/SVG bytes of the first pass."""
    folder = tmp_path_factory.mktemp("reports")
    R.generate(FIXTURE, folder, latex=True, formats=("png", "svg"))
    first = {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.suffix in (".md", ".svg", ".tex")}
    R.generate(FIXTURE, folder, latex=True, formats=("png", "svg"))
    return folder, first


def report_md(folder, run, device):
    return (folder / run / device / "report.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- tables

def test_cost_table_values_equal_stored_figures(out):
    folder, _ = out
    t = tables(report_md(folder, CPU_RUN, "cpu"))["cost-resnet50-r224-b8"]
    for label in ("none", "SE", TD):
        row = row_of(t, label)
        assert row["backbone"] == "resnet50"
        assert num(row["params (M)"]) == round(stored(CPU_RUN, label, "params")["value"] / 1e6, 3)
        assert num(row["FLOPs (G) fvcore"]) == round(stored(
            CPU_RUN, label, "flops", resolution=224, method="fvcore")["value"], 3)
        assert num(row["FLOPs (G) ptflops-pytorch"]) == round(stored(
            CPU_RUN, label, "flops", resolution=224,
            method="ptflops-pytorch (+ rules added)")["value"], 3)
        assert num(row["mem. eval (MiB)"]) == round(stored(
            CPU_RUN, label, "peak_memory", resolution=224, mode="eval")["value"], 1)
        assert num(row["FPS eval, absolute (img/s)"]) == round(stored(
            CPU_RUN, label, "throughput", resolution=224, mode="eval")["value"], 1)
        assert num(row["speed ratio eval (×)"]) == round(stored(
            CPU_RUN, label, "speed_ratio", mode="eval")["value"], 3)
    for label in ("none", "SE"):
        row = row_of(t, label)
        assert num(row["mem. train (MiB)"]) == round(stored(
            CPU_RUN, label, "peak_memory", mode="train")["value"], 1)
        assert num(row["FPS train, absolute (img/s)"]) == round(stored(
            CPU_RUN, label, "throughput", mode="train")["value"], 1)
    # the plain backbone first, then by label
    assert [r[0] for r in t[1]] == ["none", "CBAM", "SE", TD]


def test_overhead_columns(out):
    folder, _ = out
    t = tables(report_md(folder, CPU_RUN, "cpu"))["overhead-resnet50-r224-b8"]
    se, none = row_of(t, "SE"), row_of(t, "none")
    # by hand: SE 28,071,976 vs plain 25,557,032 parameters -> x1.0984 = +9.84 %
    assert se["params"] == "+9.84 % (1.098×)"
    assert se["params added"] == "2,514,944" and none["params added"] == "0"
    assert set(v for k, v in none.items()
               if k not in ("method", "backbone", "params added")) == {"ref."}
    # the rest from the stored figures: (figure / plain - 1) * 100 and figure / plain
    for col, metric, match in [("mem. train", "peak_memory", {"mode": "train"}),
                               ("FLOPs fvcore", "flops", {"resolution": 224, "method": "fvcore"})]:
        ratio = (stored(CPU_RUN, "SE", metric, **match)["value"]
                 / stored(CPU_RUN, "none", metric, **match)["value"])
        assert se[col] == f"{100 * (ratio - 1):+.2f} % ({ratio:.3f}×)", col
    # relative speed is the paired speed ratio itself, never FPS / FPS of two medians
    assert "FPS eval" not in se
    ratio = stored(CPU_RUN, "SE", "speed_ratio", mode="eval")["value"]
    assert se["speed ratio eval"] == f"{100 * (ratio - 1):+.2f} % ({ratio:.3f}×)"
    assert se["speed ratio eval"].startswith("-")   # SE is slower than the plain backbone


def test_failed_cell_is_a_dash_with_its_reason_in_a_footnote(out):
    folder, _ = out
    md = report_md(folder, CPU_RUN, "cpu")
    notes = footnotes(md)
    td = row_of(tables(md)["cost-resnet50-r224-b8"], TD)
    for col in ("mem. train (MiB)", "FPS train, absolute (img/s)", "speed ratio train (×)"):
        m = re.fullmatch(r"–\[\^(\d+)\]", td[col])
        assert m, td[col]
        assert "timeout after 300 s" in notes[m.group(1)] and TD in notes[m.group(1)]
    lat = row_of(tables(md)["res-latency-resnet50-eval-b8"], TD)
    m = re.fullmatch(r"–\[\^(\d+)\]", lat["448² (ms)"])
    assert m and "timeout after 120 s" in notes[m.group(1)]
    # the list of every failure
    fails = tables(md)["failures"]
    assert [(r[0], r[2], r[3], r[6]) for r in fails[1]] == [
        ("CBAM", "", "224²", "RuntimeError: no counting rule for aten::_fused_cbam"),
        ("CBAM", "all", "224²", "worker crashed (exit code -9)"),
        (TD, "eval", "448²", "timeout after 120 s"), (TD, "train", "224²", "timeout after 300 s")]
    assert "failures" not in tables(report_md(folder, GPU_RUN, "cuda"))
    # the FLOP counters' disagreement over 2 % is flagged on the ptflops figure
    m = re.fullmatch(r"[\d.]+\[\^(\d+)\]", td["FLOPs (G) ptflops-pytorch"])
    assert m and "disagree by 2.83 %" in notes[m.group(1)]
    # failures as the runner records them: a failed FLOP count (one row per counter, the
    # disagreement without a method) and a crashed cell (mode null, first metric only)
    cbam = row_of(tables(md)["cost-resnet50-r224-b8"], "CBAM")
    assert cbam["params (M)"] == "28.074"
    for col, reason in (("FLOPs (G) fvcore", "no counting rule"),
                        ("FLOPs (G) ptflops-pytorch", "no counting rule"),
                        ("FPS train, absolute (img/s)", "worker crashed"),
                        ("FPS eval, absolute (img/s)", "worker crashed"),
                        ("speed ratio eval (×)", "worker crashed")):
        m = re.fullmatch(r"–\[\^(\d+)\]", cbam[col])
        assert m and reason in notes[m.group(1)], col
    assert cbam["mem. eval (MiB)"] == "n/a"   # never measured
    # every footnote used is defined, right under its table
    assert set(re.findall(r"\[\^(\d+)\](?!:)", md)) == set(notes)


def test_resolution_table(out):
    folder, _ = out
    md = report_md(folder, CPU_RUN, "cpu")
    t = tables(md)["res-flops-resnet50"]
    assert t[0][1:4] == ["168² (G)", "224² (G)", "448² (G)"]
    for label in ("none", "SE", TD):
        row = row_of(t, label)
        for res in (168, 224, 448):
            assert num(row[f"{res}² (G)"]) == round(stored(
                CPU_RUN, label, "flops", resolution=res, method="fvcore")["value"], 3)
    full = tables(md)["full-latency-resnet50-eval-b8"]
    assert len(full[0]) == 1 + 11   # 168..448 in steps of 28
    assert num(row_of(full, "SE")["308² (ms)"]) == round(stored(
        CPU_RUN, "SE", "latency", resolution=308, mode="eval")["value"], 2)


def test_accuracy_table_layout_and_scaling(out):
    folder, _ = out
    t = tables(report_md(folder, CPU_RUN, "cpu"))["acc-top1-resnet50-imagenet-v1"]
    assert t[0] == ["method", "trained at", "Best top1 (%)", "best at", "224²", "168²", "448²"]
    td = row_of(t, TD)
    assert (td["Best top1 (%)"], td["best at"]) == ("79.52", "280²")
    assert (td["224²"], td["168²"], td["448²"]) == ("78.96", "76.03", "77.41")
    scaled = [dict(zip(t[0], r)) for r in t[1] if r[1] == "128²"]
    assert len(scaled) == 1 and scaled[0]["method"] == "none"
    assert scaled[0]["224²"] == "64.72 (128²)"
    assert scaled[0]["168²"] == "61.10 (96²)" and scaled[0]["448²"] == "62.48 (256²)"


def test_devices_are_not_mixed(out):
    folder, _ = out
    cpu, gpu = report_md(folder, CPU_RUN, "cpu"), report_md(folder, GPU_RUN, "cuda")
    assert "NVIDIA H100" in gpu and "NVIDIA H100" not in cpu
    assert "Xeon" in cpu.split("\n## ")[0]
    gpu_fps = f"{stored(GPU_RUN, 'SE', 'throughput', mode='eval', resolution=224)['value']:.1f}"
    cpu_fps = f"{stored(CPU_RUN, 'SE', 'throughput', mode='eval', resolution=224)['value']:.1f}"
    assert gpu_fps in gpu and gpu_fps not in cpu and cpu_fps not in gpu
    t = tables(gpu)["cost-resnet50-r224-b32"]
    assert [r[0] for r in t[1]] == ["none", "SE"]
    assert num(row_of(t, "SE")["FPS eval, absolute (img/s)"]) == float(gpu_fps)
    for md, device in ((cpu, "cpu"), (gpu, "cuda")):
        for key, (headers, rows) in tables(md).items():
            assert rows, key
        assert md.count(f"on `{device}`") >= len(tables(md))
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert f"## Run `{CPU_RUN}` on `cpu`" in readme and f"## Run `{GPU_RUN}` on `cuda`" in readme


def test_readme_indexes_everything(out):
    folder, _ = out
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("<!-- Generated by `attnbench report`")
    assert "attnbench report --results" in readme.splitlines()[0]
    for token in ("2026-11-22T10:15:00+00:00", "torch 2.4.1+cu124", "CUDA 12.4",
                  "multiply-adds", "`fvcore`", "`ptflops-pytorch (+ rules added)`"):
        assert token in readme, token
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".png", ".svg", ".tex") or path.name == "report.md":
            assert path.relative_to(folder).as_posix() in readme, path
    for run, device in ((CPU_RUN, "cpu"), (GPU_RUN, "cuda")):
        for key in tables(report_md(folder, run, device)):
            assert f"{run}/{device}/report.md#{key})" in readme, key


def test_plots_written(out):
    from matplotlib.image import imread
    folder, _ = out
    for run, device, n in ((CPU_RUN, "cpu", 6), (GPU_RUN, "cuda", 4)):
        pngs = sorted((folder / run / device / "plots").glob("*.png"))
        svgs = sorted((folder / run / device / "plots").glob("*.svg"))
        assert len(pngs) == len(svgs) == n
        for p in pngs + svgs:
            assert p.stat().st_size > 1000, p
        for p in pngs:
            img = imread(p)
            assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    names = {p.name for p in (folder / CPU_RUN / "cpu" / "plots").glob("*.png")}
    assert {"throughput-vs-params-resnet50-r224-b8.png", "latency-vs-resolution-resnet50-b8.png",
            "flops-vs-resolution-resnet50.png", "peak-memory-vs-resolution-resnet50-b8.png",
            "top1-vs-resolution-resnet50-imagenet-v1-train224.png"} <= names
    svg = (folder / CPU_RUN / "cpu" / "plots" / "top1-vs-resolution-resnet50-imagenet-v1-"
           "train224.svg").read_text(encoding="utf-8")
    assert TD in svg or "TDjoint" in svg or "<path" in svg   # text is drawn as paths


def test_second_run_is_byte_identical(out):
    folder, first = out
    second = {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
              if p.suffix in (".md", ".svg", ".tex")}
    assert set(first) == set(second)
    md = [k for k in first if k.suffix == ".md"]
    assert len(md) == 3
    for key in md:
        assert first[key] == second[key], key
    for key in first:
        if key.suffix == ".svg":
            assert first[key] == second[key], key   # svg.hashsalt + no date


def test_latex_tables(out):
    folder, _ = out
    tex = (folder / CPU_RUN / "cpu" / "tables" / "cost-resnet50-r224-b8.tex").read_text(
        encoding="utf-8")
    assert tex.startswith("% Generated by `attnbench report`")
    assert "\\begin{tabular}" in tex and "\\toprule" in tex and "\\bottomrule" in tex
    assert "--\\textsuperscript{" in tex and "timeout after 300 s" in tex
    assert "TDjoint(T=2,m=1)" in tex


# --------------------------------------------------------------------------- options and errors

def test_run_filter_and_stale_folders_removed(tmp_path):
    R.generate(FIXTURE, tmp_path, formats=())
    assert (tmp_path / GPU_RUN / "cuda" / "report.md").exists()
    R.generate(FIXTURE, tmp_path, runs=[CPU_RUN], formats=())
    assert not (tmp_path / GPU_RUN).exists()
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert GPU_RUN not in readme and f"--run {CPU_RUN}" in readme and "--formats none" in readme
    assert "## Plots" not in report_md(tmp_path, CPU_RUN, "cpu")
    with pytest.raises(R.ReportError, match="unknown run"):
        R.generate(FIXTURE, tmp_path, runs=["nope"], formats=())


def test_missing_or_empty_results_give_a_clear_error(tmp_path, capsys):
    with pytest.raises(R.ReportError, match="does not exist"):
        R.generate(tmp_path / "absent", tmp_path / "out", formats=())
    (tmp_path / "empty").mkdir()
    with pytest.raises(R.ReportError, match="no runs in"):
        R.generate(tmp_path / "empty", tmp_path / "out", formats=())
    (tmp_path / "blank" / "run1").mkdir(parents=True)
    (tmp_path / "blank" / "run1" / "rows.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(R.ReportError, match="no measurements"):
        R.generate(tmp_path / "blank", tmp_path / "out", formats=())
    rc = cli_main(["report", "--results", str(tmp_path / "absent"), "--out",
                   str(tmp_path / "out")])
    assert rc == 2
    assert "results folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE / GPU_RUN, results / GPU_RUN)
    out = tmp_path / "reports"
    assert cli_main(["report", "--results", str(results), "--out", str(out),
                     "--formats", "png"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.suffix for p in (out / GPU_RUN / "cuda" / "plots").iterdir()) == [".png"] * 4
    with pytest.raises(R.ReportError, match="unknown plot format"):
        R.parse_formats("png,gif")
    assert R.parse_formats("none") == ()


def test_scaled_columns_take_the_nearest_measured_size():
    from attnbench.report.tables import scaled
    assert scaled(168, 224, [168]) == 168
    assert scaled(168, 128, [96, 128, 256]) == 96
    assert scaled(168, 100, [76, 100, 200]) == 76     # sweep rounded 75 to a multiple of 4
    assert scaled(448, 100, [76, 100, 200]) == 200
    assert scaled(448, 100, [76, 100, 180]) is None   # nothing close enough


def test_speed_ratio_cells_show_the_interval_the_control_and_indistinguishable():
    from attnbench.report import tables as T
    m = T.Measure("ok", 0.7724, row={"ratio_lo": 0.7601, "ratio_hi": 0.7843, "distinct": True})
    assert T.ratio_cell(m).text == "0.772 [0.760, 0.784]"
    same = T.Measure("ok", 0.9981, row={"ratio_lo": 0.989, "ratio_hi": 1.004, "distinct": False})
    assert T.ratio_cell(same).text == "0.998 [0.989, 1.004] ≈"
    assert T.ratio_cell(T.Measure("ok", 1.0, row={}), is_plain=True).text == "1.000"
    base = {"backbone": "resnet50", "options": "{}", "stages": None, "resolution": 224,
            "batch": 1, "mode": "eval", "unit": "x", "status": "ok", "error": "",
            "metric": "speed_ratio", "_order": 0}
    rows = [dict(base, module="none", label="none", value=1.0, control_ratio=1.002,
                 control_lo=0.995, control_hi=1.009),
            dict(base, module="se", label="SE", value=0.9, ratio_lo=0.89, ratio_hi=0.91,
                 distinct=True, _order=1)]
    idx = T.Index(rows)
    cols = [("speed ratio eval (×)", "speed_ratio", "eval", None, "speed_ratio", 1.0)]
    variants = idx.variants("resnet50", ["speed_ratio"])
    control = T._control_row(idx, "resnet50", variants, cols, 224, 1)
    assert [c.text for c in control] == ["control (A/A)", "resnet50", "1.002 [0.995, 1.009]"]


# --------------------------------------------------------------------------- a run is its folder

def _gpu_copy(results, name=GPU_RUN):
    shutil.copytree(FIXTURE / GPU_RUN, results / name)
    return results / name / "rows.jsonl"


def _edit_first_row(path, **change):
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[0] = json.dumps(dict(json.loads(lines[0]), **change))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_a_copied_run_folder_is_its_own_run_and_says_so(tmp_path, capsys):
    results = tmp_path / "results"
    _gpu_copy(results)
    backup = _gpu_copy(results, GPU_RUN + ".bak")
    _edit_first_row(backup, value=55_600_000)   # a stale copy with another value
    out = tmp_path / "reports"
    assert cli_main(["report", "--results", str(results), "--out", str(out),
                     "--formats", "none"]) == 0
    err = capsys.readouterr().err
    assert f"run_id {GPU_RUN} disagrees with the folder {GPU_RUN}.bak" in err
    # the original is untouched by the copy: its own report, its own parameter count
    md = report_md(out, GPU_RUN, "cuda")
    assert " 55.600 " not in md and " 25.557 " in md and "Read this first" not in md
    bak = report_md(out, GPU_RUN + ".bak", "cuda")
    assert " 55.600 " in bak and "Read this first" in bak and "lines 1-38" in bak
    assert f"disagrees with the folder `{GPU_RUN}.bak`" in \
        (out / "README.md").read_text(encoding="utf-8")


def test_a_renamed_then_resumed_run_is_one_report(tmp_path):
    results = tmp_path / "results"
    rows = _gpu_copy(results, "renamed")
    _edit_first_row(rows, run_id="renamed")     # the resumed session's rows name the folder
    result = R.generate(results, tmp_path / "reports", formats=())
    assert [g.run_id for g in result.groups] == ["renamed"]
    assert result.groups[0].env.get("device_name")  # the environment is not "unknown"
    assert any("lines 2-38" in n and "run_id `20261123-090000-gpu`" in n
               for n in result.notes), result.notes


def test_a_duplicated_cell_with_another_value_is_failed_not_merged(tmp_path):
    results = tmp_path / "results"
    rows = _gpu_copy(results)
    first = rows.read_text(encoding="utf-8").splitlines()[0]
    with open(rows, "a", encoding="utf-8") as fh:   # the same cell again, another value
        fh.write(json.dumps(dict(json.loads(first), value=55_600_000)) + "\n")
        fh.write(first + "\n")                      # an identical copy is harmless
    result = R.generate(results, tmp_path / "reports", formats=())
    note = [n for n in result.notes if "the same measurement" in n]
    assert len(note) == 1 and "lines 1, 39, 40" in note[0], result.notes
    assert "line 1: 25557032, line 39: 55600000" in note[0]
    md = report_md(tmp_path / "reports", GPU_RUN, "cuda")
    assert " 55.600 " not in md and " 25.557 " not in md and "conflicting duplicate rows" in md


def test_empty_and_rowless_runs_are_skipped_with_a_note(tmp_path):
    results = tmp_path / "results"
    _gpu_copy(results)
    (results / "empty").mkdir()
    (results / "empty" / "rows.jsonl").write_text("", encoding="utf-8")
    (results / "killed").mkdir()
    (results / "killed" / "env.json").write_text('{"run_id": "killed"}', encoding="utf-8")
    result = R.generate(results, tmp_path / "reports", formats=())
    assert [g.run_id for g in result.groups] == [GPU_RUN]
    readme = (tmp_path / "reports" / "README.md").read_text(encoding="utf-8")
    assert "skipped run `empty`: its rows.jsonl is empty" in readme
    assert "skipped run `killed`: it has no rows.jsonl" in readme
