"""``attnbench train``: train a backbone with one registered attention module
(:mod:`attnbench.accuracy.train`)."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from attnbench.accuracy.distributed import is_main
from attnbench.accuracy.seeds import parse_seeds, seed_path
from attnbench.accuracy.train import OPTIMIZERS, RECIPES, TrainConfig, TrainError, \
    config_fields, recipe_settings, resume_settings, train_seeds
from attnbench.cli.args import NONNEG_FLOAT, NONNEG_INT, POSITIVE_FLOAT, POSITIVE_INT, \
    check_device, parse_options, parse_stages


def register_cli(sub, parent) -> None:
    p = sub.add_parser(
        "train", parents=[parent], help="train a backbone + attention module on an ImageFolder",
        description="Train a torchvision ResNet with one registered attention module on an "
                    "ImageFolder dataset (DIR/train/<class>, DIR/val/<class>): "
                    "RandomResizedCrop+flip, SGD with (Nesterov) momentum or AdamW, linear "
                    "warm-up + cosine LR, label smoothing, AMP on CUDA. --recipe small-data "
                    "(default: learns small data sets from scratch at CPU scale) or imagenet "
                    "(the papers' recipe) sets the hyper-parameters not given. Writes a "
                    "checkpoint every epoch; "
                    "--resume CKPT continues it (settings not given on the command line "
                    "are taken from the checkpoint).")
    d = TrainConfig()
    S = argparse.SUPPRESS

    def add(flag, help_, default=None, **kw):
        text = help_ + (f" (default: {default})" if default is not None else "")
        p.add_argument(flag, default=S, help=text, **kw)

    add("--data", "ImageFolder root with train/ and val/ (required unless --resume)")
    add("--backbone", "torchvision ResNet", d.backbone)
    add("--module", "registered module name, or none", d.module)
    p.add_argument("--option", action="append", default=S, metavar="KEY=VALUE",
                   help="module option (repeatable); values parsed as JSON, else strings "
                        "(e.g. --option variant=joint --option steps=2)")
    add("--stages", "stage selection as JSON (e.g. '[3,4]'), 'all' or a preset name",
        "the module's default stages")
    add("--recipe", "hyper-parameter preset: small-data (CPU-scale small data sets) or "
        "imagenet (the papers': SGD lr 0.1 x batch/256, 90 epochs, wd 1e-4, crop 0.08-1, "
        "224²); flags given override it", d.recipe, choices=list(RECIPES))
    add("--seeds", "train once per seed, e.g. 0,1,2 or 0:3; several seeds write "
        "<out stem>-seed<N>.pt each", "--seed")
    _recipe_flags(p, add, d)
    add("--out", "checkpoint path, rewritten every epoch", f"{d.out}, or --resume's path")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue training from this checkpoint (same model and data)")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue even with other training settings than the "
                        "checkpoint's (resolution, batch size, lr...), recorded in it")
    add("--device", "cpu, cuda or cuda:N", d.device)
    p.add_argument("--amp", action="store_true", default=S,
                   help="float16 autocast + GradScaler (CUDA only; ignored on the CPU)")
    add("--workers", "DataLoader workers", d.workers, type=NONNEG_INT)
    add("--seed", "seed", d.seed, type=int)
    add("--limit-batches", "at most this many batches per epoch (smoke tests)", type=POSITIVE_INT)
    add("--eval-every", "validate every N epochs (and after the last; 0: after the last only)",
        d.eval_every, type=NONNEG_INT)
    add("--threads", "torch CPU threads (1 is much faster on an oversubscribed machine)",
        "torch's choice", type=POSITIVE_INT)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--sync-bn", action="store_true", default=S,
                   help="under torchrun: batch norm with the statistics of the global batch "
                        "(torch's SyncBatchNorm on CUDA, attnbench's own on the CPU)")
    p.set_defaults(func=run)


def _recipe_flags(p, add, d: TrainConfig) -> None:
    """The hyper-parameter flags, each with its small-data and imagenet default."""
    im = recipe_settings("imagenet")

    def both(key, fmt=str):
        return f"{fmt(getattr(d, key))}; imagenet: {fmt(im[key])}"
    add("--resolution", "training resolution", both("resolution"), type=POSITIVE_INT)
    add("--crop-pct", "validation: resize to int(res/crop_pct), centre-crop res", d.crop_pct,
        type=POSITIVE_FLOAT)
    add("--rrc-scale", "RandomResizedCrop area scale range LO,HI",
        both("rrc_scale", lambda v: ",".join(f"{x:g}" for x in v)))
    add("--epochs", "total epochs (of the whole run, resumed or not)", both("epochs"),
        type=POSITIVE_INT)
    add("--batch-size", "batch size (under torchrun the global batch, split over the ranks)",
        both("batch_size"), type=POSITIVE_INT)
    add("--lr", "peak learning rate (after warm-up)",
        f"{d.lr}; imagenet: 0.1 * batch-size / 256", type=POSITIVE_FLOAT)
    add("--optimizer", "sgd or adamw", both("optimizer"), choices=list(OPTIMIZERS))
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS,
                   help=f"Nesterov momentum for SGD (default: {both('nesterov')})")
    add("--momentum", "SGD momentum", both("momentum"), type=NONNEG_FLOAT)
    add("--weight-decay", "on weights (not on biases / BN)", both("weight_decay"),
        type=NONNEG_FLOAT)
    add("--warmup-epochs", "linear warm-up length", both("warmup_epochs"), type=NONNEG_FLOAT)
    add("--label-smoothing", "CrossEntropyLoss label smoothing", both("label_smoothing"),
        type=NONNEG_FLOAT)


def config_from_args(args) -> TrainConfig:
    """Command-line values, else (with ``--resume``) the checkpoint's, else defaults."""
    given = dict(vars(args))
    names = set(config_fields())
    kw: Dict[str, Any] = resume_settings(given["resume"]) if given.get("resume") else {}
    if "stages" in given:
        given["stages"] = parse_stages(given["stages"])
    if "rrc_scale" in given:
        given["rrc_scale"] = _rrc_scale(given["rrc_scale"])
    if "option" in given:
        given["options"] = parse_options(given["option"])
    kw.update({k: v for k, v in given.items() if k in names and k != "resume"})
    kw["resume"] = given.get("resume")
    if not kw.get("data"):
        raise TrainError("train: --data DIR is required (unless --resume names a checkpoint)")
    return TrainConfig(**kw)


def _rrc_scale(text: Any) -> list:
    """``--rrc-scale LO,HI`` -> ``[lo, hi]``."""
    try:
        lo, hi = (float(x) for x in str(text).split(","))
    except ValueError:
        raise TrainError(f"--rrc-scale {text!r}: expected LO,HI (e.g. 0.08,1.0)") from None
    return [lo, hi]


def _seeds(args, cfg: TrainConfig) -> list:
    """``--seeds`` as a list (``[cfg.seed]`` when not given)."""
    text = getattr(args, "seeds", None)
    if text is None:
        return [cfg.seed]
    try:
        return parse_seeds(text)
    except ValueError as err:
        raise TrainError(f"--seeds: {err}") from None


def run(args) -> int:
    cfg = config_from_args(args)
    check_device(cfg.device)
    seeds = _seeds(args, cfg)
    ckpts = train_seeds(cfg, seeds, progress=not args.no_progress,
                        allow_changes=getattr(args, "allow_changes", False))
    if not is_main():  # torchrun: rank 0 wrote the checkpoint and says so
        return 0
    for seed, ckpt in zip(seeds, ckpts):
        last = ckpt["history"][-1] if ckpt.get("history") else {}
        out = cfg.out if len(seeds) == 1 else seed_path(cfg.out, seed)
        print(f"wrote {out} ({ckpt['label']}, recipe {ckpt['args'].get('recipe')}, seed {seed}, "
              f"epoch {ckpt['epoch']}"
              + (f", val top1 {last['val_top1']:.1f}%" if "val_top1" in last else "") + ")")
    return 0
