"""The offline dataset generator (bench/data.py, `attnbench make-data`)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnbench.accuracy.data import DETAILS, MAX_CLASSES, SHAPES, DataError, class_names, \
    draw_image, make_dataset


def _files(root: Path):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_dataset(tmp_path / "a", classes=4, train=3, val=2, size=32, seed=0)
    make_dataset(tmp_path / "b", classes=4, train=3, val=2, size=32, seed=0)
    make_dataset(tmp_path / "c", classes=4, train=3, val=2, size=32, seed=1)
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b") == _files(tmp_path / "c")
    assert len(files) == 4 * (3 + 2)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    differ = [f for f in files
              if (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()]
    assert len(differ) == len(files)
    assert json.loads((tmp_path / "a" / "classes.json").read_text())["classes"] == a["classes"]


def test_layout_classes_and_image_size(tmp_path):
    meta = make_dataset(tmp_path, classes=10, train=2, val=1, size=40, seed=3)
    names = meta["classes"]
    assert len(names) == 10 == len(set(names))
    # 5 shapes x 2 stripe frequencies: classes need shape AND fine detail
    assert {n.split("-")[0] for n in names} == set(SHAPES[:5])
    assert {n.split("-")[1] for n in names} == set(DETAILS[:2])
    for split, n in (("train", 2), ("val", 1)):
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == sorted(names)
        for name in names:
            pngs = list((tmp_path / split / name).glob("*.png"))
            assert len(pngs) == n
            with Image.open(pngs[0]) as im:
                assert im.size == (40, 40) and im.mode == "RGB"
    # torchvision reads it as an ImageFolder with the same class order
    from torchvision.datasets import ImageFolder
    assert ImageFolder(str(tmp_path / "train")).classes == sorted(names)


def test_class_grid_and_errors():
    assert class_names(3) == ["circle-stripes3", "square-stripes3", "triangle-stripes3"]
    assert len(class_names(MAX_CLASSES)) == MAX_CLASSES == len(SHAPES) * len(DETAILS)
    assert class_names(["star-dots4", "circle-stripes7"]) == ["star-dots4", "circle-stripes7"]
    for bad in (1, MAX_CLASSES + 1, "5", ["circle-stripes3"], ["blob-stripes3", "star-dots4"]):
        with pytest.raises(DataError):
            class_names(bad)
    with pytest.raises(DataError, match="--train"):
        make_dataset("/nonexistent-never-written", classes=3, train=0)


def test_detail_is_fine_and_draw_is_deterministic():
    img = lambda name, seed, size: np.asarray(  # noqa: E731
        draw_image(name, np.random.default_rng(seed), size, nuisance=0.0), dtype=np.float32)
    a = img("circle-stripes7", 5, 96)
    assert np.array_equal(a, img("circle-stripes7", 5, 96))
    # the same draw with 3 instead of 7 stripes differs only inside the object
    b = img("circle-stripes3", 5, 96)
    assert np.abs(a - b).mean() > 1.0
    # 7 stripes carry more high-frequency energy than 3
    def hf(x):
        g = x.mean(2)
        return np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()
    assert hf(a) > hf(b)


def test_reuse_and_conflict(tmp_path):
    make_dataset(tmp_path, classes=3, train=1, val=1, size=16, seed=0)
    png = next((tmp_path / "train").rglob("*.png"))
    stamp = png.stat().st_mtime_ns
    make_dataset(tmp_path, classes=3, train=1, val=1, size=16, seed=0)  # reused, not redrawn
    assert png.stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="seed"):
        make_dataset(tmp_path, classes=3, train=1, val=1, size=16, seed=1)


def test_cli_make_data(tmp_path, capsys):
    from attnbench.cli import main
    out = tmp_path / "d"
    assert main(["make-data", str(out), "--classes", "circle-dots4,star-stripes3",
                 "--train", "2", "--val", "1", "--size", "24", "--seed", "7"]) == 0
    assert len(_files(out)) == 2 * 3
    assert "2 classes" in capsys.readouterr().out
