"""Test-resolution robustness (attnbench.accuracy.robustness) and the demo
(attnbench.accuracy.demo)."""
import json

import pytest
import torch
from PIL import Image

from attnbench.accuracy.checkpoint import save_checkpoint
from attnbench.accuracy.data import make_dataset
from attnbench.results import ROW_COLUMNS, load_rows
from attnbench.accuracy.robustness import DEFAULT_RESOLUTIONS, CheckpointRows, RobustnessError, \
    accuracy_tables, evaluate_checkpoints, model_variant, parse_resolutions, relative_sweep, \
    robustness_cell
from attnbench.accuracy.train import eval_transform, resize_size
from attnbench.modules import build_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rdata")
    make_dataset(root, classes=3, train=1, val=4, size=32, seed=2)
    return root


def _ckpt(path, module, data, train_res=24, classes=None):
    torch.manual_seed(0)
    model = build_model("resnet18", module, num_classes=3)
    from torchvision.datasets import ImageFolder
    names = classes or ImageFolder(str(data / "val")).classes
    return save_checkpoint(path, model, classes=names, train_resolution=train_res, epoch=1,
                           dataset=str(data), crop_pct=0.875)


def test_resolution_lists():
    assert parse_resolutions("168:448:28") == DEFAULT_RESOLUTIONS == list(range(168, 449, 28))
    assert len(DEFAULT_RESOLUTIONS) == 11
    assert parse_resolutions("224, 168,448") == [168, 224, 448]
    assert parse_resolutions("96") == [96]
    for bad in ("a:b:c", "448:168:28", "168:448:0", "", "4"):
        with pytest.raises(RobustnessError):
            parse_resolutions(bad)
    # the paper's sweep is 0.75x..2x of 224 in steps of 224/8
    assert relative_sweep(224) == DEFAULT_RESOLUTIONS
    assert relative_sweep(64) == list(range(48, 129, 8))
    assert relative_sweep(96) == list(range(72, 193, 12))
    assert relative_sweep(112)[0] == 84 and relative_sweep(112)[-1] == 224
    assert all(r % 4 == 0 for n in (40, 100, 112, 150) for r in relative_sweep(n))


@pytest.mark.parametrize("res", [24, 32, 56, 168, 224, 448])
def test_crop_protocol_sizes(res):
    assert resize_size(224, 0.875) == 256 and resize_size(168, 0.875) == 192
    assert resize_size(448, 0.875) == 512 and resize_size(224, 1.0) == 224
    for w, h in ((100, 150), (150, 100), (64, 64)):
        x = eval_transform(res)(Image.new("RGB", (w, h), (200, 10, 10)))
        assert x.shape == (3, res, res)
    # the shorter side goes to int(res / crop_pct), then the centre crop
    from torchvision import transforms as T
    t = eval_transform(res, 0.875)
    assert isinstance(t.transforms[0], T.Resize) and t.transforms[0].size == resize_size(res, .875)
    assert isinstance(t.transforms[1], T.CenterCrop)


def test_rows_per_resolution_metric_and_checkpoint(data, tmp_path):
    a = _ckpt(tmp_path / "none.pt", None, data)
    b = _ckpt(tmp_path / "se.pt", "se", data)
    res = [20, 24, 32]
    rows, run_dir = evaluate_checkpoints([a, b], data, resolutions=res, batch_size=5,
                                         results=tmp_path / "results", run_id="r1",
                                         progress=False, log=lambda m: None)
    assert len(rows) == len(res) * 2 * 2
    stored = load_rows(run_dir / "rows.jsonl")
    assert len(stored) == len(rows)
    assert json.loads((run_dir / "env.json").read_text())["run_id"] == "r1"
    for r in stored:
        assert all(c in r for c in ROW_COLUMNS)
        assert r["status"] == "ok" and r["unit"] == "%" and r["mode"] == "eval"
        assert r["metric"] in ("top1", "top5") and 0 <= r["value"] <= 100
        assert r["train_resolution"] == 24 and r["dataset"] == str(data)
        assert r["checkpoint"] in (str(a), str(b)) and r["images"] == 12
        assert "center-crop crop_pct=0.875" in r["method"]
        if r["metric"] == "top5":  # 3 classes: top-5 is top-3, and says so
            assert "top-3" in r["method"] and r["value"] == 100.0
    assert sorted({(r["checkpoint"], r["resolution"]) for r in stored}) == \
        sorted((str(c), x) for c in (a, b) for x in res)
    assert {r["label"] for r in stored} == {"none", "SE"}
    assert {r["options"] for r in stored if r["module"] == "se"} == {'{"reduction":16}'}
    # running the same run again skips the finished cells
    again, _ = evaluate_checkpoints([a, b], data, resolutions=res, results=tmp_path / "results",
                                    run_id="r1", progress=False, log=lambda m: None)
    assert again == [] and len(load_rows(run_dir / "rows.jsonl")) == len(rows)
    table = accuracy_tables(stored)
    assert "Best top1" in table and "24² (train)" in table and "SE" in table


def test_failures_are_rows_and_do_not_stop_the_others(data, tmp_path):
    good = _ckpt(tmp_path / "good.pt", None, data)
    other = _ckpt(tmp_path / "other.pt", None, data, classes=["x", "y", "z"])
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint at all")
    logs = []
    rows, _ = evaluate_checkpoints([broken, other, good], data, resolutions=[24, 28],
                                   results=tmp_path / "results", run_id="r2",
                                   progress=False, log=logs.append)
    assert len(rows) == 3 * 2 * 2
    by = {}
    for r in rows:
        by.setdefault(r["checkpoint"], set()).add(r["status"])
    assert by == {str(broken): {"failed"}, str(other): {"failed"}, str(good): {"ok"}}
    errors = {r["checkpoint"]: r["error"] for r in rows if r["status"] == "failed"}
    assert "corrupt or truncated" in errors[str(broken)]
    assert "not the checkpoint's" in errors[str(other)]
    assert all(r["value"] is None for r in rows if r["status"] == "failed")


def test_scale_from_auto_and_cli(data, tmp_path, capsys):
    from attnbench.cli import main
    ck = _ckpt(tmp_path / "m.pt", None, data, train_res=16)
    rc = main(["robustness", str(ck), "--data", str(data), "--scale-from", "auto",
               "--results", str(tmp_path / "res"), "--run-id", "cli", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "16² (train)" in out and "Fig. 3" in out
    rows = load_rows(tmp_path / "res" / "cli" / "rows.jsonl")
    assert sorted({r["resolution"] for r in rows}) == relative_sweep(16) == \
        [12, 16, 20, 24, 28, 32]
    assert {r["scale"] for r in rows if r["resolution"] == 32} == {2.0}


def test_demo_pipeline_tiny(tmp_path):
    from attnbench.accuracy.demo import PRESETS, demo_sweep, parse_models, run_demo
    assert [m[1] for m in parse_models(None)] == ["none", "se", "cbam", "fca", "td"]
    assert parse_models("none,se") == parse_models(None)[:2]
    assert parse_models('x=td:{"variant":"top"}') == [("x", "td", {"variant": "top"})]
    assert PRESETS["cpu"]["seeds"] == [0, 1, 2] and PRESETS["gpu"]["backbone"] == "resnet50"
    assert demo_sweep(64) == [48, 64, 80, 96, 112, 128]
    assert demo_sweep(224) == [168, 224, 280, 336, 392, 448]
    logs = []
    tiny = dict(resolution=16, classes=4, train_per_class=3, val_per_class=2, epochs=1,
                batch_size=6, oversample=1, progress=False, log=logs.append)
    result = run_demo(tmp_path / "demo", tmp_path / "results", seeds=[0, 1],
                      models=[("none", "none", {}), ("bogus", "nosuchmodule", {})],
                      run_id="demo", **tiny)
    text = "\n".join(logs)
    ckpts = tmp_path / "demo" / "checkpoints"
    assert result["trained"] == [str(ckpts / "none-seed0.pt"), str(ckpts / "none-seed1.pt")]
    assert "nosuchmodule" in result["failed"]["bogus"]
    assert "trained at 16²" in text and "0.75x..2x" in text and "Best top1" in text
    rows = load_rows(tmp_path / "results" / "demo" / "rows.jsonl")
    n_res = len(demo_sweep(16))
    # 2 seeds x (train BN + BN@test) x sizes x 2 metrics, + the failed model's 2 seeds
    assert len(rows) == 2 * 2 * n_res * 2 + 2 * n_res * 2
    assert sum(r["status"] == "failed" for r in rows) == 2 * n_res * 2
    assert {r["label"] for r in rows if r["status"] == "ok"} == {"none", "none [BN@test]"}
    # a second run reuses the trained checkpoints (nothing retrained)
    logs.clear()
    run_demo(tmp_path / "demo", tmp_path / "results", seeds=[0, 1],
             models=[("none", "none", {})], run_id="demo2", **tiny)
    assert sum("nothing to do" in m for m in logs) == 2, logs


def test_cell_ids_are_stable():
    # runs written before must resume: the id is the hash of json.dumps(sort_keys=True)
    assert robustness_cell("ck/se.pt", "data/shapes", 224, 0.875) == "c48eade55e30"
    assert robustness_cell("ck/se.pt", "data/shapes", 196, 0.875) != "c48eade55e30"


def test_model_variant_fills_defaults_or_keeps_what_it_was_given():
    assert model_variant("se", {}, "x") == ({"reduction": 16}, "SE")
    assert model_variant("none", {}, "x") == ({}, "none")
    assert model_variant("nosuchmodule", {"a": 1}, "mine") == ({"a": 1}, "mine")
    assert model_variant("se", {"bogus": 1}, "mine") == ({"bogus": 1}, "mine")


def test_checkpoint_rows_ok_and_failed_share_their_columns():
    maker = CheckpointRows("run", "ck/se.pt", "data", 8, "cpu", backbone="resnet18",
                           module="se", label="SE", options={"reduction": 16},
                           train_resolution=32)
    ok = maker.ok(48, {"top1": 50.0, "topk": 100.0, "n": 12}, n_classes=3)
    failed = maker.failed([48, 64], "boom")
    assert [r["metric"] for r in ok] == ["top1", "top5"]
    assert [(r["resolution"], r["metric"]) for r in failed] == \
        [(48, "top1"), (48, "top5"), (64, "top1"), (64, "top5")]
    assert set(ok[0]) == set(failed[0])
    assert all(c in r for r in ok + failed for c in ROW_COLUMNS)
    assert ok[0]["cell"] == failed[0]["cell"] == robustness_cell("ck/se.pt", "data", 48, 0.875)
    assert ok[0]["options"] == '{"reduction":16}' and ok[0]["scale"] == 1.5
    assert ok[1]["method"].endswith("top-5 is top-3: only 3 classes")
    assert all(r["status"] == "failed" and r["error"] == "boom" and r["value"] is None
               and r["method"] == "center-crop crop_pct=0.875" for r in failed)


def test_demo_uses_robustness_not_the_other_way():
    import ast
    import attnbench.accuracy.robustness as R
    tree = ast.parse(open(R.__file__).read())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(n and (n.endswith("demo") or n.startswith("attnbench.cli")) for n in names)


def test_demo_threads_follow_the_cores_busy_now(monkeypatch):
    """auto_threads counts the cores other work uses now (/proc/stat), not the lagging
    load average."""
    from attnbench.accuracy import demo
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (4.0, 4.0, 4.0))  # a job just ended
    ticks = iter([(1000, 2000), (1400, 2400)])  # 400 of 400 jiffies idle: nothing runs
    monkeypatch.setattr(demo, "_cpu_times", lambda: next(ticks))
    monkeypatch.setattr(demo.time, "sleep", lambda s: None)
    assert demo.auto_threads() == 4
    ticks = iter([(1000, 2000), (1100, 2400)])  # 3 of 4 cores busy
    monkeypatch.setattr(demo, "_cpu_times", lambda: next(ticks))
    assert demo.auto_threads() == 1
    monkeypatch.setattr(demo, "_cpu_times", lambda: None)  # no /proc: the load average
    assert demo.auto_threads() == 1
    assert demo._cpu_times is not None and demo.busy_cores(0.0) is None
