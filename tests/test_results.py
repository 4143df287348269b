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


# --------------------------------------------------------------------------- cells

def _cell(**kw):
    fields = dict(backbone="resnet18", module="se", resolution=64, batch=2,
                  metrics=["latency"], options={"reduction": 16}, label="SE", mode="eval")
    fields.update(kw)
    return R.Cell(**fields)


def test_cell_dict_round_trip_and_stable_id():
    cell = _cell(group="g1", timeout_s=30.0)
    assert cell.metrics == ("latency",) and cell.id == R.cell_id(cell) and len(cell.id) == 12
    data = cell.to_dict()
    assert data["metrics"] == ["latency"] and data["id"] == cell.id
    assert json.loads(json.dumps(data)) == data           # plain JSON: goes to a worker
    assert R.Cell.from_dict(data) == cell and R.Cell.of(data) == cell and R.Cell.of(cell) is cell
    # the label, the timeout and the group's name are not part of the id; interleaving is
    assert _cell(label="x", timeout_s=1.0, group="g2").id == cell.id
    assert _cell().id != cell.id
    assert _cell(metrics="latency").metrics == ("latency",)
    assert _cell(module=None).module == "none" and _cell(module="none").plain
    assert cell.describe() == "resnet18 SE 64px b2 eval latency"


def test_cell_id_is_the_hash_of_its_measure_keys():
    cell = _cell(warmup=None, repeats=None, min_run_time=None)
    keys = {k: getattr(cell, k) for k in R.MEASURE_KEYS}
    keys["interleaved"] = False
    assert cell.id == R.short_hash(keys)
    assert R.short_hash(keys) == R.short_hash(dict(keys, metrics=["latency"]))


def test_cell_resolved_fills_defaults_and_keeps_the_id():
    cell = _cell(warmup=None, repeats=None, min_run_time=None, device=None, threads=None)
    full = cell.resolved()
    assert (full.warmup, full.repeats, full.min_run_time, full.device) == (2, 5, 0.0, "cpu")
    assert full.threads is None and full.mode == "eval" and full.id == cell.id
    assert cell.replace(batch=4).id != cell.id and cell.replace(batch=4).batch == 4


@pytest.mark.parametrize("kw, words", [
    (dict(metrics=["flop"]), "unknown metric(s) ['flop']"),
    (dict(resolution=0), "resolution must be a positive integer"),
    (dict(batch=True), "batch must be a positive integer"),
    (dict(mode="test"), "mode must be eval, train or null"),
])
def test_cell_rejects_bad_fields(kw, words):
    with pytest.raises(ValueError) as err:
        _cell(**kw)
    assert words in str(err.value)


def test_cell_from_dict_names_missing_and_unknown_keys():
    data = _cell().to_dict()
    with pytest.raises(ValueError, match="the cell has no 'batch' key"):
        R.Cell.from_dict({k: v for k, v in data.items() if k != "batch"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        R.Cell.from_dict(dict(data, colour="red"))


def test_cell_base_row_is_the_rows_identity():
    cell = _cell(stages=[3, 4])
    row = cell.base_row("train", "SE(r=16)", run_id="r", cell=cell.id)
    assert list(row) == ["run_id", "cell"] + list(R.rows.BASE_COLUMNS)
    assert row == R.base_row(backbone="resnet18", module="se", label="SE(r=16)",
                             options={"reduction": 16}, stages=[3, 4], resolution=64, batch=2,
                             mode="train", device="cpu", run_id="r", cell=cell.id)
    assert row["options"] == '{"reduction":16}' and row["stages"] == "[3,4]"


def test_cell_states():
    rows = [row(cell="a"), row(cell="b"), row(cell="b", status="failed"), row(cell=None)]
    assert R.cell_states(rows) == {"a": "ok", "b": "failed"}


@pytest.mark.parametrize("column, value", [("resolution", "big"), ("batch", 1.5),
                                           ("value", "fast"), ("value", True),
                                           ("options", {"reduction": 16}), ("run_id", 3)])
def test_a_wrong_type_names_the_file_and_line(tmp_path, column, value):
    R.write_rows(tmp_path, [row(), row(cell="c2")])
    path = tmp_path / "rows.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = json.dumps(dict(json.loads(lines[1]), **{column: value}))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(R.ResultsError, match=rf"rows.jsonl, line 2: column '{column}' must be"):
        R.load_rows(path)
    with pytest.raises(R.ResultsError, match=f"column '{column}'"):
        R.write_rows(tmp_path / "w", [row(**{column: value})])


def test_a_write_that_fails_is_a_results_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    R.write_rows(tmp_path, [row()])
    before = (tmp_path / "rows.jsonl").read_text()

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(R.ResultsWriteError, match="cannot write \\(No space left on device\\); "
                                                  "the file as it was is unchanged"):
        R.write_rows(tmp_path, [row(cell="new")])
    assert (tmp_path / "rows.jsonl").read_text() == before


def test_check_writable(tmp_path):
    (tmp_path / "f").write_text("x")
    R.check_writable(tmp_path / "new" / "deeper", "--out", folder=True)
    R.check_writable(tmp_path / "m.pt", "--out")
    assert not (tmp_path / "new").exists()   # checking creates nothing
    for path, folder, message in ((tmp_path / "f", True, "is a file, not a folder"),
                                  (tmp_path / "f" / "x", True, "is a file, not a folder"),
                                  (tmp_path, False, "is a folder; give a file name")):
        with pytest.raises(R.ResultsError, match=message):
            R.check_writable(path, "--out", folder=folder)
