"""Paired statistics for comparing methods on the same problems and seeds (pure; no I/O).

Two runs of a study are paired twice over: by seed (the same seed gives every method the
same data order and the same sampled prompts) and by problem (every evaluation asks the same
held-out problems). The tests here use both pairings:

- ``mcnemar``: the exact McNemar test on per-problem outcomes (correct / wrong) of two
  methods, pooled over the paired (seed, problem) cells: only the discordant cells count,
  and under no difference each is equally likely to favour either method.
- ``paired_bootstrap``: the mean per-problem difference (each problem's outcome averaged
  over seeds first) with a percentile interval from resampling problems.
- ``paired_t``: the t test and interval of the mean difference of per-seed accuracies (the
  seed is the unit of replication: it varies data order, sampling and initial noise).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class McNemar:
    """``a_only``: cells method A got right and B wrong; ``b_only`` the reverse;
    ``p_value``: the exact two-sided p-value (binomial on the discordant cells)."""

    a_only: int
    b_only: int
    p_value: float


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean difference (A - B) with its interval at ``level``; for ``paired_t`` also the
    t statistic, degrees of freedom and two-sided p-value (NaN with fewer than 2 seeds)."""

    mean: float
    low: float
    high: float
    level: float
    n: int
    t: float = math.nan
    df: int = 0
    p_value: float = math.nan


def _as_outcomes(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name}: per-problem outcomes must be booleans or 0/1")
    return arr.astype(bool)


def _check_paired(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired outcomes: nothing to compare")


def mcnemar(a: Sequence, b: Sequence) -> McNemar:
    """Exact McNemar test of outcomes ``a`` and ``b`` (booleans, same shape: problems, or
    seeds x problems, cell by cell paired)."""
    a, b = _as_outcomes(a, "a"), _as_outcomes(b, "b")
    _check_paired(a, b)
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = a_only + b_only
    p = 1.0 if n == 0 else min(1.0, 2.0 * float(stats.binom.cdf(min(a_only, b_only), n, 0.5)))
    return McNemar(a_only, b_only, p)


def paired_bootstrap(a: Sequence, b: Sequence, *, num_resamples: int = 10000, seed: int = 0,
                     level: float = 0.95) -> Interval:
    """Mean of ``a - b`` over problems with a percentile bootstrap interval.

    Args:
      a, b: outcomes ``[problems]`` or ``[seeds, problems]`` (then each problem's outcome is
        first averaged over seeds, so resampling keeps a problem's seeds together).
      num_resamples: bootstrap resamples of the problems.
      seed: the resampling seed (the interval is reproducible).
      level: the interval's coverage.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    _check_paired(a, b)
    diff = (a - b) if a.ndim == 1 else (a - b).mean(axis=0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(num_resamples, diff.size))
    means = diff[idx].mean(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(diff.mean()), float(low), float(high), level, int(diff.size))


def paired_t(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> Interval:
    """Paired t test of per-seed scores ``a[s]`` and ``b[s]`` (e.g. accuracies), with the
    t interval of the mean difference."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    _check_paired(a, b)
    d = a - b
    n = int(d.size)
    mean = float(d.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, level, n)
    se = float(d.std(ddof=1)) / math.sqrt(n)
    df = n - 1
    q = float(stats.t.ppf(0.5 + level / 2, df))
    if se == 0.0:  # every seed moved by the same amount
        t = math.copysign(math.inf, mean) if mean else math.nan
        p = 0.0 if mean else 1.0
    else:
        t = mean / se
        p = float(2.0 * stats.t.sf(abs(t), df))
    return Interval(mean, mean - q * se, mean + q * se, level, n, t, df, p)
