"""Uncertainty of accuracies: across seeds (Student t), across validation images (bootstrap) and between two models
scored on the same images (exact McNemar, paired bootstrap). Pure functions of numbers; no scipy.

Per-image correctness is a 0/1 vector, so resampling images with replacement only changes *how many* are correct:
the count in a bootstrap sample of ``n`` images is Binomial(n, k/n) (and, for two models, the four agree/disagree
counts are Multinomial). The bootstraps draw those counts directly -- the same distribution as resampling indices,
at O(n_boot) cost and memory instead of O(n_boot * n), which matters for 50 000 ImageNet images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = Sequence[float] | Sequence[bool] | np.ndarray | torch.Tensor


def student_t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer ``df`` >= 1: the finite series of Abramowitz & Stegun 26.7.3/4.

    With theta = atan(t / sqrt(df)):
    odd df:  A = 2/pi * (theta + sin(theta) * (cos(theta) + 2/3 cos^3 + 2*4/(3*5) cos^5 + ... + cos^(df-2) term))
    even df: A = sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... + cos^(df-2) term)
    Every term is positive, so the sum is as accurate as the floats it adds; df over seeds is always an integer.
    """
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom df={df} must be an integer >= 1")
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:
        term, total = math.cos(theta), 0.0
        for j in range((df - 1) // 2):  # cos^1 .. cos^(df-2), each the last times cos^2 * (2j+2)/(2j+3)
            total += term
            term *= cos2 * (2 * j + 2) / (2 * j + 3)
        return 2 / math.pi * (theta + math.sin(theta) * total)
    term, total = 1.0, 0.0
    for j in range(df // 2):  # cos^0 .. cos^(df-2), each the last times cos^2 * (2j+1)/(2j+2)
        total += term
        term *= cos2 * (2 * j + 1) / (2 * j + 2)
    return math.sin(theta) * total


def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (t(0.975, 4) = 2.776445).

    Inverts :func:`student_t_two_sided` by bisection on theta = atan(t / sqrt(df)) in [0, pi/2): a bounded, monotone
    search that needs no bracket for heavy tails (t(0.9995, 1) = 636.6), run until theta stops changing.
    """
    if not 0 < p < 1:
        raise ValueError(f"quantile p={p} must be in (0, 1)")
    if p == 0.5:
        return 0.0
    target = abs(2 * p - 1)  # P(|T| <= t) of the upper quantile; the lower one is its negative
    lo, hi = 0.0, math.pi / 2
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if student_t_two_sided(math.sqrt(df) * math.tan(mid), df) < target:
            lo = mid
        else:
            hi = mid
    t = math.sqrt(df) * math.tan(0.5 * (lo + hi))
    return t if p > 0.5 else -t


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")


def _vector(values: ArrayLike, name: str, dtype: type) -> np.ndarray:
    array = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}")
    return array.astype(dtype)


def t_interval(values: ArrayLike, confidence: float = 0.95) -> tuple[float, float | None]:
    """(mean, half-width) of the Student t confidence interval of the mean of ``values`` (e.g. top-1 over seeds):
    half-width = t((1 + confidence) / 2, n - 1) * s / sqrt(n), s the sample standard deviation (ddof 1).
    A single value has no spread to estimate: half-width None."""
    _check_confidence(confidence)
    x = _vector(values, "values", float)
    if x.size == 1:
        return float(x[0]), None
    sd = float(np.std(x, ddof=1))
    return float(x.mean()), student_t_quantile((1 + confidence) / 2, x.size - 1) * sd / math.sqrt(x.size)


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def bootstrap_interval(
    correct: ArrayLike, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """(top-1, lo, hi): the percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13) of one run's top-1 over
    its validation images, ``correct`` being one bool per image. A resample of the n images holds
    Binomial(n, top-1) correct ones, so the ``n_boot`` resampled top-1s are drawn as such (module docstring)."""
    _check_confidence(confidence)
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1 (bootstrap resamples)")
    hits = _vector(correct, "correct", bool)
    n, acc = hits.size, float(hits.mean())
    samples = np.random.default_rng(seed).binomial(n, acc, size=n_boot) / n
    return (acc, *_percentiles(samples, confidence))


def _discordant(correct_a: ArrayLike, correct_b: ArrayLike) -> tuple[int, int, int]:
    a, b = _vector(correct_a, "correct_a", bool), _vector(correct_b, "correct_b", bool)
    if a.size != b.size:
        raise ValueError(
            f"correct_a has {a.size} images, correct_b {b.size}; pair the two models' results on the same images"
        )
    return int((a & ~b).sum()), int((~a & b).sum()), a.size


def mcnemar(correct_a: ArrayLike, correct_b: ArrayLike) -> float:
    """Two-sided exact McNemar p-value of two models scored on the same images (McNemar 1947, exact form).

    Only the discordant images count: b = a right and b wrong, c = the reverse. Under H0 (equal accuracy) b is
    Binomial(b + c, 1/2), so p = min(1, 2 * P(X <= min(b, c))) = min(1, 2 * sum_{i<=min(b,c)} C(n, i) / 2^n),
    n = b + c. The binomial terms are summed in log space (lgamma), exact to float precision for any n.
    """
    b, c, _ = _discordant(correct_a, correct_b)
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)
    ]
    peak = max(log_terms)
    tail = math.exp(peak) * math.fsum(math.exp(t - peak) for t in log_terms)
    return min(1.0, 2 * tail)


def paired_bootstrap(
    correct_a: ArrayLike, correct_b: ArrayLike, confidence: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float, float, float]:
    """(diff, lo, hi, p) for top-1(a) - top-1(b) on the same images, resampling images (pairs) with replacement.

    diff = (b - c) / n with b, c the discordant counts of :func:`mcnemar`; a resample's counts are
    Multinomial(n, (b/n, c/n, rest)). [lo, hi]: percentile interval of the resampled differences d*. p: two-sided,
    from the bootstrap distribution shifted to the null (Efron & Tibshirani 1993, ch. 16; Davison & Hinkley 1997,
    ch. 4): p = (1 + #{|d* - diff| >= |diff|}) / (n_boot + 1).
    """
    _check_confidence(confidence)
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1 (bootstrap resamples)")
    b, c, n = _discordant(correct_a, correct_b)
    diff = (b - c) / n
    counts = np.random.default_rng(seed).multinomial(n, [b / n, c / n, (n - b - c) / n], size=n_boot)
    samples = (counts[:, 0] - counts[:, 1]) / n
    # A tolerance of a fraction of one image's weight: d* lives on the 1/n grid, and |d* - diff| == |diff| must
    # count however the floats round.
    extreme = int((np.abs(samples - diff) >= abs(diff) - 0.5 / n).sum())
    return (diff, *_percentiles(samples, confidence), (1 + extreme) / (n_boot + 1))
