"""``attnbench robustness-demo``: the TDAM Table 2 / Fig. 3 experiment scaled down to the
CPU (:mod:`attnbench.accuracy.demo`)."""
from __future__ import annotations

import argparse

from attnbench.accuracy.demo import auto_threads, check_models, parse_models, run_demo
from attnbench.cli.args import NONNEG_FLOAT, POSITIVE_FLOAT, POSITIVE_INT, check_device, \
    number_type
from attnbench.modules.registry import OptionError


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
    p.add_argument("--resolution", type=number_type(int, 8), default=64,
                   help="training resolution R")
    p.add_argument("--classes", type=number_type(int, 2), default=10)
    p.add_argument("--train", type=POSITIVE_INT, default=80, help="training images per class")
    p.add_argument("--val", type=POSITIVE_INT, default=30, help="validation images per class")
    p.add_argument("--epochs", type=POSITIVE_INT, default=8)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32)
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=0.02)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--models", default=None,
                   help="comma list of none,se,cbam,fca,td (default: all five), or "
                        "'name=module:{json options}' items separated by ';'")
    p.add_argument("--nuisance", type=NONNEG_FLOAT, default=0.3,
                   help="strength of the dataset's nuisance variation (0..1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads, or 'auto' (fewer when the machine is busy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _threads(text: str) -> int:
    """``--threads``: ``auto`` or a positive integer."""
    if text == "auto":
        return auto_threads()
    if not str(text).isdigit() or int(text) < 1:
        raise OptionError(f"--threads {text!r}: expected a positive integer or 'auto'")
    return int(text)


def run(args) -> int:
    """Check every input (models, device, folders) before anything is drawn or trained."""
    from attnbench.results import check_writable
    threads = _threads(args.threads)
    check_device(args.device)
    models = parse_models(args.models)
    check_models(models, args.backbone)
    check_writable(args.out, "--out", folder=True)
    check_writable(args.results, "--results", folder=True)
    result = run_demo(args.out, args.results, resolution=args.resolution, classes=args.classes,
                      train_per_class=args.train, val_per_class=args.val, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, backbone=args.backbone,
                      models=models, device=args.device, threads=threads,
                      seed=args.seed, nuisance=args.nuisance, run_id=args.run_id,
                      progress=not args.no_progress)
    return 0 if result["trained"] and not result["failed"] else 1
