"""``attnbench profile BACKBONE MODULE``: one model's parameters, FLOPs (fvcore and
ptflops), latency/throughput and peak memory in one table, beside the papers' figures
where a paper reports this exact configuration."""
from __future__ import annotations

from attnbench.cli.args import parse_options, parse_stages, parse_value  # noqa: F401

import argparse
import platform
from typing import Any, Dict, List, Optional, Tuple

from attnbench.modules.registry import OptionError

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
    p.add_argument("--resolution", type=int, default=224, help="input side in pixels")
    p.add_argument("--batch", type=int, default=8, help="batch size for speed and memory")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:0, ...)")
    p.add_argument("--mode", choices=["eval", "train", "both"], default="both",
                   help="which step speed and memory are measured for")
    p.add_argument("--no-speed", action="store_true", help="skip latency and throughput")
    p.add_argument("--no-memory", action="store_true", help="skip peak memory")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP counts")
    p.add_argument("--alone", action="store_true",
                   help="time the model alone instead of in interleaved rounds with the "
                        "plain backbone (no speed ratio)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (rounds)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--amp", action="store_true", help="autocast (float16 CUDA, bfloat16 CPU)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs")
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


def _fmt_count(n: int) -> str:
    return f"{n:,}"


def run(args) -> int:
    import torch
    from tabulate import tabulate

    import attnbench.modules  # noqa: F401 - built-in registrations
    from attnbench.modules.builder import build_model

    from attnbench.profilers import flops as F_
    from attnbench.profilers import memory as M_
    from attnbench.profilers import params as P_
    from attnbench.profilers import speed as S_

    options = parse_options(args.option)
    stages = parse_stages(args.stages)
    attention = None if args.module.lower() == "none" else args.module
    for name, value in (("--resolution", args.resolution), ("--batch", args.batch),
                        ("--repeats", args.repeats)):
        if value < 1:
            raise OptionError(f"{name} must be a positive integer, got {value}")

    def fresh():
        torch.manual_seed(0)
        return build_model(args.backbone, attention, stages=stages,
                           num_classes=args.num_classes, **options)

    model = fresh()
    label = model.attnbench_label
    dev_text = device_label(args.device, args.threads)
    n_params = P_.count_params(model)
    paper = paper_figures(args.backbone, label, n_params) if args.num_classes == 1000 else None
    p_params = f"{paper[0]:.2f} M" if paper else ""
    p_flops = f"{paper[1]:.2f}" if paper and paper[1] is not None \
        and args.resolution == 224 else ""  # the papers count at 224px
    rows: List[List[Any]] = [
        ["params", _fmt_count(n_params), "count", p_params, "sum of parameter numel"],
        ["attention params", _fmt_count(P_.attention_params(model, args.backbone,
                                                            args.num_classes)),
         "count", "", f"minus plain {args.backbone}"],
    ]
    rules = not args.stock_flops
    if not args.no_flops:
        both = F_.flops_both(model, args.resolution, rules=rules)
        for fc in (both.fvcore, both.ptflops):
            rows.append([f"FLOPs {fc.counter}", f"{fc.gmac:.3f}", "GMac", p_flops,
                         f"{fc.method}, batch 1, {args.resolution}px"])
        rows.append(["FLOPs disagreement", f"{both.disagreement_pct:.2f}", "%", "",
                     "DISAGREE (> 2 %)" if both.disagree else "ptflops vs fvcore"])
    modes = ["eval", "train"] if args.mode == "both" else [args.mode]
    timing = dict(batch=args.batch, resolution=args.resolution, device=args.device,
                  amp=args.amp, channels_last=args.channels_last)
    with S_.num_threads(args.threads):
        if not args.no_speed:
            for mode in modes:
                rows.extend(_speed_rows(S_, fresh, attention, mode, args, timing, dev_text))
        if not args.no_memory:
            for mode in modes:
                mem = M_.peak_memory(fresh(), mode, **timing)
                rows.append([f"peak memory {mode}", f"{mem.peak_mib:.1f}", f"MiB ({args.device})",
                             "", mem.method.split(":")[0]])
    title = (f"{args.backbone} + {label}  |  resolution {args.resolution}px, batch "
             f"{args.batch}  |  device: {dev_text}")
    print(title)
    print(tabulate(rows, headers=["quantity", "value", "unit", "paper", "method"],
                   disable_numparse=True, colalign=("left", "right", "left", "right", "left")))
    if paper:
        print(f"\npaper: {paper[2]} (the same configuration: backbone, label and parameter "
              f"count); FLOPs in the paper are fvcore-style multiply-adds at 224px.")
    return 0


def _speed_rows(S_, fresh, attention, mode, args, timing, dev_text):
    unit_dev = f"({args.device})"
    if attention is None or args.alone:
        stats = S_.time_model(fresh(), mode, warmup=args.warmup, repeats=args.repeats,
                              **timing)
        how = stats.method
        ratio = None
    else:
        from attnbench.modules.builder import build_model
        import torch
        torch.manual_seed(0)
        plain = build_model(args.backbone, None, num_classes=args.num_classes)
        res = S_.time_interleaved({"none": plain, "model": fresh()}, mode,
                                  warmup=args.warmup, rounds=args.repeats, **timing)
        stats = res.stats["model"]
        ratio = res.ratios["model"]
        how = res.method
    rows = [[f"latency {mode}", f"{stats.median_ms:.2f}", f"ms/batch {unit_dev}", "",
             f"median [p25 {stats.p25_ms:.2f}, p75 {stats.p75_ms:.2f}]; {how}"],
            [f"throughput {mode}", f"{stats.throughput:.1f}", f"img/s {unit_dev}", "",
             "batch / median latency"]]
    if ratio is not None:
        rows.append([f"speed ratio {mode}", f"{ratio.median:.3f}", "x vs plain", "",
                     f"median over rounds [p25 {ratio.p25:.3f}, p75 {ratio.p75:.3f}]"])
    return rows
