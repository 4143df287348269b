"""``attnbench make-data``: write the offline synthetic ImageFolder dataset
(:mod:`attnbench.accuracy.data`)."""
from __future__ import annotations

from attnbench.accuracy.data import KINDS, MAX_CLASSES, make_dataset


def register_cli(sub, parent) -> None:
    p = sub.add_parser(
        "make-data", parents=[parent], help="write an offline synthetic ImageFolder dataset",
        description="Draw a deterministic image-classification dataset (classes = shape x "
                    "fine detail: stripe count / dot grid; nuisances: position, scale, "
                    "rotation, colours, background) in ImageFolder layout "
                    "OUT/{train,val}/<class>/*.png. No downloads.")
    p.add_argument("out", help="output folder")
    p.add_argument("--classes", type=_classes_arg, default=10,
                   help=f"number of classes, 2..{MAX_CLASSES} (default 10), or a comma list "
                        f"of <shape>-<detail> names")
    p.add_argument("--kind", choices=KINDS, default="shapes",
                   help="shapes: shape x fine detail (default); textures: texture x "
                        "frequency on a cluttered background (a second kind of data)")
    p.add_argument("--train", type=int, default=100, help="training images per class")
    p.add_argument("--val", type=int, default=30, help="validation images per class")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oversample", type=int, default=4,
                   help="draw at this multiple of --size, then area-downsample (default 4)")
    p.add_argument("--nuisance", type=float, default=1.0,
                   help="0..1: strength of the nuisance variation (position, scale, "
                        "rotation, blobs, noise); default 1")
    p.set_defaults(func=run)


def _classes_arg(text: str):
    """``--classes``: ``10`` -> 10, ``circle-dots4,star-stripes3`` -> a list of names."""
    text = text.strip()
    return int(text) if text.isdigit() else [t.strip() for t in text.split(",") if t.strip()]


def run(args) -> int:
    meta = make_dataset(args.out, args.classes, args.train, args.val, args.size, args.seed,
                        args.oversample, args.nuisance, progress=True, kind=args.kind)
    n = len(meta["classes"])
    print(f"{args.out}: {n} classes x ({args.train} train + {args.val} val) images of "
          f"{args.size}x{args.size} px, seed {args.seed}")
    print("classes: " + ", ".join(meta["classes"]))
    return 0
