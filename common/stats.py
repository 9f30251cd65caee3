"""Uncertainty for accuracies measured on a fixed set of sentences (SST-2 validation: 872 sentences).

Pure functions, numpy only. Every accuracy here is a fraction in 0..1; every difference between two models
is in percentage points (100 * (accuracy_a - accuracy_b)).

- `accuracy_interval`: one model's accuracy with a percentile-bootstrap interval over sentences: how much the
  accuracy would move if the validation sentences had been a different draw of the same size.
- `paired_comparison`: two models on the SAME sentences: the difference, its paired bootstrap interval, the
  2x2 agreement counts, and the exact McNemar p-value (`mcnemar_exact`), which uses only the sentences on
  which exactly one of the two models is right.
- `describe_difference`: the sentence a report prints for a `paired_comparison`.
- `seed_spread`: mean and spread of one number across training seeds (a different uncertainty: seed to seed,
  not sentence sampling).
- `median_interval`: the median of repeated measurements (e.g. the per-round speed-ups of paired timed runs)
  with its distribution-free confidence interval from order statistics.

The bootstraps are exact in distribution but drawn by counts instead of index lists: resampling n sentences
with replacement and counting the correct ones is a Binomial(n, k/n) draw; resampling n sentence indices and
counting, for the same indices, which of the four (A right?, B right?) cells each falls in is a
Multinomial(n, cell fractions) draw. So 10000 resamples cost 10000 draws, not 10000 * n.
"""

from typing import Sequence

import numpy as np

__all__ = ["accuracy_interval", "mcnemar_exact", "paired_comparison", "describe_difference", "seed_spread",
           "median_interval"]


def _method(resamples: int, seed: int) -> str:
    return f"percentile bootstrap over sentences, {resamples} resamples, seed {seed}"


def _check_settings(resamples: int, level: float) -> None:
    if not isinstance(resamples, (int, np.integer)) or isinstance(resamples, bool) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be strictly between 0 and 1, got {level!r}")


def _as_correct(correct: Sequence, name: str = "correct") -> np.ndarray:
    """A 1-D bool array from a sequence of bools (or 0/1); anything else raises ValueError."""
    arr = np.asarray(correct)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of bools, one per sentence; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one sentence")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number) or not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold only bools (or 0/1), one per sentence")
        arr = arr.astype(bool)
    return arr


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    alpha = 1.0 - level
    low, high = np.quantile(samples, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def accuracy_interval(correct: Sequence[bool], *, seed: int = 0, resamples: int = 10000,
                      level: float = 0.95) -> dict:
    """Accuracy of one model on n sentences, with a percentile bootstrap interval over sentences.

    `correct`: one bool per sentence (True = the model's prediction matched the label).

    Returns a dict:
    - "accuracy": fraction of sentences right, k / n (0..1);
    - "n": number of sentences;
    - "ci_low", "ci_high": the (1 - level)/2 and 1 - (1 - level)/2 quantiles (numpy's default linear
      interpolation) of the accuracy over `resamples` bootstrap resamples of the n sentences drawn with
      replacement (fractions 0..1). Each resample's correct count is drawn as Binomial(n, k / n), which is
      exactly the distribution of the count in an index resample. The interval says how much the accuracy
      depends on which sentences happened to be in the validation set; it says nothing about training seeds;
    - "level": the interval's nominal coverage (0.95 by default);
    - "method": e.g. "percentile bootstrap over sentences, 10000 resamples, seed 0".

    Deterministic: the same input, seed and resamples give the same output. With all (or none) of the
    sentences right every resample is identical, so the interval collapses to [1, 1] (or [0, 0]).
    """
    _check_settings(resamples, level)
    arr = _as_correct(correct)
    n = int(arr.size)
    k = int(arr.sum())
    rng = np.random.default_rng(seed)
    counts = rng.binomial(n, k / n, size=resamples)
    low, high = _percentiles(counts / n, level)
    return {"accuracy": k / n, "n": n, "ci_low": low, "ci_high": high, "level": level,
            "method": _method(resamples, seed)}


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value for two models scored on the same sentences.

    `only_a`: sentences only model A got right; `only_b`: sentences only model B got right (sentences both
    got right or both got wrong carry no information about which model is better and are not used).

    Under the null hypothesis that the two models are equally accurate, each of the m = only_a + only_b
    discordant sentences is equally likely to favour either model, so min(only_a, only_b) ~ Binomial(m, 1/2).
    Returns p = min(1, 2 * P(X <= min(only_a, only_b))) with X ~ Binomial(m, 1/2): the binomial sum is done in
    exact integer arithmetic and divided by 2**m once, so it is exact up to the final float rounding for any m
    (a p-value below ~1e-308 comes back as 0.0). m == 0 (the models never disagree) gives 1.0. Symmetric in
    its two arguments.
    """
    for name, value in (("only_a", only_a), ("only_b", only_b)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer count, got {value!r}")
    a, b = int(only_a), int(only_b)
    m = a + b
    if m == 0:
        return 1.0
    k = min(a, b)
    term = 1  # C(m, 0)
    tail = 1
    for i in range(k):
        term = term * (m - i) // (i + 1)  # C(m, i + 1), exact
        tail += term
    return min(1.0, (2 * tail) / (1 << m))  # int / int: correctly rounded, no overflow


def paired_comparison(correct_a: Sequence[bool], correct_b: Sequence[bool], *, seed: int = 0,
                      resamples: int = 10000, level: float = 0.95) -> dict:
    """Model A against model B on the SAME sentences (element i of both sequences is sentence i).

    Returns a dict:
    - "n": number of sentences;
    - "accuracy_a", "accuracy_b": each model's fraction right (0..1);
    - "diff_points": 100 * (accuracy_a - accuracy_b), in percentage points (positive: A is more accurate);
    - "ci_low_points", "ci_high_points": paired percentile bootstrap interval of diff_points: resample the n
      sentence indices with replacement, score BOTH models on the same resampled indices, take the
      (1 - level)/2 and 1 - (1 - level)/2 quantiles over `resamples` resamples. Drawn as a
      Multinomial(n, cell fractions) over the four agreement cells, which is exactly the distribution of
      the cell counts in an index resample. When the models never disagree this is [0, 0];
    - "only_a_right", "only_b_right": sentences exactly one of the two models got right (the discordant pairs);
    - "both_right", "both_wrong": the concordant sentences (the four counts sum to n);
    - "mcnemar_p": `mcnemar_exact(only_a_right, only_b_right)`, exact two-sided;
    - "significant": mcnemar_p < 1 - level (the bootstrap interval and the McNemar test are different
      procedures and can disagree at the margin: an interval just excluding 0 with p just above 1 - level);
    - "level": the interval's nominal coverage and the test's 1 - alpha;
    - "method": how the interval and the p-value were computed.

    Raises ValueError if the two sequences differ in length or are empty. Deterministic for a given seed.
    """
    _check_settings(resamples, level)
    a_arr = np.asarray(correct_a)
    b_arr = np.asarray(correct_b)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"correct_a and correct_b must score the same sentences: shapes {a_arr.shape} "
                         f"and {b_arr.shape} differ")
    a = _as_correct(a_arr, "correct_a")
    b = _as_correct(b_arr, "correct_b")
    n = int(a.size)
    both_right = int(np.count_nonzero(a & b))
    only_a = int(np.count_nonzero(a & ~b))
    only_b = int(np.count_nonzero(~a & b))
    both_wrong = n - both_right - only_a - only_b

    # Only the discordant cells move the difference: diff = (only_a - only_b) / n in every resample.
    rng = np.random.default_rng(seed)
    cells = rng.multinomial(n, [only_a / n, only_b / n, (both_right + both_wrong) / n], size=resamples)
    diffs = 100.0 * (cells[:, 0] - cells[:, 1]) / n
    low, high = _percentiles(diffs, level)

    p = mcnemar_exact(only_a, only_b)
    return {
        "n": n,
        "accuracy_a": (both_right + only_a) / n,
        "accuracy_b": (both_right + only_b) / n,
        "diff_points": 100.0 * (only_a - only_b) / n,
        "ci_low_points": low,
        "ci_high_points": high,
        "only_a_right": only_a,
        "only_b_right": only_b,
        "both_right": both_right,
        "both_wrong": both_wrong,
        "mcnemar_p": p,
        "significant": bool(p < 1.0 - level),
        "level": level,
        "method": f"paired {_method(resamples, seed)} (same sentences for both models); "
                  "exact two-sided McNemar test on the sentences only one model got right",
    }


def _format_p(p: float) -> str:
    """'p = 0.86' style (2 significant digits), or 'p < 0.001'."""
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.2g}"


def _signed(x: float) -> str:
    text = f"{x:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def _level_text(level: float) -> str:
    return f"{100.0 * level:g}%"


def describe_difference(cmp: dict, a: str, b: str) -> str:
    """One sentence for a report, from a `paired_comparison(correct_a, correct_b)` result.

    `a` and `b` are the display names of the models behind correct_a and correct_b (printed in backticks).
    The sentence gives the difference in percentage points, its bootstrap interval, whether the McNemar test
    is significant at 1 - level, the p-value (2 significant digits, "< 0.001" below 0.001) and the two
    discordant counts, e.g.
        "`a` is 0.11 points lower than `b`, 95% interval [-0.92, +0.69], not significant
         (McNemar p = 0.86; 12 vs 11 sentences only one got right)".
    It never says "no loss" or "a gain": a non-significant difference is reported as measured, with the
    interval showing how large a loss or gain the data still allow.
    """
    diff = float(cmp["diff_points"])
    interval = (f"{_level_text(cmp['level'])} interval [{_signed(cmp['ci_low_points'])}, "
                f"{_signed(cmp['ci_high_points'])}]")
    detail = (f"(McNemar {_format_p(cmp['mcnemar_p'])}; {cmp['only_a_right']} vs {cmp['only_b_right']} "
              f"sentences only one got right)")
    if cmp["only_a_right"] == cmp["only_b_right"]:
        head = f"`{a}` and `{b}` are equally accurate on these {cmp['n']} sentences"
        verdict = "significant" if cmp["significant"] else "not significant"  # always "not": p == 1 here
        return f"{head}, {interval}, {verdict} {detail}"
    direction = "higher" if diff > 0 else "lower"
    size = abs(diff)
    size_text = f"{size:.2f}" if size >= 0.005 else f"{size:.2g}"
    head = f"`{a}` is {size_text} points {direction} than `{b}`"
    verdict = f"significantly {direction}" if cmp["significant"] else "not significant"
    return f"{head}, {interval}, {verdict} {detail}"


def seed_spread(values: Sequence[float]) -> dict:
    """Spread of one number (e.g. an accuracy) across training seeds, in the units it is given in.

    This is seed-to-seed variation of the training run, NOT sentence-sampling uncertainty (for that see
    `accuracy_interval` / `paired_comparison`); with few seeds it is itself a rough estimate.

    Returns {"n_seeds": number of values, "mean": arithmetic mean, "std": sample standard deviation
    (ddof=1; 0.0 for a single seed), "min": smallest value, "max": largest value}, all floats but n_seeds.
    Raises ValueError for no values or non-finite values.
    """
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("seed_spread needs a flat, non-empty sequence of numbers, one per seed")
    if not np.isfinite(arr).all():
        raise ValueError("seed_spread got a non-finite value (NaN or inf)")
    n = int(arr.size)
    return {"n_seeds": n, "mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if n > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max())}


def median_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """The median of independent repeated measurements and its distribution-free confidence interval.

    For n independent draws from any continuous distribution, the number of draws below the true median is
    Binomial(n, 1/2), so the k-th smallest and k-th largest values bracket it with probability
    1 - 2 * P(X <= k - 1), X ~ Binomial(n, 1/2) (computed exactly, in integers). The interval is the narrowest
    such pair whose coverage is at least `level`; `coverage` is that exact probability (e.g. n = 10 gives the
    2nd smallest and 2nd largest, coverage 0.9785). Too few values for any pair to reach `level` (n <= 5 at
    95%) give ci_low = ci_high = None.

    Returns {"median", "ci_low", "ci_high", "coverage" (None with no interval), "n", "level"}.
    Raises ValueError for no values, non-finite values or a level outside (0, 1).
    """
    arr = np.sort(np.asarray(values, dtype=float))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("median_interval needs a flat, non-empty sequence of numbers")
    if not np.isfinite(arr).all():
        raise ValueError("median_interval got a non-finite value (NaN or inf)")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1 (e.g. 0.95), got {level!r}")
    n = int(arr.size)
    result = {"median": float(np.median(arr)), "ci_low": None, "ci_high": None, "coverage": None, "n": n,
              "level": level}
    below, term = 0, 1  # P(X <= k - 1) * 2**n, grown one k at a time; term = C(n, k - 1)
    for k in range(1, n // 2 + 1):
        below += term
        coverage = 1.0 - (2 * below) / (1 << n)
        if coverage < level:
            break
        result.update(ci_low=float(arr[k - 1]), ci_high=float(arr[n - k]), coverage=coverage)
        term = term * (n - k + 1) // k
    return result
