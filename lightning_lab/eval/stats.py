"""Paired statistics every method reuses: bootstrap intervals, paired differences, McNemar, paired t.

The methods compare two systems on the same items (an adapter and its base on the same prompts,
thoughts on and off, a controller and greedy decoding), so the tests here are paired: resampling
or differencing per item removes the items' own difficulty from the comparison, which makes
intervals far narrower than comparing two separate ones.

- `bootstrap_mean_ci`: the mean of each column with a percentile bootstrap interval over rows.
- `paired_bootstrap_difference`: mean of ``a - b`` per item, with the same interval.
- `mcnemar_exact`: exact McNemar test on paired right/wrong outcomes (binomial on the discordant pairs).
- `paired_t_test`: Student's paired t-test on per-item differences.

All are scipy (`stats.bootstrap`, `stats.binomtest`, `stats.ttest_rel`) with the lab's conventions
around them: seeded, defined for the degenerate cases scipy refuses (one item, no discordant pair).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def bootstrap_mean_ci(values, resamples: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column means of `values` (rows = items, e.g. prompts) and their percentile bootstrap interval.

    Returns (mean, lower, upper), each with one entry per column (a 1-D input is one column).
    The percentile method rather than scipy's default BCa: pass@k columns are often constant
    (every prompt solved, or none), where BCa's acceleration is undefined and it returns NaN.
    A single row has no spread to resample: its interval is the value itself.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or len(values) == 0:
        raise ValueError(f"bootstrap_mean_ci needs a non-empty (items, columns) array; got shape {values.shape}")
    if resamples < 1:
        raise ValueError(f"bootstrap_mean_ci: resamples must be >= 1; got {resamples}")
    mean = values.mean(axis=0)
    if len(values) == 1:
        return mean, mean.copy(), mean.copy()
    result = stats.bootstrap((values,), np.mean, axis=0, n_resamples=resamples, confidence_level=confidence,
                             method="percentile", rng=np.random.default_rng(seed))
    return mean, np.asarray(result.confidence_interval.low), np.asarray(result.confidence_interval.high)


def paired_bootstrap_difference(a, b, resamples: int = 1000, confidence: float = 0.95,
                                seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of ``a - b`` over items (rows of equal shape, item i of `a` paired with item i of `b`), with a
    bootstrap interval that resamples items, i.e. both sides of a pair together."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap_difference needs paired items of equal shape; got {a.shape} and {b.shape}")
    return bootstrap_mean_ci(a - b, resamples=resamples, confidence=confidence, seed=seed)


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """Exact (binomial) McNemar test of "a and b are right equally often" on paired outcomes.

    Only discordant items count: ``a_only`` (a right, b wrong) and ``b_only``; under the null each
    discordant item is a fair coin, so the two-sided p-value is `binomtest(a_only, a_only + b_only)`.
    With no discordant item there is no evidence either way: p = 1.
    """
    a_correct, b_correct = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a_correct.shape != b_correct.shape:
        raise ValueError(f"mcnemar_exact needs paired outcomes; got {a_correct.shape} and {b_correct.shape}")
    a_only, b_only = int(np.sum(a_correct & ~b_correct)), int(np.sum(~a_correct & b_correct))
    discordant = a_only + b_only
    p_value = stats.binomtest(a_only, discordant, 0.5).pvalue if discordant else 1.0
    return {"items": int(a_correct.size), "a_only": a_only, "b_only": b_only, "p_value": float(p_value)}


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Student's paired t-test of mean(a - b) = 0 (two-sided); None statistics when it is undefined
    (fewer than two items, or every difference equal, where the standard error is 0)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_t_test needs two equally long 1-D sequences; got {a.shape} and {b.shape}")
    difference = a - b
    result = {"items": int(a.size), "mean_difference": float(difference.mean()) if a.size else None,
              "t": None, "df": None, "p_value": None}
    if a.size >= 2 and np.ptp(difference) > 0:
        test = stats.ttest_rel(a, b)
        result.update(t=float(test.statistic), df=int(test.df), p_value=float(test.pvalue))
    return result
