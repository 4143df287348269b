"""Seed-to-seed noise: one model trained with several seeds, summarised per test size.

A model's accuracy at one test resolution over ``n`` seeds is summarised by the **mean**
and its **95 % Student-t interval** across seeds, ``mean +- t(0.975, n - 1) * s / sqrt(n)``
(``s`` the sample standard deviation; the seeds are treated as independent draws of the
training run). One seed has no interval (lo = hi = the value, ``n = 1``).

A module's difference from the plain backbone *clears the seed noise* when the Welch
95 % t-interval of the difference of the two means (Welch-Satterthwaite degrees of
freedom) excludes 0; with one seed on either side nothing can be said
(:func:`clears_noise` returns None).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from attnbench.profilers.stats import Interval, clears_noise, mean_interval, welch_interval

__all__ = ["parse_seeds", "seed_path", "seed_interval", "difference_interval", "clears_noise",
           "interval_text"]


def parse_seeds(text: "str | int | Sequence[int]") -> List[int]:
    """``"0,1,2"``, ``"0:3"`` (start:stop, stop excluded) or ``3`` -> a list of distinct
    seeds in the given order. ValueError for anything else."""
    if isinstance(text, int):
        return [text]
    if isinstance(text, (list, tuple)):
        out = [int(s) for s in text]
    elif ":" in str(text):
        lo, hi = (int(x) for x in str(text).split(":"))
        out = list(range(lo, hi))
    else:
        out = [int(s) for s in str(text).replace(" ", "").split(",") if s]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"seeds {text!r}: expected distinct integers, e.g. 0,1,2 or 0:3")
    return out


def seed_path(out: "str | Path", seed: int) -> Path:
    """The checkpoint of ``seed`` of a several-seed run writing ``out``:
    ``DIR/NAME-seed<seed>.pt`` (``checkpoints/se.pt`` -> ``checkpoints/se-seed1.pt``)."""
    out = Path(out)
    return out.with_name(f"{out.stem}-seed{seed}{out.suffix or '.pt'}")


#: the mean of one model's per-seed values with its 95 % t-interval across seeds
seed_interval = mean_interval
#: Welch's 95 % t-interval of the difference of two models' seed means
difference_interval = welch_interval


def interval_text(iv: Interval, decimals: int = 1) -> str:
    """``"84.2 [81.0, 87.4]"``; the bare mean for one seed."""
    if iv.n <= 1:
        return f"{iv.estimate:.{decimals}f}"
    return f"{iv.estimate:.{decimals}f} [{iv.lo:.{decimals}f}, {iv.hi:.{decimals}f}]"
