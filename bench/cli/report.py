"""``attnbench report``: write tables and plots from ``results/`` into ``reports/``."""
from __future__ import annotations

import sys

from attnbench.report.build import DEFAULT_FORMATS, generate, parse_formats


def register_cli(sub, parent) -> None:
    p = sub.add_parser(
        "report", parents=[parent], help="write tables and plots from results/ into reports/",
        description="Turn the measurements in results/ into Markdown (and LaTeX) tables, "
                    "seaborn plots and an index (reports/README.md). Measures nothing; one "
                    "report per run and device, never mixing devices or runs.")
    p.add_argument("--results", default="results", metavar="DIR",
                   help="results folder to read (default: results)")
    p.add_argument("--out", default="reports", metavar="DIR",
                   help="folder to write the report into (default: reports)")
    p.add_argument("--latex", action="store_true", help="also write each table as LaTeX (.tex)")
    p.add_argument("--run", nargs="+", action="extend", default=None, metavar="RUN_ID",
                   help="report only these runs (default: every run in --results)")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS), metavar="FMT[,FMT]",
                   help="plot file formats, comma-separated, from png, svg, pdf "
                        "(default: png,svg; 'none' for no plots)")
    p.set_defaults(func=run)


def run(args) -> int:
    result = generate(args.results, args.out, runs=args.run, latex=args.latex,
                      formats=parse_formats(args.formats))
    for note in result.notes:  # also in the report: runs skipped, rows not taken as they are
        print(f"attnbench: note: {note.replace('`', '')}", file=sys.stderr)
    print(f"wrote {result.readme} ({len(result.groups)} report(s), {len(result.tables)} "
          f"table(s), {len(result.plots)} plot file(s))")
    return 0
