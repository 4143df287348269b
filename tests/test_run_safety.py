"""A run that is safe to kill, resume and share: no worker outlives a ``kill -9`` of its
runner, one runner per run folder (lock), a resume in another environment refused, the
backend settings applied in the worker and recorded, settings in the cell identity.

The runs use the fake measurement of ``test_runner`` (``ATTNBENCH_FAKE`` rules).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnbench import results as R
from attnbench.matrix import lock as L
from attnbench.matrix.config import expand, parse_config
from attnbench.matrix.runner import RunnerError, run_config
from attnbench.matrix.worker import pid_alive

from test_runner import CONFIG, FAKE, _cli_env, _keys

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNBENCH_FAKE", raising=False)
    path = tmp_path / "t.toml"
    path.write_text(CONFIG)
    return path


def _group_members(pgid: int):
    """``(pid, state)`` of the live (not zombie) processes of process group ``pgid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append((int(d.name), fields[0]))
    return out


def _start_runner(cfg, results, fake):
    """``attnbench run`` in a session of its own (its process group is the run's)."""
    args = [sys.executable, "-m", "attnbench", "run", str(cfg), "--results", str(results),
            "--run-id", "r", "--no-progress", "--measure-module", "test_runner"]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_cli_env(ATTNBENCH_FAKE=fake),
                            start_new_session=True)


def _wait_for_unit(log: Path, text: str, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if log.exists() and text in log.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in {log}")


#: three params cells, then one interleaved latency group of three models
SMALL = CONFIG.replace('metrics = ["params", "flops", "latency"]', 'metrics = ["params", "latency"]'
                       ).replace("resolutions = [64, 96]", "resolutions = [96]")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_runner_leaves_no_process_and_the_resume_completes(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text(SMALL)
    proc = _start_runner(cfg, tmp_path, "sleep:latency:96:*")  # the group hangs
    try:
        _wait_for_unit(tmp_path / "r" / "worker.log", "96px b1 eval latency ...", proc)
        assert len(_group_members(proc.pid)) >= 3   # runner, forkserver, worker (+ tracker)
        # a second runner on the same run folder is refused, naming the holder
        with pytest.raises(L.RunLockedError) as refused:
            run_config(cfg, results_dir=tmp_path, run_id="r", **FAKE)
        assert f"in use by another runner: pid {proc.pid} on host {socket.gethostname()}" \
            in str(refused.value) and "runner.lock" in str(refused.value)
        before = R.load_rows(tmp_path / "r" / "rows.jsonl")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.time() + 5
        while _group_members(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert _group_members(proc.pid) == []   # within 5 s of the kill
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert R.load_rows(tmp_path / "r" / "rows.jsonl") == before   # nothing half-written
    out = []
    s = run_config(cfg, results_dir=tmp_path, run_id="r", out=_Lines(out), **FAKE)
    assert s.exit_code == 0 and s.skipped == 3 and s.done == 3
    assert any("taking over a stale lock" in line for line in out)
    rows = R.load_rows(tmp_path / "r" / "rows.jsonl")
    assert len(set(_keys(rows))) == len(rows)                       # no duplicate
    assert {r["cell"] for r in rows} == {c.id for c in expand(parse_config(SMALL))}
    assert sorted(_keys(before)) == sorted(_keys(r for r in rows if r["metric"].startswith(
        "params")))                                                 # kept, not redone
    assert not (tmp_path / "r" / L.LOCK_FILE).exists()


class _Lines:
    """A text stream collecting what is printed to it."""

    def __init__(self, lines):
        self.lines = lines

    def write(self, text):
        self.lines.extend(text.splitlines())

    def flush(self):
        pass


def test_a_lock_held_by_a_live_process_refuses_and_a_dead_one_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from attnbench.matrix.lock import RunLock; "
         "l = RunLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(60)",
         str(tmp_path / "r")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(L.RunLockedError, match=f"pid {holder.pid} on host"):
            L.RunLock(tmp_path / "r").acquire()
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the flock; the file still names the dead pid: a stale lock
    assert json.loads((tmp_path / "r" / L.LOCK_FILE).read_text())["pid"] == holder.pid
    with L.RunLock(tmp_path / "r") as lock:
        assert lock.stale["pid"] == holder.pid
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "r" / L.LOCK_FILE).exists()
    # a lock file written on another host cannot be checked: refused
    (tmp_path / "r" / L.LOCK_FILE).write_text(json.dumps(
        {"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(L.RunLockedError, match="pid 1 on host elsewhere"):
        L.RunLock(tmp_path / "r").acquire()


def test_resume_in_another_environment_is_refused_unless_allowed(tmp_path, cfg):
    s = run_config(cfg, results_dir=tmp_path, run_id="r", max_units=2, **FAKE)
    assert s.interrupted
    env_path = tmp_path / "r" / "env.json"
    env = json.loads(env_path.read_text())
    threads = env["threads"]
    env["threads"] = threads + 7
    R.write_env(tmp_path / "r", env)
    with pytest.raises(RunnerError, match=rf"threads {threads + 7} there, {threads} now.*"
                                          r"--allow-env-change"):
        run_config(cfg, results_dir=tmp_path, run_id="r", **FAKE)
    assert not (tmp_path / "r" / L.LOCK_FILE).exists()   # released on the error
    s = run_config(cfg, results_dir=tmp_path, run_id="r", allow_env_change=True, **FAKE)
    assert s.exit_code == 0 and s.skipped == 2
    env = json.loads(env_path.read_text())
    assert env["env_changed"] is True
    assert env["sessions"][-1]["env_changed"] == {"threads": [threads + 7, threads]}


def test_cli_refuses_a_changed_device(tmp_path, cfg, capsys):
    from attnbench.cli import main
    run_config(cfg, results_dir=tmp_path, run_id="r", max_units=1, **FAKE)
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    R.write_env(tmp_path / "r", dict(env, device="cuda:1"))
    assert main(["run", str(cfg), "--results", str(tmp_path), "--run-id", "r",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume in another environment (device 'cuda:1' there, 'cpu' now)" in err


SETTINGS = CONFIG + """
[settings]
cudnn_benchmark = false
matmul_precision = "high"
"""


def test_settings_are_applied_in_the_worker_recorded_and_part_of_the_identity(tmp_path):
    default, tf32 = expand(parse_config(CONFIG)), expand(parse_config(SETTINGS))
    same = {c.id for c in default} & {c.id for c in tf32}
    # params and FLOPs do not depend on the settings; latency cells do
    assert same == {c.id for c in default if c.metrics[0] in ("params", "flops")}
    path = tmp_path / "s.toml"
    path.write_text(SETTINGS)
    assert run_config(path, results_dir=tmp_path, run_id="s", **FAKE).exit_code == 0
    rows = R.load_rows(tmp_path / "s" / "rows.jsonl")
    timed = [r for r in rows if r["metric"] in ("latency", "speed_ratio")]
    assert timed and all(
        (r["cudnn_benchmark"], r["tf32_matmul"], r["matmul_precision"], r["tf32_cudnn"])
        == (False, True, "high", False) for r in timed)
    assert all("matmul_precision" not in r for r in rows if r["metric"] == "params")
    env = json.loads((tmp_path / "s" / "env.json").read_text())
    assert env["settings"] == {"cudnn_benchmark": False, "tf32_cudnn": False,
                               "matmul_precision": "high"}
    assert env["config_cells"] == sorted(c.id for c in tf32)
    assert {"gpu_name", "gpu_driver"} <= set(env)


def test_failed_timed_rows_carry_the_settings_of_their_cell(tmp_path, cfg, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_FAKE", "kill:latency:64:*")
    run_config(cfg, results_dir=tmp_path, run_id="r", **FAKE)
    failed = [r for r in R.load_rows(tmp_path / "r" / "rows.jsonl") if r["status"] == "failed"]
    assert failed and all(r["matmul_precision"] == "highest" and r["amp"] is False
                          for r in failed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_zombie_or_a_reused_pid_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while pid_alive(child.pid) and time.time() < deadline:  # exits, unreaped: a zombie
        time.sleep(0.05)
    assert not pid_alive(child.pid)
    child.wait()
    assert pid_alive(os.getpid()) and not pid_alive(os.getpid(), "S 1")


@pytest.mark.parametrize("table, message", [
    ("tf32 = true", "settings.tf32: unknown key (did you mean 'tf32_cudnn', 'tf32_matmul'?)"),
    ('matmul_precision = "low"', "settings.matmul_precision: must be one of highest, high, "
                                 "medium, got 'low'"),
    ('cudnn_benchmark = "yes"', "settings.cudnn_benchmark: must be true or false"),
    ('tf32_matmul = true\nmatmul_precision = "highest"', "settings.tf32_matmul: contradicts"),
])
def test_settings_table_is_validated(table, message):
    from attnbench.matrix.config import ConfigError
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("?", r"\?")):
        parse_config(CONFIG + "[settings]\n" + table + "\n")


def test_settings_defaults_and_tf32_matmul_alias_and_mps_refused():
    from attnbench.matrix.config import ConfigError
    assert parse_config(CONFIG).settings == R.SETTING_DEFAULTS
    cfg = parse_config(CONFIG + "[settings]\ntf32_matmul = true\n")
    assert cfg.settings["matmul_precision"] == "high"
    with pytest.raises(ConfigError, match="device: device 'mps': not supported"):
        parse_config('device = "mps"\n' + CONFIG)
