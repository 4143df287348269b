"""``attnbench efficiency``: paired speed ratios beside the FLOPs limit (issue 13)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

from attnbench.cli.args import POSITIVE_FLOAT, POSITIVE_INT, check_device, int_list, \
    number_type, parse_stages, parse_value
from attnbench.modules.registry import AttnbenchError, OptionError


def register_cli(sub, parent) -> None:
    p = sub.add_parser(
        "efficiency", parents=[parent],
        help="each module's paired speed ratio beside its FLOPs limit (plain/module FLOPs)",
        description="Times every module of configs/default.toml (plus --module extras) "
                    "against the plain backbone and an A/A control in interleaved rounds, "
                    "at each batch and mode, and prints the paired speed ratio with its 95 %% "
                    "interval beside the ratio its FLOPs allow.")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--resolution", type=number_type(int, 8), default=224)
    p.add_argument("--batches", default="1,8", help="comma-separated (default 1,8)")
    p.add_argument("--modes", default="eval,train", help="comma-separated (default eval,train)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=POSITIVE_INT, default=None)
    p.add_argument("--module", action="append", default=[], metavar="NAME[:K=V,...]",
                   help="add a module variant, e.g. aw:formulation=taps (repeatable)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="time only these registered names (repeatable; default: all)")
    p.add_argument("--ci-target", type=POSITIVE_FLOAT, default=0.015,
                   help="stop adding rounds when every interval is within +-this (0.015)")
    p.add_argument("--min-rounds", type=POSITIVE_INT, default=10)
    p.add_argument("--max-rounds", type=POSITIVE_INT, default=400)
    p.add_argument("--budget-s", type=POSITIVE_FLOAT, default=120.0, help="seconds per group")
    p.add_argument("--layers", action="store_true",
                   help="instead of whole models: every AW-conv shape of the backbone, each "
                        "exact formulation's paired ratio to the dense conv it replaces")
    p.add_argument("--versus", action="append", default=[], metavar="OURS=THEIRS",
                   help="instead of whole models: module OURS against another implementation "
                        "THEIRS (e.g. a plugin's), on each map it sees in the backbone; "
                        "ratio = their time / ours (repeatable)")
    p.add_argument("--runs", type=POSITIVE_INT, default=1,
                   help="repeat the measurement in this many fresh processes, one after "
                        "another, and give each ratio's mean with a 95 %% interval over the "
                        "runs (a run's own interval misses what changes between processes "
                        "and over minutes) (1)")
    p.add_argument("--rows-out", default=None, help=argparse.SUPPRESS)  # one run of --runs
    p.add_argument("--block-rounds", type=POSITIVE_INT, default=10,
                   help="rounds per block; every model is re-instantiated between blocks "
                        "and the interval is taken over blocks (10)")
    p.set_defaults(func=run)


def _extra(text: str):
    name, _, rest = text.partition(":")
    opts: Dict[str, Any] = {}
    stages = None
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise OptionError(f"--module {text!r}: expected NAME:KEY=VALUE,...")
        if key.strip() == "stages":
            stages = parse_stages(value)
        else:
            opts[key.strip()] = parse_value(value)
    return name.strip(), opts, stages


def _modes(text: str) -> tuple:
    """``--modes``: ``eval``, ``train`` or both, comma-separated."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes or any(m not in ("eval", "train") for m in modes):
        raise OptionError(f"--modes {text!r}: expected eval, train or eval,train")
    return modes


def run(args) -> int:
    from attnbench.matrix import efficiency as E
    check_device(args.device)
    if args.min_rounds > args.max_rounds:
        raise OptionError(f"--min-rounds {args.min_rounds} is above --max-rounds "
                          f"{args.max_rounds}")
    s = E.Settings(backbone=args.backbone, resolution=args.resolution,
                   batches=tuple(int_list(args.batches, "--batches")),
                   modes=_modes(args.modes), device=args.device,
                   threads=args.threads, min_rounds=args.min_rounds,
                   ci_target=args.ci_target, max_rounds=args.max_rounds,
                   budget_s=args.budget_s, block_rounds=args.block_rounds)
    say = lambda t: print(t, file=sys.stderr, flush=True)  # noqa: E731
    if args.layers or args.versus:
        if args.only or args.module or (args.layers and args.versus):
            raise OptionError("--layers and --versus time single layers, one of them alone: "
                              "drop --only/--module")
        if args.runs > 1:
            raise OptionError("--runs repeats the whole-model table; --layers and --versus "
                              "take one run (judge a change with old and new in one run)")
        if args.layers:
            print(_layer_table(s, E.aw_layer_rows(s, progress=say)))
            return 0
        rows = [r for text in args.versus for r in E.versus_rows(s, *_pair(text), progress=say)]
        print(_versus_table(s, rows))
        return 0
    modules = [m for m in E.default_modules() if not args.only or m[0] in args.only]
    unknown = sorted(set(args.only) - {m[0] for m in E.default_modules()})
    if unknown:
        raise OptionError(f"--only {', '.join(unknown)}: not a module of configs/default.toml "
                          f"({', '.join(dict.fromkeys(m[0] for m in E.default_modules()))})")
    modules += [_extra(t) for t in args.module]
    if args.rows_out:  # one run of --runs K, in its own process: its rows, no table
        with open(args.rows_out, "w") as f:
            json.dump(E.ratio_rows(s, modules, progress=say), f, default=str)
        return 0
    limits = E.flops_limits(E.flops_rows(s, modules))
    if args.runs > 1:
        rows = E.combine_runs([_run_apart(args, i, say) for i in range(args.runs)])
    else:
        rows = E.ratio_rows(s, modules, progress=say)
    print(_table(s, rows, limits, args.runs))
    return 0


def _run_apart(args, i: int, say) -> List[Dict[str, Any]]:
    """Run ``i`` of ``--runs``: this command in a fresh Python process (the same command
    line and interpreter), its progress on stderr; its rows."""
    fd, path = tempfile.mkstemp(prefix="attnbench-efficiency-", suffix=".json")
    os.close(fd)
    # the command as given; the child's --rows-out returns before --runs is looked at
    argv = [sys.executable, "-m", "attnbench", *args.argv, "--rows-out", path]
    say(f"run {i + 1} of {args.runs} (a fresh process)")
    try:
        code = subprocess.run(argv).returncode
        if code != 0:
            raise AttnbenchError(f"efficiency --runs: run {i + 1} of {args.runs} failed "
                                 f"(exit {code}; its message is above)")
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def _table(s, rows: List[Dict[str, Any]], limits, runs: int = 1) -> str:
    from tabulate import tabulate
    keys = [(b, m) for b in s.batches for m in s.modes]
    ratio = {(r["label"], r["batch"], r["mode"]): r for r in rows
             if r["metric"] == "speed_ratio" and r["status"] == "ok"}
    labels = list(dict.fromkeys(r["label"] for r in rows if r["metric"] == "latency"))
    table = []
    for label in labels:
        gm, lim = limits.get(label, (float("nan"), float("nan")))
        line = [label, f"{gm:.3f}", f"{lim:.3f}"]
        for b, m in keys:
            r = ratio.get((label, b, m))
            line.append("-" if r is None else _ratio_text(r))
        table.append(line)
    control = ["control (A/A)", "", "1.000"]
    for b, m in keys:
        r = ratio.get(("none", b, m))
        control.append("-" if r is None or r.get("control_ratio") is None else
                       f"{r['control_ratio']:.3f} [{r['control_lo']:.3f}, {r['control_hi']:.3f}]")
    table.append(control)
    headers = ["module", "GMac", "FLOPs limit"] + [f"b{b} {m}" for b, m in keys]
    stops = sorted({f"{r['stop']} ({r['rounds']} rounds, {r.get('blocks') or 1} blocks)"
                    for r in ratio.values()})
    over = (f"estimate [95 % CI] over blocks of {s.block_rounds} interleaved rounds (mean of "
            f"block medians, Student t; fresh instances each block)" if runs == 1 else
            f"mean [95 % CI] over {runs} runs in fresh processes, one after another (Student "
            f"t over the runs; the run estimates after it), each run over blocks of "
            f"{s.block_rounds} interleaved rounds (mean of block medians; fresh instances "
            f"each block)")
    head = (f"{s.backbone} at {s.resolution}², device {s.device}, paired speed ratio to the "
            f"plain backbone: {over}, target +-{100 * s.ci_target:g} %; FLOPs limit = plain "
            f"GMac / module GMac (fvcore)\n"
            f"groups stopped by: {'; '.join(stops)}")
    return head + "\n" + tabulate(table, headers, tablefmt="github")


def _ratio_text(r) -> str:
    lo, hi = r.get("ratio_lo"), r.get("ratio_hi")
    text = f"{r['value']:.3f}"
    if lo is not None and hi is not None:
        text += f" [{lo:.3f}, {hi:.3f}]"
    if r.get("runs"):
        text += " (" + ", ".join(f"{v:.3f}" for v in r["runs"]) + ")"
    return text + (" ≈" if r.get("distinct") is False else "")


def _layer_table(s, rows: List[Dict[str, Any]]) -> str:
    """``--layers``: one line per AW-conv shape x batch x mode; * marks the automatic
    choice, the best estimate is in bold."""
    from tabulate import tabulate
    from attnbench.modules.aw import FORMULATIONS
    forms = FORMULATIONS[1:]
    table = []
    for r in rows:
        best = max((f for f in forms if f in r["ratio"]), key=lambda f: r["ratio"][f].estimate,
                   default=None)
        cells = []
        for f in forms:
            text = _interval_text(r["ratio"].get(f))
            text = f"**{text}**" if f == best else text
            cells.append(text + (" *" if f == r["auto"] else ""))
        table.append([r["layer"], r["count"], f"{r['median_ms']['dense conv']:.2f}"] + cells
                     + [_rounds_text(r)])
    head = (f"AW-{s.backbone} at {s.resolution}², device {s.device}: each AW-conv shape "
            f"(C1 x H x W of its input, stride), paired ratio dense conv time / formulation time "
            f"[95 % CI] over blocks of {s.block_rounds} interleaved rounds (fresh instances "
            f"each block); * = the automatic choice, bold = the best estimate\n"
            f"methods: {_methods(rows)}")
    return head + "\n" + tabulate(table, ["layer", "count", "dense conv ms"] + list(forms)
                                   + ["rounds"], tablefmt="github")


def _pair(text: str):
    """``--versus OURS=THEIRS``: two registered module names."""
    from attnbench.modules.registry import REGISTRY
    ours, sep, theirs = (t.strip() for t in text.partition("="))
    if not sep or not ours or not theirs:
        raise OptionError(f"--versus {text!r}: expected OURS=THEIRS, e.g. se=timm_se")
    for name in (ours, theirs):
        REGISTRY.get(name)  # unknown names: the registry's message with the closest names
    return ours, theirs


def _versus_table(s, rows: List[Dict[str, Any]]) -> str:
    from tabulate import tabulate
    table = [[r["pair"], r["layer"], r["count"], f"{r['theirs_ms']:.3f}", f"{r['ours_ms']:.3f}",
              _interval_text(r["ratio"]), _interval_text(r["control"]), _rounds_text(r)]
             for r in rows]
    head = (f"{s.backbone} at {s.resolution}², device {s.device}: each module on the maps it "
            f"sees (C x H x W), ours against theirs in interleaved rounds; their time / our "
            f"time [95 % CI] over blocks of {s.block_rounds} rounds (fresh instances each "
            f"block); above 1: ours is faster; control: theirs against a second instance "
            f"of theirs\nmethods: {_methods(rows)}")
    return head + "\n" + tabulate(table, ["pair", "map", "count", "theirs ms", "ours ms",
                                          "theirs / ours", "control (A/A)", "rounds"],
                                   tablefmt="github")


def _rounds_text(r) -> str:
    return f"{r['rounds']} ({r['stop']})"


def _methods(rows: List[Dict[str, Any]]) -> str:
    """The rows' timing methods, each once (round counts and stop reasons: ``rounds``)."""
    return "; ".join(dict.fromkeys(r["scheme"] for r in rows))


def _interval_text(iv) -> str:
    """An interval of ``--layers``/``--versus`` as ``estimate [lo, hi]`` ("failed": none)."""
    return "failed" if iv is None else f"{iv.estimate:.3f} [{iv.lo:.3f}, {iv.hi:.3f}]"
