"""``attnbench robustness-demo``: the TDAM Table 2 / Fig. 3 experiment, scaled down.

One command, offline. Preset ``cpu`` (the default; measured 11.8 min on 2 CPU cores):

1. draw a synthetic dataset (:mod:`attnbench.accuracy.data`) whose classes need the
   test resolution: 4 classes = circle / square x 3 / 7 stripes, 150 training and 40
   validation images per class of 2·R pixels, mild nuisances (at R = 48 the 7 stripes
   are ~4 px a period, at 0.75·R ~3 px: they blur towards a flat fill);
2. train ResNet-18 at R² = 48² with the ``small-data`` recipe
   (:data:`attnbench.accuracy.train.RECIPES`) with batch 16, lr 0.05, crop scale 0.5-1 and
   16 epochs (measured: plain 87 %, SE 92 % at R², 3 seeds; the recipe's batch 32, lr 0.1,
   scale 0.35-1 underfitted here: 76 % after 20 epochs) for the plain backbone and SE
   (``--models`` for others), each with 3 seeds (one checkpoint per seed);
3. evaluate every checkpoint at 0.75·R .. 2·R in steps of R/4 (36² .. 96²: the analogue
   of the paper's 224² training and 168² .. 448² test sweep) with the single-crop
   protocol, twice: with the training batch-norm statistics and, as a separate variant
   ``<label> [BN@test]``, with them re-estimated at each test size (FixRes);
4. print a Table-2-like table with each model's mean and 95 % interval across seeds
   (``≈`` marks a difference from the plain backbone within the seed noise) and the
   full sweep; ``attnbench report`` draws the curves with their intervals as bands.

Preset ``gpu``: ResNet-50 at 224² (tested 168² .. 448²), the five modules, 3 seeds,
sized for about 10 minutes on one H100 (``--device cuda --amp``). The same steps on real
data are the paper's protocol::

    attnbench train --recipe imagenet --data IMAGENET --backbone resnet50 --module se \
        --device cuda --amp --workers 8 --seeds 0,1,2 --out se.pt
    attnbench robustness se-seed*.pt ... --data IMAGENET --resolutions 168:448:28 --device cuda

What it shows (see the README for the measured numbers): the models learn the task well
above chance at R², accuracy falls at 0.75·R where the fine stripes blur away, and the
train/test resolution discrepancy FixRes describes (RandomResizedCrop makes objects look
larger in training than at test) puts the best test size above R; the BN re-estimation
changes the curve above and below R. Checkpoints already trained by an earlier run of
the demo (same ``--out``) are reused, so an interrupted demo continues where it stopped.
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
    model_variant, sweep_text
from attnbench.accuracy.seeds import seed_path
from attnbench.accuracy.train import TrainConfig, train
from attnbench.modules.registry import REGISTRY, AttnbenchError
from attnbench.results import append_rows, error_text, load_rows, new_run_id

#: (name, module, options) trained by default
DEMO_MODELS: List[Tuple[str, str, Dict[str, Any]]] = [
    ("none", "none", {}),
    ("se", "se", {}),
    ("cbam", "cbam", {}),
    ("fca", "fca", {}),
    ("td-joint", "td", {"variant": "joint", "steps": 2, "m": 1}),
]


#: the demo's presets: ``cpu`` (2 CPU cores, 11.8 min measured) and ``gpu`` (one H100,
#: sized for ~10 min, not run yet)
PRESETS: Dict[str, Dict[str, Any]] = {
    "cpu": dict(backbone="resnet18", resolution=48, kind="shapes",
                classes=["circle-stripes3", "circle-stripes7", "square-stripes3",
                         "square-stripes7"],
                train_per_class=150, val_per_class=40, epochs=16, batch_size=16,
                lr=0.05, rrc_scale=[0.5, 1.0],
                seeds=[0, 1, 2], models="none,se", nuisance=0.3, oversample=4,
                fixres_bn=True, device="cpu", amp=False, workers=0),
    "gpu": dict(backbone="resnet50", resolution=224, kind="shapes",
                classes=["circle-stripes3", "circle-stripes7", "square-stripes3",
                         "square-stripes7", "triangle-stripes3", "triangle-stripes7"],
                train_per_class=300, val_per_class=50, epochs=20, batch_size=64,
                seeds=[0, 1, 2], models=None, nuisance=0.5, oversample=2,
                fixres_bn=True, device="cuda", amp=True, workers=8),
}
#: the demo's test sizes, as multiples of the training size R (R/4 apart)
SWEEP_FACTORS = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def demo_sweep(resolution: int, factors: Sequence[float] = SWEEP_FACTORS) -> List[int]:
    """``f · R`` for each factor, rounded to a multiple of 4 (64 -> 48, 64, 80, ..., 128)."""
    return sorted({max(4, int(resolution * f / 4 + 0.5) * 4) for f in factors})


def _cpu_times() -> Optional[Tuple[int, int]]:
    """``(idle + iowait, total)`` jiffies of all CPUs from ``/proc/stat``; None without it."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def busy_cores(interval: float = 0.5) -> Optional[float]:
    """Cores in use by other work now: the busy share of ``/proc/stat`` over ``interval``
    seconds times the core count (the 1-minute load average still counts a job that
    ended seconds ago: it made a demo run on 1 thread of 2, 18.9 min instead of ~11)."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(interval)
    second = _cpu_times()
    total = second[1] - first[1]
    if total <= 0:
        return None
    return (1.0 - (second[0] - first[0]) / total) * (os.cpu_count() or 1)


def auto_threads() -> int:
    """CPU threads for torch: all cores on an idle machine, fewer when other work keeps
    some busy now (on an oversubscribed CPU one thread is several times faster than two);
    the load average where ``/proc/stat`` is missing."""
    cores = os.cpu_count() or 1
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


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
             preset: str = "cpu",
             models: Optional[Sequence[Tuple[str, str, Dict[str, Any]]]] = None,
             threads: Optional[int] = None, run_id: Optional[str] = None, progress: bool = True,
             log=print, **overrides: Any) -> Dict[str, Any]:
    """Run the whole demo; returns ``{"rows", "run_dir", "trained", "failed", "seconds"}``.

    ``preset``: a key of :data:`PRESETS`; ``overrides``: any of its settings (e.g.
    ``resolution=32, epochs=1, seeds=[0]``) and the training recipe's (``lr``,
    ``warmup_epochs``, ``rrc_scale``...; default: the ``small-data`` recipe)."""
    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    if preset not in PRESETS:
        raise AttnbenchError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    settings = dict(PRESETS[preset])
    recipe = {k: settings.pop(k) for k in list(settings) if k in RECIPE_OVERRIDES}
    recipe.update({k: overrides.pop(k) for k in list(overrides) if k in RECIPE_OVERRIDES})
    unknown = [k for k in overrides if k not in settings]
    if unknown:
        raise AttnbenchError(f"run_demo: unknown settings {', '.join(unknown)}")
    settings.update(overrides)
    chosen = list(models) if models is not None else parse_models(settings.pop("models"))
    settings.pop("models", None)
    demo = _Demo(Path(out), results, preset, chosen, recipe, progress, log,
                 run_id or new_run_id("robustness-demo"), **settings)
    log(f"robustness demo ({preset}): {demo.backbone}, {len(demo.class_list)} classes, trained "
        f"at {demo.resolution}² for {demo.epochs} epochs, seeds {demo.seeds}, "
        f"{sweep_text(demo.sweep, demo.resolution)} (paper: trained at 224², tested "
        f"168²..448² = 0.75x..2x); device {demo.device}, {torch.get_num_threads()} threads")
    demo.make_data()
    trained, failed, rows_failed = demo.train_all()
    rows, run_dir = demo.evaluate(trained)
    if rows_failed:
        append_rows(run_dir, rows_failed)
        rows += rows_failed
    seconds = time.perf_counter() - t_start
    log("")
    every = load_rows(run_dir / "rows.jsonl") if (run_dir / "rows.jsonl").exists() else rows
    log(accuracy_tables(every, "top1"))  # with the rows of earlier, resumed runs
    for name, msg in failed.items():
        log(f"not in the table: {name}: {msg}")
    log(f"\nrows: {run_dir / 'rows.jsonl'}; `attnbench report` draws Table 2 / Fig. 3 from "
        f"them. Demo took {seconds / 60:.1f} min.")
    return {"rows": rows, "run_dir": run_dir, "trained": trained, "failed": failed,
            "seconds": seconds}


#: training settings the demo passes on to :class:`TrainConfig` (else the recipe's)
RECIPE_OVERRIDES = ("recipe", "lr", "warmup_epochs", "rrc_scale", "weight_decay",
                    "label_smoothing", "optimizer")


@dataclass
class _Demo:
    """The settings of one :func:`run_demo` and its steps."""

    out: Path
    results: "str | Path"
    preset: str
    models: List[Tuple[str, str, Dict[str, Any]]]
    recipe: Dict[str, Any]
    progress: bool
    log: Callable[[str], None]
    run_id: str
    backbone: str = "resnet18"
    resolution: int = 64
    kind: str = "shapes"
    classes: Any = 4
    train_per_class: int = 100
    val_per_class: int = 40
    epochs: int = 12
    batch_size: int = 32
    seeds: Sequence[int] = (0, 1, 2)
    nuisance: float = 0.3
    oversample: int = 4
    fixres_bn: bool = True
    device: str = "cpu"
    amp: bool = False
    workers: int = 0

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def class_list(self) -> List[str]:
        from attnbench.accuracy.data import class_names, texture_class_names
        return class_names(self.classes) if self.kind == "shapes" \
            else texture_class_names(self.classes)

    @property
    def sweep(self) -> List[int]:
        """The test sizes: 0.75·R .. 2·R in steps of R/4."""
        return demo_sweep(self.resolution)

    def make_data(self) -> None:
        """Draw the data set (reused when it is there already)."""
        t0 = time.perf_counter()
        meta = make_dataset(self.data, self.classes, self.train_per_class, self.val_per_class,
                            size=2 * self.resolution, seed=0, nuisance=self.nuisance,
                            oversample=self.oversample, progress=self.progress, kind=self.kind)
        self.log(f"data: {self.data} ({len(meta['classes'])} classes x {self.train_per_class} "
                 f"train + {self.val_per_class} val images of {2 * self.resolution}² px, "
                 f"{time.perf_counter() - t0:.0f} s)")

    def checkpoint(self, name: str, seed: int) -> Path:
        """``checkpoints/<name>.pt`` for one seed, ``<name>-seed<N>.pt`` for several."""
        path = self.out / "checkpoints" / f"{name}.pt"
        return path if len(self.seeds) == 1 else seed_path(path, seed)

    def train_all(self) -> Tuple[List[str], Dict[str, str], List[Dict[str, Any]]]:
        """Train every model and seed: (checkpoints trained, {name: why not}, failed rows)."""
        trained: List[str] = []
        failed: Dict[str, str] = {}
        rows: List[Dict[str, Any]] = []
        for name, module, options in self.models:
            msg = _unregistered(module)
            if msg:
                self.log(f"SKIP {name}: {msg}")
            for seed in self.seeds:
                ckpt = self.checkpoint(name, seed)
                if not msg:
                    err = self.train_one(name, module, options, ckpt, seed)
                    if err is None:
                        trained.append(str(ckpt))
                        continue
                    failed[f"{name} seed {seed}"] = err
                else:
                    failed[name] = msg
                rows += self.failed_rows(name, module, options, ckpt,
                                         msg or f"training failed: {err}")
        return trained, failed, rows

    def train_one(self, name: str, module: str, options: Dict[str, Any],
                  ckpt: Path, seed: int) -> Optional[str]:
        """Train (or finish training) one model and seed into ``ckpt``; None, or why not."""
        cfg = TrainConfig(data=str(self.data), backbone=self.backbone, module=module,
                          options=options, resolution=self.resolution, epochs=self.epochs,
                          batch_size=self.batch_size, out=str(ckpt), device=self.device,
                          amp=self.amp, workers=self.workers, seed=int(seed),
                          eval_every=self.epochs, **self.recipe)
        if ckpt.exists():
            cfg.resume = str(ckpt)
        t0 = time.perf_counter()
        try:
            result = self.train_or_restart(cfg, name, ckpt)
        except Exception as err:  # noqa: BLE001 - one model failing must not stop the rest
            msg = error_text(err)
            self.log(f"FAILED {name} seed {seed}: {msg}")
            return msg
        last = result["history"][-1] if result.get("history") else {}
        self.log(f"{result['label']} seed {seed}: trained in {time.perf_counter() - t0:.0f} s"
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
        maker = CheckpointRows(self.run_id, str(ckpt), str(self.data), 64,
                               self.device, 0.875, backbone=self.backbone, module=module,
                               label=label, options=options, stages=None,
                               train_resolution=self.resolution)
        return maker.failed(self.sweep, error)

    def evaluate(self, trained: List[str]) -> Tuple[List[Dict[str, Any]], Path]:
        """Evaluate the trained checkpoints over the sweep: (rows, run folder)."""
        if not trained:
            return [], Path(self.results) / self.run_id
        return evaluate_checkpoints(
            trained, self.data, resolutions=self.sweep, fixres_bn=self.fixres_bn, batch_size=64,
            device=self.device, amp=self.amp, workers=self.workers, results=self.results,
            run_id=self.run_id, progress=self.progress, log=self.log,
            config_text=self.config_text())

    def config_text(self) -> str:
        """The demo's settings, for the run's ``env.json``."""
        return json.dumps({"command": "robustness-demo", "preset": self.preset,
                           "backbone": self.backbone, "resolution": self.resolution,
                           "kind": self.kind, "classes": self.class_list,
                           "train_per_class": self.train_per_class,
                           "val_per_class": self.val_per_class, "epochs": self.epochs,
                           "batch_size": self.batch_size, "seeds": list(self.seeds),
                           "recipe": dict(self.recipe), "nuisance": self.nuisance,
                           "fixres_bn": self.fixres_bn, "sweep": self.sweep,
                           "models": [list(m) for m in self.models]}, indent=1)


def _unregistered(module: str) -> Optional[str]:
    """Why ``module`` is skipped (not registered), or None."""
    if module == "none" or module in REGISTRY:
        return None
    return (f"module {module!r} is not registered (yet); skipped "
            f"(registered: {', '.join(REGISTRY.names())})")
