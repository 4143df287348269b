"""``attnbench robustness``: accuracy of trained checkpoints across test resolutions.

The TDAM paper's Table 2 / Fig. 3 protocol: models trained at 224² are evaluated
single-crop at 168² .. 448² in steps of 28 (the default here). Each test size ``res``
uses the standard protocol: resize the shorter side to ``int(res / crop_pct)``
(bilinear, antialiased), centre-crop ``res`` x ``res``; ``crop_pct`` 0.875 (224 <-
256), as timm's ``validate`` (``--crop-pct``, ``--interpolation`` bilinear / bicubic /
nearest). ``--fixres-bn`` adds a separate variant, ``<label> [BN@test]``, whose batch-norm
statistics are re-estimated at each test size (:func:`reestimate_bn`, FixRes). Several
checkpoints of one model (``train --seeds``) are summarised by the mean and 95 %
t-interval across seeds (:mod:`attnbench.accuracy.seeds`). Top-1 and top-5 accuracy
(%); with fewer than 5 classes top-5 is top-k with k = number of classes, and the row's
``method`` says so.

``--scale-from R`` sweeps the same *relative* range for a model trained at R²:
``0.75·R .. 2·R`` in steps of ``R/8`` (the analogue of 168..448 step 28 around 224),
each size rounded to a multiple of 4; for R divisible by 32 the sizes are exact
(224 -> 168..448 step 28, 64 -> 48..128 step 8, 96 -> 72..192 step 12).
``--scale-from auto`` takes R from each checkpoint's training resolution.

Rows go to the results store (``results/<run_id>/rows.jsonl`` + ``env.json``), one per
(checkpoint, test resolution, metric): ``metric`` top1/top5, ``unit`` %, ``mode``
eval, ``resolution`` = test size, extra columns ``train_resolution``, ``checkpoint``,
``dataset``, ``scale`` (= test / train size), ``images``. ``attnbench report`` draws
them as the paper's Table 2 and Fig. 3. A checkpoint that fails (unreadable, another
dataset's classes, an error while evaluating) gets ``status=failed`` rows with the
error and the others go on. Re-running with the same ``--run-id`` skips finished cells.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from attnbench.accuracy import distributed
from attnbench.accuracy.checkpoint import load_checkpoint
from attnbench.accuracy.seeds import clears_noise, interval_text, seed_interval
from attnbench.accuracy.train import eval_transform, evaluate, image_folder, resize_size
from attnbench.modules.registry import AttnbenchError
from attnbench.results import RESOLUTION_SWEEP, append_rows, base_row, canonical_options, \
    error_text, failed_rows, finished_cells, is_oom, new_run_id, ok_row, write_env

DEFAULT_RESOLUTIONS = list(RESOLUTION_SWEEP)
#: the metrics of every (checkpoint, test size)
ACCURACY_METRICS = ("top1", "top5")
REFERENCE_TRAIN_RES = 224
CACHE_LIMIT = 20000  # folders (validation, BN re-estimation) up to this many images decode once
FIXRES_BATCHES = 4  # training batches (of --batch-size) that re-estimate the BN statistics
#: the label suffix of the FixRes variant (BN statistics re-estimated at the test size)
FIXRES_SUFFIX = " [BN@test]"


class RobustnessError(AttnbenchError):
    """Bad arguments for the robustness evaluation."""


# --------------------------------------------------------------------------- resolutions

def parse_resolutions(text: str) -> List[int]:
    """``"168:448:28"`` (start:stop:step, stop included) or ``"168,224,448"`` or ``"224"``."""
    text = str(text).strip()
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[0] > parts[1]:
                raise ValueError
            out = list(range(parts[0], parts[1] + 1, parts[2]))
        else:
            out = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise RobustnessError(f"--resolutions {text!r}: expected START:STOP:STEP (stop "
                              f"included, e.g. 168:448:28) or a list (e.g. 168,224,448)") \
            from None
    if not out or any(r < 8 for r in out):
        raise RobustnessError(f"--resolutions {text!r}: need sizes >= 8 pixels")
    return sorted(set(out))


def relative_sweep(train_res: int, multiple: int = 4) -> List[int]:
    """``0.75·R .. 2·R`` in steps of ``R/8``, each rounded to a multiple of ``multiple``
    (the analogue of 168..448 step 28 for R = 224)."""
    train_res = int(train_res)
    if train_res < 8:
        raise RobustnessError(f"--scale-from {train_res}: training resolution too small")
    out = []
    for eighths in range(6, 17):
        size = train_res * eighths / 8
        out.append(max(multiple, int(math.floor(size / multiple + 0.5)) * multiple))
    return sorted(set(out))


def sweep_text(resolutions: Sequence[int], train_res: Optional[int]) -> str:
    res = sorted(resolutions)
    steps = {b - a for a, b in zip(res, res[1:])}
    span = (f"{res[0]}..{res[-1]} step {steps.pop()}" if len(steps) == 1
            else ",".join(map(str, res)))
    if train_res:
        return (f"test {span} = {res[0] / train_res:.3g}x..{res[-1] / train_res:.3g}x "
                f"of train {train_res}")
    return f"test {span}"


# --------------------------------------------------------------------------- data

def val_root(data: "str | Path") -> Path:
    """``DIR/val`` when it exists, else ``DIR`` itself (an ImageFolder of classes)."""
    data = Path(data)
    return data / "val" if (data / "val").is_dir() else data


# --------------------------------------------------------------------------- rows

def robustness_cell(checkpoint: str, dataset: str, res: int, crop_pct: float,
                    interpolation: str = "bilinear", bn_stats: str = "train") -> str:
    """The ``cell`` of one (checkpoint, data set, test size, protocol) evaluation.

    The SHA-256 of its key as ``json.dumps(sort_keys=True)`` (not :func:`short_hash`, whose
    compact JSON would give other ids: runs written before must still resume; for the
    same reason interpolation and BN statistics enter the key only when not the default)."""
    key_d = {"kind": "robustness", "checkpoint": checkpoint, "dataset": dataset,
             "resolution": res, "crop_pct": crop_pct}
    if interpolation != "bilinear":
        key_d["interpolation"] = interpolation
    if bn_stats != "train":
        key_d["bn_stats"] = bn_stats
    key = json.dumps(key_d, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def model_variant(module: str, options: Mapping[str, Any],
                  label: str) -> Tuple[Dict[str, Any], str]:
    """``(full options, label)`` of ``module`` as the registry builds it, or the given
    ``options`` and ``label`` where it cannot (a module not registered here)."""
    try:
        return canonical_options(module, options)
    except Exception:  # noqa: BLE001 - unregistered module: keep what we were given
        return dict(options), label


@dataclass
class CheckpointRows:
    """Builds the rows of one checkpoint's evaluation: per test size, top1 and top5."""

    run_id: str
    checkpoint: str
    dataset: str
    batch: int
    device: str
    crop_pct: float = 0.875
    backbone: str = "?"
    module: str = "?"
    label: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    stages: Any = None
    train_resolution: Optional[int] = None
    interpolation: str = "bilinear"
    bn_stats: str = "train"  # or "test" (FixRes: re-estimated at the test resolution)
    seed: Optional[int] = None
    recipe: Optional[str] = None

    def cell(self, res: int) -> str:
        """The ``cell`` of the rows at test size ``res``."""
        return robustness_cell(self.checkpoint, self.dataset, res, self.crop_pct,
                               self.interpolation, self.bn_stats)

    @property
    def method(self) -> str:
        """The protocol, as the rows' ``method`` says it (before the resize size)."""
        text = f"center-crop crop_pct={self.crop_pct:g}"
        if self.interpolation != "bilinear":
            text += f" {self.interpolation}"
        if self.bn_stats == "test":
            text += f" +BN stats re-estimated at the test size ({FIXRES_BATCHES} train batches)"
        return text

    def base(self, res: int) -> Dict[str, Any]:
        """The identity columns of the rows at test size ``res``."""
        return base_row(backbone=self.backbone, module=self.module, label=self.label,
                        options=self.options, stages=self.stages, resolution=res,
                        batch=self.batch, mode="eval", device=self.device, run_id=self.run_id,
                        cell=self.cell(res), checkpoint=self.checkpoint, dataset=self.dataset,
                        train_resolution=self.train_resolution, seed=self.seed,
                        recipe=self.recipe, crop_pct=self.crop_pct,
                        interpolation=self.interpolation, bn_stats=self.bn_stats)

    def failed(self, resolutions: Sequence[int], error: str) -> List[Dict[str, Any]]:
        """Failed top1/top5 rows at every size of ``resolutions``, carrying ``error``."""
        method = self.method
        return [row for res in resolutions
                for row in failed_rows(self.base(res), [(m, "%") for m in ACCURACY_METRICS], error,
                                       methods=[method] * len(ACCURACY_METRICS), scale=None,
                                       images=None)]

    def ok(self, res: int, acc: Mapping[str, Any], n_classes: int) -> List[Dict[str, Any]]:
        """The top1 and top5 rows of accuracy ``acc`` (from :func:`evaluate`) at ``res``."""
        method = f"{self.method} (resize {resize_size(res, self.crop_pct)})"
        k = min(5, n_classes)
        note = "" if k == 5 else f"; top-5 is top-{k}: only {n_classes} classes"
        tr = self.train_resolution
        extra = dict(scale=round(res / tr, 4) if tr else None, images=acc["n"])
        base = self.base(res)
        return [ok_row(base, "top1", acc["top1"], "%", method, **extra),
                ok_row(base, "top5", acc["topk"], "%", method + note, **extra)]


# --------------------------------------------------------------------------- inputs

def check_inputs(checkpoints: Sequence["str | Path"], data: "str | Path") -> None:
    """What ``attnbench robustness`` checks before it writes a row: every checkpoint is a
    readable attnbench checkpoint (its content hash intact) trained on the classes of
    ``data``'s validation set. :class:`CheckpointError` / :class:`RobustnessError` name the
    first that is not (:func:`evaluate_checkpoints` itself turns such a checkpoint into
    failed rows and goes on with the others)."""
    from attnbench.accuracy.checkpoint import read_checkpoint
    if not checkpoints:
        raise RobustnessError("robustness: give at least one checkpoint")
    found = image_folder(val_root(data), None, "validation").classes
    for path in checkpoints:
        classes = list(read_checkpoint(path).get("classes") or [])
        if classes and classes != list(found):
            raise RobustnessError(
                f"{path}: trained on other classes ({len(classes)}: {', '.join(classes[:3])}"
                f"...) than {val_root(data)} has ({len(found)}: {', '.join(found[:3])}...)")


# --------------------------------------------------------------------------- evaluation

def evaluate_checkpoints(checkpoints: Sequence["str | Path"], data: "str | Path", *,
                         resolutions: Optional[Sequence[int]] = None,
                         scale_from: "int | str | None" = None, crop_pct: float = 0.875,
                         interpolation: str = "bilinear", fixres_bn: bool = False,
                         batch_size: int = 64, device: str = "cpu", amp: bool = False,
                         workers: int = 0, results: "str | Path" = "results",
                         run_id: Optional[str] = None, progress: bool = True,
                         log: Callable[[str], None] = print,
                         config_text: Optional[str] = None) -> Tuple[List[Dict[str, Any]], Path]:
    """Evaluate every checkpoint at every test resolution; returns ``(rows, run_dir)``.

    ``resolutions``: the test sizes (default 168..448 step 28), unless ``scale_from``
    (an int R, or ``"auto"`` for each checkpoint's own training resolution) asks for
    the relative sweep 0.75·R..2·R (see :func:`relative_sweep`). ``crop_pct`` and
    ``interpolation`` are timm's ``validate`` options (see :func:`eval_transform`).
    ``fixres_bn``: also evaluate each checkpoint with its batch-norm statistics
    re-estimated at every test size (FixRes, Touvron et al. 2019), a separate variant
    labelled ``<label> [BN@test]`` with ``bn_stats=test`` (see :func:`reestimate_bn`).
    Rows carry the checkpoint's ``seed`` and ``recipe``: ``attnbench report`` groups the
    seeds of one model into a mean with its 95 % interval.
    """
    if not checkpoints:
        raise RobustnessError("robustness: give at least one checkpoint")
    resize_size(8, crop_pct)  # validates crop_pct
    eval_transform(8, crop_pct, interpolation)  # validates interpolation
    if fixres_bn and not (Path(data) / "train").is_dir():
        raise RobustnessError(f"--fixres-bn: {data} has no train/ folder to re-estimate the "
                              f"batch-norm statistics on")
    if batch_size < 1:
        raise RobustnessError(f"--batch-size must be >= 1, got {batch_size}")
    if scale_from not in (None, "auto"):
        scale_from = int(scale_from)
    # torchrun: each rank evaluates a share of the images, rank 0 logs and writes the rows
    device = distributed.init(device)
    log, progress = distributed.main_only(log), progress and distributed.is_main()
    ev = _Evaluation(data, resolutions, scale_from, crop_pct, batch_size, device, amp, workers,
                     progress, log)
    ev.interpolation, ev.fixres_bn = interpolation, bool(fixres_bn)
    if config_text is None:
        config_text = json.dumps({"command": "robustness", "checkpoints": [str(c) for c in
                                  checkpoints], "data": ev.dataset, "resolutions": resolutions,
                                  "scale_from": scale_from, "crop_pct": crop_pct,
                                  "interpolation": interpolation, "fixres_bn": bool(fixres_bn)},
                                 indent=1)
    ev.open_run(results, run_id, config_text)
    all_rows: List[Dict[str, Any]] = []
    for ckpt_path in checkpoints:
        all_rows += ev.checkpoint(str(ckpt_path))
    return all_rows, ev.run_dir


class _Evaluation:
    """One :func:`evaluate_checkpoints` call: its settings, images and run folder."""

    def __init__(self, data, resolutions, scale_from, crop_pct, batch_size, device, amp,
                 workers, progress, log) -> None:
        self.root = val_root(data)
        # the validation images; their transform is set per test size
        self.folder = image_folder(self.root, None, "validation", cache_max=CACHE_LIMIT)
        self.dataset = str(data)
        self.resolutions, self.scale_from, self.crop_pct = resolutions, scale_from, crop_pct
        self.batch_size, self.device, self.workers = batch_size, device, workers
        self.dev = torch.device(device)
        self.amp = bool(amp) and self.dev.type == "cuda"
        self.progress, self.log = progress, log
        self.interpolation, self.fixres_bn = "bilinear", False
        self._bn_images = None

    def open_run(self, results, run_id: Optional[str], config_text: str) -> None:
        """Name the run, note its finished cells, write its ``env.json``."""
        self.run_id = distributed.broadcast(run_id or new_run_id("robustness"))
        self.run_dir = Path(results) / self.run_id
        self.done = (finished_cells(self.run_dir, include_failed=False)
                     if self.run_dir.exists() else {})
        try:
            from attnbench.profilers.env import collect_env
            env = collect_env(config_text, None, self.device, self.run_id)
        except Exception as err:  # noqa: BLE001 - never lose the measurements for the env
            env = {"run_id": self.run_id, "device": self.device,
                   "error": f"collect_env: {err}"}
        if distributed.is_main():
            env["world_size"] = distributed.world_size()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_env(self.run_dir, env)
        distributed.barrier()

    def append(self, rows: List[Dict[str, Any]]) -> None:
        """Append ``rows`` to the run (rank 0 only under torchrun)."""
        if distributed.is_main():
            append_rows(self.run_dir, rows)

    def rows_of(self, ckpt_path: str, **variant: Any) -> CheckpointRows:
        """The row builder of checkpoint ``ckpt_path``."""
        return CheckpointRows(self.run_id, ckpt_path, self.dataset, self.batch_size,
                              self.device, self.crop_pct, interpolation=self.interpolation,
                              **variant)

    def checkpoint(self, ckpt_path: str) -> List[Dict[str, Any]]:
        """Evaluate one checkpoint over its sweep; its new rows (also appended to the run)."""
        t0 = time.perf_counter()
        try:
            model, ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        except AttnbenchError as err:
            maker = self.rows_of(ckpt_path, label=Path(ckpt_path).stem)
            rows = maker.failed(_sweep(self.resolutions, self.scale_from, None), str(err))
            self.append(rows)
            self.log(f"FAILED {ckpt_path}: {err}")
            return rows
        config = ckpt["model_config"]
        train_res = ckpt.get("train_resolution")
        module = config.get("attention") or "none"
        options, label = model_variant(module, dict(config.get("options") or {}),
                                       ckpt.get("label") or "")
        args = ckpt.get("args") or {}
        maker = self.rows_of(ckpt_path, backbone=config.get("backbone"), module=module,
                             label=label, options=options, stages=config.get("stages"),
                             train_resolution=train_res, seed=args.get("seed"),
                             recipe=args.get("recipe"))
        res_list = _sweep(self.resolutions, self.scale_from, train_res)
        classes = list(ckpt.get("classes") or [])
        n_classes = int(config.get("num_classes") or len(classes) or 1000)
        error = self.class_error(classes, n_classes)
        self.log(f"{label} ({ckpt_path}): trained at {train_res}, "
                 f"{sweep_text(res_list, train_res)}, {len(self.folder)} images")
        model.to(self.dev)
        rows = self.sweep(model, maker, res_list, n_classes, error)
        if self.fixres_bn:
            fix = dataclasses.replace(maker, label=maker.label + FIXRES_SUFFIX, bn_stats="test")
            rows += self.sweep(model, fix, res_list, n_classes, error)
        if rows:
            self.append(rows)
        model.to("cpu")
        if error:
            self.log(f"FAILED {ckpt_path}: {error}")
        else:
            self.log(f"{label}: {len(rows)} rows in {time.perf_counter() - t0:.0f} s")
        return rows

    def class_error(self, classes: List[str], n_classes: int) -> Optional[str]:
        """Why the validation classes do not fit the checkpoint, or None."""
        found = self.folder.classes
        if classes and classes != list(found):
            return (f"{self.root}: its classes ({len(found)}: {', '.join(found[:4])}...) are "
                    f"not the checkpoint's ({len(classes)}: {', '.join(classes[:4])}...)")
        if not classes and len(found) != n_classes:
            return f"{self.root}: {len(found)} classes, the model has {n_classes} outputs"
        return None

    def sweep(self, model, maker: CheckpointRows, res_list: Sequence[int], n_classes: int,
              error: Optional[str]) -> List[Dict[str, Any]]:
        """The rows of every test size not finished yet (failed ones for ``error``)."""
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(res_list), desc=f"{maker.label} robustness", unit="res",
                       leave=False)
        rows: List[Dict[str, Any]] = []
        for res in res_list:
            if error is not None:
                rows += maker.failed([res], error)
                continue
            finished = maker.cell(res) in self.done
            if not finished:
                rows += self.resolution(model, maker, res, n_classes)
            if bar is not None:
                bar.update(1)
                if not finished and rows[-2]["status"] == "ok":
                    bar.set_postfix(res=res, top1=f"{rows[-2]['value']:.1f}")
        if bar is not None:
            bar.close()
        return rows

    def resolution(self, model, maker: CheckpointRows, res: int,
                   n_classes: int) -> List[Dict[str, Any]]:
        """Evaluate at test size ``res`` (under torchrun: this rank's share of the images,
        then the counts of all ranks); failed rows when that raises on any rank."""
        acc, msg = None, None
        try:
            if maker.bn_stats == "test":
                model = reestimate_bn(model, self.bn_images(), self.batch_size, self.device,
                                      eval_transform(res, self.crop_pct, self.interpolation))
            self.folder.transform = eval_transform(res, self.crop_pct, self.interpolation)
            loader = torch.utils.data.DataLoader(
                distributed.shard(self.folder), batch_size=self.batch_size, shuffle=False,
                num_workers=self.workers, pin_memory=self.dev.type == "cuda")
            acc = evaluate(model, loader, self.device, self.amp, topk=5,
                           progress=self.progress and len(loader) > 1,
                           desc=f"{maker.label} {res}px")
        except Exception as err:  # noqa: BLE001 - one failing size must not stop the rest
            msg = error_text(err)
            if is_oom(err) and self.dev.type == "cuda":
                torch.cuda.empty_cache()
        acc, msg = distributed.merge_eval(acc, msg)
        if msg is not None:
            self.log(f"FAILED {maker.label} at {res}px: {msg}")
            return maker.failed([res], msg)
        return maker.ok(res, acc, n_classes)


    def bn_images(self):
        """The training images that re-estimate the BN statistics (``--fixres-bn``)."""
        if self._bn_images is None:
            self._bn_images = image_folder(Path(self.dataset) / "train", None, "train",
                                           cache_max=CACHE_LIMIT)
        return self._bn_images


def reestimate_bn(model: torch.nn.Module, images, batch_size: int, device: str,
                  transform, batches: int = FIXRES_BATCHES, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` whose batch-norm running statistics are re-estimated at the
    test resolution (FixRes, Touvron et al. 2019, the BN-only variant of its fine-tuning):
    ``batches`` batches of training images, preprocessed by the test ``transform``, go
    through the model with only its BN layers in training mode and momentum None (a
    cumulative average); weights, and the original model, are unchanged. Returns the copy
    in eval mode."""
    import copy
    fixed = copy.deepcopy(model).eval()
    bns = [m for m in fixed.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    images.transform = transform
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)[:batches * batch_size].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, order),
                                         batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        for x, _ in loader:
            fixed(x.to(device))
    return fixed.eval()


def _sweep(resolutions, scale_from, train_res) -> List[int]:
    """The test sizes of one checkpoint (see :func:`evaluate_checkpoints`)."""
    if scale_from == "auto":
        return relative_sweep(train_res) if train_res else list(resolutions or
                                                                 DEFAULT_RESOLUTIONS)
    if scale_from is not None:
        return relative_sweep(int(scale_from))
    return sorted(set(int(r) for r in (resolutions or DEFAULT_RESOLUTIONS)))


# --------------------------------------------------------------------------- tables

def seed_groups(rows: Sequence[Dict[str, Any]], metric: str = "top1"):
    """``(order, groups)``: the rows of ``metric`` grouped by model variant and training
    size, ``(label, train_resolution)`` -> ``{"module", "bn_stats", "seeds",
    "values": {test size: [value of each checkpoint (seed)]}}``; a failed cell adds no
    value. The last ok row of a (checkpoint, size) counts (a resumed run re-measures)."""
    groups: Dict[Tuple[str, Any], Dict[str, Any]] = {}
    order: List[Tuple[str, Any]] = []
    for r in rows:
        if r["metric"] != metric:
            continue
        key = (r["label"], r.get("train_resolution"))
        if key not in groups:
            groups[key] = {"module": r.get("module"), "bn_stats": r.get("bn_stats", "train"),
                           "by_ckpt": {}, "res": set()}
            order.append(key)
        g = groups[key]
        g["res"].add(r["resolution"])
        cell = g["by_ckpt"].setdefault(r["checkpoint"], {})
        if r["status"] == "ok" and r["value"] is not None:
            cell[r["resolution"]] = float(r["value"])
    for g in groups.values():
        g["seeds"] = len(g["by_ckpt"])
        g["values"] = {res: [c[res] for c in g["by_ckpt"].values() if res in c]
                       for res in sorted(g["res"])}
    return order, groups


def _reference(groups, key) -> Optional[Tuple[str, Any]]:
    """The plain backbone's group with the same training size and BN statistics."""
    g = groups[key]
    for k, other in groups.items():
        if k[1] == key[1] and other["module"] == "none" and other["bn_stats"] == g["bn_stats"]:
            return None if k == key else k
    return None


def _cell(groups, key, res, ref) -> str:
    """``mean [lo, hi]`` at ``res``, with ``≈`` where the difference from the plain
    backbone does not clear the seed noise."""
    vals = groups[key]["values"].get(res) or []
    if not vals:
        return "-"
    text = interval_text(seed_interval(vals))
    if ref is not None:
        verdict = clears_noise(vals, groups[ref]["values"].get(res) or [])
        if verdict is False:
            text += " ≈"
    return text


def accuracy_tables(rows: Sequence[Dict[str, Any]], metric: str = "top1") -> str:
    """Table 2 layout (Best, train size, 0.75x, 2x) and the full sweep (Fig. 3 data), each
    model's seeds summarised as ``mean [lo, hi]`` (95 % t-interval across seeds, see
    :mod:`attnbench.accuracy.seeds`); ``≈`` marks a module's difference from the plain
    backbone (same BN statistics) that does not clear the seed noise."""
    from tabulate import tabulate
    order, groups = seed_groups(rows, metric)
    if not order:
        return "(no rows)"
    out = []
    for tr in sorted({k[1] for k in order}, key=lambda x: (x is None, x or 0)):
        keys = [k for k in order if k[1] == tr]
        res_here = sorted({res for k in keys for res in groups[k]["values"]})
        lo, hi = res_here[0], res_here[-1]
        head = ["model", "seeds", f"Best {metric} (%)", "best at",
                f"{tr}² (train)" if tr in res_here else f"{tr}² (train, not tested)",
                f"{lo}²", f"{hi}²"]
        table = []
        for k in keys:
            ref = _reference(groups, k)
            means = {res: sum(v) / len(v) for res, v in groups[k]["values"].items() if v}
            best = max(means, key=lambda res: (means[res], -res)) if means else None
            table.append([k[0], str(groups[k]["seeds"]),
                          _cell(groups, k, best, ref) if best else "-",
                          f"{best}²" if best else "-"]
                         + [_cell(groups, k, res, ref) for res in (tr, lo, hi)])
        ratio = f" = {lo / tr:.3g}x..{hi / tr:.3g}x of the training size" if tr else ""
        out.append(f"{metric} accuracy (%), trained at {tr}², tested at {lo}²..{hi}²{ratio} "
                   f"(paper Table 2: trained at 224², tested 168²..448² = 0.75x..2x); mean "
                   f"[95 % t-interval] over seeds; ≈: difference from the plain backbone "
                   f"within the seed noise (Welch 95 % interval of the difference contains 0)")
        out.append(tabulate(table, headers=head, tablefmt="github", disable_numparse=True))
        sweep = [[k[0]] + [_pm(groups[k]["values"].get(res)) for res in res_here] for k in keys]
        out.append("")
        out.append(f"{metric} accuracy (%) at every test size, mean ± 95 % half-width over "
                   f"seeds (Fig. 3 data):")
        out.append(tabulate(sweep, headers=["model"] + [f"{r}" for r in res_here],
                            tablefmt="github", disable_numparse=True))
        out.append("")
    return "\n".join(out).rstrip()


def _pm(vals) -> str:
    """``mean±half`` of one cell of the sweep table (the bare mean for one seed)."""
    if not vals:
        return "-"
    iv = seed_interval(vals)
    return f"{iv.estimate:.1f}" if iv.n < 2 else f"{iv.estimate:.1f}±{iv.hi - iv.estimate:.1f}"
