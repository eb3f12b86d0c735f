"""The trigger threshold theta, fitted on the quantity the trigger compares.

Calibration: greedy outputs labelled correct or wrong by the task metric. ``unit="token"`` (the default)
fits on the trigger's signal at every generated token (for rauq the running token-level RAUQ), each
labelled with its output's label (the trigger compares exactly that); ``unit="sequence"`` on one score per
output (RAUQ's sequence score; the mean signal for entropy and margin). A logistic
regression (scikit-learn) of "wrong" on the score gives the coefficients; theta is the cut on the score with
the largest Youden's J (TPR - FPR) on the ROC of "score > theta predicts a wrong output". For a positive
coefficient that is the ROC of the regression's probability too (it rises with the score).

The theta file records the trigger, alpha, the model and the heads file's hash: `Threshold.check` refuses a theta fitted
for other ones (re-run `lab rauq fit-threshold` after changing any of them).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lightning_lab.data.io import DataError
from lightning_lab.errors import UserError
from lightning_lab.rauq.heads import write_new_json

UNITS = ("token", "sequence")


@dataclass
class Threshold:
    theta: float
    trigger: str  # the signal it was fitted on: rauq | entropy | margin (controller.TRIGGERS)
    unit: str
    coef: float  # logistic regression of "wrong" on the score: P(wrong) = sigmoid(coef * score + intercept)
    intercept: float
    auroc: float  # of the score for predicting a wrong output, over the fitted units
    youden_j: float
    num_samples: int  # tokens or outputs fitted on
    num_wrong: int  # of those, labelled wrong
    num_outputs: int  # calibration outputs they came from
    alpha: float
    model: str
    heads_hash: str
    data_hash: str

    def save(self, path: str | os.PathLike) -> None:
        write_new_json(path, asdict(self))

    def check(self, trigger: str, alpha: float, model: str, heads_hash: str, where: str) -> None:
        """Refuse a theta fitted for another trigger, alpha, model or heads file (`where`: the theta file's path)."""
        mismatches = [f"{name} {mine!r} (this run: {theirs!r})" for name, mine, theirs in
                      (("trigger", self.trigger, trigger), ("alpha", self.alpha, alpha), ("model", self.model, model),
                       ("heads", self.heads_hash, heads_hash)) if mine != theirs]
        if mismatches:
            raise UserError(f"{where}: theta was fitted for {', '.join(mismatches)}; re-run "
                            "`lab rauq fit-threshold` with this run's --trigger, --alpha, --model and --heads")


def load_threshold(path: str | os.PathLike) -> Threshold:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such theta file (write one with `lab rauq fit-threshold`)")
    try:
        return Threshold(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:
        raise DataError(f"{path}: not a theta file written by `lab rauq fit-threshold` ({error})") from None


def fit_threshold(scores: np.ndarray, wrong: np.ndarray) -> dict:
    """theta (Youden's J on the ROC of ``score > theta`` -> wrong), the logistic regression's coefficients and
    the AUROC. Both labels must occur: with one class there is nothing to separate."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score, roc_curve

    scores, wrong = np.asarray(scores, dtype=np.float64), np.asarray(wrong, dtype=bool)
    if not np.isfinite(scores).all():
        raise ValueError("fit_threshold: scores must be finite")
    num_wrong = int(wrong.sum())
    if num_wrong in (0, len(wrong)):
        label = "wrong" if num_wrong else "correct"
        raise UserError(f"fit-threshold: all {len(wrong)} calibration samples are {label}, so no threshold separates "
                        "right from wrong; use more or harder/easier calibration problems (--calibration, "
                        "--num-examples), another --scorer, or a larger --max-new-tokens")
    regression = LogisticRegression().fit(scores[:, None], wrong)
    false_positive, true_positive, cuts = roc_curve(wrong, scores)
    best = int(np.argmax(true_positive - false_positive))
    # roc_curve flags score >= cut; the trigger fires on score > theta, so theta sits just below the cut:
    # halfway to the next lower score (or below every score when the cut is the lowest)
    below = scores[scores < cuts[best]]
    theta = float((cuts[best] + below.max()) / 2) if below.size else (
        math.inf if math.isinf(cuts[best]) else float(np.nextafter(cuts[best], -np.inf)))
    return {"theta": theta, "coef": float(regression.coef_[0, 0]), "intercept": float(regression.intercept_[0]),
            "auroc": float(roc_auc_score(wrong, scores)), "youden_j": float(true_positive[best] - false_positive[best]),
            "num_samples": len(scores), "num_wrong": num_wrong}


def auroc_interval(scores, wrong, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """AUROC of `scores` for predicting `wrong`, with a percentile bootstrap interval over items (scipy's
    `stats.bootstrap`, paired: an item's score and label are drawn together); None where one class is missing."""
    from scipy import stats
    from sklearn.metrics import roc_auc_score

    scores, wrong = np.asarray(scores, dtype=np.float64), np.asarray(wrong, dtype=bool)
    if wrong.all() or not wrong.any():
        return {"auroc": None, "low": None, "high": None, "items": len(wrong), "wrong": int(wrong.sum())}

    def statistic(s, w):
        return roc_auc_score(w, s) if 0 < w.sum() < len(w) else 0.5  # a resample of one class: no information

    result = stats.bootstrap((scores, wrong), statistic, paired=True, vectorized=False, n_resamples=resamples,
                             confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    return {"auroc": float(roc_auc_score(wrong, scores)), "low": float(result.confidence_interval.low),
            "high": float(result.confidence_interval.high), "items": len(wrong), "wrong": int(wrong.sum())}
