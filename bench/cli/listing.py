"""``attnbench list``: the registered attention modules and backbones."""
from __future__ import annotations

from tabulate import tabulate


def register_cli(sub, parent) -> None:
    p = sub.add_parser("list", parents=[parent], help="list registered attention modules",
                       description="List registered attention modules, their kind, default "
                                   "options, default stages and paper.")
    p.set_defaults(func=run)


def run(args) -> int:
    from attnbench import modules
    from attnbench.modules.builder import BACKBONES
    rows = []
    for spec in modules.list_modules():
        opts = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items()) or "-"
        rows.append([spec.name, spec.kind, spec.display(), opts,
                     ",".join(map(str, spec.stages)), spec.paper or "-",
                     spec.source])
    print(tabulate(rows, headers=["name", "kind", "label", "default options", "stages",
                                  "paper", "source"]))
    print(f"\nbackbones: {', '.join(BACKBONES)}")
    return 0
