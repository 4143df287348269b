"""``attnbench robustness``: accuracy of trained checkpoints across test resolutions
(:mod:`attnbench.accuracy.robustness`)."""
from __future__ import annotations

import argparse

import torch

from attnbench.accuracy.distributed import is_main
from attnbench.accuracy.robustness import RobustnessError, accuracy_tables, check_inputs, \
    evaluate_checkpoints, parse_resolutions, relative_sweep
from attnbench.accuracy.train import INTERPOLATIONS
from attnbench.cli.args import NONNEG_INT, POSITIVE_FLOAT, POSITIVE_INT, check_device
from attnbench.results import load_rows


def register_cli(sub, parent) -> None:
    p = sub.add_parser(
        "robustness", parents=[parent],
        help="accuracy of trained checkpoints across test resolutions (TDAM Table 2 / Fig. 3)",
        description="Evaluate checkpoints (from `attnbench train`) on an ImageFolder "
                    "validation set at several test resolutions with the single-crop "
                    "protocol (resize shorter side to int(res/crop_pct), centre crop res); "
                    "top-1/top-5 rows go to the results store for `attnbench report`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="checkpoints; several seeds of one model (`train --seeds`) are "
                        "summarised as the mean with its 95 %% t-interval across seeds")
    p.add_argument("--data", required=True,
                   help="ImageFolder root with val/ (or the validation ImageFolder itself)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resolutions", default="168:448:28",
                   help="START:STOP:STEP (stop included) or a comma list")
    g.add_argument("--scale-from", default=None, metavar="TRAIN_RES|auto",
                   help="the relative sweep 0.75x..2x of TRAIN_RES in steps of TRAIN_RES/8, "
                        "rounded to multiples of 4 ('auto': each checkpoint's own training "
                        "resolution)")
    p.add_argument("--crop-pct", type=POSITIVE_FLOAT, default=0.875,
                   help="timm's crop_pct: resize the shorter side to int(res / crop_pct), "
                        "then centre-crop res")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default="bilinear",
                   help="resize interpolation (timm's validate --interpolation)")
    p.add_argument("--fixres-bn", action="store_true",
                   help="also evaluate each checkpoint with its batch-norm statistics "
                        "re-estimated at every test size on training images (FixRes); "
                        "a separate variant labelled '<label> [BN@test]'; needs DATA/train")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    p.add_argument("--workers", type=NONNEG_INT, default=0)
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads")
    p.add_argument("--results", default="results", help="results store folder")
    p.add_argument("--run-id", default=None,
                   help="run folder name (default <UTC time>-robustness); an existing run "
                        "is resumed (finished cells are skipped)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _scale_from(text):
    """``--scale-from``: None, ``"auto"`` or a training resolution (int)."""
    if text in (None, "auto"):
        return text
    try:
        return int(text)
    except ValueError:
        raise RobustnessError(f"--scale-from {text!r}: expected a training "
                              f"resolution (e.g. 224) or 'auto'") from None


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    check_device(args.device)
    resolutions = None if args.scale_from else parse_resolutions(args.resolutions)
    scale_from = _scale_from(args.scale_from)
    if isinstance(scale_from, int):
        relative_sweep(scale_from)  # validates it
    check_inputs(args.checkpoints, args.data)  # before any row is written
    from attnbench.results import check_writable
    check_writable(args.results, "--results", folder=True)
    rows, run_dir = evaluate_checkpoints(
        args.checkpoints, args.data, resolutions=resolutions,
        scale_from=scale_from, crop_pct=args.crop_pct, interpolation=args.interpolation,
        fixres_bn=args.fixres_bn,
        batch_size=args.batch_size, device=args.device, amp=args.amp, workers=args.workers,
        results=args.results, run_id=args.run_id, progress=not args.no_progress)
    if not is_main():  # torchrun: rank 0 wrote the rows and prints the tables
        return 1 if any(r["status"] == "failed" for r in rows) else 0
    all_rows = load_rows(run_dir / "rows.jsonl")
    print(accuracy_tables(all_rows, "top1"))
    print(f"\nrows: {run_dir / 'rows.jsonl'} ({len(all_rows)} rows)")
    failed = sum(r["status"] == "failed" for r in rows)
    return 1 if failed else 0
