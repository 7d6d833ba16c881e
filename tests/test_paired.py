"""Paired statistics against hand-computed cases."""

import math

import numpy as np
import pytest

from mio_jax import paired


def test_mcnemar_counts_only_discordant_problems_and_is_exact():
    # 7 discordant problems, 1 for A and 6 for B: p = 2 * P(X <= 1 | 7, 1/2) = 2 * 8 / 128
    a = [1, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    b = [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    out = paired.mcnemar(a, b)
    assert (out.a_only, out.b_only) == (1, 6)
    assert out.p_value == pytest.approx(16 / 128, abs=1e-12)
    # symmetric, and 1 when nothing is discordant or the split is even
    assert paired.mcnemar(b, a).p_value == pytest.approx(out.p_value, abs=1e-12)
    assert paired.mcnemar([1, 0], [1, 0]).p_value == 1.0
    assert paired.mcnemar([1, 0], [0, 1]).p_value == 1.0  # 2 * P(X <= 1 | 2) = 1.5 -> 1
    # seeds x problems: every cell is one paired outcome
    two = paired.mcnemar(np.array([a, a], bool), np.array([b, b], bool))
    assert (two.a_only, two.b_only) == (2, 12)
    # 14 discordant, 2 for A: 2 * (1 + 14 + 91) / 2**14
    assert two.p_value == pytest.approx(2 * 106 / 2**14, abs=1e-12)


def test_paired_t_equals_the_closed_form_for_two_degrees_of_freedom():
    # d = [0.1, 0.2, 0.3]: mean 0.2, sd 0.1, se 0.1/sqrt(3), t = 2 sqrt(3), df = 2;
    # for df = 2 the t tail is 0.5 (1 - t / sqrt(t^2 + 2)) and t_0.975 = 4.302652729...
    out = paired.paired_t([0.6, 0.7, 0.8], [0.5, 0.5, 0.5])
    t = 2 * math.sqrt(3)
    assert out.mean == pytest.approx(0.2, abs=1e-12)
    assert out.t == pytest.approx(t, rel=1e-12) and out.df == 2
    assert out.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    half = 4.302652729696142 * 0.1 / math.sqrt(3)
    assert (out.low, out.high) == pytest.approx((0.2 - half, 0.2 + half), rel=1e-9)
    assert paired.paired_t([0.5], [0.4]).n == 1 and math.isnan(paired.paired_t([0.5], [0.4]).low)


def test_paired_bootstrap_interval_contains_the_mean_and_shrinks_with_problems():
    rng = np.random.default_rng(0)
    a = rng.random((3, 400)) < 0.6
    b = rng.random((3, 400)) < 0.5
    out = paired.paired_bootstrap(a, b, num_resamples=4000, seed=1)
    want = float((a.astype(float) - b).mean())
    assert out.mean == pytest.approx(want, abs=1e-12) and out.n == 400
    assert out.low < out.mean < out.high
    # the normal approximation of the same interval: mean +- 1.96 sd / sqrt(n) over problems
    per_problem = (a.astype(float) - b).mean(axis=0)
    half = 1.96 * per_problem.std(ddof=1) / math.sqrt(400)
    assert out.high - out.low == pytest.approx(2 * half, rel=0.1)
    # the same seed gives the same interval; identical methods give exactly zero
    assert paired.paired_bootstrap(a, b, num_resamples=4000, seed=1) == out
    same = paired.paired_bootstrap(a, a, num_resamples=100)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        paired.mcnemar([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="booleans or 0/1"):
        paired.mcnemar([0.5, 1], [1, 0])
    with pytest.raises(ValueError, match="nothing to compare"):
        paired.paired_t([], [])
