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

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from attnbench.accuracy.data import make_dataset
from attnbench.accuracy.robustness import CheckpointRows, accuracy_tables, evaluate_checkpoints, \
    model_variant, relative_sweep, sweep_text
from attnbench.accuracy.train import TrainConfig, train
from attnbench.modules.registry import REGISTRY, AttnbenchError
from attnbench.results import append_rows, error_text, new_run_id

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


def check_models(models: Sequence[Tuple[str, str, Dict[str, Any]]], backbone: str) -> None:
    """:class:`AttnbenchError` naming the first of ``models`` that is not registered or does
    not build on ``backbone`` with its options (built on the meta device: no memory, no
    time). The command line checks this before anything is trained; :func:`run_demo` itself
    reports such a model and goes on with the others."""
    from attnbench.modules.builder import BACKBONES, build_model
    from attnbench.modules.registry import unknown_name_message
    if str(backbone).lower() not in BACKBONES:
        raise AttnbenchError("--backbone: " + unknown_name_message("backbone", backbone,
                                                                   BACKBONES))
    for name, module, options in models:
        try:
            if module != "none":
                REGISTRY.get(module)
            with torch.device("meta"):
                build_model(backbone, module, **dict(options))
        except AttnbenchError as err:
            raise AttnbenchError(f"--models {name}: {err}") from None


def run_demo(out: "str | Path" = "runs/robustness-demo", results: "str | Path" = "results", *,
             resolution: int = 64, classes: int = 10, train_per_class: int = 80,
             val_per_class: int = 30, epochs: int = 8, batch_size: int = 32, lr: float = 0.02,
             warmup_epochs: float = 1.0, backbone: str = "resnet18",
             models: Optional[Sequence[Tuple[str, str, Dict[str, Any]]]] = None,
             device: str = "cpu", threads: Optional[int] = None, seed: int = 0,
             nuisance: float = 0.3, rrc_scale: Sequence[float] = (0.25, 1.0),
             run_id: Optional[str] = None, progress: bool = True, log=print) -> Dict[str, Any]:
    """Run the whole demo; returns ``{"rows", "run_dir", "trained", "failed", "seconds"}``."""
    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    demo = _Demo(Path(out), results, resolution, classes, train_per_class, val_per_class,
                 epochs, batch_size, lr, warmup_epochs, backbone, list(models or DEMO_MODELS),
                 device, seed, nuisance, rrc_scale, progress, log,
                 run_id or new_run_id("robustness-demo"))
    log(f"robustness demo: {backbone}, {classes} classes, trained at {resolution}² for {epochs} "
        f"epochs, {sweep_text(demo.sweep, resolution)} (paper: trained at 224², tested "
        f"168²..448² step 28 = 0.75x..2x); device {device}, {torch.get_num_threads()} threads")
    demo.make_data()
    trained, failed, rows_failed = demo.train_all()
    rows, run_dir = demo.evaluate(trained)
    if rows_failed:
        append_rows(run_dir, rows_failed)
        rows += rows_failed
    seconds = time.perf_counter() - t_start
    log("")
    log(accuracy_tables(rows, "top1"))
    for name, msg in failed.items():
        log(f"not in the table: {name}: {msg}")
    log(f"\nrows: {run_dir / 'rows.jsonl'}; `attnbench report` draws Table 2 / Fig. 3 from "
        f"them. Demo took {seconds / 60:.1f} min.")
    return {"rows": rows, "run_dir": run_dir, "trained": trained, "failed": failed,
            "seconds": seconds}


@dataclass
class _Demo:
    """The settings of one :func:`run_demo` and its steps."""

    out: Path
    results: "str | Path"
    resolution: int
    classes: int
    train_per_class: int
    val_per_class: int
    epochs: int
    batch_size: int
    lr: float
    warmup_epochs: float
    backbone: str
    models: List[Tuple[str, str, Dict[str, Any]]]
    device: str
    seed: int
    nuisance: float
    rrc_scale: Sequence[float]
    progress: bool
    log: Callable[[str], None]
    run_id: str

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def sweep(self) -> List[int]:
        """The test sizes: 0.75·R .. 2·R in steps of R/8."""
        return relative_sweep(self.resolution)

    def make_data(self) -> None:
        """Draw the data set (reused when it is there already)."""
        t0 = time.perf_counter()
        meta = make_dataset(self.data, self.classes, self.train_per_class, self.val_per_class,
                            size=2 * self.resolution, seed=self.seed, nuisance=self.nuisance,
                            progress=self.progress)
        self.log(f"data: {self.data} ({len(meta['classes'])} classes x {self.train_per_class} "
                 f"train + {self.val_per_class} val images of {2 * self.resolution}² px, "
                 f"{time.perf_counter() - t0:.0f} s)")

    def train_all(self) -> Tuple[List[str], Dict[str, str], List[Dict[str, Any]]]:
        """Train every model: (checkpoints trained, {name: why not}, their failed rows)."""
        trained: List[str] = []
        failed: Dict[str, str] = {}
        rows: List[Dict[str, Any]] = []
        for name, module, options in self.models:
            ckpt = self.out / "checkpoints" / f"{name}.pt"
            msg = _unregistered(module)
            if msg:
                self.log(f"SKIP {name}: {msg}")
                error = msg
            else:
                msg = self.train_one(name, module, options, ckpt)
                if msg is None:
                    trained.append(str(ckpt))
                    continue
                error = f"training failed: {msg}"
            failed[name] = msg
            rows += self.failed_rows(name, module, options, ckpt, error)
        return trained, failed, rows

    def train_one(self, name: str, module: str, options: Dict[str, Any],
                  ckpt: Path) -> Optional[str]:
        """Train (or finish training) one model into ``ckpt``; None, or why it failed."""
        cfg = TrainConfig(data=str(self.data), backbone=self.backbone, module=module,
                          options=options, resolution=self.resolution, epochs=self.epochs,
                          batch_size=self.batch_size, lr=self.lr,
                          warmup_epochs=self.warmup_epochs, label_smoothing=0.1,
                          out=str(ckpt), device=self.device, seed=self.seed,
                          rrc_scale=list(self.rrc_scale), eval_every=self.epochs)
        if ckpt.exists():
            cfg.resume = str(ckpt)
        t0 = time.perf_counter()
        try:
            result = self.train_or_restart(cfg, name, ckpt)
        except Exception as err:  # noqa: BLE001 - one model failing must not stop the rest
            msg = error_text(err)
            self.log(f"FAILED {name}: {msg}")
            return msg
        last = result["history"][-1] if result.get("history") else {}
        self.log(f"{result['label']}: trained in {time.perf_counter() - t0:.0f} s"
                 + (f", val top1 at {self.resolution}² {last['val_top1']:.1f}%"
                    if "val_top1" in last else ""))
        return None

    def train_or_restart(self, cfg: TrainConfig, name: str, ckpt: Path) -> Dict[str, Any]:
        """:func:`train`; a checkpoint that cannot be resumed is trained again from scratch."""
        try:
            return train(cfg, progress=self.progress, log=self.log)
        except AttnbenchError as err:
            if cfg.resume is None:
                raise
            self.log(f"{name}: cannot reuse {ckpt} ({err}); training from scratch")
            cfg.resume = None
            return train(cfg, progress=self.progress, log=self.log)

    def failed_rows(self, name: str, module: str, options: Dict[str, Any], ckpt: Path,
                    error: str) -> List[Dict[str, Any]]:
        """Failed rows of a model that was not trained, at every test size."""
        options, label = model_variant(module, options, name)
        maker = CheckpointRows(self.run_id, str(ckpt), str(self.data), self.batch_size,
                               self.device, 0.875, backbone=self.backbone, module=module,
                               label=label, options=options, stages=None,
                               train_resolution=self.resolution)
        return maker.failed(self.sweep, error)

    def evaluate(self, trained: List[str]) -> Tuple[List[Dict[str, Any]], Path]:
        """Evaluate the trained checkpoints over the sweep: (rows, run folder)."""
        if not trained:
            return [], Path(self.results) / self.run_id
        return evaluate_checkpoints(
            trained, self.data, scale_from=self.resolution, batch_size=64, device=self.device,
            results=self.results, run_id=self.run_id, progress=self.progress, log=self.log,
            config_text=self.config_text())

    def config_text(self) -> str:
        """The demo's settings, for the run's ``env.json``."""
        return json.dumps({"command": "robustness-demo", "backbone": self.backbone,
                           "resolution": self.resolution, "classes": self.classes,
                           "train_per_class": self.train_per_class,
                           "val_per_class": self.val_per_class, "epochs": self.epochs,
                           "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed,
                           "nuisance": self.nuisance, "rrc_scale": list(self.rrc_scale),
                           "models": [list(m) for m in self.models]}, indent=1)


def _unregistered(module: str) -> Optional[str]:
    """Why ``module`` is skipped (not registered), or None."""
    if module == "none" or module in REGISTRY:
        return None
    return (f"module {module!r} is not registered (yet); skipped "
            f"(registered: {', '.join(REGISTRY.names())})")
