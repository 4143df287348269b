"""Speed-ratio statistics (bench/profilers/stats.py): intervals, pairing, round order."""
import math
import random

import pytest

from attnbench.profilers import stats as S


def test_order_statistic_ranks_match_the_binomial_table():
    # n=6: ranks 1 and 6 (0-based 0, 5), coverage 1 - 2/64; n=10: ranks 2..9; n=20: 6..15
    assert S.median_ranks(5) is None
    assert S.median_ranks(6) == (0, 5)
    assert S.median_ranks(10) == (1, 8)
    assert S.median_ranks(20) == (5, 14)


def test_interval_covers_the_true_median_about_95_percent_of_the_time():
    rng = random.Random(0)
    hits, trials = 0, 2000
    for _ in range(trials):
        xs = [rng.lognormvariate(0, 0.1) for _ in range(15)]
        hits += S.median_interval(xs).contains(1.0)  # the lognormal's median is exactly 1
    assert 0.93 <= hits / trials <= 0.995


def test_interval_values_and_half_width():
    iv = S.median_interval([1.0, 0.9, 1.1, 1.05, 0.95, 1.0])
    assert (iv.estimate, iv.lo, iv.hi, iv.n) == (1.0, 0.9, 1.1, 6)
    assert iv.half_width == pytest.approx(0.1)
    small = S.median_interval([1.0, 2.0])
    assert small.half_width == math.inf and not S.distinguishable(small, None)


def test_paired_ratio_is_baseline_over_module_per_round():
    assert S.paired_ratios([10.0, 12.0], [20.0, 24.0]) == [0.5, 0.5]
    with pytest.raises(ValueError, match="differ in length"):
        S.paired_ratios([1.0], [1.0, 2.0])


def test_a_common_drift_cancels_in_the_paired_ratio():
    """The machine slows by 2x over the rounds; the paired ratio does not move."""
    base = [10.0 * (1 + r / 10) for r in range(20)]
    mod = [12.5 * (1 + r / 10) for r in range(20)]
    iv = S.median_interval(S.paired_ratios(base, mod))
    assert iv.estimate == pytest.approx(0.8) and iv.half_width == pytest.approx(0.0)


def test_round_order_is_seeded_and_balanced():
    labels = ["plain", "control", "se", "cbam"]
    assert S.round_order(labels, 0, 3) == S.round_order(labels, 0, 3)
    orders = [S.round_order(labels, 0, r) for r in range(400)]
    assert len({tuple(o) for o in orders}) > 12
    # every model comes right after the baseline in roughly a third of the rounds
    follows = {lab: 0 for lab in labels}
    for o in orders:
        i = o.index("plain")
        if i + 1 < len(o):
            follows[o[i + 1]] += 1
    assert all(60 <= follows[lab] <= 140 for lab in labels if lab != "plain"), follows


def test_distinguishable_against_one_and_the_control():
    control = S.Interval(1.0, 0.99, 1.01, 20)
    assert S.distinguishable(S.Interval(0.8, 0.78, 0.82, 20), control)
    assert not S.distinguishable(S.Interval(0.995, 0.98, 1.005, 20), control)
    assert not S.distinguishable(S.Interval(0.985, 0.98, 0.989, 20),
                                 S.Interval(1.0, 0.985, 1.02, 20))


def test_t_quantiles_match_the_table_and_the_normal_limit():
    assert S.t975(1) == 12.706 and S.t975(2) == 4.303 and S.t975(10) == 2.228
    assert S.t975(30) == 2.042
    assert S.t975(31) == pytest.approx(2.040, abs=2e-3)   # the expansion joins the table
    assert S.t975(120) == pytest.approx(1.980, abs=1e-3)
    assert S.t975(0) == math.inf


def test_block_interval_is_the_mean_of_block_medians_with_a_t_interval():
    values = [1.0, 1.2, 1.1, 2.0, 2.2, 2.1, 3.0, 3.3, 3.1]
    blocks = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    iv = S.block_interval(values, blocks)
    # block medians 1.1, 2.1, 3.1: mean 2.1, sd 1.0, half-width 4.303 / sqrt(3)
    assert (iv.estimate, iv.n, iv.blocks) == (pytest.approx(2.1), 9, 3)
    assert iv.hi - iv.estimate == pytest.approx(4.303 / math.sqrt(3))
    assert "3 blocks" in S.describe(iv)
    one = S.block_interval(values[:3], blocks[:3])             # one block: order statistics
    assert one.blocks == 1 and one.estimate == S.median_interval(values[:3]).estimate
    with pytest.raises(ValueError, match="differ in length"):
        S.block_interval(values, blocks[:-1])


def test_blocks_cover_an_instance_effect_that_per_round_intervals_miss():
    """Each block (a fresh instance, a new stretch of time) shifts the ratio by its own
    offset (sd 2 %) on top of per-round noise (sd 3 %), as measured on this machine.
    The per-round interval over all rounds treats them as independent and undercovers;
    the interval over blocks keeps about 95 %."""
    rng = random.Random(1)
    blocked = per_round = 0
    trials = 600
    for _ in range(trials):
        values, blocks = [], []
        for b in range(8):
            offset = rng.gauss(0, 0.02)
            for _ in range(10):
                values.append(1.0 + offset + rng.gauss(0, 0.03))
                blocks.append(b)
        blocked += S.block_interval(values, blocks).contains(1.0)
        per_round += S.median_interval(values).contains(1.0)
    assert 0.92 <= blocked / trials <= 0.985
    assert per_round / trials < 0.85
