"""eval/stats.py against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_lab.eval.stats import bootstrap_mean_ci, mcnemar_exact, paired_bootstrap_difference, paired_t_test


def test_bootstrap_interval_is_the_exact_bootstrap_distributions_quantiles():
    # [0, 0, 3]: the resampled mean is 0, 1, 2, 3 with probabilities 8/27, 12/27, 6/27, 1/27 (how many 3s of 3 draws),
    # so the 95% interval is [0, 3] (P(mean <= 2) = 26/27 < 0.975) and the 90% interval [0, 2] (26/27 > 0.95).
    mean, lower, upper = bootstrap_mean_ci([0.0, 0.0, 3.0], resamples=4000, confidence=0.95, seed=1)
    assert (mean[0], lower[0], upper[0]) == (1.0, 0.0, 3.0)
    _, lower, upper = bootstrap_mean_ci([0.0, 0.0, 3.0], resamples=4000, confidence=0.90, seed=1)
    assert (lower[0], upper[0]) == (0.0, 2.0)
    # two columns at once; a constant column has no spread; [0, 1] at 40%: the 30% and 70% quantiles are both 0.5
    mean, lower, upper = bootstrap_mean_ci([[0.0, 2.0], [1.0, 2.0]], resamples=4000, confidence=0.4, seed=0)
    assert mean.tolist() == [0.5, 2.0] and lower.tolist() == [0.5, 2.0] and upper.tolist() == [0.5, 2.0]
    # one item: the interval is the value; the same seed gives the same interval
    assert [x.tolist() for x in bootstrap_mean_ci([0.25])] == [[0.25]] * 3
    assert np.array_equal(bootstrap_mean_ci(np.arange(20.0), seed=3)[1], bootstrap_mean_ci(np.arange(20.0), seed=3)[1])
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        bootstrap_mean_ci([1.0, 2.0], resamples=0)


def test_paired_difference_resamples_pairs():
    # differences 1, 1, 0, 0: mean 0.5; a pair whose sides move together adds nothing to the spread
    mean, lower, upper = paired_bootstrap_difference([1, 1, 1, 0, 5], [0, 0, 1, 0, 5], resamples=2000)
    assert mean[0] == pytest.approx(0.4) and 0.0 <= lower[0] < 0.4 < upper[0] <= 0.8 + 1e-12
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap_difference([1, 2], [1, 2, 3])


def test_mcnemar_exact_p_value():
    # a right and b wrong on 1 item, the reverse on 6: p = 2 * P(Bin(7, 1/2) <= 1) = 2 * (1 + 7) / 128
    a = [True] * 3 + [True] + [False] * 6 + [False] * 2
    b = [True] * 3 + [False] + [True] * 6 + [False] * 2
    assert mcnemar_exact(a, b) == {"items": 12, "a_only": 1, "b_only": 6, "p_value": pytest.approx(16 / 128)}
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0  # no discordant pair


def test_paired_t_test_matches_the_closed_form():
    # differences 1, 2, 3, 3: mean 2.25, sd sqrt(2.75 / 3), t = 2.25 / (sd / 2); df 3, whose t CDF has a closed form
    result = paired_t_test([1, 2, 3, 4], [0, 0, 0, 1])
    t = 2.25 / (math.sqrt(2.75 / 3) / 2)
    x = t / math.sqrt(3)
    cdf = 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi
    assert result["t"] == pytest.approx(t) and result["df"] == 3 and result["mean_difference"] == 2.25
    assert result["p_value"] == pytest.approx(2 * (1 - cdf))
    assert paired_t_test([1, 2], [0, 1])["p_value"] is None  # every difference equal: no standard error
