"""``attnbench robustness-demo``: the TDAM Table 2 / Fig. 3 experiment, scaled down.

One command, offline, on the CPU:

1. draw a synthetic dataset (:mod:`attnbench.accuracy.data`; default 10 classes = 5 shapes x 2
   stripe frequencies, images of 2·R pixels);
2. train ResNet-18 at R² (default R = 64) with and without attention: the plain
   backbone, SE, CBAM, FCA and TDjoint(T=2, m=1) (:mod:`attnbench.accuracy.train`; a module that
   is not registered or fails is reported and skipped, the others go on);
3. evaluate every checkpoint over the relative sweep 0.75·R .. 2·R in steps of R/8
   (for R = 64: 48² .. 128² step 8 -- the analogue of the paper's 224² training and
   168² .. 448² step 28 test sweep) with the single-crop protocol
   (:mod:`attnbench.accuracy.robustness`), writing rows to ``results/<run_id>/``;
4. print a Table-2-like accuracy table (and the full sweep).

The same steps on real data and a GPU are the paper's protocol::

    attnbench train --data IMAGENET --backbone resnet50 --module se --resolution 224 \\
        --epochs 100 --batch-size 256 --device cuda --amp --workers 8 --out se.pt
    attnbench robustness se.pt ... --data IMAGENET --resolutions 168:448:28 --device cuda

Checkpoints already trained by an earlier run of the demo (same ``--out``) are
reused, so an interrupted demo continues where it stopped.

Reading the result: it demonstrates the protocol, it does not reproduce the paper's
numbers. ResNet-18 trained from scratch for ~8 CPU-minutes on 800 images reaches
roughly 30-55 % top-1 (10 classes); its last feature map is 2x2 at 64², 3x3 at
72..96² and 4x4 at 104..128², so the curve jumps where the grid changes and peaks at
the training size, and at 48² (0.75x) the pooled statistics collapse to near chance
(the effect of resolution on global pooling the paper cites). FCA keeps its 224²
DCT grids (56/28/14/7), so at 64² its maps are upsampled to them: slower, and not an
exact analogue. ``--resolution 96`` or ``128`` is closer to the paper, ~2-4x slower.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from attnbench.modules.registry import AttnbenchError

#: (name, module, options) trained by default
DEMO_MODELS: List[Tuple[str, str, Dict[str, Any]]] = [
    ("none", "none", {}),
    ("se", "se", {}),
    ("cbam", "cbam", {}),
    ("fca", "fca", {}),
    ("td-joint", "td", {"variant": "joint", "steps": 2, "m": 1}),
]


def auto_threads() -> int:
    """CPU threads for torch: all cores on an idle machine, fewer when it is busy
    (on an oversubscribed CPU one thread is several times faster than two)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores
    return max(1, min(cores, int(cores - load + 0.5)))


def parse_models(text: Optional[str]) -> List[Tuple[str, str, Dict[str, Any]]]:
    """``none,se,cbam`` or ``name=module:{"k":v}`` items; default :data:`DEMO_MODELS`."""
    if not text:
        return list(DEMO_MODELS)
    known = {name: (name, module, opts) for name, module, opts in DEMO_MODELS}
    known.update({module: (name, module, opts) for name, module, opts in DEMO_MODELS})
    out = []
    for item in [t.strip() for t in text.split(";" if "{" in text else ",") if t.strip()]:
        if item in known:
            out.append(known[item])
            continue
        name, _, rest = item.partition("=")
        module, _, opts = (rest or name).partition(":")
        try:
            options = json.loads(opts) if opts else {}
        except ValueError:
            raise AttnbenchError(f"--models {item!r}: options must be JSON, e.g. "
                                 f'td:{{"variant":"top"}}') from None
        out.append((name if rest else module, module, options))
    return out


def run_demo(out: "str | Path" = "runs/robustness-demo", results: "str | Path" = "results", *,
             resolution: int = 64, classes: int = 10, train_per_class: int = 80,
             val_per_class: int = 30, epochs: int = 8, batch_size: int = 32, lr: float = 0.02,
             warmup_epochs: float = 1.0, backbone: str = "resnet18",
             models: Optional[Sequence[Tuple[str, str, Dict[str, Any]]]] = None,
             device: str = "cpu", threads: Optional[int] = None, seed: int = 0,
             nuisance: float = 0.3, rrc_scale: Sequence[float] = (0.25, 1.0),
             run_id: Optional[str] = None, progress: bool = True, log=print) -> Dict[str, Any]:
    """Run the whole demo; returns ``{"rows", "run_dir", "trained", "failed", "seconds"}``."""
    from attnbench.results import append_rows, new_run_id
    from attnbench.modules.registry import REGISTRY
    from attnbench.accuracy.data import make_dataset
    from attnbench.accuracy.robustness import accuracy_tables, evaluate_checkpoints, relative_sweep, sweep_text
    from attnbench.accuracy.train import TrainConfig, train

    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out)
    models = list(models or DEMO_MODELS)
    sweep = relative_sweep(resolution)
    run_id = run_id or new_run_id("robustness-demo")
    log(f"robustness demo: {backbone}, {classes} classes, trained at {resolution}² for {epochs} "
        f"epochs, {sweep_text(sweep, resolution)} (paper: trained at 224², tested "
        f"168²..448² step 28 = 0.75x..2x); device {device}, {torch.get_num_threads()} threads")
    data = out / "data"
    t0 = time.perf_counter()
    meta = make_dataset(data, classes, train_per_class, val_per_class, size=2 * resolution,
                        seed=seed, nuisance=nuisance, progress=progress)
    log(f"data: {data} ({len(meta['classes'])} classes x {train_per_class} train + "
        f"{val_per_class} val images of {2 * resolution}² px, {time.perf_counter() - t0:.0f} s)")
    trained: List[str] = []
    failed: Dict[str, str] = {}
    failed_rows: List[Dict[str, Any]] = []
    for name, module, options in models:
        ckpt = out / "checkpoints" / f"{name}.pt"
        if module != "none" and module not in REGISTRY:
            msg = (f"module {module!r} is not registered (yet); skipped "
                   f"(registered: {', '.join(REGISTRY.names())})")
            log(f"SKIP {name}: {msg}")
            failed[name] = msg
            failed_rows += _failed_rows(run_id, backbone, module, options, name, sweep,
                                        resolution, batch_size, device, str(data), str(ckpt),
                                        msg)
            continue
        cfg = TrainConfig(data=str(data), backbone=backbone, module=module, options=options,
                          resolution=resolution, epochs=epochs, batch_size=batch_size, lr=lr,
                          warmup_epochs=warmup_epochs, label_smoothing=0.1, out=str(ckpt),
                          device=device, seed=seed, rrc_scale=list(rrc_scale),
                          eval_every=epochs)
        if ckpt.exists():
            cfg.resume = str(ckpt)
        t0 = time.perf_counter()
        try:
            try:
                result = train(cfg, progress=progress, log=log)
            except AttnbenchError as err:
                if cfg.resume is None:
                    raise
                log(f"{name}: cannot reuse {ckpt} ({err}); training from scratch")
                cfg.resume = None
                result = train(cfg, progress=progress, log=log)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - one model failing must not stop the rest
            msg = f"{type(err).__name__}: {err}"
            log(f"FAILED {name}: {msg}")
            failed[name] = msg
            failed_rows += _failed_rows(run_id, backbone, module, options, name, sweep,
                                        resolution, batch_size, device, str(data), str(ckpt),
                                        f"training failed: {msg}")
            continue
        last = result["history"][-1] if result.get("history") else {}
        log(f"{result['label']}: trained in {time.perf_counter() - t0:.0f} s"
            + (f", val top1 at {resolution}² {last['val_top1']:.1f}%" if "val_top1" in last
               else ""))
        trained.append(str(ckpt))
    rows: List[Dict[str, Any]] = []
    run_dir = Path(results) / run_id
    if trained:
        config_text = json.dumps({"command": "robustness-demo", "backbone": backbone,
                                  "resolution": resolution, "classes": classes,
                                  "train_per_class": train_per_class,
                                  "val_per_class": val_per_class, "epochs": epochs,
                                  "batch_size": batch_size, "lr": lr, "seed": seed,
                                  "nuisance": nuisance, "rrc_scale": list(rrc_scale),
                                  "models": [list(m) for m in models]}, indent=1)
        rows, run_dir = evaluate_checkpoints(
            trained, data, scale_from=resolution, batch_size=64, device=device,
            results=results, run_id=run_id, progress=progress, log=log,
            config_text=config_text)
    if failed_rows:
        append_rows(run_dir, failed_rows)
        rows += failed_rows
    seconds = time.perf_counter() - t_start
    log("")
    log(accuracy_tables(rows, "top1"))
    for name, msg in failed.items():
        log(f"not in the table: {name}: {msg}")
    log(f"\nrows: {run_dir / 'rows.jsonl'}; `attnbench report` draws Table 2 / Fig. 3 from "
        f"them. Demo took {seconds / 60:.1f} min.")
    return {"rows": rows, "run_dir": run_dir, "trained": trained, "failed": failed,
            "seconds": seconds}


def _failed_rows(run_id, backbone, module, options, name, sweep, train_res, batch, device,
                 dataset, checkpoint, error) -> List[Dict[str, Any]]:
    from attnbench.matrix.config import canonical_json
    label = name
    try:
        from attnbench.matrix.config import canonical_options
        options, label = canonical_options(module, options)
    except Exception:  # noqa: BLE001 - an unregistered module keeps its given options
        pass
    from attnbench.accuracy.robustness import _cell
    return [{"run_id": run_id, "cell": _cell(checkpoint, dataset, res, 0.875),
             "backbone": backbone, "module": module, "label": label,
             "options": canonical_json(options), "stages": None, "resolution": res,
             "batch": batch, "mode": "eval", "device": device, "metric": metric,
             "value": None, "unit": "%", "method": "center-crop crop_pct=0.875",
             "status": "failed", "error": error, "train_resolution": train_res,
             "checkpoint": checkpoint, "dataset": dataset, "scale": None, "images": None}
            for res in sweep for metric in ("top1", "top5")]


def register_cli(sub, parent) -> None:
    p = sub.add_parser(
        "robustness-demo", parents=[parent],
        help="the TDAM Table 2 / Fig. 3 experiment scaled down to the CPU (offline)",
        description="Generate a synthetic dataset, train ResNet-18 plain/SE/CBAM/FCA/TD at a "
                    "reduced resolution R, evaluate each over 0.75R..2R (the analogue of "
                    "224 -> 168..448), write rows to the results store and print a "
                    "Table-2-like accuracy table. About 10 minutes on 2 CPU cores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/robustness-demo",
                   help="folder for the data and checkpoints (reused when run again)")
    p.add_argument("--results", default="results", help="results store folder")
    p.add_argument("--run-id", default=None)
    p.add_argument("--resolution", type=int, default=64, help="training resolution R")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train", type=int, default=80, help="training images per class")
    p.add_argument("--val", type=int, default=30, help="validation images per class")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--models", default=None,
                   help="comma list of none,se,cbam,fca,td (default: all five), or "
                        "'name=module:{json options}' items separated by ';'")
    p.add_argument("--nuisance", type=float, default=0.3,
                   help="strength of the dataset's nuisance variation (0..1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads, or 'auto' (fewer when the machine is busy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    threads = auto_threads() if args.threads == "auto" else int(args.threads)
    result = run_demo(args.out, args.results, resolution=args.resolution, classes=args.classes,
                      train_per_class=args.train, val_per_class=args.val, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, backbone=args.backbone,
                      models=parse_models(args.models), device=args.device, threads=threads,
                      seed=args.seed, nuisance=args.nuisance, run_id=args.run_id,
                      progress=not args.no_progress)
    return 0 if result["trained"] and not result["failed"] else 1
