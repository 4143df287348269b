"""``attnbench profile BACKBONE MODULE``: one model's parameters, FLOPs (fvcore and
ptflops), latency/throughput and peak memory in one table, beside the papers' figures
where a paper reports this exact configuration."""
from __future__ import annotations

import argparse
import platform
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from attnbench.cli.args import NONNEG_INT, POSITIVE_INT, check_device, number_type, \
    parse_options, parse_stages, parse_value  # noqa: F401
from attnbench.modules.registry import OptionError
from attnbench.results import Cell

# (backbone, label, exact parameter count or None) -> (params M, GFLOPs or None, source)
# Exact counts: REFERENCE.md (the configuration the paper row used); None: label only.
TDAM = "TDAM Table 1"
PAPER: Dict[Tuple[str, str, Optional[int]], Tuple[float, Optional[float], str]] = {
    ("resnet50", "none", 25_557_032): (25.56, 4.12, TDAM),
    ("resnet50", "SE", 28_071_976): (28.07, 4.13, TDAM),
    ("resnet50", "CBAM", 28_073_576): (28.07, 4.14, TDAM),
    ("resnet50", "ECA", 25_557_118): (25.56, 4.13, TDAM),
    ("resnet50", "FCA-TS", 28_071_976): (28.07, 4.13, TDAM),
    ("resnet50", "TDjoint(T=2,m=1)", 27_645_992): (27.65, 4.59, TDAM),
    ("resnet50", "TDtop(T=2,m=1)", 27_056_168): (27.06, 4.59, TDAM),
    ("resnet50", "TDtop(T=2,m=3)", 27_655_208): (27.66, 5.98, TDAM),
    ("resnet101", "none", 44_549_160): (44.55, 7.85, TDAM),
    ("resnet101", "SE", 49_292_328): (49.29, 7.86, TDAM),
    ("resnet101", "CBAM", 49_295_628): (49.29, 7.88, TDAM),
    ("resnet101", "FCA-TS", 49_292_328): (49.29, 7.86, TDAM),
    ("resnet101", "TDjoint(T=2,m=1)", 46_754_856): (46.75, 8.37, TDAM),
    ("resnet101", "TDjoint(T=2,m=1)", 45_937_704): (45.94, 8.01, TDAM + " (L4)"),
    ("resnet50", "AW", None): (25.72, None, "AW paper Table 1"),
    ("resnet50", "AW-SE", None): (28.25, None, "AW paper Table 1"),
    ("resnet50", "TDAF(N=3,ANAR-3)", None): (29.9, 5.4, "TDAF paper"),
}


def paper_figures(backbone: str, label: str, params: int):
    """(params M, GFLOPs, source) of the paper row for this build, or None."""
    key = (backbone.lower(), label, int(params))
    if key in PAPER:
        return PAPER[key]
    return PAPER.get((backbone.lower(), label, None))


def register_cli(sub, parent) -> None:
    p = sub.add_parser(
        "profile", parents=[parent], help="profile one model (params, FLOPs, speed, memory)",
        description="Build BACKBONE with attention MODULE ('none' for the plain backbone) "
                    "and print its parameters, attention parameters, FLOPs by fvcore and "
                    "ptflops (GMac at batch 1, with the paper's figure where a paper "
                    "reports this configuration), latency and throughput (eval and train "
                    "step; timed in interleaved rounds with the plain backbone, giving "
                    "the speed ratio) and peak memory, on the chosen device.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("backbone", help="resnet18, resnet34, resnet50 or resnet101")
    p.add_argument("module", help="registered attention module, or 'none'")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="module option (repeatable); VALUE is parsed as JSON when it can "
                        "be (2, true, \"top\", [1,2]), else taken as a string")
    p.add_argument("--stages", default=None,
                   help="stage selection: 'all', a preset name (e.g. 'paper'), or JSON "
                        "such as '[3,4]' or '{\"3\": [0,1,2,3,4], \"4\": \"all\"}'")
    p.add_argument("--resolution", type=number_type(int, 8), default=224,
                   help="input side in pixels (>= 8)")
    p.add_argument("--batch", type=POSITIVE_INT, default=8,
                   help="batch size for speed and memory")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:0, ...)")
    p.add_argument("--mode", choices=["eval", "train", "both"], default="both",
                   help="which step speed and memory are measured for")
    p.add_argument("--no-speed", action="store_true", help="skip latency and throughput")
    p.add_argument("--no-memory", action="store_true", help="skip peak memory")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP counts")
    p.add_argument("--alone", action="store_true",
                   help="time the model alone instead of in interleaved rounds with the "
                        "plain backbone (no speed ratio)")
    p.add_argument("--repeats", type=POSITIVE_INT, default=5, help="timed runs (rounds)")
    p.add_argument("--warmup", type=NONNEG_INT, default=2, help="untimed warm-up runs")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch threads (CPU)")
    p.add_argument("--amp", action="store_true", help="autocast (float16 CUDA, bfloat16 CPU)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="autocast dtype of timing and memory (fp16: CUDA only); default fp32, "
                        "or what --amp means")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model for timing and memory (its compiling first "
                        "call is reported apart, compile_s); FLOPs stay those of the eager "
                        "model")
    p.add_argument("--block-rounds", type=POSITIVE_INT, default=None,
                   help="interleaved rounds per block of fresh model instances; the interval "
                        "is then taken over blocks (default: one block)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--num-classes", type=POSITIVE_INT, default=1000, help="classifier outputs")
    p.add_argument("--stock-flops", action="store_true",
                   help="FLOPs with the counters' stock rules only (REFERENCE.md's fvcore "
                        "convention) instead of attnbench's added rules")
    p.set_defaults(func=run)


def device_label(device: str, threads: Optional[int] = None) -> str:
    import torch
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {device}: CUDA is not available on this machine")
        return f"{device} ({torch.cuda.get_device_name(dev)})"
    try:
        from attnbench.profilers.env import cpu_model
        name = cpu_model()
    except Exception:  # noqa: BLE001
        name = platform.processor() or platform.machine()
    return f"cpu ({name}, {threads or torch.get_num_threads()} threads)"


Line = List[str]
Rows = Sequence[Mapping[str, Any]]


def _fmt(value: Optional[float], spec: str) -> str:
    """``value`` formatted with ``spec``; a missing value (not finite) as ``nan``."""
    return format(float("nan") if value is None else value, spec)


def _profile_cell(args) -> Cell:
    """The :class:`attnbench.results.Cell` the flags describe (metrics: params)."""
    options = parse_options(args.option)
    stages = parse_stages(args.stages)
    check_device(args.device)
    for name, value in (("--resolution", args.resolution), ("--batch", args.batch),
                        ("--repeats", args.repeats)):
        if value < 1:
            raise OptionError(f"{name} must be a positive integer, got {value}")
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        raise OptionError(f"--precision fp16 needs a CUDA device (--device {args.device}); "
                          f"autocast on the CPU is bfloat16: use --precision bf16")
    if args.precision and args.amp:
        raise OptionError("--amp and --precision: give one (--amp is fp16 on CUDA, bf16 on "
                          "the CPU)")
    return Cell(backbone=args.backbone,
                module="none" if args.module.lower() == "none" else args.module,
                options=options, stages=stages, resolution=args.resolution, batch=args.batch,
                mode=None if args.mode == "both" else args.mode, device=args.device,
                metrics=("params",), warmup=args.warmup, repeats=args.repeats,
                amp=args.amp, channels_last=args.channels_last, threads=args.threads,
                num_classes=args.num_classes, precision=args.precision or "fp32",
                compile=bool(args.compile), block_rounds=args.block_rounds)


def run(args) -> int:
    """Measure the flags' cell metric by metric (as the matrix does) and print the table."""
    from attnbench.matrix.measure import measure_cell
    cell = _profile_cell(args)
    counts = {r["metric"]: r for r in measure_cell(cell, strict=True)}
    label = counts["params"]["label"]
    dev_text = device_label(args.device, args.threads)
    n_params = int(counts["params"]["value"])
    paper = paper_figures(args.backbone, label, n_params) if args.num_classes == 1000 else None
    lines = _param_lines(counts, args.backbone, paper)
    if not args.no_flops:
        p_flops = f"{paper[1]:.2f}" if paper and paper[1] is not None \
            and args.resolution == 224 else ""  # the papers count at 224px
        flops = measure_cell(cell.replace(metrics=("flops",), mode=None, compile=False),
                             flop_rules=not args.stock_flops, strict=True)
        lines.extend(_flop_lines(flops, p_flops, args.resolution))
    if not args.no_speed:
        lines.extend(_speed_lines(_speed_rows(cell, args.alone), args.device))
    if not args.no_memory:
        memory = measure_cell(cell.replace(metrics=("memory",)), strict=True)
        lines.extend(_memory_lines(memory, args.device))
    _print_table(f"{args.backbone} + {label}  |  resolution {args.resolution}px, batch "
                 f"{args.batch}  |  device: {dev_text}", lines, paper)
    return 0


def _print_table(title: str, lines: List[Line], paper) -> None:
    from tabulate import tabulate
    print(title)
    print(tabulate(lines, headers=["quantity", "value", "unit", "paper", "method"],
                   disable_numparse=True, colalign=("left", "right", "left", "right", "left")))
    if paper:
        print(f"\npaper: {paper[2]} (the same configuration: backbone, label and parameter "
              f"count); FLOPs in the paper are fvcore-style multiply-adds at 224px.")


def _param_lines(counts: Mapping[str, Mapping[str, Any]], backbone: str, paper) -> List[Line]:
    """The params and attention params lines (``counts``: the params rows by metric)."""
    p_params = f"{paper[0]:.2f} M" if paper else ""
    added = counts["params_attention"]["value"]
    return [["params", f"{int(counts['params']['value']):,}", "count", p_params,
             "sum of parameter numel"],
            ["attention params", "nan" if added is None else f"{int(added):,}", "count", "",
             f"minus plain {backbone}"]]


def _flop_lines(rows: Rows, p_flops: str, resolution: int) -> List[Line]:
    """A line per counter (named by its method) and the disagreement line."""
    lines = []
    for r in rows:
        if r["metric"] == "flops":
            counter = r["method"].split("+")[0]
            lines.append([f"FLOPs {counter}", _fmt(r["value"], ".3f"), "GMac", p_flops,
                          f"{r['method']}, batch 1, {resolution}px"])
        else:
            disagree = r["method"].startswith("DISAGREE")
            lines.append(["FLOPs disagreement", _fmt(r["value"], ".2f"), "%", "",
                          "DISAGREE (> 2 %)" if disagree else "ptflops vs fvcore"])
    return lines


def _speed_rows(cell: Cell, alone: bool) -> List[Mapping[str, Any]]:
    """Latency rows: the model timed in interleaved rounds with the plain backbone
    (speed ratio), or alone (``--alone``, the plain backbone itself)."""
    from attnbench.matrix.measure import measure_cell, measure_group
    timed = cell.replace(metrics=("latency",))
    if cell.plain or alone:
        return measure_cell(timed, strict=True)
    return measure_group([timed], strict=True)


def _by_mode(rows: Rows) -> List[Tuple[str, Dict[str, Mapping[str, Any]]]]:
    """``[(mode, {metric: row})]`` in the order the rows have them."""
    out: Dict[str, Dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["mode"], {})[r["metric"]] = r
    return list(out.items())


def _speed_lines(rows: Rows, device: str) -> List[Line]:
    """Latency, throughput and (interleaved) speed-ratio lines of each mode."""
    unit_dev = f"({device})"
    lines = []
    for mode, r in _by_mode(rows):
        lat = r["latency"]
        lines.append([f"latency {mode}", _fmt(lat["value"], ".2f"), f"ms/batch {unit_dev}", "",
                      f"median [p25 {_fmt(r['latency_p25']['value'], '.2f')}, p75 "
                      f"{_fmt(r['latency_p75']['value'], '.2f')}]; {lat['method']}"])
        lines.append([f"throughput {mode}", _fmt(r["throughput"]["value"], ".1f"),
                      f"img/s {unit_dev}", "", "absolute: batch / median latency"])
        ratio = r.get("speed_ratio")
        if ratio is not None and ratio.get("value") is not None:
            lines.append(_ratio_line(mode, ratio))
    return lines


def _ratio_line(mode: str, ratio: Mapping[str, Any]) -> Line:
    """The paired speed ratio with its 95 % interval and the A/A control's."""
    ctrl = ""
    if ratio.get("control_ratio") is not None:
        ctrl = (f"; A/A control {_fmt(ratio['control_ratio'], '.3f')} "
                f"[{_fmt(ratio.get('control_lo'), '.3f')}, {_fmt(ratio.get('control_hi'), '.3f')}]")
        if ratio.get("distinct") is False:
            ctrl += "; indistinguishable from the plain backbone"
    return [f"speed ratio {mode}", _fmt(ratio["value"], ".3f"), "x vs plain", "",
            f"paired, {ratio.get('rounds')} rounds in {ratio.get('blocks') or 1} block(s), "
            f"95 % CI "
            f"[{_fmt(ratio.get('ratio_lo'), '.3f')}, {_fmt(ratio.get('ratio_hi'), '.3f')}], "
            f"stopped by {ratio.get('stop')}{ctrl}"]


def _memory_lines(rows: Rows, device: str) -> List[Line]:
    """A peak memory line per mode."""
    return [[f"peak memory {r['mode']}", _fmt(r["value"], ".1f"), f"MiB ({device})", "",
             r["method"].split(":")[0]] for r in rows]
