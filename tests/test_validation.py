"""Bad input gets one line, ``attnbench: error: ...`` naming the input and what would be
valid, exit status 2, no traceback, and nothing measured, trained or written (issue 18).
``--debug`` shows the traceback. Each case of the issue is one parameter below."""
from __future__ import annotations

import errno
import json
import os
import tempfile
import zipfile
from pathlib import Path

import pytest

from attnbench import results as R
from attnbench.accuracy.data import make_dataset
from attnbench.cli import main
from attnbench.matrix.config import expand, load_config


@pytest.fixture(scope="module", autouse=True)
def _keep_threads():
    """``train --threads 1`` sets torch's threads for the whole process: put them back."""
    import torch
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, classes=2, train=2, val=1, size=16, seed=0)
    return root


@pytest.fixture(scope="module")
def ckpt32(data, tmp_path_factory):
    """A ResNet-18 + SE checkpoint trained for one step at 32 px."""
    out = tmp_path_factory.mktemp("ckpt") / "se32.pt"
    assert main(["train", "--data", str(data), "--module", "se", "--resolution", "32",
                 "--epochs", "1", "--batch-size", "2", "--limit-batches", "1", "--threads", "1",
                 "--out", str(out), "--no-progress"]) == 0
    return out


def _tampered(src: Path, dst: Path) -> Path:
    """``src`` with its largest tensor zeroed inside the zip (a torch.load still works)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        names = zin.namelist()
        big = max((n for n in names if "/data/" in n), key=lambda n: zin.getinfo(n).file_size)
        for n in names:
            zout.writestr(zin.getinfo(n), bytes(zin.getinfo(n).file_size) if n == big
                          else zin.read(n))
    return dst


def _results(root: Path, rows=None) -> Path:
    """A results folder with one run ``r`` (a params row of ResNet-18, or ``rows``)."""
    base = {c: None for c in R.ROW_COLUMNS}
    base.update(run_id="r", cell="c1", backbone="resnet18", module="none", label="none",
                options="{}", resolution=64, batch=1, device="cpu", metric="params",
                value=11689512.0, unit="count", method="count", status="ok", error="")
    R.write_rows(root / "r", [dict(base, **kw) for kw in (rows or [{}])])
    R.write_env(root / "r", {"run_id": "r", "device": "cpu"})
    return root


def _bad_type_results(root: Path) -> Path:
    _results(root)
    path = root / "r" / "rows.jsonl"
    row = json.loads(path.read_text())
    path.write_text(json.dumps(dict(row, resolution="big")) + "\n")
    return root


MODULE_CONFIG = """name = "bad"
backbones = ["resnet50"]
metrics = ["params"]
[[modules]]
name = "{name}"
options = {{{option}}}
"""


@pytest.fixture
def ws(tmp_path, monkeypatch, data, ckpt32, clean_plugins):
    """A working folder with the inputs the cases name (``{key}`` in their arguments)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)))
    paths = {"tmp": tmp_path, "file": tmp_path / "afile", "data": data, "ckpt32": ckpt32,
             "binary": tmp_path / "binary.toml"}
    for name, option in (("td", 'variant = "sideways"'), ("td", "m = 9"), ("se", "reduction = 0"),
                         ("se", "reduction = 100000")):
        key = f"cfg_{name}_{option.split()[0]}_{option.split()[-1].strip(chr(34))}"
        (tmp_path / f"{key}.toml").write_text(MODULE_CONFIG.format(name=name, option=option))
        paths[key] = tmp_path / f"{key}.toml"
    return paths


def _argv(args, ws):
    return [a.format(**ws) for a in args]


def _run(argv, capsys):
    """(exit status, stderr) of ``attnbench ARGV`` in this process."""
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        rc = exit_.code
    return rc, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("attnbench: error: "), err
    assert "Traceback" not in err
    return lines[0]


# (id, arguments, what the message must say, paths that must not exist afterwards)
CASES = [
    ("stages-not-layers", ["profile", "resnet18", "se", "--stages", "3,x"],
     ["--stages '3,x'", "layer numbers 1..4"], []),
    ("stages-empty-list", ["profile", "resnet18", "se", "--stages", "[]", "--no-speed"],
     ["se: stages=[] selects no block", "module 'none'"], []),
    ("stages-zero-blocks", ["profile", "resnet18", "se", "--stages", '{{"3":0}}', "--no-speed"],
     ["selects no block"], []),
    ("check-module-stages", ["check-module", "se", "--stages", "3,x"], ["--stages '3,x'"], []),
    ("train-stages", ["train", "--data", "{data}", "--module", "se", "--stages", "3,x",
                      "--out", "{tmp}/m.pt"], ["--stages '3,x'"], ["{tmp}/m.pt"]),
    ("train-stages-without-module", ["train", "--data", "{data}", "--stages", "3,4",
                                     "--out", "{tmp}/m.pt"],
     ["--stages", "--module none"], ["{tmp}/m.pt"]),
    ("profile-device", ["profile", "resnet18", "se", "--device", "tpu"],
     ["--device 'tpu'", "cpu, cuda or cuda:N"], []),
    ("check-module-device", ["check-module", "se", "--device", "tpu"], ["--device 'tpu'"], []),
    ("train-device", ["train", "--data", "{data}", "--device", "tpu", "--out", "{tmp}/m.pt"],
     ["--device", "tpu"], ["{tmp}/m.pt"]),
    ("robustness-device", ["robustness", "{ckpt32}", "--data", "{data}", "--device", "tpu",
                           "--results", "{tmp}/res"], ["--device 'tpu'"], ["{tmp}/res"]),
    ("demo-device", ["robustness-demo", "--device", "tpu", "--out", "{tmp}/demo"],
     ["--device 'tpu'"], ["{tmp}/demo"]),
    ("profile-resolution", ["profile", "resnet18", "se", "--resolution", "1"],
     ["argument --resolution", "integer >= 8", "'1'"], []),
    ("profile-warmup", ["profile", "resnet18", "se", "--warmup", "-1"],
     ["argument --warmup", ">= 0"], []),
    ("profile-threads", ["profile", "resnet18", "se", "--threads", "0"],
     ["argument --threads", ">= 1"], []),
    ("check-module-resolutions", ["check-module", "se", "--resolutions", "abc"],
     ["--resolutions 'abc'", "integers >= 8"], []),
    ("run-timeout-nan", ["run", "tiny", "--timeout", "nan", "--dry-run"],
     ["argument --timeout", "'nan'"], []),
    ("run-results-is-a-file", ["run", "tiny", "--results", "{file}", "--dry-run"],
     ["--results", "is a file, not a folder"], []),
    ("run-binary-config", ["run", "{binary}", "--dry-run"],
     ["binary.toml: not a TOML config", "not UTF-8"], []),
    ("config-td-variant", ["run", "{cfg_td_variant_sideways}", "--dry-run"],
     ["modules[0].options", "variant='sideways'", "'joint', 'top'"], []),
    ("config-td-m", ["run", "{cfg_td_m_9}", "--dry-run"], ["m=9", "must be 1..3"], []),
    ("config-se-reduction-0", ["run", "{cfg_se_reduction_0}", "--dry-run"],
     ["reduction=0", "positive integer"], []),
    ("config-se-reduction-large", ["run", "{cfg_se_reduction_100000}", "--dry-run"],
     ["reduction=100000", "larger than the channel count"], []),
    ("report-out-under-a-file", ["report", "--results", "{results}", "--out", "{file}/rep"],
     ["--out", "is a file, not a folder"], []),
    ("report-wrong-type", ["report", "--results", "{bad_results}", "--out", "{tmp}/rep"],
     ["rows.jsonl, line 1", "column 'resolution'", "'big'"], ["{tmp}/rep/README.md"]),
    ("train-workers", ["train", "--data", "{data}", "--workers", "-1"],
     ["argument --workers", ">= 0"], []),
    ("train-out-unwritable", ["train", "--data", "{data}", "--module", "se",
                              "--out", "{file}/m.pt"], ["--out", "is a file, not a folder"], []),
    ("make-data-onto-a-file", ["make-data", "{file}"], ["afile", "is a file, not a folder"], []),
    ("demo-out-is-a-file", ["robustness-demo", "--out", "{file}"],
     ["--out", "is a file, not a folder"], []),
    ("demo-unknown-model", ["robustness-demo", "--models", "se,sqe", "--out", "{tmp}/demo"],
     ["--models sqe", "Did you mean 'se'"], ["{tmp}/demo"]),
    ("robustness-missing-checkpoint", ["robustness", "{tmp}/nope.pt", "--data", "{data}",
                                       "--results", "{tmp}/res"],
     ["nope.pt: no such checkpoint file"], ["{tmp}/res"]),
    ("robustness-tampered-checkpoint", ["robustness", "{tampered}", "--data", "{data}",
                                        "--results", "{tmp}/res"],
     ["do not match the checkpoint's content hash"], ["{tmp}/res"]),
    ("plugin-registers-nothing", ["list", "--plugin", "os"],
     ["plugin 'os' registered no attention module"], []),
    ("efficiency-batches", ["efficiency", "--batches", "1,x"], ["--batches '1,x'"], []),
    ("efficiency-modes", ["efficiency", "--modes", "sideways"],
     ["--modes 'sideways'", "eval, train"], []),
    ("check-module-backbone", ["check-module", "se", "--backbone", "resnet5"],
     ["--backbone: unknown backbone 'resnet5'", "Did you mean"], []),
]


@pytest.mark.parametrize("args, expected, absent", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(args, expected, absent, ws, capsys):
    ws["results"] = _results(ws["tmp"] / "results")
    ws["bad_results"] = _bad_type_results(ws["tmp"] / "bad_results")
    ws["tampered"] = _tampered(ws["ckpt32"], ws["tmp"] / "tampered.pt")
    rc, err = _run(_argv(args, ws), capsys)
    line = _one_line(err)
    assert rc == 2, err
    for text in expected:
        assert text in line, line
    for path in absent:
        assert not Path(path.format(**ws)).exists(), path


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a folder no one may write in")
def test_unwritable_places_are_refused_before_any_work(ws, capsys):
    probe = Path("/sys")
    try:
        tempfile.TemporaryFile(dir=probe).close()
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    results = _results(ws["tmp"] / "results")
    for argv in (["report", "--results", str(results), "--out", "/sys/attnbench-report"],
                 ["train", "--data", str(ws["data"]), "--module", "se", "--out", "/sys/m.pt"],
                 ["run", "tiny", "--results", "/sys/attnbench-results"]):
        rc, err = _run(argv, capsys)
        assert rc == 2 and "cannot write in /sys" in _one_line(err), err


def _refuse(monkeypatch, target, name, code):
    def fail(*a, **k):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(target, name, fail)


@pytest.mark.parametrize("where, code", [(os, errno.ENOSPC), (tempfile, errno.EROFS)],
                         ids=["disk-full", "read-only-disk"])
def test_a_full_or_read_only_disk_is_one_line(where, code, ws, monkeypatch, capsys):
    results = _results(ws["tmp"] / "results")
    _refuse(monkeypatch, where, "replace" if where is os else "mkstemp", code)
    rc, err = _run(["report", "--results", str(results), "--out", str(ws["tmp"] / "rep"),
                    "--formats", "none"], capsys)
    assert rc == 2 and f"cannot write ({os.strerror(code)})" in _one_line(err), err
    assert R.load_rows(results / "r" / "rows.jsonl")  # nothing of the results is harmed


def test_debug_shows_the_traceback(ws, capsys):
    for argv in (["--debug", "profile", "resnet18", "se", "--stages", "3,x"],
                 ["profile", "resnet18", "se", "--stages", "3,x", "--debug"]):
        rc, err = _run(argv, capsys)
        assert rc == 2 and "Traceback" in err
        assert err.strip().splitlines()[-1].startswith("attnbench: error: --stages '3,x'")


def test_an_unexpected_error_is_one_line_pointing_to_debug(ws, monkeypatch, capsys):
    import attnbench.cli.listing as listing

    def boom(args):
        raise RuntimeError("boom\nsecond line")
    monkeypatch.setattr(listing, "run", boom)
    rc, err = _run(["list"], capsys)
    line = _one_line(err)
    assert rc == 2 and "RuntimeError: boom second line" in line and "--debug" in line


def test_cuda_config_without_a_gpu_is_refused_up_front(ws, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = ws["tmp"] / "gpu.toml"
    cfg.write_text('name = "gpu"\ndevice = "cuda"\nbackbones = ["resnet18"]\n'
                   'metrics = ["params"]\n[[modules]]\nname = "se"\n')
    rc, err = _run(["run", str(cfg), "--results", str(ws["tmp"] / "res")], capsys)
    assert rc == 2 and "device = 'cuda': no CUDA device" in _one_line(err), err
    assert not (ws["tmp"] / "res").exists()
    rc, _ = _run(["run", str(cfg), "--dry-run", "--results", str(ws["tmp"] / "res")], capsys)
    assert rc == 0  # the plan can still be listed


# --------------------------------------------------------------------------- resume

def _run_folder(results: Path, name: str, done: int, env: str = "ok") -> Path:
    """A folder of a run of configs/tiny.toml with its first ``done`` cells finished
    (``done=-1``: all); env.json ``ok``, ``missing`` or ``corrupt``."""
    cells = expand(load_config("tiny"))
    folder = results / name
    folder.mkdir(parents=True)
    if env == "ok":
        R.write_env(folder, {"run_id": name, "device": "cpu", "created": "2026-01-01"})
    elif env == "corrupt":
        (folder / "env.json").write_text("{not json")
    chosen = cells if done < 0 else cells[:done]
    if chosen:
        base = {c: None for c in R.ROW_COLUMNS}
        R.write_rows(folder, [dict(base, run_id=name, cell=c.id, backbone=c.backbone,
                                   module=c.module, metric=c.metrics[0], value=1.0,
                                   status="ok", error="") for c in chosen])
    return folder


def test_resume_takes_the_unfinished_run_not_the_latest_finished(ws, capsys):
    results = ws["tmp"] / "results"
    _run_folder(results, "20260101-000000-tiny", 0)           # killed in its first unit
    _run_folder(results, "20260102-000000-tiny", -1)          # finished, and newer
    assert main(["run", "tiny", "--resume", "--dry-run", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "0 already done in " + str(results / "20260101-000000-tiny") in out


@pytest.mark.parametrize("folders, expected", [
    ([("20260101-000000-tiny", 3), ("20260102-000000-tiny", 0)],
     ["2 unfinished runs of 'tiny'", "20260101-000000-tiny (3 of", "20260102-000000-tiny (0 of",
      "--run-id"]),
    ([("20260101-000000-tiny", -1)], ["every run of 'tiny'", "is finished", "--run-id"]),
], ids=["two-unfinished", "all-finished"])
def test_resume_that_would_guess_is_refused(folders, expected, ws, capsys):
    results = ws["tmp"] / "results"
    for name, done in folders:
        _run_folder(results, name, done)
    rc, err = _run(["run", "tiny", "--resume", "--dry-run", "--results", str(results)], capsys)
    line = _one_line(err)
    assert rc == 2
    for text in expected:
        assert text in line, line


@pytest.mark.parametrize("env, expected", [("missing", "env.json is missing"),
                                           ("corrupt", "env.json cannot be read")])
def test_resume_without_a_readable_env_json_is_refused(env, expected, ws, capsys):
    results = ws["tmp"] / "results"
    folder = _run_folder(results, "20260101-000000-tiny", 3, env=env)
    before = sorted(p.name for p in folder.iterdir())
    for argv in (["--resume"], ["--run-id", "20260101-000000-tiny"]):
        rc, err = _run(["run", "tiny", *argv, "--results", str(results)], capsys)
        line = _one_line(err)
        assert rc == 2 and expected in line and "start a new run" in line, line
    assert sorted(p.name for p in folder.iterdir()) == before  # no new env.json


def test_train_resume_with_other_settings_is_refused_then_recorded(ws, capsys):
    ck = ws["tmp"] / "se.pt"
    ck.write_bytes(ws["ckpt32"].read_bytes())
    rc, err = _run(["train", "--resume", str(ck), "--resolution", "64", "--no-progress"], capsys)
    line = _one_line(err)
    assert rc == 2 and "--resolution 64 (checkpoint: 32)" in line and "--allow-changes" in line
    assert ck.read_bytes() == ws["ckpt32"].read_bytes()
    assert main(["train", "--resume", str(ck), "--resolution", "64", "--batch-size", "1",
                 "--epochs", "2", "--threads", "1", "--allow-changes", "--no-progress"]) == 0
    from attnbench.accuracy.checkpoint import read_checkpoint
    saved = read_checkpoint(ck)
    assert saved["resumes"] == [{"at_epoch": 1, "allowed": True, "changed": {
        "resolution": {"from": 32, "to": 64}, "epochs": {"from": 1, "to": 2},
        "batch_size": {"from": 2, "to": 1}}}]
