"""Issue 17: training recipes, several seeds with 95 % intervals, the evaluation protocol's
options (crop_pct, interpolation) and FixRes batch-norm re-estimation, and the seeds
through `attnbench report` (tables with intervals, plots with bands)."""
import math

import pytest
import torch

from attnbench.accuracy import seeds as S
from attnbench.accuracy.data import make_dataset, texture_class_names
from attnbench.accuracy.robustness import FIXRES_SUFFIX, accuracy_tables, \
    evaluate_checkpoints, reestimate_bn
from attnbench.accuracy.train import RECIPES, TrainConfig, TrainError, eval_transform, \
    image_folder, train_seeds
from attnbench.results import load_rows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeddata")
    make_dataset(root, classes=3, train=4, val=3, size=32, seed=1)
    return root


# --------------------------------------------------------------------------- recipes

def test_recipes_resolve_to_the_documented_hyper_parameters():
    small = TrainConfig()
    assert small.recipe == "small-data"
    assert (small.resolution, small.epochs, small.batch_size, small.peak_lr) == (64, 20, 32, 0.1)
    assert (small.optimizer, small.nesterov, small.momentum) == ("sgd", True, 0.9)
    assert (small.weight_decay, small.warmup_epochs, small.label_smoothing) == (5e-4, 2.0, 0.1)
    assert small.rrc_scale == [0.35, 1.0]
    im = TrainConfig(recipe="imagenet")
    assert (im.resolution, im.epochs, im.batch_size, im.weight_decay) == (224, 90, 256, 1e-4)
    assert im.peak_lr == pytest.approx(0.1 * 256 / 256) and im.lr is None
    assert im.rrc_scale == [0.08, 1.0] and im.nesterov is False
    # a setting given wins over the recipe's; lr None in the imagenet recipe scales
    mine = TrainConfig(recipe="imagenet", batch_size=64, rrc_scale=[0.5, 1.0])
    assert mine.peak_lr == pytest.approx(0.025) and mine.rrc_scale == [0.5, 1.0]
    assert set(RECIPES) == {"small-data", "imagenet"}
    with pytest.raises(TrainError, match="unknown"):
        TrainConfig(recipe="cifar")
    with pytest.raises(TrainError, match="optimizer"):
        TrainConfig(optimizer="lamb").check()


def test_optimizer_choice(tiny, tmp_path):
    from attnbench.accuracy.train import _optimizer
    from attnbench.modules import build_model
    model = build_model("resnet18", "none", num_classes=3)
    sgd = _optimizer(TrainConfig(), model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] is True
    adamw = _optimizer(TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05), model)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]


# --------------------------------------------------------------------------- intervals

def test_seed_interval_is_the_student_t_interval():
    iv = S.seed_interval([80.0, 82.0, 84.0])
    # mean 82, s = 2, t(0.975, 2) = 4.303: half-width 4.303 * 2 / sqrt(3)
    assert iv.estimate == pytest.approx(82.0) and iv.n == 3
    assert iv.hi - 82.0 == pytest.approx(4.303 * 2 / math.sqrt(3))
    assert iv.lo == pytest.approx(82.0 - 4.303 * 2 / math.sqrt(3))
    one = S.seed_interval([70.0])
    assert (one.estimate, one.lo, one.hi, one.n) == (70.0, 70.0, 70.0, 1)
    assert S.interval_text(iv) == "82.0 [77.0, 87.0]" and S.interval_text(one) == "70.0"


def test_welch_difference_and_noise_verdict():
    a, b = [90.0, 91.0, 92.0], [80.0, 81.0, 82.0]
    iv = S.difference_interval(a, b)
    # equal variances 1, n = 3 each: se = sqrt(2/3), Welch df = 4, t = 2.776
    assert iv.estimate == pytest.approx(10.0)
    assert iv.hi - 10.0 == pytest.approx(2.776 * math.sqrt(2 / 3))
    assert S.clears_noise(a, b) is True
    assert S.clears_noise([80.0, 84.0, 88.0], [81.0, 85.0, 83.0]) is False
    assert S.clears_noise([80.0], [70.0, 71.0]) is None


def test_parse_seeds_and_paths():
    assert S.parse_seeds("0,1,2") == [0, 1, 2] == S.parse_seeds("0:3")
    assert S.parse_seeds(5) == [5]
    for bad in ("", "1,1", "a"):
        with pytest.raises(ValueError):
            S.parse_seeds(bad)
    assert S.seed_path("ck/se.pt", 2).as_posix() == "ck/se-seed2.pt"


# --------------------------------------------------------------------------- protocol

def test_crop_pct_and_interpolation_follow_timm():
    from torchvision.transforms import InterpolationMode
    t = eval_transform(64, 0.875, "bicubic").transforms
    assert t[0].size == int(64 / 0.875) == 73 and t[0].interpolation == InterpolationMode.BICUBIC
    assert t[1].size == (64, 64)
    t = eval_transform(64, 1.0, "nearest").transforms
    assert t[0].size == 64 and t[0].interpolation == InterpolationMode.NEAREST
    assert eval_transform(48).transforms[0].interpolation == InterpolationMode.BILINEAR
    with pytest.raises(TrainError, match="interpolation"):
        eval_transform(64, 0.875, "lanczos")


def test_fixres_bn_reestimation_changes_running_stats_only(tiny):
    from attnbench.modules import build_model
    torch.manual_seed(0)
    model = build_model("resnet18", "se", num_classes=3).eval()
    images = image_folder(tiny / "train", None, "train")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fixed = reestimate_bn(model, images, 4, "cpu", eval_transform(48), batches=2)
    after = fixed.state_dict()
    assert not fixed.training
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])
    assert not torch.equal(after["layer4.1.bn2.running_var"], before["layer4.1.bn2.running_var"])
    for k, v in before.items():  # the original is unchanged; weights of the copy too
        assert torch.equal(model.state_dict()[k], v)
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(after[k], v), k


# --------------------------------------------------------------------------- end to end

def test_seeds_train_evaluate_and_report_with_bands(tiny, tmp_path, monkeypatch):
    ckpts = []
    for module in ("none", "se"):
        cfg = TrainConfig(data=str(tiny), module=module, resolution=24, epochs=1, batch_size=6,
                          warmup_epochs=0, out=str(tmp_path / f"{module}.pt"), eval_every=0)
        out = train_seeds(cfg, [0, 1, 2], progress=False, log=lambda m: None)
        assert [c["args"]["seed"] for c in out] == [0, 1, 2]
        assert all(c["args"]["recipe"] == "small-data" for c in out)
        paths = [tmp_path / f"{module}-seed{s}.pt" for s in (0, 1, 2)]
        assert all(p.exists() for p in paths)
        ckpts += paths
    w = [torch.load(p, weights_only=True)["state_dict"]["fc.weight"] for p in ckpts[:2]]
    assert not torch.equal(w[0], w[1])  # distinct seeds, distinct models
    rows, run_dir = evaluate_checkpoints(ckpts, tiny, resolutions=[16, 24, 32], fixres_bn=True,
                                         interpolation="bicubic", batch_size=6,
                                         results=tmp_path / "res", run_id="seeds",
                                         progress=False, log=lambda m: None)
    top1 = [r for r in rows if r["metric"] == "top1"]
    assert len(top1) == 6 * 3 * 2  # checkpoints x sizes x (train BN, BN@test)
    assert {r["seed"] for r in top1} == {0, 1, 2}
    fix = [r for r in top1 if r["bn_stats"] == "test"]
    assert len(fix) == 18 and all(r["label"].endswith(FIXRES_SUFFIX) for r in fix)
    assert all("bicubic" in r["method"] and "re-estimated" in r["method"] for r in fix)
    assert len({r["cell"] for r in top1}) == len(top1)  # the variant has cells of its own
    text = accuracy_tables(load_rows(run_dir / "rows.jsonl"))
    assert "| SE [BN@test] " in text and "| 3 " in text and "95 % t-interval" in text
    _report_has_intervals_and_bands(tmp_path, monkeypatch)


def _report_has_intervals_and_bands(tmp_path, monkeypatch):
    from matplotlib.axes import Axes
    from attnbench.report import build as R
    bands = []
    real = Axes.fill_between

    def spy(self, *a, **kw):
        bands.append(a)
        return real(self, *a, **kw)
    monkeypatch.setattr(Axes, "fill_between", spy)
    result = R.generate(tmp_path / "res", tmp_path / "rep", formats=("png",))
    md = (tmp_path / "rep").rglob("report.md").__next__().read_text(encoding="utf-8")
    assert "seeds" in md
    assert "95 % Student-t interval" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| SE [BN@test]"))
    assert line.count("[") >= 4  # mean [lo, hi] cells
    assert '<a id="acc-sweep-top1-resnet18' in md  # every size, with intervals
    sweep = md.split('<a id="acc-sweep-top1-resnet18')[1]
    assert "16²" in sweep and "24²" in sweep and "32²" in sweep
    assert any(p.suffix == ".png" and "top1-vs-resolution" in p.name for p in result.plots)
    assert len(bands) >= 2  # one band per variant with several seeds


def test_texture_data_kind(tmp_path):
    meta = make_dataset(tmp_path, classes=4, train=1, val=1, size=16, seed=0, kind="textures")
    assert meta["classes"] == texture_class_names(4) == \
        ["stripes-coarse", "stripes-fine", "checker-coarse", "checker-fine"]
    assert meta["generator"] == "attnbench.synthetic-textures-v1"
    assert len(list((tmp_path / "train").rglob("*.png"))) == 4


def test_train_cli_seeds_and_recipe(tiny, tmp_path, capsys):
    from attnbench.cli import main
    out = tmp_path / "ck" / "se.pt"
    rc = main(["train", "--data", str(tiny), "--module", "se", "--resolution", "24",
               "--epochs", "1", "--batch-size", "6", "--seeds", "3,4", "--out", str(out),
               "--recipe", "imagenet", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    for seed in (3, 4):
        path = tmp_path / "ck" / f"se-seed{seed}.pt"
        ck = torch.load(path, weights_only=True)
        assert (ck["args"]["seed"], ck["args"]["recipe"]) == (seed, "imagenet")
        assert ck["args"]["rrc_scale"] == [0.08, 1.0] and ck["args"]["weight_decay"] == 1e-4
        assert f"se-seed{seed}.pt" in printed
    assert not out.exists()
