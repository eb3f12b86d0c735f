"""Predicting best-of-N emergence from a few cheap samples.

Emergence, defined explicitly:

- per prompt: a prompt is *emergent* when sampling more helps a lot,
  ``pass@k_max - pass@1 >= threshold`` (unbiased estimators over all n samples of the prompt);
- per dataset: the *emergence k* is where the mean pass@k curve gains most per doubling of k,
  the k (a power of two) that maximises ``pass@k - pass@(k/2)``.

Two predictors:

1. A logistic regression on features of the first ``feature_samples`` samples of each prompt
   (pass@1 estimate, answer entropy, distinct answers, mean token log-prob, length, and the
   collector's telemetry when every run has it): the part a user has before deciding whether to
   sample more (the label uses all n samples). Evaluated with grouped cross-validation
   (`StratifiedGroupKFold`: no prompt id, or no run, is in both a training and a test fold, and
   each fold keeps the class balance): out-of-fold ROC-AUC, Brier score and a calibration table. The fitted model is saved as plain JSON (feature names, scaler mean and
   scale, coefficients, intercept) and `EmergencePredictor.predict_proba` computes the same
   numbers from those values alone, so a model loaded back gives identical probabilities.
2. A per-dataset beta-binomial model (Schaeffer et al. 2025, "How do large language monkeys
   get their power (laws)?"): per-prompt success probabilities p ~ Beta(alpha, beta), fitted by
   maximum likelihood to the successes in a small budget of samples per prompt, then
   ``E[pass@k] = E[1 - (1 - p)^k] = 1 - B(alpha, beta + k) / B(alpha, beta)`` extrapolates the
   curve to large k. Reported next to the plug-in baseline ``mean(1 - (1 - c/m)^k)``, which
   cannot credit a prompt that was never solved within the budget.

The functions here take already-read runs (see `collect.read_run`): `(name, header, records, telemetry)`.
`lab bon predict` (`predict`) writes the report; `load_predictor(path)` gives the model back.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from scipy.stats import betabinom

from lightning_lab.data.io import DataError
from lightning_lab.eval.metrics import pass_at_k

# A sample counts as correct when its score reaches this (the exact, numeric, gsm8k, math and
# code scorers all give 0 or 1).
CORRECT_SCORE = 1.0
FEATURE_NAMES = ("pass1_estimate", "answer_entropy", "distinct_answers", "mean_token_logprob", "mean_length")
# Per-batch cost features from `lab bon collect --telemetry`; used only when every run has them.
TELEMETRY_FEATURES = ("decode_s_per_token", "queue_wait_s")


@dataclass
class PredictConfig:
    """Fit and cross-validate the emergence predictor, and the beta-binomial extrapolation."""

    runs: list[str] | str = field(default_factory=lambda: ["runs/bon"])
    """run directories, samples.jsonl files, or directories holding runs: one path, or [path, path, ...]"""
    out: str = "runs/bon/predictor.json"
    """the report JSON (a .calibration.png goes beside it); must not exist yet"""
    threshold: float = 0.5
    """a prompt is emergent when pass@k_max - pass@1 >= threshold, in (0, 1]"""
    k_max: int | None = None
    """null: the largest k that every run measured"""
    feature_samples: int = 8
    """features (and the beta-binomial fit) see only this many samples per prompt"""
    group_by: str = "prompt"
    """cross-validation groups: prompt (id) or run"""
    n_splits: int = 5
    """folds of the grouped cross-validation (>= 2)"""
    regularization_c: float = 1.0
    """inverse L2 strength of the logistic regression (> 0)"""
    extrapolate_k: list[int] = field(default_factory=lambda: [64, 128])
    """k values the beta-binomial fit extrapolates to"""
    calibration_bins: int = 10
    """equal-width bins of the calibration table"""
    seed: int = 0
    """seed of the fold assignment"""

    def __post_init__(self) -> None:
        from lightning_lab.loops import check_choice, check_count, check_number

        self.runs = [self.runs] if isinstance(self.runs, str) else list(self.runs)
        check_number("threshold", self.threshold, 0.0, 1.0, low_open=True)
        if self.k_max is not None:
            check_count("k_max", self.k_max)
        check_count("feature_samples", self.feature_samples)
        check_choice("group_by", self.group_by, ("prompt", "run"))
        check_count("n_splits", self.n_splits, minimum=2)
        check_number("regularization_c", self.regularization_c, 0.0, low_open=True)
        for k in self.extrapolate_k:
            check_count("extrapolate_k", k)
        check_count("calibration_bins", self.calibration_bins)


# ---- small statistics shared with the collector -----------------------------------------------


def is_correct(score: float) -> bool:
    return score >= CORRECT_SCORE


def answer_entropy(answers: Sequence[str | None]) -> float:
    """Shannon entropy (bits) of the final answers; "no answer" (None) is one answer of its own."""
    counts = Counter("\0none" if answer is None else answer for answer in answers)
    total = sum(counts.values())
    return float(-sum(c / total * math.log2(c / total) for c in counts.values())) if total else 0.0


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean over prompts of the unbiased pass@k, from (n samples, c correct) per prompt."""
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def powers_of_two_up_to(n: int) -> list[int]:
    return [2**i for i in range(int(math.log2(n)) + 1)] if n >= 1 else []


# ---- emergence ---------------------------------------------------------------------------------


def prompt_gain(n: int, c: int, k_max: int) -> float:
    """pass@k_max - pass@1 for one prompt with c of n samples correct."""
    return pass_at_k(n, c, k_max) - pass_at_k(n, c, 1)


def dataset_emergence(ks: Sequence[int], curve: Sequence[float]) -> dict:
    """Gain per doubling of a pass@k curve sampled at powers of two, and the k where it peaks.

    `ks` must be 1, 2, 4, ... ; gain at k is ``curve[k] - curve[k/2]``. With fewer than two
    points there is no doubling and the emergence k is None.
    """
    ks, curve = list(ks), list(curve)
    if ks and ks != powers_of_two_up_to(ks[-1]):
        raise ValueError(f"dataset_emergence needs k = 1, 2, 4, ...; got {ks}")
    gains = {k: curve[i] - curve[i - 1] for i, k in enumerate(ks) if i > 0}
    emergence_k = max(gains, key=gains.get) if gains else None
    return {"k": ks, "pass_at_k": curve, "gain_per_doubling": {str(k): g for k, g in gains.items()},
            "emergence_k": emergence_k, "peak_gain": gains[emergence_k] if gains else None,
            # the gain is largest at the largest k measured: the curve may keep accelerating beyond it
            "peak_at_largest_k": bool(gains) and emergence_k == ks[-1]}


# ---- features -----------------------------------------------------------------------------------


def prompt_features(record: dict, feature_samples: int, telemetry_row: dict | None = None) -> dict[str, float]:
    """Cheap features of the first `feature_samples` samples of one prompt record."""
    samples = record["samples"][:feature_samples]
    if len(samples) < feature_samples:
        raise DataError(f"prompt {record['id']!r} has {len(samples)} samples; feature_samples={feature_samples} "
                        f"needs that many")
    features = {
        "pass1_estimate": float(np.mean([is_correct(s["score"]) for s in samples])),
        "answer_entropy": answer_entropy([s["answer"] for s in samples]),
        "distinct_answers": float(len({s["answer"] for s in samples})),
        "mean_token_logprob": float(np.mean([s["logprob"] / max(s["num_tokens"], 1) for s in samples])),
        "mean_length": float(np.mean([s["num_tokens"] for s in samples])),
    }
    if telemetry_row is not None:
        features["decode_s_per_token"] = telemetry_row["decode_s"] / max(telemetry_row["new_tokens"], 1)
        features["queue_wait_s"] = telemetry_row["queue_wait_s"]
    return features


def common_k_max(runs: Sequence[tuple]) -> int:
    """The largest k that every run measured (its config's k_values)."""
    return min(max(header["config"]["k_values"]) for _, header, _, _ in runs)


@dataclass
class EmergenceDataset:
    features: np.ndarray  # (prompts, features)
    labels: np.ndarray  # (prompts,) 1 = emergent
    gains: np.ndarray  # pass@k_max - pass@1 per prompt
    feature_names: list[str]
    run_names: list[str]
    prompt_ids: list[str]
    k_max: int


def build_dataset(runs: Sequence[tuple], config: PredictConfig) -> EmergenceDataset:
    """One row per (run, prompt): features of the first samples, label from all samples."""
    k_max = config.k_max or common_k_max(runs)
    # telemetry features only when every prompt of every run has a telemetry row
    use_telemetry = all(telemetry is not None and all(record["id"] in telemetry for record in records)
                        for _, _, records, telemetry in runs)
    feature_names = list(FEATURE_NAMES) + (list(TELEMETRY_FEATURES) if use_telemetry else [])
    rows, gains, run_names, prompt_ids = [], [], [], []
    for name, _, records, telemetry in runs:
        for record in records:
            n, c = record["n"], record["num_correct"]
            if k_max > n:
                raise DataError(f"{name}: prompt {record['id']!r} has {n} samples, fewer than k_max={k_max}")
            row = prompt_features(record, config.feature_samples, telemetry[record["id"]] if use_telemetry else None)
            rows.append([row[feature] for feature in feature_names])
            gains.append(prompt_gain(n, c, k_max))
            run_names.append(name)
            prompt_ids.append(record["id"])
    gains_array = np.array(gains)
    return EmergenceDataset(np.array(rows, dtype=float), (gains_array >= config.threshold).astype(int), gains_array,
                            feature_names, run_names, prompt_ids, k_max)


# ---- logistic regression, stored as JSON -------------------------------------------------------


@dataclass
class EmergencePredictor:
    """Standardise, then logistic regression; every number needed to predict is a plain list."""

    feature_names: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    metadata: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, feature_names: Sequence[str],
            regularization_c: float = 1.0) -> EmergencePredictor:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        if len(set(labels.tolist())) < 2:
            raise DataError(f"cannot fit: every prompt has label {int(labels[0])}; "
                             f"change the emergence threshold or collect more varied prompts")
        scaler = StandardScaler().fit(features)
        model = LogisticRegression(C=regularization_c, max_iter=1000).fit(scaler.transform(features), labels)
        return cls(list(feature_names), scaler.mean_.tolist(), scaler.scale_.tolist(),
                   model.coef_[0].tolist(), float(model.intercept_[0]))

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """P(emergent) per row of `features` (columns in `feature_names` order)."""
        features = np.asarray(features, dtype=float)
        if features.ndim != 2 or features.shape[1] != len(self.feature_names):
            raise ValueError(f"expected features of shape (rows, {len(self.feature_names)}) "
                             f"for {self.feature_names}; got {features.shape}")
        standardised = (features - np.array(self.mean)) / np.array(self.scale)
        return expit(standardised @ np.array(self.coef) + self.intercept)

    def to_json(self) -> dict:
        return {"kind": "logistic_regression", **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> EmergencePredictor:
        if data.get("kind") != "logistic_regression":
            raise DataError(f"not a saved emergence predictor (kind={data.get('kind')!r})")
        return cls(data["feature_names"], data["mean"], data["scale"], data["coef"], data["intercept"],
                   data.get("metadata", {}))


def load_predictor(path: str | Path) -> EmergencePredictor:
    """The model of a `lab bon predict` report (or of a JSON file holding only the model)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return EmergencePredictor.from_json(data.get("model", data))


def calibration_table(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> list[dict]:
    """Equal-width probability bins: mean predicted probability vs observed fraction positive.

    Not sklearn's `calibration_curve`: it returns neither the bins' counts nor their edges, which the
    report and the calibration plot show.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    table = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            table.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(mask.sum()),
                          "mean_predicted": float(probabilities[mask].mean()),
                          "fraction_positive": float(labels[mask].mean())})
    return table


def cross_validate(dataset: EmergenceDataset, config: PredictConfig) -> dict:
    """Out-of-fold probabilities from grouped, class-stratified K-fold; ROC-AUC, Brier, calibration."""
    from sklearn.metrics import brier_score_loss, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    groups = np.array(dataset.prompt_ids if config.group_by == "prompt" else dataset.run_names)
    n_groups = len(set(groups.tolist()))
    n_splits = min(config.n_splits, n_groups)
    if n_splits < 2:
        raise DataError(f"grouped cross-validation by {config.group_by} needs at least 2 groups; got {n_groups}")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=config.seed)
    out_of_fold = np.full(len(dataset.labels), np.nan)
    for fold, (train, test) in enumerate(folds.split(dataset.features, dataset.labels, groups)):
        if len(set(dataset.labels[train].tolist())) < 2:
            raise DataError(f"fold {fold}: the training part has a single class; too few emergent (or "
                             f"non-emergent) prompts for {n_splits}-fold cross-validation")
        model = EmergencePredictor.fit(dataset.features[train], dataset.labels[train], dataset.feature_names,
                                       config.regularization_c)
        out_of_fold[test] = model.predict_proba(dataset.features[test])
    both_classes = len(set(dataset.labels.tolist())) == 2
    return {
        "group_by": config.group_by,
        "n_splits": n_splits,
        "roc_auc": float(roc_auc_score(dataset.labels, out_of_fold)) if both_classes else None,
        "brier": float(brier_score_loss(dataset.labels, out_of_fold)),
        "brier_base_rate": float(np.mean((dataset.labels - dataset.labels.mean()) ** 2)),
        "calibration": calibration_table(dataset.labels, out_of_fold, config.calibration_bins),
        "out_of_fold_probability": out_of_fold.tolist(),
    }


# ---- beta-binomial extrapolation ---------------------------------------------------------------


@dataclass
class BetaBinomialFit:
    alpha: float
    beta: float
    log_likelihood: float
    num_prompts: int
    converged: bool

    def pass_at_k(self, k: int) -> float:
        """E[1 - (1 - p)^k] for p ~ Beta(alpha, beta)."""
        return beta_binomial_pass_at_k(self.alpha, self.beta, k)


def beta_binomial_pass_at_k(alpha: float, beta: float, k: int) -> float:
    """1 - P(no success in k draws) = 1 - B(alpha, beta + k) / B(alpha, beta)."""
    return float(1.0 - betabinom.pmf(0, k, alpha, beta))


def beta_binomial_log_likelihood(alpha: float, beta: float, successes: np.ndarray, trials: np.ndarray) -> float:
    return float(np.sum(betabinom.logpmf(successes, trials, alpha, beta)))


def fit_beta_binomial(successes: Sequence[int], trials: Sequence[int]) -> BetaBinomialFit:
    """Maximum likelihood over (log alpha, log beta), L-BFGS-B with bounds that keep both finite."""
    successes, trials = np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    if successes.shape != trials.shape or successes.size == 0:
        raise ValueError("fit_beta_binomial needs equally long, non-empty successes and trials")
    if np.any(successes < 0) or np.any(successes > trials):
        raise ValueError("fit_beta_binomial: each success count must lie in [0, trials]")

    def negative_log_likelihood(log_params: np.ndarray) -> float:
        return -beta_binomial_log_likelihood(*np.exp(log_params), successes, trials)

    result = minimize(negative_log_likelihood, x0=np.zeros(2), method="L-BFGS-B", bounds=[(-10.0, 10.0)] * 2)
    alpha, beta = np.exp(result.x)
    return BetaBinomialFit(float(alpha), float(beta), beta_binomial_log_likelihood(alpha, beta, successes, trials),
                           int(successes.size), bool(result.success))


def extrapolation_report(label: str, records: Sequence[dict], budget: int, extrapolate_k: Sequence[int]) -> dict:
    """Fit on the first `budget` samples per prompt of one dataset (`label`: e.g. an adapter's pooled runs),
    predict pass@k, compare with the measured curve.

    The measured curve uses all n samples (k <= n); extrapolated ks beyond n are reported
    without an error.
    """
    n_min = min(record["n"] for record in records)
    if budget > n_min:
        raise DataError(f"{label}: beta-binomial budget {budget} exceeds the {n_min} samples of some prompt")
    budget_successes = [sum(is_correct(s["score"]) for s in record["samples"][:budget]) for record in records]
    fit = fit_beta_binomial(budget_successes, [budget] * len(records))
    counts = [(record["n"], record["num_correct"]) for record in records]
    ks = sorted(set(powers_of_two_up_to(n_min)) | set(extrapolate_k))
    plug_in_p = np.array(budget_successes) / budget
    rows = []
    for k in ks:
        measured = mean_pass_at_k(counts, k) if k <= n_min else None
        predicted = fit.pass_at_k(k)
        plug_in = float(np.mean(1.0 - (1.0 - plug_in_p) ** k))
        rows.append({"k": k, "measured": measured, "beta_binomial": predicted, "plug_in": plug_in,
                     "beta_binomial_error": None if measured is None else predicted - measured,
                     "plug_in_error": None if measured is None else plug_in - measured})
    measured_rows = [row for row in rows if row["measured"] is not None and row["k"] > budget]
    return {
        "adapter": label,
        "budget": budget,
        "num_prompts": len(records),
        "fit": asdict(fit),
        "curve": rows,
        # errors where the fit has to extrapolate (k beyond the budget) and a measurement exists
        "max_abs_error_beta_binomial": max((abs(r["beta_binomial_error"]) for r in measured_rows), default=None),
        "max_abs_error_plug_in": max((abs(r["plug_in_error"]) for r in measured_rows), default=None),
        "measured_emergence": dataset_emergence(powers_of_two_up_to(n_min),
                                                [mean_pass_at_k(counts, k) for k in powers_of_two_up_to(n_min)]),
        "predicted_emergence": dataset_emergence(powers_of_two_up_to(max(ks)),
                                                 [fit.pass_at_k(k) for k in powers_of_two_up_to(max(ks))]),
    }


# ---- lab bon predict ------------------------------------------------------------------------------


def predict(config: PredictConfig) -> dict:
    """Fit and cross-validate the emergence predictor, fit the beta-binomial extrapolation; save JSON + plot."""
    from lightning_lab.bon.collect import read_runs, records_by_adapter
    from lightning_lab.bon.distill import check_output
    from lightning_lab.data.io import write_json_atomic
    from lightning_lab.reports.plots import plot_calibration

    out = check_output(config.out, config.runs)
    calibration_png = check_output(out.with_suffix(".calibration.png"), config.runs, "out (its .calibration.png)")
    runs = read_runs(config.runs)
    dataset = build_dataset(runs, config)
    cv = cross_validate(dataset, config)
    model = EmergencePredictor.fit(dataset.features, dataset.labels, dataset.feature_names, config.regularization_c)
    model.metadata = {"k_max": dataset.k_max, "threshold": config.threshold,
                      "feature_samples": config.feature_samples, "runs": [name for name, *_ in runs]}
    plot_calibration([b["mean_predicted"] for b in cv["calibration"]],
                     [b["fraction_positive"] for b in cv["calibration"]], calibration_png,
                     counts=[b["count"] for b in cv["calibration"]],
                     title=f"emergence predictor, out-of-fold ({cv['group_by']} groups)")
    report = {
        "definition": {
            "prompt": f"emergent when pass@{dataset.k_max} - pass@1 >= {config.threshold} (unbiased, all samples)",
            "dataset": "emergence k = the power of two k maximising pass@k - pass@(k/2) of the mean curve",
            "features": f"from the first {config.feature_samples} samples of each prompt",
        },
        "config": asdict(config),
        "num_prompts": int(len(dataset.labels)),
        "num_emergent": int(dataset.labels.sum()),
        "model": model.to_json(),
        "cross_validation": {key: value for key, value in cv.items() if key != "out_of_fold_probability"},
        "calibration_plot": str(calibration_png),
        # per adapter (its runs pooled, e.g. the shards of one collection), as `analyze` pools them
        "beta_binomial": [extrapolation_report(label, records, config.feature_samples, config.extrapolate_k)
                          for label, records in records_by_adapter(runs).items()],
    }
    write_json_atomic(out, report)
    return report


def report_lines(report: dict) -> list[str]:
    """What `lab bon predict` prints: the cross-validated scores, then each adapter's beta-binomial fit."""
    cv = report["cross_validation"]
    auc = "n/a" if cv["roc_auc"] is None else f"{cv['roc_auc']:.3f}"
    lines = [f"{report['num_emergent']}/{report['num_prompts']} prompts emergent; out-of-fold ROC-AUC={auc}, "
             f"Brier={cv['brier']:.4f} (base rate {cv['brier_base_rate']:.4f})"]
    for fit in report["beta_binomial"]:
        errors = [fit["max_abs_error_beta_binomial"], fit["max_abs_error_plug_in"]]
        errors = ["n/a" if e is None else f"{e:.3f}" for e in errors]
        lines.append(f"{fit['adapter']}: beta-binomial alpha={fit['fit']['alpha']:.3g} beta={fit['fit']['beta']:.3g}; "
                     f"max |pass@k error| for k > {fit['budget']}: {errors[0]} (plug-in {errors[1]})")
    return lines
