"""tokred.stats against hand-computed values: Student t quantiles and intervals, bootstrap intervals, McNemar."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from tokred.stats import (
    bootstrap_interval,
    mcnemar,
    paired_bootstrap,
    student_t_quantile,
    student_t_two_sided,
    t_interval,
)


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        # published table values (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2)
        (0.975, 2, 4.302653),
        (0.975, 4, 2.776445),
        (0.975, 9, 2.262157),
        (0.975, 30, 2.042272),
        (0.95, 5, 2.015048),
        (0.995, 10, 3.169273),
        # df = 1 is the Cauchy distribution: t = tan(pi * (p - 1/2)); tan(0.475 pi) = 12.706205
        (0.975, 1, math.tan(math.pi * 0.475)),
        (0.9995, 1, math.tan(math.pi * 0.4995)),
        # df = 2 has the closed form t = (2p - 1) / sqrt(2 p (1 - p)): 0.8 / sqrt(0.18) = 1.885618
        (0.9, 2, 0.8 / math.sqrt(0.18)),
        # lower tail: the negative of the upper one
        (0.025, 4, -2.776445),
        (0.5, 7, 0.0),
        # df -> infinity: the normal quantile z(0.975) = 1.959964; df = 1e5 is 1.959988
        (0.975, 100_000, 1.959988),
    ],
)
def test_student_t_quantile(p, df, expected):
    assert student_t_quantile(p, df) == pytest.approx(expected, abs=2e-6)


def test_student_t_two_sided_closed_forms():
    # df = 2: P(|T| <= t) = t / sqrt(2 + t^2); df = 3: 2/pi * (atan(t/sqrt3) + sqrt3 t / (3 + t^2))
    for t in (0.1, 1.0, 2.5, 40.0):
        assert student_t_two_sided(t, 2) == pytest.approx(t / math.sqrt(2 + t * t), rel=1e-12)
        three = 2 / math.pi * (math.atan(t / math.sqrt(3)) + math.sqrt(3) * t / (3 + t * t))
        assert student_t_two_sided(t, 3) == pytest.approx(three, rel=1e-12)


def test_student_t_rejects_bad_input():
    with pytest.raises(ValueError, match="df=2.5 must be an integer"):
        student_t_two_sided(1.0, 2.5)
    with pytest.raises(ValueError, match=r"p=1 must be in \(0, 1\)"):
        student_t_quantile(1, 3)


def test_t_interval_by_hand():
    # values 1..5: mean 3, s = sqrt(10 / 4) = 1.581139, half-width = t(0.975, 4) * s / sqrt(5)
    #   = 2.776445 * 0.707107 = 1.963243
    mean, half = t_interval([1, 2, 3, 4, 5])
    assert mean == 3.0
    assert half == pytest.approx(1.963243, abs=1e-6)
    # two seeds 0.90, 0.94: mean 0.92, s = 0.04 / sqrt 2 = 0.028284, half = 12.706205 * 0.028284 / sqrt 2 = 0.254124
    mean, half = t_interval(torch.tensor([0.90, 0.94], dtype=torch.float64), confidence=0.95)
    assert mean == pytest.approx(0.92)
    assert half == pytest.approx(0.254124, abs=1e-6)
    # 90 %: t(0.95, 4) = 2.131847 -> 2.131847 * 0.707107 = 1.507443
    assert t_interval([1, 2, 3, 4, 5], confidence=0.9)[1] == pytest.approx(1.507443, abs=1e-6)


def test_t_interval_single_seed_and_errors():
    assert t_interval([0.93]) == (0.93, None)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        t_interval([])
    with pytest.raises(ValueError, match=r"confidence=95 must be in \(0, 1\)"):
        t_interval([1, 2], confidence=95)


def test_mcnemar_by_hand():
    # 8 images only a gets right, 2 only b, 5 both: n = 10 discordant, min(b, c) = 2
    #   p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * 56 / 1024 = 0.109375
    a = [True] * 8 + [False] * 2 + [True] * 5
    b = [False] * 8 + [True] * 2 + [True] * 5
    assert mcnemar(a, b) == pytest.approx(0.109375, rel=1e-12)
    assert mcnemar(b, a) == pytest.approx(0.109375, rel=1e-12)  # two-sided: symmetric
    # b = 0, c = 5: p = 2 * C(5,0) / 2^5 = 0.0625
    assert mcnemar([False] * 5, [True] * 5) == pytest.approx(0.0625, rel=1e-12)
    # balanced discordance (2 * P(X <= 3 | n = 6) = 1.3125) and no discordance at all: p = 1
    assert mcnemar([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]) == 1.0
    assert mcnemar(np.ones(7, bool), np.ones(7, bool)) == 1.0


def test_mcnemar_large_n_matches_exact_integers():
    # b = 1400, c = 1600: the tail sum in exact rational arithmetic, against the log-space sum
    b, c = 1400, 1600
    n = b + c
    exact = min(Fraction(1), 2 * Fraction(sum(math.comb(n, i) for i in range(b + 1)), 2**n))
    a_right = np.r_[np.ones(b, bool), np.zeros(c, bool)]
    assert mcnemar(a_right, ~a_right) == pytest.approx(float(exact), rel=1e-9)


def test_mcnemar_rejects_unpaired():
    with pytest.raises(ValueError, match="correct_a has 3 images, correct_b 2; pair"):
        mcnemar([1, 0, 1], [1, 0])


def test_bootstrap_interval_by_hand():
    # 80 of 100 right: the bootstrap top-1 is Binomial(100, 0.8) / 100, sd = sqrt(0.8 * 0.2 / 100) = 0.04, so the
    # 95 % percentile interval is about 0.8 -/+ 1.96 * 0.04 = [0.7216, 0.8784] (on the 1/100 grid: 0.72, 0.88)
    correct = np.r_[np.ones(80, bool), np.zeros(20, bool)]
    acc, lo, hi = bootstrap_interval(correct, n_boot=20_000, seed=0)
    assert acc == 0.8
    assert lo == pytest.approx(0.72, abs=0.011)
    assert hi == pytest.approx(0.88, abs=0.011)
    assert bootstrap_interval(correct, n_boot=500, seed=3) == bootstrap_interval(correct, n_boot=500, seed=3)
    assert bootstrap_interval(np.ones(50, bool)) == (1.0, 1.0, 1.0)  # no wrong image: nothing to resample


def test_bootstrap_draws_match_resampling_images():
    # Binomial draws of the count stand for resampling the image indices themselves: same percentiles
    rng = np.random.default_rng(1)
    correct = rng.random(300) < 0.7
    resampled = correct[rng.integers(0, 300, size=(4000, 300))].mean(axis=1)
    lo, hi = np.quantile(resampled, [0.025, 0.975])
    _, blo, bhi = bootstrap_interval(correct, n_boot=4000, seed=2)
    assert (blo, bhi) == pytest.approx((lo, hi), abs=0.01)


def test_paired_bootstrap_by_hand():
    # n = 200 images, 30 only a right (b), 10 only b right (c): diff = (30 - 10) / 200 = 0.1. The resampled diff has
    # variance (b/n + c/n - diff^2) / n = (0.15 + 0.05 - 0.01) / 200 = 0.00095, sd 0.030822: the 95 % interval is
    # about 0.1 -/+ 1.96 * 0.030822 = [0.0396, 0.1604]; p ~ P(|Z| >= 0.1 / 0.030822 = 3.24) = 0.0012
    a = np.r_[np.ones(30, bool), np.zeros(10, bool), np.ones(100, bool), np.zeros(60, bool)]
    b = np.r_[np.zeros(30, bool), np.ones(10, bool), np.ones(100, bool), np.zeros(60, bool)]
    diff, lo, hi, p = paired_bootstrap(a, b, n_boot=20_000, seed=0)
    assert diff == pytest.approx(0.1)
    assert lo == pytest.approx(0.0396, abs=0.006)
    assert hi == pytest.approx(0.1604, abs=0.006)
    assert p < 0.01
    # the same order of evidence as McNemar's exact test on those counts: 2 * P(X <= 10 | n = 40) = 0.0022
    assert mcnemar(a, b) == pytest.approx(0.002221, abs=1e-6)
    # swapped models: the difference and its interval change sign
    neg = paired_bootstrap(b, a, n_boot=20_000, seed=0)
    assert neg[0] == pytest.approx(-0.1)
    assert neg[1] == pytest.approx(-hi, abs=0.006)


def test_paired_bootstrap_no_difference():
    same = np.random.default_rng(0).random(100) < 0.5
    assert paired_bootstrap(same, same, n_boot=1000) == (0.0, 0.0, 0.0, 1.0)
    # equal discordant counts: diff 0, p = 1 (every resample is at least as far from 0 as 0 is)
    a, b = [1, 0, 1, 0], [0, 1, 1, 0]
    diff, lo, hi, p = paired_bootstrap(a, b, n_boot=1000)
    assert (diff, p) == (0.0, 1.0)
    assert lo < 0 < hi


def test_paired_bootstrap_matches_resampling_pairs():
    rng = np.random.default_rng(4)
    a, b = rng.random(400) < 0.8, rng.random(400) < 0.7
    idx = rng.integers(0, 400, size=(4000, 400))
    diffs = a[idx].mean(axis=1) - b[idx].mean(axis=1)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    _, blo, bhi, _ = paired_bootstrap(a, b, n_boot=4000, seed=5)
    assert (blo, bhi) == pytest.approx((lo, hi), abs=0.01)
