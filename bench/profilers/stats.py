"""Statistics of paired timing rounds: the speed ratio and its confidence interval.

The suite's one definition of a module's speed relative to the plain backbone is the
**paired per-round ratio**: in round r the baseline and the module are each timed once
(order randomised), and r_i = t_baseline / t_module. The summary is the median of the
r_i with a distribution-free 95 % confidence interval for the median from order
statistics (the ranks where the binomial(n, 1/2) tail drops below 2.5 %), so no
assumption of normality and no random resampling: the same times give the same interval.

**Blocks (batch means).** Rounds within one sitting share conditions that a per-round
interval cannot see: where each model instance's tensors happen to lie in memory, and
the machine's state during those minutes (other tenants' memory traffic). Measured
here, two runs of one config disagreed by up to 4 % with per-round intervals of
+-1.5 %. So the interleaved timer splits its rounds into *blocks*, rebuilds every model
instance (a fresh copy of its weights and inputs) at the start of each block, and
:func:`block_interval` summarises the ratio by the **mean of the block medians** with a
Student-t 95 % interval over blocks (the batch-means method of simulation output
analysis). Instance and drift effects then vary between blocks and widen the interval
instead of biasing it. With a single block the per-round order-statistic interval
(:func:`median_interval`) is used.

A ratio > 1 means faster than the plain backbone, < 1 slower. The interval's relative
half-width ``(hi - lo) / (2 * estimate)`` is what the adaptive round loop drives below
its target (``[timing] ci_target``).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

CONFIDENCE = 0.95
#: fewest rounds for which the order-statistic interval reaches 95 %: 1 - 2 / 2^6 = 0.969
MIN_ROUNDS_FOR_CI = 6


@dataclass(frozen=True)
class Interval:
    """A ratio's point estimate with its ``CONFIDENCE`` interval, from ``n`` rounds in
    ``blocks`` blocks (estimate: the median of the rounds for one block, the mean of
    the block medians for several; see the module docstring)."""

    estimate: float
    lo: float
    hi: float
    n: int
    blocks: int = 1

    @property
    def half_width(self) -> float:
        """Relative half-width of the interval, (hi - lo) / (2 * estimate); inf if undefined."""
        if not self.n or not math.isfinite(self.lo) or not math.isfinite(self.hi) \
                or self.estimate <= 0:
            return math.inf
        return (self.hi - self.lo) / (2 * self.estimate)

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


#: two-sided 97.5 % quantiles of Student's t for 1..30 degrees of freedom (standard table;
#: scipy is not a dependency); beyond 30 the Cornish-Fisher expansion below is used
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
         2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
         2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (95 % two-sided)."""
    if df < 1:
        return math.inf
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_interval(values: Sequence[float]) -> Interval:
    """The mean of ``values`` with its Student-t 95 % interval (one value: the value as
    its own interval; none: nan). Used across blocks here and across seeds (accuracy)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, mean, mean, 1)
    half = t975(n - 1) * math.sqrt(_var(xs) / n)
    return Interval(mean, mean - half, mean + half, n)


def _var(xs: Sequence[float]) -> float:
    m = sum(xs) / len(xs)
    return sum((float(x) - m) ** 2 for x in xs) / (len(xs) - 1)


def welch_interval(a: Sequence[float], b: Sequence[float]) -> Optional[Interval]:
    """Welch's 95 % t-interval of ``mean(a) - mean(b)`` (unequal variances, the
    Welch-Satterthwaite degrees of freedom rounded down); None with fewer than 2 of either."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = _var(a) / len(a), _var(b) / len(b)
    diff = mean_interval(a).estimate - mean_interval(b).estimate
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(diff, diff, diff, len(a) + len(b))
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1)) + (vb ** 2 / (len(b) - 1)))
    half = t975(max(1, int(math.floor(df)))) * se
    return Interval(diff, diff - half, diff + half, len(a) + len(b))


def clears_noise(a: Sequence[float], b: Sequence[float]) -> Optional[bool]:
    """Whether ``mean(a) - mean(b)`` clears the noise: its Welch interval excludes 0;
    None when either side has fewer than 2 values."""
    iv = welch_interval(a, b)
    if iv is None:
        return None
    return iv.lo > 0 or iv.hi < 0 or (iv.lo == iv.hi and iv.estimate != 0)


def block_interval(values: Sequence[float], blocks: Sequence[int]) -> Interval:
    """Batch means: the mean of the per-block medians of ``values`` (``blocks[i]`` is the
    block of ``values[i]``) with its Student-t 95 % interval over blocks. One block:
    :func:`median_interval` of the values."""
    if len(values) != len(blocks):
        raise ValueError(f"values and blocks differ in length: {len(values)} != {len(blocks)}")
    by: Dict[int, List[float]] = {}
    for v, b in zip(values, blocks):
        if v is not None and math.isfinite(v):
            by.setdefault(int(b), []).append(float(v))
    if len(by) < 2:
        return median_interval([v for vs in by.values() for v in vs])
    iv = mean_interval([median(vs) for _, vs in sorted(by.items())])
    return Interval(iv.estimate, iv.lo, iv.hi, sum(len(vs) for vs in by.values()), iv.n)


def describe(iv: Interval) -> str:
    """How ``iv`` was computed, for a row's method column."""
    if iv.blocks > 1:
        return (f"mean of the medians of {iv.blocks} blocks ({iv.n} interleaved rounds; "
                f"fresh model instances each block) with its Student-t 95 % interval over "
                f"blocks")
    return f"median of {iv.n} interleaved rounds with its 95 % order-statistic interval"


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
