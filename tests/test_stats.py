"""common.stats: bootstrap intervals, exact McNemar, the report's wording, seed spread (hand-computed cases)."""

import math
import time

import numpy as np
import pytest

from common.stats import (accuracy_interval, describe_difference, mcnemar_exact, median_interval, paired_comparison,
                          seed_spread)


def cells(both_right: int, only_a: int, only_b: int, both_wrong: int):
    """Two correctness vectors with the given 2x2 agreement counts (shuffled, so order cannot matter)."""
    a = [True] * both_right + [True] * only_a + [False] * only_b + [False] * both_wrong
    b = [True] * both_right + [False] * only_a + [True] * only_b + [False] * both_wrong
    order = np.random.default_rng(123).permutation(len(a))
    return np.asarray(a)[order], np.asarray(b)[order]


def at_accuracy(n: int, k: int):
    x = np.zeros(n, dtype=bool)
    x[:k] = True
    return np.random.default_rng(7).permutation(x)


# ---- mcnemar_exact ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("only_a, only_b, expected", [
    (0, 5, 2 * 0.5 ** 5),                  # 0.0625
    (1, 9, 2 * (1 + 10) / 2 ** 10),        # 0.021484375 = 2 * (C(10,0) + C(10,1)) / 2**10
    (3, 7, 2 * (1 + 10 + 45 + 120) / 2 ** 10),  # 0.34375
    (0, 1, 1.0),                           # 2 * 0.5 = 1
    (5, 5, 1.0),                           # 2 * P(X <= 5 | 10) > 1 -> capped
    (11, 12, 1.0),                         # odd m, k = (m - 1) / 2: 2 * 0.5 = 1
    (0, 0, 1.0),                           # never disagree
])
def test_mcnemar_known_splits(only_a, only_b, expected):
    assert mcnemar_exact(only_a, only_b) == pytest.approx(expected, rel=1e-15, abs=0)


def test_mcnemar_is_symmetric():
    for a, b in [(0, 5), (1, 9), (3, 7), (40, 61), (600, 700)]:
        assert mcnemar_exact(a, b) == mcnemar_exact(b, a)


def test_mcnemar_large_counts_are_finite_and_exact():
    p = mcnemar_exact(600, 700)
    assert math.isfinite(p) and 0.0 < p < 1.0
    # Same number from exact rationals, independently of the implementation's loop.
    m = 1300
    exact = 2 * sum(math.comb(m, i) for i in range(601)) / 2 ** m
    assert p == pytest.approx(exact, rel=1e-12)
    assert 0.001 < p < 0.02  # 600 vs 700 of 1300: z ~ 2.8
    assert mcnemar_exact(3000, 3000) == 1.0
    assert mcnemar_exact(1500, 1600) < mcnemar_exact(150, 160)  # same ratio, more evidence


@pytest.mark.parametrize("bad", [(-1, 3), (2.5, 3), (True, 3)])
def test_mcnemar_rejects_non_counts(bad):
    with pytest.raises(ValueError):
        mcnemar_exact(*bad)


# ---- paired_comparison ------------------------------------------------------------------------------------

def test_identical_models_agree_everywhere():
    a = at_accuracy(872, 776)
    cmp = paired_comparison(a, a.copy())
    assert cmp["only_a_right"] == cmp["only_b_right"] == 0
    assert cmp["both_right"] == 776 and cmp["both_wrong"] == 96
    assert cmp["mcnemar_p"] == 1.0 and cmp["significant"] is False
    assert cmp["diff_points"] == 0.0
    assert cmp["ci_low_points"] == 0.0 and cmp["ci_high_points"] == 0.0


def test_paired_counts_and_difference_on_constructed_example():
    a, b = cells(both_right=80, only_a=7, only_b=3, both_wrong=10)
    cmp = paired_comparison(a, b)
    assert cmp["n"] == 100
    assert (cmp["both_right"], cmp["only_a_right"], cmp["only_b_right"], cmp["both_wrong"]) == (80, 7, 3, 10)
    assert cmp["accuracy_a"] == pytest.approx(0.87) and cmp["accuracy_b"] == pytest.approx(0.83)
    assert cmp["diff_points"] == pytest.approx(4.0)
    assert cmp["mcnemar_p"] == pytest.approx(0.34375)
    assert cmp["significant"] is False
    assert cmp["ci_low_points"] <= cmp["diff_points"] <= cmp["ci_high_points"]
    assert cmp["ci_low_points"] < 0 < cmp["ci_high_points"]  # 7 vs 3 of 100 cannot exclude 0
    # Every resampled difference is a multiple of 1 point on 100 sentences, so the percentiles are too.
    for key in ("ci_low_points", "ci_high_points"):
        assert cmp[key] == pytest.approx(round(cmp[key]))
    assert cmp["level"] == 0.95 and "seed 0" in cmp["method"] and "10000 resamples" in cmp["method"]

    swapped = paired_comparison(b, a)
    assert swapped["diff_points"] == pytest.approx(-4.0)
    assert (swapped["only_a_right"], swapped["only_b_right"]) == (3, 7)
    assert swapped["mcnemar_p"] == cmp["mcnemar_p"]


def test_paired_accepts_0_1_integers_and_lists():
    a, b = cells(80, 7, 3, 10)
    as_ints = paired_comparison(a.astype(int).tolist(), b.astype(int).tolist())
    as_bools = paired_comparison(list(a), list(b))
    assert as_ints == as_bools


def test_paired_interval_widens_when_n_shrinks():
    big = paired_comparison(*cells(800, 70, 30, 100))  # same proportions, 10x the sentences
    small = paired_comparison(*cells(80, 7, 3, 10))
    assert big["diff_points"] == pytest.approx(small["diff_points"])
    width_big = big["ci_high_points"] - big["ci_low_points"]
    width_small = small["ci_high_points"] - small["ci_low_points"]
    assert width_small > 2 * width_big  # ~sqrt(10) wider
    assert big["ci_low_points"] > 0 and big["significant"] is True  # 70 vs 30 of 1000 is clear


def test_paired_is_seeded():
    a, b = cells(700, 40, 25, 107)
    assert paired_comparison(a, b, seed=3) == paired_comparison(a, b, seed=3)
    other = paired_comparison(a, b, seed=4)
    assert other["diff_points"] == paired_comparison(a, b, seed=3)["diff_points"]
    assert "seed 4" in other["method"]


def test_paired_count_bootstrap_matches_index_bootstrap():
    """The multinomial shortcut has the distribution of resampling sentence indices for both models at once."""
    a, b = cells(760, 20, 28, 64)
    fast = paired_comparison(a, b, seed=0, resamples=20000)
    rng = np.random.default_rng(99)
    n = a.size
    idx = rng.integers(0, n, size=(4000, n))
    slow = 100.0 * (a[idx].mean(axis=1) - b[idx].mean(axis=1))
    low, high = np.quantile(slow, [0.025, 0.975])
    assert fast["ci_low_points"] == pytest.approx(low, abs=0.35)  # one sentence is 0.115 points
    assert fast["ci_high_points"] == pytest.approx(high, abs=0.35)


@pytest.mark.parametrize("a, b", [([True, False], [True]), ([], []), ([True] * 3, [False] * 4)])
def test_paired_rejects_mismatched_or_empty(a, b):
    with pytest.raises(ValueError):
        paired_comparison(a, b)


def test_paired_rejects_non_boolean_scores():
    with pytest.raises(ValueError):
        paired_comparison([0.9, 0.1], [1, 0])


def test_paired_significance_follows_level():
    a, b = cells(800, 40, 20, 12)  # p ~ 0.013
    cmp = paired_comparison(a, b)
    assert 0.01 < cmp["mcnemar_p"] < 0.05
    assert cmp["significant"] is True
    assert paired_comparison(a, b, level=0.99)["significant"] is False


def test_paired_is_fast():
    a, b = cells(760, 20, 28, 64)
    start = time.perf_counter()
    paired_comparison(a, b)
    assert time.perf_counter() - start < 0.5


# ---- accuracy_interval ------------------------------------------------------------------------------------

def test_accuracy_all_correct_collapses():
    r = accuracy_interval([True] * 50)
    assert r["accuracy"] == 1.0 and r["n"] == 50
    assert r["ci_low"] == 1.0 and r["ci_high"] == 1.0
    r0 = accuracy_interval([False] * 50)
    assert r0["ci_low"] == 0.0 and r0["ci_high"] == 0.0


def test_accuracy_sst2_sized_interval_is_about_two_points_each_side():
    x = at_accuracy(872, 776)  # 776 / 872 = 88.99%
    start = time.perf_counter()
    r = accuracy_interval(x)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5
    assert r["accuracy"] == pytest.approx(776 / 872)
    assert r["ci_low"] < r["accuracy"] < r["ci_high"]
    width_points = 100 * (r["ci_high"] - r["ci_low"])
    assert 3.0 < width_points < 5.0  # normal approx: 2 * 1.96 * sqrt(.89 * .11 / 872) = 4.2 points
    assert r == {"accuracy": r["accuracy"], "n": 872, "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                 "level": 0.95, "method": "percentile bootstrap over sentences, 10000 resamples, seed 0"}


def test_accuracy_interval_is_seeded_and_level_matters():
    x = at_accuracy(872, 776)
    assert accuracy_interval(x, seed=5) == accuracy_interval(x, seed=5)
    r95 = accuracy_interval(x)
    r80 = accuracy_interval(x, level=0.80)
    assert r80["ci_high"] - r80["ci_low"] < r95["ci_high"] - r95["ci_low"]


def test_accuracy_interval_rejects_bad_input():
    for bad in ([], [[True, False]], [0.5, 1.0]):
        with pytest.raises(ValueError):
            accuracy_interval(bad)
    with pytest.raises(ValueError):
        accuracy_interval([True, False], level=95)


# ---- describe_difference ----------------------------------------------------------------------------------

def test_describe_non_significant_negative():
    cmp = paired_comparison(*cells(80, 3, 7, 10))
    text = describe_difference(cmp, "pruned", "student")
    assert text.startswith("`pruned` is 4.00 points lower than `student`, 95% interval [")
    assert f"[{cmp['ci_low_points']:+.2f}, {cmp['ci_high_points']:+.2f}]" in text
    assert "not significant" in text and "significantly" not in text
    assert "McNemar p = 0.34" in text and "3 vs 7 sentences only one got right" in text
    assert "no loss" not in text.lower() and "gain" not in text.lower()


def test_describe_significant_positive_and_negative():
    a, b = cells(800, 40, 20, 12)
    up = describe_difference(paired_comparison(a, b), "A", "B")
    down = describe_difference(paired_comparison(b, a), "B", "A")
    assert "`A` is 2.29 points higher than `B`" in up and "significantly higher" in up
    assert "`B` is 2.29 points lower than `A`" in down and "significantly lower" in down
    assert "not significant" not in up + down
    assert "McNemar p = 0.013" in up
    for text in (up, down):
        assert "no loss" not in text.lower() and "a gain" not in text.lower()


def test_describe_equal_and_tiny_p():
    text = describe_difference(paired_comparison(*cells(80, 5, 5, 10)), "A", "B")
    assert text.startswith("`A` and `B` are equally accurate")
    assert "McNemar p = 1;" in text and "not significant" in text and "no loss" not in text.lower()
    tiny = describe_difference(paired_comparison(*cells(800, 60, 5, 7)), "A", "B")
    assert "McNemar p < 0.001" in tiny and "significantly higher" in tiny


def test_describe_identical_models():
    a = at_accuracy(100, 90)
    text = describe_difference(paired_comparison(a, a), "A", "A copy")
    assert "equally accurate" in text and "[0.00, 0.00]" in text and "0 vs 0" in text


# ---- seed_spread ------------------------------------------------------------------------------------------

def test_seed_spread_known_values():
    r = seed_spread([89.0, 90.0, 91.0])
    assert r == {"n_seeds": 3, "mean": pytest.approx(90.0), "std": pytest.approx(1.0), "min": 89.0, "max": 91.0}
    r2 = seed_spread([0.88, 0.90])
    assert r2["std"] == pytest.approx(math.sqrt(0.0002))  # sample std: |a - b| / sqrt(2)
    one = seed_spread([0.9])
    assert one == {"n_seeds": 1, "mean": 0.9, "std": 0.0, "min": 0.9, "max": 0.9}


def test_seed_spread_rejects_empty_and_nan():
    with pytest.raises(ValueError):
        seed_spread([])
    with pytest.raises(ValueError):
        seed_spread([0.9, float("nan")])


# ---- median_interval --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, k, coverage", [
    (6, 1, 1 - 2 / 64),                    # min and max: 0.96875
    (10, 2, 1 - 2 * (1 + 10) / 1024),      # 2nd smallest and largest: 0.978515625 (k = 3 gives 0.890625)
    (20, 6, 1 - 2 * sum(math.comb(20, i) for i in range(6)) / 2 ** 20),  # 0.9586 (k = 7 gives 0.8847)
])
def test_median_interval_takes_the_narrowest_order_statistics_that_cover(n, k, coverage):
    values = list(np.random.default_rng(n).permutation(np.arange(1.0, n + 1)))  # order must not matter
    result = median_interval(values)
    assert result["median"] == (n + 1) / 2
    assert (result["ci_low"], result["ci_high"]) == (k, n + 1 - k)
    assert result["coverage"] == pytest.approx(coverage, abs=1e-12) and result["coverage"] >= 0.95


def test_median_interval_too_few_values_and_bad_input():
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0])["ci_low"] is None  # n = 5: min..max covers only 0.9375
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0], level=0.9)["ci_low"] == 1.0
    assert median_interval([2.0] * 8)["median"] == 2.0
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            median_interval(bad)
    with pytest.raises(ValueError, match="level"):
        median_interval([1.0] * 10, level=95)
