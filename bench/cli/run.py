"""``attnbench run CONFIG``: run a benchmark matrix (:func:`attnbench.matrix.runner.run_config`)."""
from __future__ import annotations

import argparse
import importlib
from typing import List


def register_cli(sub, parent) -> None:
    p = sub.add_parser(
        "run", parents=[parent], help="run a benchmark matrix config",
        description="Expand a matrix config into cells and measure each in a separate "
                    "worker process; rows go to RESULTS/<run-id>/rows.jsonl. A stopped run "
                    "resumes with --resume (or the same --run-id) without redoing finished "
                    "cells. Exit status: 0 all ok, 1 some cell failed, 2 bad config, "
                    "130 interrupted.")
    p.add_argument("config", metavar="CONFIG",
                   help="a TOML config, or the name of a built-in one: default, paper, tiny")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUES",
                   help="run only the cells matching, e.g. module=se,td backbone=resnet50 "
                        "resolution=224 metric=latency mode=eval (repeatable; all must match)")
    p.add_argument("--run-id", default=None,
                   help="run id (folder name); an existing one is resumed "
                        "(default: <UTC date-time>-<config name>)")
    p.add_argument("--results", default="results", metavar="DIR",
                   help="results folder (default: results)")
    p.add_argument("--resume", action="store_true",
                   help="resume the latest run of this config (or --run-id)")
    p.add_argument("--retry-failed", action="store_true",
                   help="on resume, run failed cells again")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="per-cell (per interleaved group) timeout in seconds, overriding "
                        "the config's timing.timeout_s")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells that would run, run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--measure-module", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _loaded_plugins(args) -> List[str]:
    """The plugins loaded in this process, for the workers to load again."""
    try:
        from attnbench.plugins.loader import loaded_plugins
        return list(loaded_plugins())
    except ImportError:  # pragma: no cover
        return list(getattr(args, "plugin", []) or [])


def run(args) -> int:
    from attnbench.matrix.runner import RunnerError, run_config
    if args.timeout is not None and args.timeout <= 0:
        raise RunnerError(f"--timeout must be positive, got {args.timeout}")
    measure = measure_group = None
    if args.measure_module:  # testing hook: a module with measure_cell / measure_group
        measure = f"{args.measure_module}:measure_cell"
        mod = importlib.import_module(args.measure_module)
        if hasattr(mod, "measure_group"):
            measure_group = f"{args.measure_module}:measure_group"
    summary = run_config(args.config, only=args.only, run_id=args.run_id,
                         results_dir=args.results, resume=args.resume,
                         retry_failed=args.retry_failed, timeout=args.timeout,
                         dry_run=args.dry_run, measure=measure, measure_group=measure_group,
                         plugins=_loaded_plugins(args),
                         progress=not args.no_progress)
    return 0 if args.dry_run else summary.exit_code
