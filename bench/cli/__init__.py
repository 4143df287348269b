"""The ``attnbench`` command line.

Each subcommand lives in its own module, which defines ``register_cli(subparsers)``
(adding its parser and ``set_defaults(func=...)``); this file only assembles them
and loads plugins (``--plugin`` on every command) before dispatching.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# module providing each subcommand, in the order --help lists them; each defines
# ``register_cli(subparsers, parent)``. All argparse code of attnbench lives in this package.
COMMAND_MODULES = [
    "attnbench.cli.listing",
    "attnbench.cli.profile",
    "attnbench.cli.run",
    "attnbench.cli.report",
    "attnbench.cli.train",        # train
    "attnbench.cli.data",         # make-data
    "attnbench.cli.robustness",
    "attnbench.cli.demo",         # robustness-demo
    "attnbench.cli.check_module",
]


def _plugin_parent(dest: str) -> argparse.ArgumentParser:
    """``--plugin``, accepted before and after the subcommand (two dests, merged in main)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--plugin", action="append", default=[], dest=dest,
                        metavar="FILE_OR_MODULE",
                        help="load attention modules from a Python file or dotted module "
                             "name before running (repeatable)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parent = _plugin_parent("plugin_after")
    parser = argparse.ArgumentParser(
        prog="attnbench", parents=[_plugin_parent("plugin")],
        description="Comparative benchmark suite for attention modules in CNNs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        mod = importlib.import_module(name)
        mod.register_cli(sub, parent)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.plugin = list(args.plugin) + list(getattr(args, "plugin_after", []))
    from attnbench.modules.registry import AttnbenchError
    try:
        from attnbench.plugins import loader as plugins
        plugins.load_all(args.plugin)
        return int(args.func(args) or 0)
    except AttnbenchError as err:
        print(f"attnbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
