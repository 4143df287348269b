"""``attnbench compare RUN_A RUN_B``: two runs' speed ratios side by side."""
from __future__ import annotations

from pathlib import Path

from attnbench.modules.registry import AttnbenchError


def register_cli(sub, parent) -> None:
    p = sub.add_parser("compare", parents=[parent],
                       help="two runs' speed ratios side by side (reproducibility check)",
                       description="For every speed ratio timed in both runs: both ratios "
                                   "with their 95 %% intervals, the difference, and whether "
                                   "each lies in the other's interval; the A/A control too.")
    p.add_argument("run_a", help="a run folder (results/<run_id>) or run id")
    p.add_argument("run_b", help="a second run folder or run id")
    p.add_argument("--results", default="results", help="where run ids are looked up")
    p.set_defaults(func=run)


def _folder(text: str, results: str) -> Path:
    for p in (Path(text), Path(results) / text):
        if (p / "rows.jsonl").is_file():
            return p
    raise AttnbenchError(f"compare: {text!r} is not a run folder with rows.jsonl "
                         f"(nor a run id under {results}/)")


def run(args) -> int:
    from attnbench.report.compare import compare, compare_text
    a, b = _folder(args.run_a, args.results), _folder(args.run_b, args.results)
    records = compare(a, b)
    if not records:
        raise AttnbenchError(f"compare: {a} and {b} have no speed ratio in common")
    print(compare_text(records, a.name, b.name))
    return 0
