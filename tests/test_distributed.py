"""Beyond one machine: the matrix on Ray (attnbench.matrix.ray_backend) and training and
evaluation under torchrun (attnbench.accuracy.distributed).

Ray tests share one local Ray instance (num_cpus=2) started once for this module; the
ones with a fake measurement use ``measure_cell`` / ``measure_group`` below (imported by
the Ray workers, whose PYTHONPATH has this folder), steered by ``ATTNBENCH_TEST_KILL``
(``module:resolution:metric``: the worker of that cell kills itself) and ``ATTNBENCH_TEST_SLEEP``
(seconds per cell). torchrun tests train ResNet-18 at 32 px on a generated data set with
gloo on the CPU.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from attnbench import results as R
from attnbench.accuracy import distributed as D
from attnbench.accuracy.checkpoint import read_checkpoint
from attnbench.accuracy.data import make_dataset
from attnbench.accuracy.train import TrainConfig, image_folder, train, train_transform
from attnbench.matrix import ray_backend, runner
from attnbench.matrix.config import expand, load_config
from attnbench.matrix.runner import RunnerError, run_config
from attnbench.results import Cell

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


# --------------------------------------------------------------------------- the fake

def _fake_rows(cell):
    kill = os.environ.get("ATTNBENCH_TEST_KILL", "")
    if kill == f"{cell.module}:{cell.resolution}:{cell.metrics[0]}":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(os.environ.get("ATTNBENCH_TEST_SLEEP", "0")))
    base = {"backbone": cell.backbone, "module": cell.module, "label": cell.module.upper(),
            "options": json.dumps(cell.options, sort_keys=True), "stages": None,
            "resolution": cell.resolution, "batch": cell.batch, "mode": cell.mode,
            "device": cell.device, "status": "ok", "error": "", "pid": os.getpid()}
    metric = cell.metrics[0]
    unit = {"params": "count", "flops": "GMac", "latency": "ms"}[metric]
    return [dict(base, metric=metric, value=float(cell.resolution), unit=unit, method="fake")]


def measure_cell(cell):
    return _fake_rows(cell)


def measure_group(cells):
    out = []
    for cell in cells:
        out += _fake_rows(cell)
        out.append(dict(out[-1], metric="speed_ratio", value=1.0, unit="x"))
    return out


CONFIG = """
name = "raytest"
backbones = ["resnet18"]
num_classes = 10
threads = 1
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


@pytest.fixture
def cfg_path(tmp_path):
    path = tmp_path / "raytest.toml"
    path.write_text(CONFIG)
    return path


def _each_cell_once(rows, cells):
    """Every cell of ``cells`` has rows, each (cell, metric, method) exactly once."""
    assert {r["cell"] for r in rows} == {c.id for c in cells}
    twice = [k for k, n in Counter((r["cell"], r["metric"], r["method"]) for r in rows).items()
             if n > 1]
    assert not twice, twice


# --------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance for this module (2 CPUs); its GCS address."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:  # the Ray workers import this module
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS),
                                                              os.environ.get("PYTHONPATH")])))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _ray_run(cfg, tmp_path, **kw):
    kw.setdefault("out", io.StringIO())
    return run_config(cfg, results_dir=tmp_path / "results", progress=False, backend="ray",
                      measure=measure_cell, measure_group=measure_group, **kw)


@pytest.mark.slow
def test_tiny_static_metrics_on_ray_equal_the_local_backend(ray_address, tmp_path):
    """configs/tiny.toml, params and FLOPs (the deterministic metrics), real profilers."""
    only = ["metric=params,flops"]
    common = dict(only=only, results_dir=tmp_path, progress=False)
    local = run_config("tiny", run_id="local", out=io.StringIO(), **common)
    remote = run_config("tiny", run_id="ray", backend="ray", out=io.StringIO(), **common)
    assert local.exit_code == remote.exit_code == 0
    assert local.ok == remote.ok == len(expand(load_config("tiny"), only)) == 12

    def values(run):
        rows = R.load_rows(tmp_path / run / R.ROWS_FILE)
        return rows, {(r["cell"], r["metric"], r["method"]): r["value"] for r in rows}

    local_rows, a = values("local")
    ray_rows, b = values("ray")
    assert {r["cell"] for r in local_rows} == {r["cell"] for r in ray_rows}
    assert a == b and len(a) == len(ray_rows) == len(local_rows)
    assert {m for _, m, _ in a} >= {"params", "params_attention", "flops"}
    assert {r["node"] for r in ray_rows} == {socket.gethostname()}
    env = R.load_env(tmp_path / "ray")
    assert env["backend"] == "ray" and env["ray"]["nodes"][0]["CPU"] == 2


def test_ray_run_interrupted_then_resumed_has_every_cell_once(ray_address, cfg_path, tmp_path):
    cells = expand(load_config(cfg_path))
    first = _ray_run(cfg_path, tmp_path, run_id="r", max_units=5)
    assert first.interrupted and first.exit_code == runner.EXIT_INTERRUPTED
    rows = R.load_rows(tmp_path / "results" / "r" / R.ROWS_FILE)
    saved = {r["cell"] for r in rows}
    assert 5 <= len(saved) < len(cells)  # 5 units: cells or interleaved groups
    second = _ray_run(cfg_path, tmp_path, run_id="r")
    assert second.exit_code == 0 and not second.interrupted
    assert second.skipped == len(saved) and second.done == len(cells) - len(saved)
    rows = R.load_rows(tmp_path / "results" / "r" / R.ROWS_FILE)
    _each_cell_once(rows, cells)
    groups = [r for r in rows if r["metric"] == "speed_ratio"]
    assert len(groups) == 6 and all(r["unit_wall_s"] is not None for r in rows)
    assert "--- unit" in (tmp_path / "results" / "r" / "worker.log").read_text()


def test_ray_failed_cell_is_recorded_and_retried(ray_address, cfg_path, tmp_path, monkeypatch):
    """An injected failure (the worker of one cell is SIGKILLed; the variable travels to
    the Ray task with the unit) fails that cell only; --retry-failed completes the run."""
    cells = expand(load_config(cfg_path))
    monkeypatch.setenv("ATTNBENCH_TEST_KILL", "se:96:flops")
    first = _ray_run(cfg_path, tmp_path, run_id="f")
    assert first.exit_code == runner.EXIT_FAILED
    assert (first.ok, first.failed) == (len(cells) - 1, 1)
    rows = R.load_rows(tmp_path / "results" / "f" / R.ROWS_FILE)
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["module"], r["resolution"], r["metric"]) for r in failed] == [("se", 96, "flops")]
    assert "worker process killed by signal SIGKILL" in failed[0]["error"], failed[0]["error"]
    monkeypatch.delenv("ATTNBENCH_TEST_KILL")
    again = _ray_run(cfg_path, tmp_path, run_id="f", retry_failed=True)
    assert again.exit_code == 0 and again.done == first.failed
    rows = R.load_rows(tmp_path / "results" / "f" / R.ROWS_FILE)
    _each_cell_once(rows, cells)
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.slow
def test_ray_driver_killed_then_resumed_has_every_cell_once(ray_address, cfg_path, tmp_path):
    """`attnbench run --backend ray --address` killed with SIGKILL after some cells; the
    resumed run measures the rest, and every cell has its rows once."""
    cells = expand(load_config(cfg_path))
    rows_file = tmp_path / "results" / "k" / R.ROWS_FILE
    env = dict(os.environ, ATTNBENCH_TEST_SLEEP="0.5", PYTHONPATH=str(TESTS))
    cmd = [sys.executable, "-m", "attnbench", "run", str(cfg_path), "--backend", "ray",
           "--address", ray_address, "--run-id", "k", "--results", str(tmp_path / "results"),
           "--measure-module", "test_distributed", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if rows_file.exists() and len({r["cell"] for r in R.load_rows(rows_file)}) >= 4:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    saved = {r["cell"] for r in R.load_rows(rows_file)}
    assert 4 <= len(saved) < len(cells)
    resumed = _ray_run(cfg_path, tmp_path, run_id="k")
    assert resumed.exit_code == 0 and resumed.skipped == len(saved)
    _each_cell_once(R.load_rows(rows_file), cells)


def test_backend_choices_and_ray_resources(monkeypatch):
    with pytest.raises(RunnerError, match="only with --backend ray"):
        runner._backend("local", "auto", io.StringIO())
    with pytest.raises(RunnerError, match="unknown backend 'slurm'"):
        runner._backend("slurm", None, io.StringIO())
    monkeypatch.setattr(ray_backend.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RunnerError, match=r"pip install 'attnbench\[ray\]'"):
        runner._backend("ray", None, io.StringIO())
    cell = dict(backbone="resnet18", module="se", resolution=64, batch=2)
    cpu_timed = [Cell(metrics=("latency",), threads=2, **cell)]
    assert ray_backend.unit_resources(cpu_timed, 8) == {"num_cpus": 2, "num_gpus": 0}
    assert ray_backend.unit_resources([Cell(metrics=("latency",), **cell)], 8)["num_cpus"] == 8
    gpu = [Cell(metrics=("latency",), device="cuda", **cell),
           Cell(metrics=("latency",), device="cuda", **dict(cell, module="eca"))]
    assert ray_backend.unit_resources(gpu, 8) == {"num_cpus": 1, "num_gpus": 1}
    static = [Cell(metrics=("flops",), device="cuda", **cell)]
    assert ray_backend.unit_resources(static, 8)["num_gpus"] == 0
    with pytest.raises(RunnerError, match="set device = \"cuda\""):
        ray_backend.check_cells([Cell(metrics=("latency",), device="cuda:1", **cell)])


def test_ray_task_survives_an_unreachable_forkserver(cfg_path, monkeypatch):
    """A Ray worker process is reused; CI saw its forkserver refuse connections after
    cancelled tasks. Here the forkserver state points at a socket nobody listens on and a
    live pid: the task's unit still runs (spawned) and the log says so."""
    import multiprocessing.forkserver as forkserver
    fs = forkserver._forkserver
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    sock = socket.socket(socket.AF_UNIX)
    address = str(cfg_path.parent / "dead-forkserver.sock")
    sock.bind(address)
    sock.close()  # the socket file stays; no one listens on it
    _, alive_w = os.pipe()
    monkeypatch.setattr(fs, "_forkserver_pid", sleeper.pid)
    monkeypatch.setattr(fs, "_forkserver_address", address)
    monkeypatch.setattr(fs, "_forkserver_alive_fd", alive_w)
    monkeypatch.setattr(ray_backend, "_START_METHOD", None)
    monkeypatch.syspath_prepend(str(TESTS))  # the spawned worker imports this module
    cell = expand(load_config(cfg_path))[0]
    try:
        with pytest.raises(ConnectionRefusedError):  # the state really is broken
            forkserver.connect_to_new_process([])
        kind, payload, _, _, log, _ = ray_backend.unit_task(
            [cell.to_dict()], measure_cell, measure_group, [], 60.0, {})
    finally:
        sleeper.kill()
        sleeper.wait()
    assert kind == "rows" and payload[0]["value"] == float(cell.resolution), payload
    assert ray_backend._START_METHOD == "spawn"
    assert "ConnectionRefusedError" in log and "spawned from now on" in log


# --------------------------------------------------------------------------- DDP pieces

def test_global_batches_and_augmentations_do_not_depend_on_the_world_size(tmp_path):
    """Rank r of W takes positions r, r+W, ... of the epoch's permutation: the union of
    the ranks' batch k is the single process's batch k, with the same augmented images."""
    make_dataset(tmp_path, classes=3, train=6, val=2, size=32, seed=1)
    ds = image_folder(tmp_path / "train", train_transform(32), "train")
    for epoch in (0, 1):
        single = D.train_loader(ds, 6, seed=3)
        D.start_epoch(single, epoch)
        ranks = []
        for r in range(2):
            sampler = torch.utils.data.DistributedSampler(
                single.dataset, num_replicas=2, rank=r, shuffle=True, seed=3, drop_last=True)
            sampler.set_epoch(epoch)
            ranks.append(list(torch.utils.data.DataLoader(single.dataset, batch_size=3,
                                                          sampler=sampler)))
        batches = list(single)
        assert len(batches) == len(ranks[0]) == 3
        for k, (images, labels) in enumerate(batches):
            mine = torch.cat([ranks[0][k][0], ranks[1][k][0]])
            order = [int(i) for i in list(single.sampler)[6 * k:6 * k + 6]]
            assert torch.equal(images, torch.stack([single.dataset[i][0] for i in order]))
            assert sorted(map(tuple, mine.flatten(1).tolist())) == \
                sorted(map(tuple, images.flatten(1).tolist()))
    first = D.SeededSamples(ds, 3)[0][0]
    assert torch.equal(first, D.SeededSamples(ds, 3)[0][0])
    assert not torch.equal(first, D.SeededSamples(ds, 4)[0][0])


def _sync_bn_rank(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    x, w = _sync_bn_inputs()
    seq = nn.Sequential(nn.BatchNorm2d(4))
    assert D.convert_sync_batchnorm(seq, "cpu") == 1
    net = seq[0].train()
    assert isinstance(net, D.CPUSyncBatchNorm)
    xr = x[rank::2].clone().requires_grad_(True)
    y = net(xr)
    (y * w[rank::2]).sum().backward()
    torch.save({"y": y.detach(), "grad": xr.grad, "mean": net.running_mean,
                "var": net.running_var}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _sync_bn_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, 3, 3, generator=g) * 3 + 1, torch.randn(6, 4, 3, 3, generator=g)


def test_cpu_sync_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path):
    """Two gloo ranks with half a batch each: outputs, input gradients and running
    statistics of the full batch's BatchNorm2d."""
    import torch.multiprocessing as mp
    port = 29000 + os.getpid() % 1000
    mp.spawn(_sync_bn_rank, args=(port, str(tmp_path)), nprocs=2)
    x, w = _sync_bn_inputs()
    x.requires_grad_(True)
    ref = nn.BatchNorm2d(4).train()
    y = ref(x)
    (y * w).sum().backward()
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in range(2):
        torch.testing.assert_close(got[r]["y"], y[r::2].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[r]["grad"], x.grad[r::2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[r]["mean"], ref.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[r]["var"], ref.running_var, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- torchrun

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "attnbench"]
TRAIN = ["train", "--backbone", "resnet18", "--resolution", "32", "--batch-size", "8",
         "--lr", "0.01", "--limit-batches", "2", "--no-progress", "--threads", "1"]
#: float32 reduction order differs between 2 ranks and 1 process (~1e-6 per step); batch
#: norm at batch 8 on 32 px images amplifies it (2e-5 after 2 steps here)
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_dataset(root, classes=3, train=8, val=4, size=32, seed=1)
    return root


def _torchrun(args, cwd, **env):
    full = dict(os.environ, OMP_NUM_THREADS="1", **env)
    proc = subprocess.run(TORCHRUN + [str(a) for a in args], cwd=cwd, env=full, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def _digests(folder):
    return [[json.loads(line) for line in (folder / f"rank{r}.jsonl").read_text().splitlines()]
            for r in range(2)]


def _max_rel_diff(a, b):
    return max(float((a[k].double() - b[k].double()).norm() / (a[k].double().norm() + 1e-12))
               for k in a if a[k].is_floating_point())


@pytest.mark.slow
def test_torchrun_sync_bn_matches_one_process_and_resumes_exactly(shapes, tmp_path):
    """2 gloo ranks with --sync-bn: identical weights and buffers on both ranks after each
    step, the single-process result with the same global batch within TOLERANCE, rank 0
    alone logs and writes, and a resumed run equals an uninterrupted one bit for bit."""
    dg = tmp_path / "dg"
    dg.mkdir()
    out = _torchrun(TRAIN + ["--data", shapes, "--epochs", 1, "--sync-bn", "--out", "a.pt"],
                    tmp_path, ATTNBENCH_DDP_DIGESTS=str(dg))
    assert out.count("wrote a.pt") == 1 and out.count("epoch 1/1") == 1, out
    ranks = _digests(dg)
    assert [d["step"] for d in ranks[0]] == [0, 1] and ranks[0] == ranks[1]
    one = train(TrainConfig(data=str(shapes), resolution=32, epochs=1, batch_size=8, lr=0.01,
                            limit_batches=2, threads=1, out=str(tmp_path / "one.pt")),
                progress=False, log=lambda m: None)
    ddp = read_checkpoint(tmp_path / "a.pt")
    assert ddp["world_size"] == 2 and ddp["args"]["sync_bn"] is True
    assert _max_rel_diff(one["state_dict"], ddp["state_dict"]) < TOLERANCE
    assert ddp["history"][0]["images"] == one["history"][0]["images"] == 16
    assert ddp["history"][0]["train_loss"] == pytest.approx(one["history"][0]["train_loss"],
                                                            rel=1e-4)
    shutil.copy(tmp_path / "a.pt", tmp_path / "b.pt")
    _torchrun(["train", "--resume", "b.pt", "--epochs", 2, "--no-progress"], tmp_path,
              ATTNBENCH_DDP_DIGESTS=str(dg))
    ranks = _digests(dg)
    assert [d["step"] for d in ranks[0]] == [0, 1, 2, 3] and ranks[0] == ranks[1]
    # the small-data recipe's warm-up + cosine schedule spans the total epochs, so a run
    # extended from 1 to 2 epochs is not a straight 2-epoch run (it was, with the old
    # constant rate); the resumed run goes on from the checkpoint on both ranks
    resumed, first = read_checkpoint(tmp_path / "b.pt"), read_checkpoint(tmp_path / "a.pt")
    assert resumed["state_dict"].keys() == first["state_dict"].keys()
    assert len(resumed["history"]) == 2 and resumed["history"][0] == first["history"][0]
    assert not all(torch.equal(resumed["state_dict"][k], first["state_dict"][k])
                   for k in first["state_dict"])


@pytest.mark.slow
def test_torchrun_without_sync_bn_and_robustness_over_ranks(shapes, tmp_path):
    """Plain BN: identical weights after each step, but each rank's own running statistics
    (so not the single-process result); `robustness` under torchrun gives the rows of a
    single-process evaluation."""
    dg = tmp_path / "dg"
    dg.mkdir()
    _torchrun(TRAIN + ["--data", shapes, "--epochs", 1, "--out", "p.pt"], tmp_path,
              ATTNBENCH_DDP_DIGESTS=str(dg))
    ranks = _digests(dg)
    assert [d["params"] for d in ranks[0]] == [d["params"] for d in ranks[1]]
    assert [d["buffers"] for d in ranks[0]] != [d["buffers"] for d in ranks[1]]
    common = ["p.pt", "--data", shapes, "--resolutions", "24,32,40", "--results", "res",
              "--no-progress"]
    _torchrun(["robustness"] + common + ["--run-id", "two"], tmp_path)
    subprocess.run([sys.executable, "-m", "attnbench", "robustness"] + [str(c) for c in common]
                   + ["--run-id", "one", "--threads", "1"], cwd=tmp_path, check=True,
                   capture_output=True)

    def rows(run):
        return {(r["resolution"], r["metric"]): (r["value"], r["images"], r["status"])
                for r in R.load_rows(tmp_path / "res" / run / R.ROWS_FILE)}

    assert rows("two") == rows("one") and len(rows("one")) == 6
    assert {v[1] for v in rows("one").values()} == {12}
    assert R.load_env(tmp_path / "res" / "two")["world_size"] == 2
