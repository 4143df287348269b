"""``attnbench robustness``: accuracy of trained checkpoints across test resolutions.

The TDAM paper's Table 2 / Fig. 3 protocol: models trained at 224² are evaluated
single-crop at 168² .. 448² in steps of 28 (the default here). Each test size ``res``
uses the standard protocol: resize the shorter side to ``int(res / crop_pct)``
(bilinear, antialiased), centre-crop ``res`` x ``res``; ``crop_pct`` 0.875 (224 <-
256). Top-1 and top-5 accuracy (%); with fewer than 5 classes top-5 is top-k with
k = number of classes, and the row's ``method`` says so.

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

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from attnbench.modules.registry import AttnbenchError

DEFAULT_RESOLUTIONS = list(range(168, 449, 28))
REFERENCE_TRAIN_RES = 224
CACHE_LIMIT = 20000  # validation sets up to this many images are decoded once, kept in memory


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

class _Images(torch.utils.data.Dataset):
    """(image, label) pairs with a transform; images decoded once when cached."""

    def __init__(self, folder, cache: bool):
        self.folder = folder
        self.cache = [None] * len(folder.samples) if cache else None
        self.transform = None

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, i: int):
        path, label = self.folder.samples[i]
        img = self.cache[i] if self.cache is not None else None
        if img is None:
            img = self.folder.loader(path)
            if self.cache is not None:
                img.load()
                self.cache[i] = img
        return self.transform(img), label


def val_root(data: "str | Path") -> Path:
    """``DIR/val`` when it exists, else ``DIR`` itself (an ImageFolder of classes)."""
    data = Path(data)
    return data / "val" if (data / "val").is_dir() else data


# --------------------------------------------------------------------------- evaluation

def _cell(checkpoint: str, dataset: str, res: int, crop_pct: float) -> str:
    import hashlib
    key = json.dumps({"kind": "robustness", "checkpoint": checkpoint, "dataset": dataset,
                      "resolution": res, "crop_pct": crop_pct}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _variant(config: Dict[str, Any], label: str) -> Tuple[str, str, str, Optional[str]]:
    """(module, label, options JSON, stages JSON) as the runner writes them."""
    from attnbench.matrix.config import canonical_json
    module = config.get("attention") or "none"
    opts = dict(config.get("options") or {})
    try:
        from attnbench.matrix.config import canonical_options
        opts, label = canonical_options(module, opts)
    except Exception:  # noqa: BLE001 - unregistered module: keep what the checkpoint says
        pass
    stages = config.get("stages")
    return (module, label, canonical_json(opts),
            None if stages is None else canonical_json(stages))


def evaluate_checkpoints(checkpoints: Sequence["str | Path"], data: "str | Path", *,
                         resolutions: Optional[Sequence[int]] = None,
                         scale_from: "int | str | None" = None, crop_pct: float = 0.875,
                         batch_size: int = 64, device: str = "cpu", amp: bool = False,
                         workers: int = 0, results: "str | Path" = "results",
                         run_id: Optional[str] = None, progress: bool = True,
                         log: Callable[[str], None] = print,
                         config_text: Optional[str] = None) -> Tuple[List[Dict[str, Any]], Path]:
    """Evaluate every checkpoint at every test resolution; returns ``(rows, run_dir)``.

    ``resolutions``: the test sizes (default 168..448 step 28), unless ``scale_from``
    (an int R, or ``"auto"`` for each checkpoint's own training resolution) asks for
    the relative sweep 0.75·R..2·R (see :func:`relative_sweep`).
    """
    from attnbench.results import append_rows, finished_cells, new_run_id, write_env
    from attnbench.accuracy.checkpoint import load_checkpoint
    from attnbench.accuracy.train import eval_transform, evaluate, image_folder, resize_size

    if not checkpoints:
        raise RobustnessError("robustness: give at least one checkpoint")
    resize_size(8, crop_pct)  # validates crop_pct
    if batch_size < 1:
        raise RobustnessError(f"--batch-size must be >= 1, got {batch_size}")
    if scale_from not in (None, "auto"):
        scale_from = int(scale_from)
    root = val_root(data)
    folder = image_folder(root, None, "validation")
    images = _Images(folder, cache=len(folder.samples) <= CACHE_LIMIT)
    dataset = str(data)
    run_id = run_id or new_run_id("robustness")
    run_dir = Path(results) / run_id
    done = finished_cells(run_dir, include_failed=False) if run_dir.exists() else {}
    if config_text is None:
        config_text = json.dumps({"command": "robustness", "checkpoints": [str(c) for c in
                                  checkpoints], "data": dataset, "resolutions": resolutions,
                                  "scale_from": scale_from, "crop_pct": crop_pct}, indent=1)
    try:
        from attnbench.profilers.env import collect_env
        env = collect_env(config_text, None, device, run_id)
    except Exception as err:  # noqa: BLE001 - never lose the measurements for the env
        env = {"run_id": run_id, "device": device, "error": f"collect_env: {err}"}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_env(run_dir, env)
    all_rows: List[Dict[str, Any]] = []
    dev = torch.device(device)
    use_amp = bool(amp) and dev.type == "cuda"
    for ckpt_path in checkpoints:
        ckpt_path = str(ckpt_path)
        base = {"run_id": run_id, "batch": batch_size, "mode": "eval", "device": device,
                "unit": "%", "checkpoint": ckpt_path, "dataset": dataset}
        t0 = time.perf_counter()
        try:
            model, ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        except AttnbenchError as err:
            res_list = _sweep(resolutions, scale_from, None)
            rows = [_failed(base, ckpt_path, dataset, r, crop_pct, m, str(err), None)
                    for r in res_list for m in ("top1", "top5")]
            append_rows(run_dir, rows)
            all_rows += rows
            log(f"FAILED {ckpt_path}: {err}")
            continue
        config = ckpt["model_config"]
        train_res = ckpt.get("train_resolution")
        module, label, options, stages = _variant(config, ckpt.get("label") or "")
        base.update(backbone=config.get("backbone"), module=module, label=label,
                    options=options, stages=stages, train_resolution=train_res)
        res_list = _sweep(resolutions, scale_from, train_res)
        classes = list(ckpt.get("classes") or [])
        n_classes = int(config.get("num_classes") or len(classes) or 1000)
        k = min(5, n_classes)
        error = None
        if classes and classes != list(folder.classes):
            error = (f"{root}: its classes ({len(folder.classes)}: "
                     f"{', '.join(folder.classes[:4])}...) are not the checkpoint's "
                     f"({len(classes)}: {', '.join(classes[:4])}...)")
        elif not classes and len(folder.classes) != n_classes:
            error = f"{root}: {len(folder.classes)} classes, the model has {n_classes} outputs"
        log(f"{label} ({ckpt_path}): trained at {train_res}, {sweep_text(res_list, train_res)}"
            f", {len(images)} images")
        model.to(dev)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(res_list), desc=f"{label} robustness", unit="res",
                       leave=False)
        rows = []
        for res in res_list:
            cell = _cell(ckpt_path, dataset, res, crop_pct)
            method = f"center-crop crop_pct={crop_pct:g} (resize {resize_size(res, crop_pct)})"
            if error is None and cell in done:
                if bar is not None:
                    bar.update(1)
                continue
            if error is not None:
                rows += [_failed(base, ckpt_path, dataset, res, crop_pct, m, error, train_res)
                         for m in ("top1", "top5")]
                continue
            try:
                images.transform = eval_transform(res, crop_pct)
                loader = torch.utils.data.DataLoader(
                    images, batch_size=batch_size, shuffle=False, num_workers=workers,
                    pin_memory=dev.type == "cuda")
                acc = evaluate(model, loader, device, use_amp, topk=5,
                               progress=progress and len(loader) > 1,
                               desc=f"{label} {res}px")
            except Exception as err:  # noqa: BLE001 - one failing size must not stop the rest
                msg = f"{type(err).__name__}: {err}"
                if "out of memory" in str(err).lower():
                    msg = f"out of memory ({msg})"
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                rows += [_failed(base, ckpt_path, dataset, res, crop_pct, m, msg, train_res)
                         for m in ("top1", "top5")]
                log(f"FAILED {label} at {res}px: {msg}")
            else:
                extra = {"cell": cell, "resolution": res, "status": "ok", "error": "",
                         "scale": round(res / train_res, 4) if train_res else None,
                         "images": acc["n"]}
                rows.append({**base, **extra, "metric": "top1", "value": acc["top1"],
                             "method": method})
                note = "" if k == 5 else f"; top-5 is top-{k}: only {n_classes} classes"
                rows.append({**base, **extra, "metric": "top5", "value": acc["topk"],
                             "method": method + note})
            if bar is not None:
                bar.update(1)
                if rows and rows[-2]["status"] == "ok":
                    bar.set_postfix(res=res, top1=f"{rows[-2]['value']:.1f}")
        if bar is not None:
            bar.close()
        if rows:
            append_rows(run_dir, rows)
        all_rows += rows
        model.to("cpu")
        if error:
            log(f"FAILED {ckpt_path}: {error}")
        else:
            log(f"{label}: {len(rows)} rows in {time.perf_counter() - t0:.0f} s")
    return all_rows, run_dir


def _sweep(resolutions, scale_from, train_res) -> List[int]:
    if scale_from == "auto":
        return relative_sweep(train_res) if train_res else list(resolutions or
                                                                 DEFAULT_RESOLUTIONS)
    if scale_from is not None:
        return relative_sweep(int(scale_from))
    return sorted(set(int(r) for r in (resolutions or DEFAULT_RESOLUTIONS)))


def _failed(base, ckpt_path, dataset, res, crop_pct, metric, error, train_res):
    row = {"backbone": None, "module": None, "label": Path(ckpt_path).stem, "options": "{}",
           "stages": None, "train_resolution": train_res}
    row.update(base)
    row.update(cell=_cell(ckpt_path, dataset, res, crop_pct), resolution=res, metric=metric,
               value=None, method=f"center-crop crop_pct={crop_pct:g}", status="failed",
               error=error, scale=None, images=None)
    if row["backbone"] is None:
        row["backbone"] = "?"
    if row["module"] is None:
        row["module"] = "?"
    return row


# --------------------------------------------------------------------------- tables

def accuracy_tables(rows: Sequence[Dict[str, Any]], metric: str = "top1") -> str:
    """Table 2 layout (Best, train size, 0.75x, 2x) and the full sweep (Fig. 3 data)."""
    from tabulate import tabulate
    ok = [r for r in rows if r["metric"] == metric]
    if not ok:
        return "(no rows)"
    groups: Dict[Tuple[str, Any], Dict[int, Any]] = {}
    order: List[Tuple[str, Any]] = []
    names: Dict[Tuple[str, Any], str] = {}
    for r in ok:
        key = (r["checkpoint"], r.get("train_resolution"))
        if key not in groups:
            groups[key] = {}
            order.append(key)
            names[key] = r["label"]
        groups[key][r["resolution"]] = r["value"] if r["status"] == "ok" else None
    dup = {n for n in names.values() if list(names.values()).count(n) > 1}
    for key in order:
        if names[key] in dup:
            names[key] = f"{names[key]} [{Path(key[0]).stem}]"
    out = []
    for tr in sorted({k[1] for k in order}, key=lambda x: (x is None, x or 0)):
        keys = [k for k in order if k[1] == tr]
        res_here = sorted({res for k in keys for res in groups[k]})
        lo, hi = res_here[0], res_here[-1]
        head = ["model", f"Best {metric} (%)", "best at",
                f"{tr}² (train)" if tr in res_here else f"{tr}² (train, not tested)",
                f"{lo}²", f"{hi}²"]
        table = []
        for k in keys:
            g = groups[k]
            vals = [(v, res) for res, v in g.items() if v is not None]
            best = max(vals, key=lambda x: (x[0], -x[1])) if vals else None
            table.append([names[k], _f(best[0] if best else None),
                          f"{best[1]}²" if best else "-", _f(g.get(tr)), _f(g.get(lo)),
                          _f(g.get(hi))])
        ratio = f" = {lo / tr:.3g}x..{hi / tr:.3g}x of the training size" if tr else ""
        out.append(f"{metric} accuracy (%), trained at {tr}², tested at {lo}²..{hi}²{ratio} "
                   f"(paper Table 2: trained at 224², tested 168²..448² = 0.75x..2x)")
        out.append(tabulate(table, headers=head, tablefmt="github", disable_numparse=True))
        sweep = [[names[k]] + [_f(groups[k].get(res)) for res in res_here] for k in keys]
        out.append("")
        out.append(f"{metric} accuracy (%) at every test size (Fig. 3 data):")
        out.append(tabulate(sweep, headers=["model"] + [f"{r}" for r in res_here],
                            tablefmt="github", disable_numparse=True))
        out.append("")
    return "\n".join(out).rstrip()


def _f(v) -> str:
    return "-" if v is None else f"{v:.1f}"


# --------------------------------------------------------------------------- CLI

def register_cli(sub, parent) -> None:
    p = sub.add_parser(
        "robustness", parents=[parent],
        help="accuracy of trained checkpoints across test resolutions (TDAM Table 2 / Fig. 3)",
        description="Evaluate checkpoints (from `attnbench train`) on an ImageFolder "
                    "validation set at several test resolutions with the single-crop "
                    "protocol (resize shorter side to int(res/crop_pct), centre crop res); "
                    "top-1/top-5 rows go to the results store for `attnbench report`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    p.add_argument("--data", required=True,
                   help="ImageFolder root with val/ (or the validation ImageFolder itself)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resolutions", default="168:448:28",
                   help="START:STOP:STEP (stop included) or a comma list")
    g.add_argument("--scale-from", default=None, metavar="TRAIN_RES|auto",
                   help="the relative sweep 0.75x..2x of TRAIN_RES in steps of TRAIN_RES/8, "
                        "rounded to multiples of 4 ('auto': each checkpoint's own training "
                        "resolution)")
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--results", default="results", help="results store folder")
    p.add_argument("--run-id", default=None,
                   help="run folder name (default <UTC time>-robustness); an existing run "
                        "is resumed (finished cells are skipped)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_cli)
    from attnbench.accuracy import demo as pipeline
    pipeline.register_cli(sub, parent)


def _run_cli(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise RobustnessError("--device cuda: no CUDA device is available here")
    resolutions = None if args.scale_from else parse_resolutions(args.resolutions)
    scale_from = args.scale_from
    if scale_from not in (None, "auto"):
        try:
            scale_from = int(scale_from)
        except ValueError:
            raise RobustnessError(f"--scale-from {scale_from!r}: expected a training "
                                  f"resolution (e.g. 224) or 'auto'") from None
    rows, run_dir = evaluate_checkpoints(
        args.checkpoints, args.data, resolutions=resolutions, scale_from=scale_from,
        crop_pct=args.crop_pct, batch_size=args.batch_size, device=args.device, amp=args.amp,
        workers=args.workers, results=args.results, run_id=args.run_id,
        progress=not args.no_progress)
    from attnbench.results import load_rows
    all_rows = load_rows(run_dir / "rows.jsonl")
    print(accuracy_tables(all_rows, "top1"))
    print(f"\nrows: {run_dir / 'rows.jsonl'} ({len(all_rows)} rows)")
    failed = sum(r["status"] == "failed" for r in rows)
    return 1 if failed else 0
