"""Emergence definition, predictor JSON round trip, grouped CV, beta-binomial fit and extrapolation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import beta as beta_distribution

from lightning_lab.bon.predict import (
    EmergenceDataset,
    EmergencePredictor,
    PredictConfig,
    answer_entropy,
    beta_binomial_pass_at_k,
    calibration_table,
    cross_validate,
    dataset_emergence,
    extrapolation_report,
    fit_beta_binomial,
    prompt_gain,
)


def test_prompt_gain_is_pass_at_kmax_minus_pass_at_1():
    # 1 correct of 8: pass@1 = 1/8, pass@8 = 1
    assert prompt_gain(8, 1, 8) == pytest.approx(1 - 1 / 8)
    assert prompt_gain(8, 0, 8) == 0.0
    assert prompt_gain(8, 8, 8) == 0.0


def test_dataset_emergence_peaks_where_the_gain_per_doubling_is_largest():
    result = dataset_emergence([1, 2, 4, 8, 16], [0.05, 0.07, 0.10, 0.40, 0.45])
    assert result["emergence_k"] == 8
    assert result["peak_gain"] == pytest.approx(0.30) and not result["peak_at_largest_k"]
    still_accelerating = dataset_emergence([1, 2, 4, 8], [0.01, 0.02, 0.04, 0.09])
    assert still_accelerating["emergence_k"] == 8 and still_accelerating["peak_at_largest_k"]
    with pytest.raises(ValueError, match="1, 2, 4"):
        dataset_emergence([1, 3, 9], [0.1, 0.2, 0.3])


def test_answer_entropy_in_bits():
    assert answer_entropy(["4", "4", "4", "4"]) == 0.0
    assert answer_entropy(["1", "2", "3", "4"]) == pytest.approx(2.0)
    assert answer_entropy(["1", None, "1", None]) == pytest.approx(1.0)  # "no answer" is one answer


def _synthetic(rows: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(rows, 3))
    logits = 2.0 * features[:, 0] - 1.5 * features[:, 1]
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logits))).astype(int)
    return features, labels


def test_predictor_matches_sklearn_and_round_trips_through_json(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = _synthetic()
    model = EmergencePredictor.fit(features, labels, ["a", "b", "c"])
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(features, labels)
    probabilities = model.predict_proba(features)
    np.testing.assert_allclose(probabilities, reference.predict_proba(features)[:, 1], rtol=1e-10, atol=1e-12)

    path = tmp_path / "model.json"
    path.write_text(json.dumps(model.to_json()))
    loaded = EmergencePredictor.from_json(json.loads(path.read_text()))
    assert np.array_equal(loaded.predict_proba(features), probabilities)  # bit for bit
    assert loaded.feature_names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="shape"):
        loaded.predict_proba(features[:, :2])


def test_fit_refuses_a_single_class():
    features, _ = _synthetic(20)
    with pytest.raises(ValueError, match="threshold"):
        EmergencePredictor.fit(features, np.zeros(20, dtype=int), ["a", "b", "c"])


def test_grouped_cross_validation_scores_an_informative_feature_well():
    features, labels = _synthetic(400)
    dataset = EmergenceDataset(features, labels, labels.astype(float), ["a", "b", "c"],
                               run_names=["run"] * 400, prompt_ids=[f"p{i // 2}" for i in range(400)], k_max=8)
    cv = cross_validate(dataset, PredictConfig(n_splits=4))
    assert cv["n_splits"] == 4
    assert cv["roc_auc"] > 0.8
    assert cv["brier"] < cv["brier_base_rate"]
    assert sum(b["count"] for b in cv["calibration"]) == 400
    # one run cannot be split by run
    with pytest.raises(ValueError, match="at least 2 groups"):
        cross_validate(dataset, PredictConfig(group_by="run"))


def test_calibration_table_bins():
    table = calibration_table(np.array([0, 0, 1, 1]), np.array([0.05, 0.15, 0.85, 0.95]), bins=2)
    assert [b["count"] for b in table] == [2, 2]
    assert table[0]["fraction_positive"] == 0.0 and table[1]["fraction_positive"] == 1.0


def test_beta_binomial_closed_form_matches_numerical_integration():
    alpha, beta = 0.4, 2.5
    for k in (1, 8, 64):
        numeric, _ = integrate.quad(lambda p: (1 - (1 - p) ** k) * beta_distribution.pdf(p, alpha, beta), 0, 1,
                                    limit=200)
        assert beta_binomial_pass_at_k(alpha, beta, k) == pytest.approx(numeric, rel=1e-6)
    assert beta_binomial_pass_at_k(alpha, beta, 1) == pytest.approx(alpha / (alpha + beta))


def test_beta_binomial_fit_recovers_known_parameters():
    rng = np.random.default_rng(0)
    alpha, beta, prompts, budget = 0.5, 3.0, 4000, 8
    successes = rng.binomial(budget, rng.beta(alpha, beta, size=prompts))
    fit = fit_beta_binomial(successes, [budget] * prompts)
    assert fit.converged
    assert fit.alpha == pytest.approx(alpha, rel=0.15)
    assert fit.beta == pytest.approx(beta, rel=0.2)
    assert fit.pass_at_k(128) == pytest.approx(beta_binomial_pass_at_k(alpha, beta, 128), abs=0.03)


def test_extrapolation_beats_the_plug_in_estimate_on_hard_prompts():
    rng = np.random.default_rng(1)
    n, budget = 64, 8
    records = []
    for i, p in enumerate(rng.beta(0.3, 4.0, size=1000)):
        scores = (rng.random(n) < p).astype(float)
        records.append({"id": f"p{i}", "n": n, "num_correct": int(scores.sum()),
                        "samples": [{"score": s} for s in scores]})
    report = extrapolation_report("synthetic", records, budget, extrapolate_k=(128,))
    assert [row["k"] for row in report["curve"]] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert report["curve"][-1]["measured"] is None  # 128 > n: extrapolated only
    # 8 samples per prompt leave real estimation noise (up to ~0.05 over seeds); the plug-in is off by ~0.3
    assert report["max_abs_error_beta_binomial"] < 0.08
    assert report["max_abs_error_beta_binomial"] < report["max_abs_error_plug_in"] / 3
    with pytest.raises(ValueError, match="budget"):
        extrapolation_report("synthetic", records, 100, extrapolate_k=(128,))
