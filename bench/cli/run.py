"""``attnbench run CONFIG``: run a benchmark matrix (:func:`attnbench.matrix.runner.run_config`)."""
from __future__ import annotations

import argparse
import errno
import importlib
from typing import List

from attnbench.cli.args import POSITIVE_FLOAT, POSITIVE_INT


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
                   help="resume the one unfinished run of this config (or --run-id); when "
                        "several could be meant, or none is unfinished, say which there are")
    p.add_argument("--retry-failed", action="store_true",
                   help="on resume, run failed cells again")
    p.add_argument("--allow-env-change", action="store_true",
                   help="resume even on another device, torch version or thread count than "
                        "the run's env.json records (the change is recorded there)")
    p.add_argument("--timeout", type=POSITIVE_FLOAT, default=None, metavar="S",
                   help="per-cell (per interleaved group) timeout in seconds, overriding "
                        "the config's timing.timeout_s")
    p.add_argument("--jobs", type=POSITIVE_INT, default=None, metavar="N",
                   help="measure N untimed units (params, FLOPs, memory) at once, each in its "
                        "own worker; timed units always run alone, after them (default: the "
                        "config's jobs, 1)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells that would run, run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="where the units run: local worker processes (default), or Ray tasks "
                        "that each hold one GPU (CUDA timing) or the config's threads (CPU); "
                        "needs `pip install 'attnbench[ray]'`")
    p.add_argument("--address", default=None, metavar="ADDRESS",
                   help="with --backend ray: the Ray cluster to join (auto, HOST:6379, "
                        "ray://HOST:10001; default: RAY_ADDRESS, else the cluster `ray start` "
                        "started on this machine, else a new local Ray instance)")
    p.add_argument("--measure-module", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _loaded_plugins(args) -> List[str]:
    """The plugins loaded in this process, for the workers to load again."""
    try:
        from attnbench.plugins.loader import loaded_plugins
        return list(loaded_plugins())
    except ImportError:  # pragma: no cover
        return list(getattr(args, "plugin", []) or [])


def _resolve_run(args) -> None:
    """Check what can be checked before any cell runs: --results, the config (with every
    module's options, by its factory), its device, and the run ``--resume`` means."""
    from pathlib import Path

    from attnbench.matrix.config import ConfigError, load_config
    from attnbench.matrix.resume import check_env, pick_run
    results = Path(args.results)
    if results.exists() and not results.is_dir():
        raise ConfigError(f"--results {results}: is a file, not a folder")
    if not args.dry_run:
        from attnbench.results import check_writable
        check_writable(results, "--results", folder=True)
    cfg = load_config(args.config)
    if not args.dry_run and cfg.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"{cfg.where}: device = {cfg.device!r}: no CUDA device is "
                              f"available on this machine; run it where there is one, or set "
                              f"device = \"cpu\" (--dry-run lists its cells anyway)")
    if args.resume and args.run_id is None:
        args.run_id = pick_run(cfg, results, args.only, args.retry_failed)
        if args.run_id is None:
            print(f"attnbench: no earlier run of {cfg.name!r} under {results}; starting a new "
                  f"one", flush=True)
            args.resume = False
    if args.run_id is not None:
        check_env(results / args.run_id)


def run(args) -> int:
    from attnbench.matrix.runner import run_config
    _resolve_run(args)
    measure = measure_group = None
    if args.measure_module:  # testing hook: a module with measure_cell / measure_group
        measure = f"{args.measure_module}:measure_cell"
        mod = importlib.import_module(args.measure_module)
        if hasattr(mod, "measure_group"):
            measure_group = f"{args.measure_module}:measure_group"
    try:
        summary = run_config(args.config, only=args.only, run_id=args.run_id,
                             results_dir=args.results, resume=args.resume,
                             retry_failed=args.retry_failed, timeout=args.timeout,
                             allow_env_change=args.allow_env_change,
                             dry_run=args.dry_run, measure=measure, measure_group=measure_group,
                             plugins=_loaded_plugins(args),
                             progress=not args.no_progress,
                             backend=args.backend, address=args.address, jobs=args.jobs)
    except OSError as err:  # a full or read-only disk met by a write that names no file
        if err.filename or err.errno not in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            raise
        from attnbench.results import ResultsWriteError
        raise ResultsWriteError(f"--results {args.results}: cannot write ({err.strerror}); "
                                f"the rows written before are intact") from err
    return 0 if args.dry_run else summary.exit_code
