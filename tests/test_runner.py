"""The matrix runner: isolation of failing cells, persistence, resume, interrupt, CLI.

Most tests inject the fake measurement below (``measure_cell`` / ``measure_group`` of
this module, imported by the spawned worker), steered by the ``ATTNBENCH_FAKE``
environment variable: ``action:metric:resolution:module`` rules, comma-separated, with
action ``raise`` (an exception), ``kill`` (SIGKILL of the worker), ``exit`` (os._exit)
or ``sleep`` (hangs: a timeout). One test runs the real profilers on configs/tiny.toml.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnbench import results as R
from attnbench.matrix import runner
from attnbench.matrix.config import expand, load_config
from attnbench.matrix.runner import run_config

REPO = Path(__file__).resolve().parent.parent

UNITS = {"params": "count", "params_attention": "count", "flops": "GMac",
         "flops_disagreement": "%", "latency": "ms", "latency_p25": "ms",
         "latency_p75": "ms", "throughput": "img/s", "speed_ratio": "x",
         "peak_memory": "MiB"}


# --------------------------------------------------------------------------- the fake

def _maybe_fail(cell):
    for rule in filter(None, os.environ.get("ATTNBENCH_FAKE", "").split(",")):
        action, metric, res, module = rule.split(":")
        if (metric in ("*", cell.metrics[0]) and res in ("*", str(cell.resolution))
                and module in ("*", cell.module)):
            if action == "raise":
                raise RuntimeError(f"boom at {cell.resolution}")
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "exit":
                os._exit(3)
            if action == "sleep":
                time.sleep(60)
            if action == "nap":
                time.sleep(0.4)


def _row(cell, metric, value, method="fake"):
    return {"backbone": cell.backbone, "module": cell.module,
            "label": cell.module.upper(),
            "options": json.dumps(cell.options, sort_keys=True),
            "stages": None if cell.stages is None else json.dumps(cell.stages),
            "resolution": cell.resolution, "batch": cell.batch, "mode": cell.mode,
            "device": cell.device, "metric": metric, "value": float(value),
            "unit": UNITS[metric], "method": method, "status": "ok", "error": "",
            "measured_at": time.time_ns(), "pid": os.getpid()}


def _rows(cell):
    metric = cell.metrics[0]
    if metric == "params":
        return [_row(cell, "params", 1e6), _row(cell, "params_attention", 10)]
    if metric == "flops":
        return [_row(cell, "flops", 1.0, "fvcore"), _row(cell, "flops", 1.01, "ptflops-pytorch"),
                _row(cell, "flops_disagreement", 1.0, "ptflops-pytorch vs fvcore")]
    if metric == "latency":
        return [_row(cell, m, v) for m, v in (("latency", 10), ("latency_p25", 9),
                                              ("latency_p75", 11), ("throughput", 100))]
    if metric == "memory":
        return [_row(cell, "peak_memory", 50.0, "fake")]
    raise ValueError(metric)


def measure_cell(cell):
    assert isinstance(cell, R.Cell), cell  # the worker hands over Cells
    started = time.time_ns()
    _maybe_fail(cell)
    return [dict(r, started_at=started) for r in _rows(cell)]


def measure_group(cells):
    started = time.time_ns()
    out = [] if started else None
    for cell in cells:
        assert isinstance(cell, R.Cell), cell
        _maybe_fail(cell)
        out.extend(_rows(cell))
        out.append(_row(cell, "speed_ratio", 1.0 if cell.module == "none" else 0.9))
    return [dict(r, started_at=started) for r in out]


TIMED_METRICS = ("latency", "latency_p25", "latency_p75", "throughput", "speed_ratio")
FAKE = {"measure": measure_cell, "measure_group": measure_group, "progress": False}

CONFIG = """
name = "t"
backbones = ["resnet18"]
num_classes = 10
[timing]
warmup = 0
repeats = 1
timeout_s = 60
[[modules]]
name = "se"
[[modules]]
name = "eca"
[[sweeps]]
metrics = ["params", "flops", "latency"]
resolutions = [64, 96]
"""
MEMORY = """
[[sweeps]]
metrics = ["memory"]
resolutions = [64]
"""


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNBENCH_FAKE", raising=False)
    path = tmp_path / "t.toml"
    path.write_text(CONFIG)
    return path


def _keys(rows):
    return [(r["cell"], r["metric"], r["method"]) for r in rows]


# --------------------------------------------------------------------------- tests

def test_rows_for_every_metric(tmp_path, cfg, capsys):
    cfg.write_text(CONFIG + MEMORY)
    s = run_config(cfg, results_dir=tmp_path / "res", run_id="r1", **FAKE)
    assert s.exit_code == 0 and s.failed == 0 and s.ok == s.cells == 21
    df, env = R.load_run(tmp_path / "res" / "r1")
    assert set(df.metric) == set(UNITS)
    assert (df.run_id == "r1").all() and df.status.eq("ok").all()
    assert set(df.cell) == {c.id for c in expand(load_config(cfg))}
    assert len(set(_keys(df.to_dict("records")))) == len(df)
    ratio = df[df.metric == "speed_ratio"]
    assert len(ratio) == 6 and set(ratio.module) == {"none", "se", "eca"}
    assert set(R.ENV_KEYS) <= set(env) and env["run_id"] == "r1"
    assert (tmp_path / "res" / "r1" / "config.toml").read_text() == cfg.read_text()
    out = capsys.readouterr().out
    assert "21 cells ok, 0 failed" in out and "rows.jsonl" in out
    # every unit ran in a process of its own
    assert df.groupby("pid").cell.nunique().max() == 3  # an interleaved group of 3


def test_failing_cells_are_recorded_and_the_run_goes_on(tmp_path, cfg, monkeypatch, capsys):
    monkeypatch.setenv("ATTNBENCH_FAKE", "raise:flops:96:se,kill:params:64:eca,"
                                         "sleep:flops:96:eca,exit:latency:96:eca")
    s = run_config(cfg, results_dir=tmp_path, run_id="r", timeout=3, **FAKE)
    assert s.exit_code == 1
    rows = R.load_rows(tmp_path / "r" / "rows.jsonl")
    failed = {(r["module"], r["metric"], r["resolution"]): r["error"]
              for r in rows if r["status"] == "failed"}
    assert failed[("se", "flops", 96)] == "RuntimeError: boom at 96"
    assert "killed by signal SIGKILL" in failed[("eca", "params", 64)]
    assert failed[("eca", "flops", 96)] == "timeout after 3 s"
    # a failure inside an interleaved group fails the whole group
    for module in ("none", "se", "eca"):
        assert "exited with status 3" in failed[(module, "latency", 96)]
    assert len(failed) == 6 and all(r["value"] is None for r in rows if r["status"] == "failed")
    assert s.failed == 6 and s.ok == 12
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["module"], r["resolution"]) for r in ok if r["metric"] == "latency"} == \
        {(m, 64) for m in ("none", "se", "eca")}
    out = capsys.readouterr().out
    assert "12 cells ok, 6 failed" in out and "FAILED" in out
    assert "--retry-failed" in out and "--run-id r" in out

    # resume: failed cells stay failed unless --retry-failed
    monkeypatch.delenv("ATTNBENCH_FAKE")
    s2 = run_config(cfg, results_dir=tmp_path, run_id="r", **FAKE)
    assert s2.done == 0 and s2.exit_code == 1
    s3 = run_config(cfg, results_dir=tmp_path, run_id="r", retry_failed=True, **FAKE)
    assert s3.done == 6 and s3.exit_code == 0
    rows3 = R.load_rows(tmp_path / "r" / "rows.jsonl")
    assert all(r["status"] == "ok" for r in rows3)
    assert len(set(_keys(rows3))) == len(rows3)
    kept = {_keys([r])[0]: r["measured_at"] for r in rows if r["status"] == "ok"}
    assert all(kept[_keys([r])[0]] == r["measured_at"] for r in rows3 if _keys([r])[0] in kept)


def test_interrupted_run_resumes_without_redoing_cells(tmp_path, cfg, capsys):
    def stop(n):
        if n == 3:
            raise KeyboardInterrupt

    s = run_config(cfg, results_dir=tmp_path, run_id="r", after_unit=stop, **FAKE)
    assert s.interrupted and s.exit_code == 130 and s.done == 3
    first = R.load_rows(tmp_path / "r" / "rows.jsonl")
    assert len({r["cell"] for r in first}) == 3
    out = capsys.readouterr().out
    assert "Resume with" in out and "--run-id r" in out

    s2 = run_config(cfg, resume=True, results_dir=tmp_path, **FAKE)  # finds the latest "t"
    assert s2.run_id == "r" and s2.skipped == 3 and s2.exit_code == 0
    rows = R.load_rows(tmp_path / "r" / "rows.jsonl")
    assert len(set(_keys(rows))) == len(rows)
    assert len({r["cell"] for r in rows}) == s2.cells == 18
    before = {_keys([r])[0]: r["measured_at"] for r in first}
    assert all(r["measured_at"] == before[_keys([r])[0]] for r in rows if _keys([r])[0] in before)
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    assert len(env["sessions"]) == 1

    s3 = run_config(cfg, results_dir=tmp_path, run_id="r", max_units=0, **FAKE)
    assert s3.done == 0 and s3.exit_code == 0  # nothing left to do


def test_only_filter_keeps_the_baseline_of_groups(tmp_path, cfg):
    s = run_config(cfg, results_dir=tmp_path, run_id="r", only=["module=se", "resolution=64"],
                   **FAKE)
    rows = R.load_rows(tmp_path / "r" / "rows.jsonl")
    assert s.exit_code == 0
    assert {(r["module"], r["metric"]) for r in rows if r["metric"] in ("params", "latency")} \
        == {("se", "params"), ("se", "latency"), ("none", "latency")}


def test_dry_run_writes_nothing(tmp_path, cfg, capsys):
    s = run_config(cfg, results_dir=tmp_path / "res", dry_run=True, **FAKE)
    assert s.cells == 18 and not (tmp_path / "res").exists()
    out = capsys.readouterr().out
    assert "18 cells in 14 units" in out and "group" in out


def test_complete_rows_fill_in_the_cell_and_fail_cells_without_rows():
    cells = [c for c in expand(load_config("tiny"))
             if c.group and c.resolution == 64 and c.mode == "eval"]
    assert [c.module for c in cells] == ["none", "se", "eca"]
    raw = {"module": "se", "options": {"reduction": 16}, "metric": "latency", "value": 1.0,
           "unit": "ms", "extra": 3}
    rows = runner.complete_rows([raw], cells, "r")
    assert [(r["module"], r["status"]) for r in rows] == [("se", "ok"), ("none", "failed"),
                                                          ("eca", "failed")]
    se = rows[0]
    assert list(se)[:11] == ["run_id", "cell"] + list(R.rows.BASE_COLUMNS)
    assert se["cell"] == cells[1].id and se["label"] == "SE" and se["options"] == \
        '{"reduction":16}' and se["error"] == "" and se["method"] == "" and se["extra"] == 3
    assert rows[1]["error"] == "the measurement returned no rows for this cell"
    assert (rows[1]["metric"], rows[1]["unit"], rows[1]["mode"]) == ("latency", "ms", "eval")
    with pytest.raises(R.ResultsError, match="matches no cell of its group"):
        runner.complete_rows([dict(raw, module="cbam")], cells, "r")


def test_run_command_lives_in_the_cli():
    from attnbench.cli import run as cli_run
    assert hasattr(cli_run, "register_cli") and not hasattr(runner, "register_cli")


def _cli_env(**extra):
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{REPO}", **extra)
    env.pop("ATTNBENCH_FAKE", None)
    env.update(extra)
    return env


def test_cli_ctrl_c_saves_finished_cells_and_exits_130(tmp_path, cfg):
    attnbench = [sys.executable, "-m", "attnbench"]
    args = ["run", str(cfg), "--results", str(tmp_path), "--run-id", "r", "--no-progress",
            "--measure-module", "test_runner"]
    proc = subprocess.Popen(attnbench + args, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=_cli_env(ATTNBENCH_FAKE="sleep:latency:96:*"))
    rows = tmp_path / "r" / "rows.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if rows.exists() and len({r["cell"] for r in R.load_rows(rows)}) >= 15:
            # all but the 96 px latency group, which hangs
            break
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "Resume with" in out
    done = {r["cell"] for r in R.load_rows(rows)}
    assert len(done) == 15  # all but the 96 px latency group
    # the same --run-id resumes
    s = run_config(cfg, results_dir=tmp_path, run_id="r", **FAKE)
    assert s.skipped == 15 and s.done == 3 and s.exit_code == 0
    final = R.load_rows(rows)
    assert len({r["cell"] for r in final}) == 18 and len(set(_keys(final))) == len(final)


def test_cli_ctrl_c_stops_a_parallel_run_at_once(tmp_path, cfg):
    """Ctrl-C while two untimed units are in flight: both workers are killed, the run
    exits 130 within seconds, and what was saved resumes to every cell once."""
    cfg.write_text(CONFIG + MEMORY)
    args = [sys.executable, "-m", "attnbench", "run", str(cfg), "--results", str(tmp_path),
            "--run-id", "r", "--no-progress", "--measure-module", "test_runner", "--jobs", "2"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_cli_env(ATTNBENCH_FAKE="sleep:flops:*:*"))
    log = tmp_path / "r" / "worker.log"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and log.read_text().count("flops") >= 2):
        time.sleep(0.2)
    time.sleep(1.0)
    started = time.time()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert time.time() - started < 10
    s = run_config(cfg, results_dir=tmp_path, run_id="r", **FAKE)
    assert s.exit_code == 0
    final = R.load_rows(tmp_path / "r" / "rows.jsonl")
    assert len({r["cell"] for r in final}) == s.cells and len(set(_keys(final))) == len(final)


def test_cli_bad_config_exits_2(tmp_path, capsys):
    from attnbench.cli import main
    bad = tmp_path / "bad.toml"
    bad.write_text('[[modules]]\nname = "sx"\n')
    assert main(["run", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "modules[0].name" in err and "'sx'" in err and str(bad) in err


def test_cli_dry_run_of_the_default_config(capsys):
    from attnbench.cli import main
    assert main(["run", "default", "--dry-run", "--only", "module=se",
                 "--only", "metric=latency"]) == 0
    out = capsys.readouterr().out
    assert "configs/default.toml: 10 cells" in out  # se and the plain backbone: 5 groups each


def test_real_measure_tiny_end_to_end(tmp_path):
    pytest.importorskip("attnbench.matrix.measure")
    s = run_config("tiny", results_dir=tmp_path, run_id="tiny", progress=False)
    df, env = R.load_run(tmp_path / "tiny")
    assert s.exit_code == 0, df[df.status == "failed"][["label", "metric", "error"]]
    assert {"params", "flops", "latency", "throughput", "speed_ratio", "peak_tensor_memory",
            "rss_increase"} \
        <= set(df.metric)
    assert set(df.module) == {"none", "se", "eca"} and env["device"] == "cpu"


def test_jobs_measure_untimed_units_at_once_and_timed_ones_alone_after(tmp_path, cfg,
                                                                       monkeypatch):
    cfg.write_text(CONFIG + MEMORY)
    monkeypatch.setenv("ATTNBENCH_FAKE", "nap:params:*:*,nap:flops:*:*,nap:memory:*:*")
    serial = run_config(cfg, results_dir=tmp_path, run_id="one", **FAKE)
    s = run_config(cfg, results_dir=tmp_path, run_id="two", jobs=2, **FAKE)
    assert s.exit_code == 0 and s.done == serial.done == s.cells
    rows = R.load_rows(tmp_path / "two" / "rows.jsonl")
    assert sorted(_keys(rows)) == sorted(_keys(R.load_rows(tmp_path / "one" / "rows.jsonl")))
    spans = {}
    for r in rows:   # one span per unit: (start, end, pid, timed)
        spans[(r["started_at"], r["pid"])] = (r["started_at"], r["measured_at"], r["pid"],
                                              r["metric"] in TIMED_METRICS)
    untimed = [v for v in spans.values() if not v[3]]
    timed = [v for v in spans.values() if v[3]]
    assert timed and untimed
    overlap = any(a[0] < b[1] and b[0] < a[1] and a[2] != b[2]
                  for i, a in enumerate(untimed) for b in untimed[i + 1:])
    assert overlap                                        # two untimed units at once
    assert min(t[0] for t in timed) >= max(u[1] for u in untimed)   # timed: after, alone
    assert all(not (a[0] < b[1] and b[0] < a[1]) for i, a in enumerate(timed)
               for b in timed[i + 1:])


def test_a_fresh_parallel_run_still_starts_its_timed_units(tmp_path, cfg):
    """In a fresh process (no forkserver yet) the parallel phase must not start the
    forkserver from a pool thread: the server dies with the thread that started it
    (PR_SET_PDEATHSIG), and the timed units after the pool then failed to start
    ("EOFError: unexpected EOF")."""
    cfg.write_text(CONFIG + MEMORY)
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from attnbench.matrix.runner import run_config\n"
              f"s = run_config({str(cfg)!r}, results_dir={str(tmp_path)!r}, run_id='p', "
              "jobs=2, measure='test_runner:measure_cell', "
              "measure_group='test_runner:measure_group', progress=False)\n"
              "print('exit', s.exit_code, s.done, s.cells)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    words = done.stdout.split("exit ")[-1].split()
    assert words[0] == "0" and words[1] == words[2], done.stdout[-2000:]
    rows = R.load_rows(tmp_path / "p" / "rows.jsonl")
    assert {r["metric"] for r in rows} >= {"params", "latency", "speed_ratio"}


def test_a_parallel_run_interrupted_resumes_with_every_cell_once(tmp_path, cfg):
    def stop(n):
        if n == 4:
            raise KeyboardInterrupt
    s = run_config(cfg, results_dir=tmp_path, run_id="r", jobs=2, after_unit=stop, **FAKE)
    assert s.interrupted and s.exit_code == 130 and s.done == 4
    s2 = run_config(cfg, results_dir=tmp_path, run_id="r", jobs=2, **FAKE)
    assert s2.exit_code == 0 and s2.skipped == 4
    rows = R.load_rows(tmp_path / "r" / "rows.jsonl")
    assert len(set(_keys(rows))) == len(rows) and len({r["cell"] for r in rows}) == s2.cells


def test_jobs_are_checked(tmp_path, cfg):
    cfg.write_text(CONFIG.replace('name = "t"', 'name = "t"\njobs = 0'))
    with pytest.raises(ValueError, match="jobs: must be an integer >= 1"):
        load_config(cfg)
    cfg.write_text(CONFIG)
    with pytest.raises(runner.RunnerError, match="only with the local backend"):
        run_config(cfg, results_dir=tmp_path, jobs=2, backend="ray", **FAKE)
