"""The spread of a figure over calibration seeds, and paired comparisons of methods.

Every run of a method draws its calibration windows with its own seed; the test windows are the same for every run,
so two methods' runs with the same seed are a pair. For one method: the mean, the sample standard deviation and a
95% confidence interval of the mean (Student t, n - 1 degrees of freedom). Against a reference method: each seed's
ratio (method / reference), the mean ratio and its 95% t-interval, and a verdict in words: "better" where the whole
interval lies below 1 (a lower perplexity), "worse" where it lies above, else "not distinguishable at N seeds".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats

CONFIDENCE = 0.95


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """n, mean, sample std and the t-interval of the mean (None bounds for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("values: nothing to summarize")
    mean = math.fsum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci_low": None, "ci_high": None, "half_width": None}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "half_width": half}


def verdict(low: float | None, high: float | None, n: int, threshold: float = 1.0) -> str:
    """The words for a ratio's interval (lower is better): better, worse, or not distinguishable at n seeds."""
    if low is not None and high is not None:
        if high < threshold:
            return "better"
        if low > threshold:
            return "worse"
    return f"not distinguishable at {n} seed{'s' if n != 1 else ''}"


def paired_ratio(values: Sequence[float], reference: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Per-seed ratios value / reference (paired by position), their summary and the verdict."""
    if len(values) != len(reference):
        raise ValueError(f"values: {len(values)} runs against {len(reference)} of the reference; pair them by seed")
    ratios = [v / r for v, r in zip(values, reference, strict=True)]
    summary = summarize(ratios, confidence)
    return {"ratios": ratios, **summary, "verdict": verdict(summary["ci_low"], summary["ci_high"], summary["n"])}


def describe(summary: dict, digits: int = 3) -> str:
    """`mean ± half-width` (the mean alone for one run)."""
    if summary["half_width"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['half_width']:.{digits}f}"
