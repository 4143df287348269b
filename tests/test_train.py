"""Training (attnbench.accuracy.train), its command (attnbench.cli.train) and checkpoints
(attnbench.accuracy.checkpoint)."""
import math

import pytest
import torch

from attnbench.accuracy.checkpoint import CheckpointError, CheckpointMismatchError, \
    load_checkpoint, read_checkpoint, save_checkpoint
from attnbench.accuracy.data import make_dataset
from attnbench.accuracy.train import TrainConfig, eval_transform, evaluate, image_folder, \
    lr_lambda, train
from attnbench.cli.args import parse_options
from attnbench.modules import build_model

# shape and detail both differ: the easiest 3-class task the generator draws
EASY = ["circle-stripes3", "square-dots4", "triangle-stripes7"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("easy")
    make_dataset(root, classes=EASY, train=80, val=30, size=48, seed=0, nuisance=0.3)
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_dataset(root, classes=3, train=8, val=4, size=32, seed=1)
    return root


def _cfg(data, out, **kw):
    base = dict(data=str(data), backbone="resnet18", module="none", resolution=32, epochs=1,
                batch_size=8, lr=0.01, warmup_epochs=0.5, out=str(out), seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_loss_and_beats_chance(easy_data, tmp_path):
    ckpt = train(_cfg(easy_data, tmp_path / "m.pt", epochs=8, batch_size=16, lr=0.003,
                      warmup_epochs=1, label_smoothing=0.0, rrc_scale=[0.5, 1.0],
                      eval_every=8), progress=False, log=lambda m: None)
    hist = ckpt["history"]
    assert [h["epoch"] for h in hist] == list(range(1, 9))
    first, last = hist[0]["train_loss"], hist[-1]["train_loss"]
    assert last < 0.75 * first, [round(h["train_loss"], 3) for h in hist]
    # held-out accuracy clearly above chance (33.3 %) for the 3 classes
    assert hist[-1]["val_top1"] >= 55.0, hist[-1]
    # the checkpoint, reloaded, gives the same held-out accuracy
    model, ck = load_checkpoint(tmp_path / "m.pt")
    loader = torch.utils.data.DataLoader(
        image_folder(easy_data / "val", eval_transform(32), "val"), batch_size=64)
    acc = evaluate(model, loader, "cpu")
    assert acc["top1"] == pytest.approx(hist[-1]["val_top1"])
    assert ck["classes"] == sorted(EASY) and ck["train_resolution"] == 32
    assert ck["model_config"]["num_classes"] == 3 and ck["label"] == "none"


def test_checkpoint_round_trip_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", "se", num_classes=3, reduction=8).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = save_checkpoint(tmp_path / "se.pt", model, classes=["a", "b", "c"], epoch=3,
                           train_resolution=32, args={"path": tmp_path, "t": (1, 2)})
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["epoch"] == 3 and raw["args"]["t"] == [1, 2]
    loaded, ck = load_checkpoint(path, expect_config=model.attnbench_config)
    assert not loaded.training
    assert loaded.attnbench_config["options"] == {"reduction": 8}
    assert loaded.attnbench_label == model.attnbench_label == ck["label"]
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_mismatched_checkpoint_is_refused(tmp_path):
    model = build_model("resnet18", "se", num_classes=3)
    path = save_checkpoint(tmp_path / "se.pt", model)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(path, expect_config=build_model("resnet18", "cbam", num_classes=3))
    msg = str(err.value)
    assert str(path) in msg and "another model" in msg
    assert "attention: checkpoint has 'se', expected 'cbam'" in msg
    with pytest.raises(CheckpointMismatchError, match="num_classes: checkpoint has 3, "
                                                      "expected 10"):
        load_checkpoint(path, expect_config={"backbone": "resnet18", "attention": "se",
                                             "num_classes": 10})
    with pytest.raises(CheckpointMismatchError, match="option reduction"):
        load_checkpoint(path, expect_config={"backbone": "resnet18", "attention": "se",
                                             "num_classes": 3, "options": {"reduction": 4}})
    # defaults filled in: se == se(reduction=16)
    load_checkpoint(path, expect_config={"backbone": "resnet18", "attention": "se",
                                         "num_classes": 3, "options": {"reduction": 16}})
    # weights that do not fit the model the config builds: keys and shapes named
    ck = read_checkpoint(path)
    ck["state_dict"].pop("fc.bias")
    ck["state_dict"]["fc.weight"] = torch.zeros(5, 512)
    ck["state_dict"]["extra.weight"] = torch.zeros(1)
    from attnbench.accuracy.checkpoint import content_hash
    ck["content_hash"] = content_hash(ck)  # an intact file whose weights fit another model
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(tmp_path / "bad.pt")
    msg = str(err.value)
    assert str(tmp_path / "bad.pt") in msg
    assert "missing keys: fc.bias" in msg and "unexpected keys: extra.weight" in msg
    assert "fc.weight: checkpoint (5, 512) vs model (3, 512)" in msg


def test_corrupt_truncated_and_foreign_files(tmp_path):
    rnd = tmp_path / "random.pt"
    rnd.write_bytes(bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()))
    good = save_checkpoint(tmp_path / "good.pt", build_model("resnet18", num_classes=2))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (rnd, cut):
        with pytest.raises(CheckpointError, match="not a readable attnbench checkpoint "
                                                  r"\(corrupt or truncated file\?\)") as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not an attnbench checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    # the CLI turns them into a clean error (exit 2), no traceback
    from attnbench.cli import main
    assert main(["robustness", str(rnd), "--data", str(tmp_path), "--no-progress",
                 "--results", str(tmp_path / "results")]) != 0


def test_resume_continues_from_saved_epoch(tiny_data, tmp_path, monkeypatch):
    kw = dict(epochs=2, limit_batches=2, module="se")
    straight = train(_cfg(tiny_data, tmp_path / "a.pt", **kw), progress=False,
                     log=lambda m: None)
    # the same run, interrupted right after epoch 1 was saved
    import attnbench.accuracy.checkpoint as C
    real_save = C.save_checkpoint

    def save_then_stop(path, model, **k):
        real_save(path, model, **k)
        if k["epoch"] == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(C, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_data, tmp_path / "b.pt", **kw), progress=False, log=lambda m: None)
    monkeypatch.setattr(C, "save_checkpoint", real_save)
    assert read_checkpoint(tmp_path / "b.pt")["epoch"] == 1
    logs = []
    resumed = train(_cfg(tiny_data, tmp_path / "b.pt", resume=str(tmp_path / "b.pt"), **kw),
                    progress=False, log=logs.append)
    assert any("resumed" in m and "epoch 1/2" in m for m in logs), logs
    assert resumed["epoch"] == 2 and len(resumed["history"]) == 2
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["scheduler"]["last_epoch"] == straight["scheduler"]["last_epoch"] == 4
    # same batches, augmentations and optimizer state: the same weights as one straight run
    for key, value in straight["state_dict"].items():
        assert torch.allclose(value.float(), resumed["state_dict"][key].float(), atol=1e-5), key
    # resuming a finished run does nothing; resuming another model is refused
    again = train(_cfg(tiny_data, tmp_path / "b.pt", resume=str(tmp_path / "b.pt"), **kw),
                  progress=False, log=lambda m: None)
    assert again["epoch"] == 2
    with pytest.raises(CheckpointMismatchError, match="cannot resume"):
        train(_cfg(tiny_data, tmp_path / "c.pt", resume=str(tmp_path / "b.pt"),
                   **{**kw, "module": "cbam"}), progress=False, log=lambda m: None)


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(total_steps=10, warmup_steps=2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(9) < 0.05
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_lambda(5, 0)(0) == pytest.approx(1.0)


def test_parse_options():
    assert parse_options(["variant=joint", "steps=2", "m=1", "x=0.5", "b=true"]) == \
        {"variant": "joint", "steps": 2, "m": 1, "x": 0.5, "b": True}
    from attnbench.modules.registry import AttnbenchError
    with pytest.raises(AttnbenchError, match="KEY=VALUE"):
        parse_options(["novalue"])


def test_cli_train_smoke(tiny_data, tmp_path, capsys):
    from attnbench.cli import main
    out = tmp_path / "cli.pt"
    rc = main(["train", "--data", str(tiny_data), "--module", "se", "--option", "reduction=8",
               "--resolution", "32", "--epochs", "1", "--batch-size", "8", "--lr", "0.01",
               "--limit-batches", "1", "--out", str(out), "--no-progress", "--amp"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "CUDA only" in text and f"wrote {out}" in text
    model, ck = load_checkpoint(out)
    assert ck["model_config"]["options"] == {"reduction": 8}
    assert ck["args"]["limit_batches"] == 1 and ck["history"][0]["images"] == 8
    # --resume alone: model, data and settings come from the checkpoint; --epochs extends
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    model, ck = load_checkpoint(out)
    assert ck["epoch"] == 2 and ck["model_config"]["options"] == {"reduction": 8}
    assert len(ck["history"]) == 2 and ck["args"]["resolution"] == 32
    assert "resumed" in capsys.readouterr().out
    from attnbench.modules.registry import AttnbenchError
    with pytest.raises(AttnbenchError, match="--data"):
        from attnbench.cli.train import config_from_args
        import argparse
        config_from_args(argparse.Namespace(resume=None))



def test_config_from_args_resume_settings_and_rrc_scale(tiny_data, tmp_path):
    import argparse
    from attnbench.accuracy.train import TrainError, config_fields, resume_settings
    from attnbench.cli.train import config_from_args
    out = tmp_path / "r.pt"
    train(_cfg(tiny_data, out, module="se", limit_batches=1, options={"reduction": 8}),
          progress=False, log=lambda m: None)
    saved = resume_settings(str(out))
    assert saved["out"] == str(out) and saved["options"] == {"reduction": 8}
    assert set(saved) <= set(config_fields())
    cfg = config_from_args(argparse.Namespace(resume=str(out), epochs=3, rrc_scale="0.5,1",
                                              stages="[3,4]", no_progress=True))
    assert (cfg.resume, cfg.out, cfg.module, cfg.epochs) == (str(out), str(out), "se", 3)
    assert cfg.rrc_scale == [0.5, 1.0] and cfg.stages == [3, 4]
    with pytest.raises(TrainError, match="expected LO,HI"):
        config_from_args(argparse.Namespace(resume=None, data="d", rrc_scale="0.5"))


def test_checkpoint_content_hash_refuses_changed_weights(tmp_path):
    import zipfile
    model = build_model("resnet18", "se", num_classes=3)
    path = save_checkpoint(tmp_path / "m.pt", model, epoch=1)
    assert read_checkpoint(path)["content_hash"].startswith("sha256:")
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as zout:
        big = max((n for n in zin.namelist() if "/data/" in n),
                  key=lambda n: zin.getinfo(n).file_size)
        for n in zin.namelist():
            zout.writestr(zin.getinfo(n), bytes(zin.getinfo(n).file_size) if n == big
                          else zin.read(n))
    torch.load(bad, weights_only=True)  # torch itself notices nothing
    with pytest.raises(CheckpointError, match="do not match the checkpoint's content hash"):
        load_checkpoint(bad)
    # a checkpoint written before content hashes loads as before
    old = torch.load(path, weights_only=True)
    del old["content_hash"]
    torch.save(old, tmp_path / "old.pt")
    load_checkpoint(tmp_path / "old.pt")


def test_small_folders_decode_each_image_once_with_the_same_tensors(tiny_data, monkeypatch):
    from torchvision.datasets import folder as tv_folder
    from attnbench.accuracy import train as T
    opened = []
    real = tv_folder.default_loader
    monkeypatch.setattr(tv_folder, "default_loader", lambda p: opened.append(p) or real(p))
    cached = image_folder(tiny_data / "val", eval_transform(32), "val")
    assert isinstance(cached.loader, T.CachedLoader)
    first = [cached[i][0] for i in range(len(cached))]
    second = [cached[i][0] for i in range(len(cached))]
    assert len(opened) == len(cached) == len(set(opened))  # each file decoded once
    monkeypatch.setattr(T, "CACHE_MAX_IMAGES", 0)
    plain = image_folder(tiny_data / "val", eval_transform(32), "val")
    assert not isinstance(plain.loader, T.CachedLoader)
    for a, b, (c, _) in zip(first, second, plain):
        assert torch.equal(a, b) and torch.equal(a, c)
