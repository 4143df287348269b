"""Statistics of paired timing rounds: the speed ratio and its confidence interval.

The suite's one definition of a module's speed relative to the plain backbone is the
**paired per-round ratio**: in round r the baseline and the module are each timed once
(order randomised), and r_i = t_baseline / t_module. The summary is the median of the
r_i with a distribution-free 95 % confidence interval for the median from order
statistics (the ranks where the binomial(n, 1/2) tail drops below 2.5 %), so no
assumption of normality and no random resampling: the same times give the same interval.

A ratio > 1 means faster than the plain backbone, < 1 slower. The interval's relative
half-width ``(hi - lo) / (2 * median)`` is what the adaptive round loop drives below
its target (``[timing] ci_target``).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence

CONFIDENCE = 0.95
#: fewest rounds for which the order-statistic interval reaches 95 %: 1 - 2 / 2^6 = 0.969
MIN_ROUNDS_FOR_CI = 6


@dataclass(frozen=True)
class Interval:
    """Median of paired ratios with its ``CONFIDENCE`` interval over ``n`` rounds."""

    median: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        """Relative half-width of the interval, (hi - lo) / (2 * median); inf if undefined."""
        if not self.n or not math.isfinite(self.lo) or not math.isfinite(self.hi) \
                or self.median <= 0:
            return math.inf
        return (self.hi - self.lo) / (2 * self.median)

    def contains(self, value: float) -> bool:
        return self.lo <= value <= self.hi


def median(values: Sequence[float]) -> float:
    xs = sorted(values)
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _binom_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def median_ranks(n: int, confidence: float = CONFIDENCE) -> Optional[tuple]:
    """0-based ranks (l, u) of the sorted sample with P(x_(l) <= median <= x_(u)) >=
    ``confidence``, as narrow as possible; None when n is too small for it."""
    alpha = (1 - confidence) / 2
    k = -1
    while _binom_cdf(k + 1, n) <= alpha:
        k += 1
    if k < 0:
        return None
    return k, n - 1 - k


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The median of ``values`` and its order-statistic confidence interval."""
    xs = sorted(float(v) for v in values if v is not None and math.isfinite(v))
    ranks = median_ranks(len(xs), confidence) if xs else None
    if ranks is None:
        return Interval(median(xs), -math.inf, math.inf, len(xs))
    return Interval(median(xs), xs[ranks[0]], xs[ranks[1]], len(xs))


def paired_ratios(baseline: Sequence[float], model: Sequence[float]) -> List[float]:
    """Per-round ratios baseline time / model time (rounds where both were timed)."""
    if len(baseline) != len(model):
        raise ValueError(f"paired rounds differ in length: {len(baseline)} != {len(model)}")
    return [b / m for b, m in zip(baseline, model) if b > 0 and m > 0]


def round_order(labels: Sequence[str], seed: int, round_index: int) -> List[str]:
    """The order of round ``round_index``: a permutation seeded by (seed, round), so each
    model follows every other about equally often and a rerun repeats the order."""
    order = list(labels)
    random.Random(f"{seed}:{round_index}").shuffle(order)
    return order


def distinguishable(ratio: Interval, control: Optional[Interval]) -> bool:
    """True when the module's ratio differs from 1.00 by more than the noise floor: its
    interval excludes 1, and the control's (if any) does not overlap it."""
    if not math.isfinite(ratio.lo) or ratio.contains(1.0):
        return False
    if control is None or not math.isfinite(control.lo):
        return True
    return ratio.hi < control.lo or ratio.lo > control.hi
