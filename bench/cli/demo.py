"""``attnbench robustness-demo``: the TDAM Table 2 / Fig. 3 experiment scaled down to the
CPU (:mod:`attnbench.accuracy.demo`)."""
from __future__ import annotations

import argparse

from attnbench.accuracy.demo import PRESETS, auto_threads, check_models, parse_models, run_demo
from attnbench.accuracy.seeds import parse_seeds
from attnbench.cli.args import NONNEG_FLOAT, NONNEG_INT, POSITIVE_FLOAT, POSITIVE_INT, \
    check_device, number_type
from attnbench.modules.registry import OptionError


def register_cli(sub, parent) -> None:
    p = sub.add_parser(
        "robustness-demo", parents=[parent],
        help="the TDAM Table 2 / Fig. 3 experiment scaled down (offline; CPU or one GPU)",
        description="Generate a synthetic dataset whose classes need the test resolution, "
                    "train each model with several seeds at a training resolution R "
                    "(small-data recipe), evaluate each over 0.75R..2R (the analogue of "
                    "224 -> 168..448) with and without FixRes batch-norm re-estimation, "
                    "write rows to the results store and print a Table-2-like table with "
                    "95 %% intervals across seeds. --preset cpu (default): ResNet-18 at 48², "
                    "none and SE, 3 seeds, about 12 minutes on 2 CPU cores; --preset gpu: "
                    "ResNet-50 at 224², the five modules, 3 seeds, about 10 minutes on one "
                    "H100. Flags given override the preset.")
    S = argparse.SUPPRESS
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--out", default="runs/robustness-demo",
                   help="folder for the data and checkpoints (reused when run again)")
    p.add_argument("--results", default="results", help="results store folder")
    p.add_argument("--run-id", default=None)
    p.add_argument("--resolution", type=number_type(int, 8), default=S,
                   help="training resolution R " + _preset_values("resolution"))
    p.add_argument("--classes", type=_classes, default=S,
                   help="number of classes or a comma list of names (preset: 4 = circle / "
                        "square x 3 / 7 stripes; gpu: 6)")
    p.add_argument("--train", dest="train_per_class", type=POSITIVE_INT, default=S,
                   help="training images per class " + _preset_values("train_per_class"))
    p.add_argument("--val", dest="val_per_class", type=POSITIVE_INT, default=S,
                   help="validation images per class " + _preset_values("val_per_class"))
    p.add_argument("--epochs", type=POSITIVE_INT, default=S, help=_preset_values("epochs"))
    p.add_argument("--batch-size", type=POSITIVE_INT, default=S, help=_preset_values("batch_size"))
    p.add_argument("--seeds", type=_seeds, default=S, help="seeds, e.g. 0,1,2 (preset: 0,1,2)")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=S,
                   help="peak learning rate " + _preset_values("lr", "the small-data recipe's"))
    p.add_argument("--backbone", default=S, help=_preset_values("backbone"))
    p.add_argument("--models", default=S,
                   help="comma list of none,se,cbam,fca,td (cpu: none,se; gpu: all five), or "
                        "'name=module:{json options}' items separated by ';'")
    p.add_argument("--nuisance", type=NONNEG_FLOAT, default=S,
                   help="strength of the dataset's nuisance variation (0..1)")
    p.add_argument("--no-fixres-bn", dest="fixres_bn", action="store_false", default=S,
                   help="skip the variant with BN statistics re-estimated at each test size")
    p.add_argument("--device", default=S, help=_preset_values("device"))
    p.add_argument("--workers", type=NONNEG_INT, default=S, help="DataLoader workers")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads, or 'auto' (fewer when the machine is busy)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _preset_values(key: str, missing: str = "-") -> str:
    """``(cpu: 48, gpu: 224)``: each preset's value of ``key``, for the help text."""
    return "(" + ", ".join(f"{name}: {p.get(key, missing)}" for name, p in PRESETS.items()) + ")"


def _seeds(text: str) -> list:
    try:
        return parse_seeds(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _classes(text: str):
    text = text.strip()
    return int(text) if text.isdigit() else [t.strip() for t in text.split(",") if t.strip()]


def _threads(text: str) -> int:
    """``--threads``: ``auto`` or a positive integer."""
    if text == "auto":
        return auto_threads()
    if not str(text).isdigit() or int(text) < 1:
        raise OptionError(f"--threads {text!r}: expected a positive integer or 'auto'")
    return int(text)


#: the settings ``run_demo`` takes from the command line when given
_SETTINGS = ("resolution", "classes", "train_per_class", "val_per_class", "epochs",
             "batch_size", "seeds", "lr", "backbone", "nuisance", "fixres_bn", "device",
             "workers")


def run(args) -> int:
    """Check every input (models, device, folders) before anything is drawn or trained."""
    from attnbench.results import check_writable
    threads = _threads(args.threads)
    preset = PRESETS[args.preset]
    given = {k: getattr(args, k) for k in _SETTINGS if hasattr(args, k)}
    check_device(given.get("device", preset["device"]))
    models = parse_models(getattr(args, "models", preset["models"]))
    check_models(models, given.get("backbone", preset["backbone"]))
    check_writable(args.out, "--out", folder=True)
    check_writable(args.results, "--results", folder=True)
    result = run_demo(args.out, args.results, preset=args.preset, models=models,
                      threads=threads, run_id=args.run_id, progress=not args.no_progress,
                      **given)
    return 0 if result["trained"] and not result["failed"] else 1
