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
    "attnbench.cli.efficiency",
    "attnbench.cli.compare",
]


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, ``attnbench: error: ...``."""

    def error(self, message: str):
        command = self.prog.partition(" ")[2]
        where = f"{command}: " if command else ""
        self.exit(2, f"attnbench: error: {where}{message} (see {self.prog} --help)\n")


def _plugin_parent(dest: str, debug_dest: str) -> argparse.ArgumentParser:
    """``--plugin`` and ``--debug``, accepted before and after the subcommand (two dests
    each, merged in main)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--plugin", action="append", default=[], dest=dest,
                        metavar="FILE_OR_MODULE",
                        help="load attention modules from a Python file or dotted module "
                             "name before running (repeatable)")
    parent.add_argument("--debug", action="store_true", default=False, dest=debug_dest,
                        help="on an error, show the full traceback instead of one line")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parent = _plugin_parent("plugin_after", "debug_after")
    parser = Parser(
        prog="attnbench", parents=[_plugin_parent("plugin", "debug")],
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given (efficiency --runs)
    args.plugin = list(args.plugin) + list(getattr(args, "plugin_after", []))
    args.debug = bool(args.debug or getattr(args, "debug_after", False))
    from attnbench.modules.registry import AttnbenchError
    try:
        from attnbench.plugins import loader as plugins
        plugins.load_all(args.plugin)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("attnbench: interrupted", file=sys.stderr)
        return 130
    except (AttnbenchError, OSError) as err:
        return _fail(args, error_line(err))
    except Exception as err:  # noqa: BLE001 - one line unless --debug
        text = " ".join(str(err).split())
        return _fail(args, f"{type(err).__name__}: {text} (an unexpected error; rerun with "
                           f"--debug for the traceback)")


def error_line(err: BaseException) -> str:
    """The one-line message of a user error: an :class:`AttnbenchError`'s text, or for an
    ``OSError`` (unwritable place, full disk) the file and the reason."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return " ".join(str(err).split()) or type(err).__name__


def _fail(args, message: str) -> int:
    """Print ``attnbench: error: MESSAGE`` (and the traceback with ``--debug``); exit 2."""
    if getattr(args, "debug", False):
        import traceback
        traceback.print_exc()
    print(f"attnbench: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
