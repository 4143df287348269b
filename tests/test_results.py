"""The results store: schema-checked rows, atomic writes, loaders that never drop rows."""
from __future__ import annotations

import json
import os

import pytest

from attnbench import results as R


def row(**kw):
    base = {c: None for c in R.ROW_COLUMNS}
    base.update(run_id="r", cell="c1", backbone="resnet50", module="se", label="SE",
                options='{"reduction":16}', resolution=224, batch=1, device="cpu",
                metric="params", value=28071976.0, unit="count", method="count",
                status="ok", error="")
    base.update(kw)
    return base


def test_write_and_load_round_trip(tmp_path):
    rows = [row(), row(cell="c2", metric="latency", value=float("nan"), mode="eval",
                       threads=2)]
    path = R.write_rows(tmp_path / "run", rows)
    assert path.name == "rows.jsonl"
    loaded = R.load_rows(path)
    assert loaded[0] == rows[0]
    assert loaded[1]["value"] is None and loaded[1]["threads"] == 2  # NaN -> null, extras kept
    assert all(json.loads(line) for line in path.read_text().splitlines())
    R.write_env(tmp_path / "run", {"run_id": "r", "device": "cpu"})
    df, env = R.load_run(tmp_path / "run")
    assert list(df.columns[:len(R.ROW_COLUMNS)]) == list(R.ROW_COLUMNS)
    assert len(df) == 2 and env == {"run_id": "r", "device": "cpu"}


def test_append_rows_rewrites_atomically(tmp_path):
    R.write_rows(tmp_path, [row()])
    R.append_rows(tmp_path, [row(cell="c2")])
    assert [r["cell"] for r in R.load_rows(tmp_path / "rows.jsonl")] == ["c1", "c2"]
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl"]  # no temporary file left


def test_load_all_runs(tmp_path):
    for run in ("a", "b"):
        R.write_rows(tmp_path / run, [row(run_id=run), row(run_id=run, cell="c2")])
        R.write_env(tmp_path / run, {"run_id": run})
    (tmp_path / "not-a-run").mkdir()
    df, envs = R.load_all(tmp_path)
    assert len(df) == 4 and set(envs) == {"a", "b"} and set(df.run_id) == {"a", "b"}
    empty, none = R.load_all(tmp_path / "missing")
    assert empty.empty and list(empty.columns) == list(R.ROW_COLUMNS) and none == {}


def _lines(n=4):
    return [json.dumps(row(cell=f"c{i}")) for i in range(n)]


def test_truncated_last_line_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = _lines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    with pytest.raises(R.ResultsError) as err:
        R.load_rows(path)
    assert str(path) in str(err.value) and "line 4" in str(err.value)
    assert "truncated" in str(err.value)


def test_garbage_line_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = _lines()
    lines[2] = "garbage{"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(R.ResultsError, match=r"rows\.jsonl, line 3: not valid JSON"):
        R.load_rows(path)
    with pytest.raises(R.ResultsError, match="line 3"):
        R.load_run(tmp_path)
    with pytest.raises(R.ResultsError, match="line 3"):
        R.load_all(tmp_path.parent)


def test_missing_column_and_bad_status(tmp_path):
    path = tmp_path / "rows.jsonl"
    bad = row()
    del bad["unit"], bad["cell"]
    path.write_text(json.dumps(row()) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(R.ResultsError, match=r"line 2: row is missing required column\(s\) "
                                             r"cell, unit"):
        R.load_rows(path)
    path.write_text("\n" + json.dumps(row(status="meh")) + "\n")
    with pytest.raises(R.ResultsError, match="line 2: status must be"):
        R.load_rows(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(R.ResultsError, match="line 1: expected a JSON object"):
        R.load_rows(path)
    with pytest.raises(R.ResultsError, match="missing required column"):
        R.write_rows(tmp_path / "w", [bad])
    assert not (tmp_path / "w" / "rows.jsonl").exists()


def test_blank_lines_are_not_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(_lines(2)) + "\n\n")
    assert len(R.load_rows(path)) == 2


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    R.write_rows(tmp_path, [row()])
    before = path.read_text()
    # an unencodable character fails half-way through writing the temporary file
    with pytest.raises(UnicodeEncodeError):
        R.atomic_write_text(path, "x" * 10000 + "\ud800")
    assert path.read_text() == before and os.listdir(tmp_path) == ["rows.jsonl"]

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        R.write_rows(tmp_path, [row(cell="new")])
    assert path.read_text() == before and os.listdir(tmp_path) == ["rows.jsonl"]


def test_missing_files(tmp_path):
    with pytest.raises(R.ResultsError, match="no such results file"):
        R.load_rows(tmp_path / "rows.jsonl")
    with pytest.raises(R.ResultsError, match="no such run folder"):
        R.load_run(tmp_path / "nope")
    (tmp_path / "env.json").write_text("{bad")
    with pytest.raises(R.ResultsError, match=r"env\.json, line 1"):
        R.load_env(tmp_path)


def test_finished_cells(tmp_path):
    R.write_rows(tmp_path, [row(cell="a"), row(cell="b"), row(cell="b", status="failed",
                                                                value=None, error="x")])
    assert R.finished_cells(tmp_path) == {"a": "ok", "b": "failed"}
    assert R.finished_cells(tmp_path, include_failed=False) == {"a": "ok"}
    assert R.finished_cells(tmp_path / "none") == {}


def test_written_files_are_not_private(tmp_path):
    R.write_rows(tmp_path, [row()])
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "rows.jsonl").stat().st_mode & 0o777 == 0o666 & ~mask
