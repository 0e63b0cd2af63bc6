"""Operating point and calibration, fit on validation predictions only.

* `ThresholdSelector` picks the decision threshold (Youden / balanced accuracy, F1, a target sensitivity, or fixed).
* `TemperatureScaler` rescales logits by one temperature so probabilities mean what they say.
* `expected_calibration_error` and `reliability_curve` measure calibration on the PNEUMONIA probability, in the
  equal-width bins of scikit-learn's ``calibration_curve`` (the report's reliability plot uses the same ones).

Both estimators follow scikit-learn's conventions (``__init__`` stores settings, ``fit`` returns ``self``, learned
state ends in ``_``), with one deliberate difference: settings are also checked in ``__init__``, so a bad setting
fails when the configuration is read, not after hours of training.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit
from sklearn.base import BaseEstimator
from sklearn.calibration import calibration_curve
from sklearn.metrics import recall_score, roc_curve
from sklearn.utils.validation import check_is_fitted

from pneumolab.errors import SettingError, did_you_mean
from pneumolab.evaluate.metrics import check_binary_inputs

__all__ = [
    "THRESHOLD_METHODS",
    "TemperatureScaler",
    "ThresholdSelector",
    "expected_calibration_error",
    "log_odds",
    "reliability_curve",
]

THRESHOLD_METHODS = ("balanced_accuracy", "youden", "f1", "target_sensitivity", "fixed")

# Scores within this of the best count as tied (rates are ratios of counts, so real differences are >= 1/n).
_TIE = 1e-12


class ThresholdSelector(BaseEstimator):
    """Choose the decision threshold on validation predictions.

    Methods:

    * ``"balanced_accuracy"`` (default) and ``"youden"``: maximise sensitivity + specificity (for a binary task the
      two criteria, ``(TPR + TNR) / 2`` and ``TPR - FPR``, have the same optimum; both names exist for reports).
    * ``"f1"``: maximise the F1 score of PNEUMONIA.
    * ``"target_sensitivity"``: the highest threshold whose validation sensitivity is ``>= target_sensitivity``, so
      specificity is as high as that sensitivity allows.
    * ``"fixed"``: ``fixed`` (default 0.5), whatever the data.

    The threshold is placed at the midpoint between adjacent distinct validation scores (below the lowest score: half
    way to 0), not on a score itself: the validation decisions are the same, and a test image scoring a hair away
    from a validation score is not flipped by rounding. Ties between equally good thresholds go to the lower one
    (higher sensitivity), since a missed pneumonia costs more than a false alarm. Images are called PNEUMONIA when
    their probability is ``>= threshold_``.

    Args:
        method: one of `THRESHOLD_METHODS`.
        target_sensitivity: required with ``"target_sensitivity"``, in (0, 1).
        fixed: the threshold of ``"fixed"``, in [0, 1]; None means 0.5.

    Attributes:
        threshold_: the chosen threshold.
        validation_sensitivity_: sensitivity (PNEUMONIA recall) on the fitting data at ``threshold_``.
        validation_specificity_: specificity (NORMAL recall) on the fitting data at ``threshold_``.
    """

    def __init__(
        self, method: str = "balanced_accuracy", *, target_sensitivity: float | None = None, fixed: float | None = None
    ) -> None:
        self.method = method
        self.target_sensitivity = target_sensitivity
        self.fixed = fixed
        self._check_settings()

    def _check_settings(self) -> None:
        if self.method not in THRESHOLD_METHODS:
            raise did_you_mean("threshold method", str(self.method), THRESHOLD_METHODS)
        if self.method == "target_sensitivity":
            target = self.target_sensitivity
            if target is None or not 0.0 < float(target) < 1.0:
                raise SettingError(
                    f"target_sensitivity must be within (0, 1) for method 'target_sensitivity', got {target}"
                )
        elif self.target_sensitivity is not None:
            raise SettingError(f"target_sensitivity is only used by method 'target_sensitivity', not {self.method!r}")
        if self.fixed is not None:
            if self.method != "fixed":
                raise SettingError(f"fixed is only used by method 'fixed', not {self.method!r}")
            if not 0.0 <= float(self.fixed) <= 1.0:
                raise SettingError(f"fixed threshold must be within [0, 1], got {self.fixed}")

    def fit(self, labels: ArrayLike, probabilities: ArrayLike) -> ThresholdSelector:
        """Choose ``threshold_`` on validation labels (0/1) and PNEUMONIA probabilities; returns ``self``."""
        self._check_settings()
        y, p = check_binary_inputs(labels, probabilities)
        if self.method == "fixed":
            self.threshold_ = 0.5 if self.fixed is None else float(self.fixed)
        else:
            # One ROC point per distinct score s_k (descending): the decision "p >= s_k"; drop the leading +inf.
            fpr, tpr, scores = roc_curve(y, p, drop_intermediate=False)
            fpr, tpr, scores = fpr[1:], tpr[1:], scores[1:]
            lower = np.r_[scores[1:], 0.0]
            midpoints = (scores + lower) / 2
            # Adjacent floats can round the midpoint onto the lower score, which would change the decisions.
            candidates = np.where(midpoints > lower, midpoints, scores)
            if self.method in ("balanced_accuracy", "youden"):
                objective = tpr - fpr
            elif self.method == "f1":
                n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
                tp, fp = tpr * n_pos, fpr * n_neg
                objective = 2 * tp / (tp + fp + n_pos)
            else:  # target_sensitivity: tpr grows along the (descending) scores; the first hit is the highest one
                objective = None
                best = int(np.flatnonzero(tpr >= float(self.target_sensitivity) - _TIE)[0])
            if objective is not None:
                best = int(np.flatnonzero(objective >= objective.max() - _TIE)[-1])
            self.threshold_ = float(candidates[best])
        predicted = self.predict(p)
        self.validation_sensitivity_ = float(recall_score(y, predicted, zero_division=0))
        self.validation_specificity_ = float(recall_score(y, predicted, pos_label=0, zero_division=0))
        return self

    def predict(self, probabilities: ArrayLike) -> np.ndarray:
        """0 (NORMAL) / 1 (PNEUMONIA) per probability, as ``int64``."""
        check_is_fitted(self, "threshold_")
        return (np.asarray(probabilities, dtype=np.float64) >= self.threshold_).astype(np.int64)

    def describe(self) -> str:
        """How the threshold is chosen, in words for reports (e.g. "sensitivity >= 0.95 on validation")."""
        if self.method == "balanced_accuracy":
            return "max balanced accuracy on validation"
        if self.method == "youden":
            return "max Youden's J (sensitivity + specificity - 1) on validation"
        if self.method == "f1":
            return "max F1 on validation"
        if self.method == "target_sensitivity":
            return f"sensitivity >= {float(self.target_sensitivity):g} on validation"
        return f"fixed at {0.5 if self.fixed is None else float(self.fixed):g}"


def log_odds(probabilities: ArrayLike) -> np.ndarray:
    """The logit of PNEUMONIA probabilities, the margins a temperature scales when no logits were saved.

    float32 softmax outputs can be exactly 0 or 1; 1e-12 is far finer than their spacing, so no new ties.
    """
    return logit(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12))


def _margins(logits: ArrayLike) -> np.ndarray:
    """PNEUMONIA-minus-NORMAL logit margins from ``N x 2`` logits, or ``N`` margins as given."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2 and z.shape[1] == 2:
        z = z[:, 1] - z[:, 0]  # softmax over two classes is the sigmoid of the margin
    elif z.ndim != 1:
        raise SettingError(f"logits must be N x 2 or N margins (z1 - z0), got shape {z.shape}")
    if z.size == 0 or not np.isfinite(z).all():
        raise SettingError("logits must be non-empty and finite")
    return z


def _nll(margins: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``sigmoid(margins / T)``, computed stably as softplus(x) - y x."""
    x = margins / temperature
    return float(np.mean(np.logaddexp(0.0, x) - labels * x))


class TemperatureScaler(BaseEstimator):
    """Temperature scaling (Guo et al., 2017): PNEUMONIA probability ``sigmoid((z1 - z0) / T)``.

    ``T`` minimises the validation negative log-likelihood; it is searched on ``log T`` (bounded) so it stays
    positive. ``T > 1`` softens an over-confident model; the ranking, and so ROC-AUC, does not change.

    Args:
        bounds: the search interval of ``T``.

    Attributes:
        temperature_: the fitted ``T``.
        nll_before_: validation NLL at ``T = 1``.
        nll_after_: validation NLL at ``temperature_``.
    """

    def __init__(self, bounds: tuple[float, float] = (0.01, 100.0)) -> None:
        self.bounds = bounds
        self._check_settings()

    def _check_settings(self) -> None:
        low, high = self.bounds
        if not 0.0 < low < 1.0 < high or not math.isfinite(high):
            raise SettingError(f"temperature bounds must satisfy 0 < low < 1 < high, got {self.bounds}")

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> TemperatureScaler:
        """Fit ``temperature_`` on validation logits (``N x 2`` or margins) and labels (0/1); returns ``self``."""
        self._check_settings()
        z = _margins(logits)
        y, _ = check_binary_inputs(labels, np.zeros(z.size), what="logits")  # label checks; zeros stand in for p
        self.search(lambda t: _nll(z, y, t))
        return self

    def search(self, nll: Callable[[float], float]) -> float:
        """Set ``temperature_`` to the ``T`` within `bounds` that minimises ``nll(T)`` (searched on ``log T``), and
        ``nll_before_`` / ``nll_after_``; return it. The K-class scaler fits through this too."""
        result = minimize_scalar(
            lambda log_t: nll(math.exp(log_t)),
            bounds=(math.log(self.bounds[0]), math.log(self.bounds[1])),
            method="bounded",
            options={"xatol": 1e-6},
        )
        self.temperature_ = float(math.exp(result.x))
        self.nll_before_, self.nll_after_ = nll(1.0), nll(self.temperature_)
        return self.temperature_

    def transform(self, logits: ArrayLike) -> np.ndarray:
        """Calibrated PNEUMONIA probability per image."""
        check_is_fitted(self, "temperature_")
        return expit(_margins(logits) / self.temperature_)


def _reliability_inputs(labels: ArrayLike, probabilities: ArrayLike, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities as 1-D arrays, checked with messages that name the setting."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise SettingError(f"n_bins must be a positive integer, got {n_bins!r}")
    return check_binary_inputs(labels, probabilities, both_classes=False)  # calibration is defined for one class


def _bin_counts(probabilities: np.ndarray, n_bins: int) -> np.ndarray:
    """Images per equal-width bin, by ``calibration_curve``'s own rule (bins (e_i, e_i+1], 0 in the first).

    ``calibration_curve`` returns the points of the non-empty bins but not their sizes, which the ECE weights by.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.bincount(np.searchsorted(edges[1:-1], probabilities), minlength=n_bins)


def expected_calibration_error(labels: ArrayLike, probabilities: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error of the PNEUMONIA probability, in [0, 1].

    Convention: *positive-class* reliability, not top-label. The PNEUMONIA probabilities are put in ``n_bins``
    equal-width bins on [0, 1] and ``ECE = sum_b (n_b / N) |observed PNEUMONIA rate_b - mean probability_b|``.
    (Top-label ECE bins ``max(p, 1 - p)`` against accuracy instead; it folds the two halves of this curve together.)
    One class only is allowed here: calibration is defined for it.

    Args:
        labels: 0 / 1 per image.
        probabilities: PNEUMONIA probability per image.
        n_bins: number of equal-width bins.
    """
    curve = reliability_curve(labels, probabilities, n_bins)
    gaps = np.abs(np.asarray(curve["accuracy"]) - np.asarray(curve["confidence"]))
    counts = np.asarray(curve["counts"], dtype=np.float64)
    return float(gaps @ counts / counts.sum())


def reliability_curve(labels: ArrayLike, probabilities: ArrayLike, n_bins: int = 10) -> dict[str, list[float]]:
    """The reliability diagram's points, for non-empty equal-width bins only (scikit-learn's ``calibration_curve``).

    Returns:
        Lists of one length, JSON-ready: ``bin_centers``, ``accuracy`` (observed PNEUMONIA rate in the bin),
        ``confidence`` (mean PNEUMONIA probability in the bin), ``counts`` (images in the bin).
    """
    y, p = _reliability_inputs(labels, probabilities, n_bins)
    accuracy, confidence = calibration_curve(y, p, pos_label=1, n_bins=int(n_bins), strategy="uniform")
    counts = _bin_counts(p, int(n_bins))
    kept = counts > 0
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    return {
        "bin_centers": ((edges[:-1] + edges[1:]) / 2)[kept].tolist(),
        "accuracy": accuracy.tolist(),
        "confidence": confidence.tolist(),
        "counts": counts[kept].astype(int).tolist(),
    }
