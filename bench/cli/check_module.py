"""``attnbench check-module NAME``: the conformance kit (:mod:`attnbench.plugins.conformance`)."""
from __future__ import annotations

from attnbench.cli.args import POSITIVE_INT, check_device, int_list, parse_options, \
    parse_stages
from attnbench.plugins.conformance import ModuleChecker, exit_code, report_text
from attnbench.results import RESOLUTION_SWEEP


def register_cli(sub, parent) -> None:
    p = sub.add_parser(
        "check-module", parents=[parent], help="conformance checks for an attention module",
        description="Build NAME into a backbone and check what the suite relies on: shapes, "
                    "every resolution 168..448 (train and eval), gradients, state_dict round "
                    "trip, determinism, FLOP counting. Exit status 0 only if nothing FAILs.")
    p.add_argument("name", metavar="NAME", help="registered module name (see attnbench list)")
    p.add_argument("--backbone", default="resnet18", help="backbone (default resnet18)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="module option, e.g. reduction=8 (repeatable)")
    p.add_argument("--stages", default=None,
                   help="stage selection: 3,4 | all | a preset | JSON mapping")
    p.add_argument("--num-classes", type=POSITIVE_INT, default=10)
    p.add_argument("--resolutions", default=None, metavar="R1,R2,...",
                   help="input sides to sweep (default 168..448 step 28)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flops", action="store_true", help="skip the two FLOP counters")
    p.set_defaults(func=run)


def run(args) -> int:
    resolutions = RESOLUTION_SWEEP
    if args.resolutions:
        resolutions = int_list(args.resolutions, "--resolutions", 8, "168,224")
    check_device(args.device)
    from attnbench.modules.builder import BACKBONES
    if args.backbone.lower() not in BACKBONES:
        from attnbench.modules.registry import UnknownNameError, unknown_name_message
        raise UnknownNameError("--backbone: " + unknown_name_message("backbone", args.backbone,
                                                                     BACKBONES))
    checker = ModuleChecker(args.name, backbone=args.backbone,
                            options=parse_options(args.option),
                            stages=parse_stages(args.stages), num_classes=args.num_classes,
                            resolutions=resolutions, device=args.device, seed=args.seed,
                            flops=not args.no_flops)
    results = checker.run()
    print(report_text(args.name, results))
    return exit_code(results)
