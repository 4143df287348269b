"""Offline, procedurally drawn image-classification data (``attnbench make-data``).

No downloads: every image is drawn with numpy -- the smooth background at the output
size, the object at ``oversample`` times the output size and area-averaged down (each
pixel mixes colours by the fraction it covers, like a camera) -- and written as PNG in
torchvision's ImageFolder layout::

    OUT/train/<class>/<class>_00000.png ...
    OUT/val/<class>/<class>_00000.png ...
    OUT/classes.json            (class names, the parameters and the seed)

A class is a combination of a **shape** (circle, square, triangle, cross, star,
hexagon; all distinct under rotation) and a **fine detail** painted inside it
(3 stripes, 7 stripes, a 4x4 grid of dots). The detail is what makes the test
resolution matter: 7 stripe periods across an object of 44..72 % of the image need
at least 2 * 7 / 0.44 = 32 pixels to be resolved at all (several times that to be
seen clearly), so at low resolution they blur into a flat fill, while the shape
survives. Nuisances vary per image: position, scale, rotation (the detail rotates
with the shape), foreground/detail/background colours, a low-frequency background
gradient, blobs and pixel noise.

Classes, in order, for ``K`` classes: the detail kinds used are ``1`` if ``K <= 3``
else ``2`` if ``K <= 12`` else ``3``; the shapes used are ``ceil(K / details)``;
classes enumerate shape-major (``circle-stripes3, circle-stripes7, square-...``) and
the first ``K`` are kept. So ``K = 3`` is a shape-only task (easy), ``K = 10`` is
5 shapes x 2 stripe frequencies, ``K = 18`` is 6 shapes x 3 details.

A second kind, ``--kind textures`` (:func:`draw_texture_image`), is another
distribution for checking that a training recipe is not tuned to the shapes: a class is
a **texture** (stripes, checkerboard, dots) at a **frequency** (coarse: 3-4 periods
across the patch, fine: 8-10) filling a rotated disc of 0.3-0.45 of the image, on a
cluttered background (3-6 random solid discs and squares in random colours). The
fine textures need ~2 x 10 / 0.6 = 33 pixels to be resolved, so here too the test
resolution matters. Classes, in order: ``stripes-coarse, stripes-fine, checker-coarse,
checker-fine, dots-coarse, dots-fine`` (the first ``K``, 2 <= K <= 6).

``--train N`` / ``--val M`` are images **per class**. The same arguments and seed
give byte-identical files (each image has its own generator seeded by
``(seed, split, class, index)``); PNG encoding carries no timestamp.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from attnbench.modules.registry import AttnbenchError

SHAPES = ("circle", "square", "triangle", "cross", "star", "hexagon")
DETAILS = ("stripes3", "stripes7", "dots4")
SPLITS = {"train": 0, "val": 1}
MAX_CLASSES = len(SHAPES) * len(DETAILS)
TEXTURES = ("stripes", "checker", "dots")
FREQUENCIES = {"coarse": (3.0, 4.0), "fine": (8.0, 10.0)}  # periods across the patch
KINDS = ("shapes", "textures")


class DataError(AttnbenchError, ValueError):
    """Bad arguments for the dataset generator, or a folder that is not a dataset."""


def class_names(num_classes) -> List[str]:
    """The class names (``<shape>-<detail>``), in label order.

    ``num_classes``: a count (the standard grid, see the module docstring) or a list
    of names ``<shape>-<detail>`` chosen by hand (e.g. an easy task for a test).
    """
    if isinstance(num_classes, (list, tuple)):
        names = [str(n) for n in num_classes]
        bad = [n for n in names if n.partition("-")[0] not in SHAPES
               or n.partition("-")[2] not in DETAILS]
        if bad or len(set(names)) != len(names) or len(names) < 2:
            raise DataError(f"make-data: class names must be >= 2 distinct <shape>-<detail> "
                            f"with shape in {', '.join(SHAPES)} and detail in "
                            f"{', '.join(DETAILS)}; got {names}")
        return names
    if not isinstance(num_classes, int) or not 2 <= num_classes <= MAX_CLASSES:
        raise DataError(f"make-data: --classes must be between 2 and {MAX_CLASSES} "
                        f"({len(SHAPES)} shapes x {len(DETAILS)} details), got {num_classes!r}")
    n_det = 1 if num_classes <= 3 else 2 if num_classes <= 12 else 3
    n_shapes = math.ceil(num_classes / n_det)
    names = [f"{s}-{d}" for s in SHAPES[:n_shapes] for d in DETAILS[:n_det]]
    return names[:num_classes]


# --------------------------------------------------------------------------- drawing

def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in the object's frame (object radius 1)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if shape == "cross":  # a plus sign: two bars of half-width 0.33
        au, av = np.abs(u), np.abs(v)
        return (np.minimum(au, av) <= 0.33) & (np.maximum(au, av) <= 0.95)
    r = np.hypot(u, v)
    a = np.arctan2(v, u)
    if shape == "triangle":   # regular polygon with n sides: r*cos(wrapped angle) <= apothem
        n, apothem = 3, 0.55
    elif shape == "hexagon":
        n, apothem = 6, 0.85
    elif shape == "star":
        n = 5
        sector = 2 * math.pi / n
        t = np.abs(((a + math.pi / 2) % sector) - sector / 2) / (sector / 2)  # 0 at tip
        return r <= 0.42 + 0.58 * (1 - t) ** 1.6
    else:  # pragma: no cover - guarded by class_names
        raise DataError(f"unknown shape {shape!r}")
    sector = 2 * math.pi / n
    wrapped = ((a + math.pi / 2) % sector) - sector / 2
    return r * np.cos(wrapped) <= apothem


def _detail_mask(detail: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if detail.startswith("stripes"):
        n = int(detail[len("stripes"):])
        return np.sin(math.pi * n * u) > 0  # n periods (n detail stripes) across [-1, 1]
    if detail.startswith("dots"):
        n = int(detail[len("dots"):])
        cu = (u + 1) / 2 * n
        cv = (v + 1) / 2 * n
        du = cu - np.floor(cu) - 0.5
        dv = cv - np.floor(cv) - 0.5
        return du * du + dv * dv <= 0.28 ** 2
    raise DataError(f"unknown detail {detail!r}")  # pragma: no cover


def _colour(rng: np.random.Generator, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    return rng.uniform(lo, hi, size=3)


@functools.lru_cache(maxsize=4)
def _grid(n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1] of an n x n grid (ys, xs), float32."""
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    return c[:, None], c[None, :]


def _area(mask: np.ndarray, factor: int) -> np.ndarray:
    """Box downsampling of a boolean mask: the covered fraction of each output pixel."""
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    return mask.reshape(h, factor, w, factor).mean(axis=(1, 3), dtype=np.float32)


def _span(centre: float, radius: float, size: int) -> Tuple[int, int]:
    """Output-pixel range [lo, hi) covering centre +- 1.15 radius (shapes reach 1.1 r)."""
    lo = max(int(math.floor((centre - 1.15 * radius) * size)), 0)
    hi = min(int(math.ceil((centre + 1.15 * radius) * size)), size)
    return lo, hi


def draw_image(name: str, rng: np.random.Generator, size: int,
               oversample: int = 4, nuisance: float = 1.0) -> Image.Image:
    """One RGB image of class ``name`` (``<shape>-<detail>``), ``size`` x ``size``.

    The background is smooth and drawn at ``size``; the object (shape and detail) is
    drawn at ``size * oversample`` and area-averaged to ``size``, i.e. each output pixel
    mixes fill, detail and background colours by the fraction of it they cover.
    ``nuisance`` (0..1) scales the nuisance variation: position jitter, scale range
    (object radius 0.29 +- 0.07 of the image), rotation, background blobs and pixel
    noise; colours are always random (the fill is kept apart from the background).
    The same random numbers are drawn whatever ``nuisance`` is.
    """
    shape, detail = name.split("-", 1)
    k = float(min(max(nuisance, 0.0), 1.0))
    ys, xs = _grid(size)
    # background: two colours blended along a random direction, plus soft blobs
    c0, c1 = _colour(rng), _colour(rng)
    ang = rng.uniform(0, 2 * math.pi)
    g = np.clip((xs - 0.5) * math.cos(ang) + (ys - 0.5) * math.sin(ang) + 0.5, 0, 1)[..., None]
    img = c0 * (1 - g) + c1 * g
    for _ in range(int(rng.integers(2, 6))):
        bx, by = rng.uniform(0, 1, 2)
        br = rng.uniform(0.05, 0.2)
        w = np.exp(-((xs - bx) ** 2 + (ys - by) ** 2) / (2 * br * br))[..., None]
        tint = _colour(rng)
        img = img * (1 - 0.5 * k * w) + 0.5 * k * w * tint
    # the object: radius 0.22..0.36 of the image, centre kept inside
    radius = 0.29 + k * (rng.uniform(0.22, 0.36) - 0.29)
    cx, cy = 0.5 + k * (rng.uniform(radius, 1 - radius, 2) - 0.5)
    rot = k * rng.uniform(-math.pi, math.pi)
    # only the output pixels of the object's bounding box are drawn at high resolution
    lo_x, hi_x = _span(cx, radius, size)
    lo_y, hi_y = _span(cy, radius, size)
    big = size * oversample
    gy, gx = _grid(big)
    gx = gx[:, lo_x * oversample:hi_x * oversample]
    gy = gy[lo_y * oversample:hi_y * oversample, :]
    dx, dy = (gx - cx) / radius, (gy - cy) / radius
    cos, sin = np.float32(math.cos(rot)), np.float32(math.sin(rot))
    u = dx * cos + dy * sin
    v = dy * cos - dx * sin
    inside = _shape_mask(shape, u, v)
    a_in = np.zeros((size, size, 1), np.float32)
    a_det = np.zeros((size, size, 1), np.float32)
    a_in[lo_y:hi_y, lo_x:hi_x, 0] = _area(inside, oversample)
    a_det[lo_y:hi_y, lo_x:hi_x, 0] = _area(inside & _detail_mask(detail, u, v), oversample)
    fg = _colour(rng)
    bg = img[lo_y:hi_y, lo_x:hi_x].reshape(-1, 3).mean(0)
    if np.abs(fg - bg).max() < 0.3:  # too close to the background: move it away
        fg = np.where(bg > 0.5, 0.5 * fg, 0.5 + 0.5 * fg)
    # the detail contrasts with the fill: shift every channel by 0.45..0.6
    delta = rng.uniform(0.45, 0.6) * np.where(fg > 0.5, -1.0, 1.0)
    det = np.clip(fg + delta, 0, 1)
    img = img * (1 - a_in) + fg * (a_in - a_det) + det * a_det
    img = img * 255 + k * rng.normal(0, rng.uniform(2, 10), size=img.shape)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


def texture_class_names(num_classes) -> List[str]:
    """The classes of the ``textures`` kind (``<texture>-<frequency>``), in label order."""
    names = [f"{t}-{f}" for t in TEXTURES for f in FREQUENCIES]
    if isinstance(num_classes, (list, tuple)):
        bad = [n for n in num_classes if n not in names]
        if bad or len(set(num_classes)) != len(num_classes) or len(num_classes) < 2:
            raise DataError(f"make-data --kind textures: class names must be >= 2 distinct "
                            f"of {', '.join(names)}; got {list(num_classes)}")
        return [str(n) for n in num_classes]
    if not isinstance(num_classes, int) or not 2 <= num_classes <= len(names):
        raise DataError(f"make-data --kind textures: --classes must be between 2 and "
                        f"{len(names)}, got {num_classes!r}")
    return names[:num_classes]


def _texture(kind: str, u: np.ndarray, v: np.ndarray, periods: float) -> np.ndarray:
    """The texture's foreground mask in the patch frame ([-1, 1]), ``periods`` across."""
    a, b = np.pi * periods * u, np.pi * periods * v
    if kind == "stripes":
        return np.sin(a) > 0
    if kind == "checker":
        return (np.sin(a) > 0) ^ (np.sin(b) > 0)
    du = (u + 1) / 2 * periods
    dv = (v + 1) / 2 * periods
    du, dv = du - np.floor(du) - 0.5, dv - np.floor(dv) - 0.5
    return du * du + dv * dv <= 0.3 ** 2


def draw_texture_image(name: str, rng: np.random.Generator, size: int,
                       oversample: int = 4, nuisance: float = 1.0) -> Image.Image:
    """One RGB image of texture class ``name`` (``<texture>-<frequency>``): a rotated
    textured disc over a cluttered background, area-averaged from ``size * oversample``.
    ``nuisance`` scales the clutter, position and scale jitter and pixel noise."""
    kind, freq = name.split("-", 1)
    k = float(min(max(nuisance, 0.0), 1.0))
    big = size * oversample
    gy, gx = _grid(big)
    c0, c1 = _colour(rng), _colour(rng)
    ang = rng.uniform(0, 2 * math.pi)
    g = np.clip((gx - 0.5) * math.cos(ang) + (gy - 0.5) * math.sin(ang) + 0.5, 0, 1)
    img = c0 * (1 - g[..., None]) + c1 * g[..., None]
    for _ in range(int(rng.integers(3, 7))):  # clutter: solid discs and squares
        bx, by = rng.uniform(0, 1, 2)
        br = rng.uniform(0.04, 0.12)
        square = rng.uniform() < 0.5
        inside = (np.maximum(np.abs(gx - bx), np.abs(gy - by)) <= br if square
                  else (gx - bx) ** 2 + (gy - by) ** 2 <= br * br)
        colour = _colour(rng)
        if rng.uniform() < k:
            img = np.where(inside[..., None], colour, img)
    radius = 0.375 + k * (rng.uniform(0.3, 0.45) - 0.375)
    cx, cy = 0.5 + k * (rng.uniform(radius, 1 - radius, 2) - 0.5)
    rot = rng.uniform(-math.pi, math.pi)
    lo, hi = FREQUENCIES[freq]
    periods = rng.uniform(lo, hi)
    dx, dy = (gx - cx) / radius, (gy - cy) / radius
    u = dx * math.cos(rot) + dy * math.sin(rot)
    v = dy * math.cos(rot) - dx * math.sin(rot)
    patch = u * u + v * v <= 1.0
    mask = patch & _texture(kind, u, v, periods)
    fg = _colour(rng)
    other = np.clip(fg + rng.uniform(0.45, 0.6) * np.where(fg > 0.5, -1.0, 1.0), 0, 1)
    img = np.where(patch[..., None], np.where(mask[..., None], fg, other), img)
    img = img.reshape(size, oversample, size, oversample, 3).mean(axis=(1, 3))
    img = img * 255 + k * rng.normal(0, rng.uniform(2, 10), size=img.shape)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


def _check_out(out: Path) -> None:
    """:class:`DataError` unless ``out`` is (or can be made) a folder to write images in."""
    from attnbench.results import ResultsError, check_writable
    try:
        check_writable(out, "make-data: output folder", folder=True)
    except ResultsError as err:
        raise DataError(str(err)) from None


def make_dataset(out: "str | Path", classes: int = 10, train: int = 100, val: int = 30,
                 size: int = 96, seed: int = 0, oversample: int = 4,
                 nuisance: float = 1.0, progress: bool = False,
                 kind: str = "shapes") -> Dict[str, object]:
    """Write the dataset to ``out`` (ImageFolder layout; see module docstring).

    ``kind``: ``shapes`` (shape x fine detail, :func:`draw_image`) or ``textures``
    (texture x frequency on clutter, :func:`draw_texture_image`).

    ``train`` / ``val``: images per class. Returns the description written to
    ``out/classes.json``. An existing dataset with the same description is reused
    (nothing is redrawn); a different one in the same folder is an error.
    """
    for key, value, lo in (("train", train, 1), ("val", val, 1), ("size", size, 8),
                           ("oversample", oversample, 1)):
        if not isinstance(value, int) or value < lo:
            raise DataError(f"make-data: --{key} must be an integer >= {lo}, got {value!r}")
    if kind not in KINDS:
        raise DataError(f"make-data: --kind must be one of {', '.join(KINDS)}, got {kind!r}")
    names = class_names(classes) if kind == "shapes" else texture_class_names(classes)
    draw = draw_image if kind == "shapes" else draw_texture_image
    out = Path(out)
    _check_out(out)
    meta = {"generator": f"attnbench.synthetic-{kind}-v{2 if kind == 'shapes' else 1}",
            "classes": names, "train": train,
            "val": val, "size": size, "seed": seed, "oversample": oversample,
            "nuisance": float(nuisance)}
    meta_path = out / "classes.json"
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = None
        if old == meta and _complete(out, names, train, val):
            return meta
        if old is not None and old != meta:
            raise DataError(f"{out}: holds another generated dataset ({meta_path} differs: "
                            f"{_diff(old, meta)}); choose another folder or delete it")
    jobs: List[Tuple[str, int, str, int]] = []
    for split, per_class in (("train", train), ("val", val)):
        for label, name in enumerate(names):
            (out / split / name).mkdir(parents=True, exist_ok=True)
            jobs.extend((split, label, name, i) for i in range(per_class))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="make-data", unit="img", leave=False)
    for split, label, name, i in jobs:
        rng = np.random.default_rng([seed, SPLITS[split], label, i])
        path = out / split / name / f"{name}_{i:05d}.png"
        image = draw(name, rng, size, oversample, nuisance)
        image.save(path, format="PNG", optimize=False)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _complete(out: Path, names: Sequence[str], train: int, val: int) -> bool:
    for split, n in (("train", train), ("val", val)):
        for name in names:
            if len(list((out / split / name).glob("*.png"))) != n:
                return False
    return True


def _diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} != {new.get(k)!r}"
                     for k in keys if old.get(k) != new.get(k)) or "?"

