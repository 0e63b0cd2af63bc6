"""The referral band: chest X-rays the model is not sure about go to a radiologist instead of getting a label.

Class-conditional (Mondrian) split conformal prediction on the validation split, fit like the threshold. For each
class c the conformity score of a validation film of that class is ``1 - P(c)``; ``q_c`` is its
``ceil((n_c + 1)(1 - alpha)) / n_c`` empirical quantile. A film's prediction set holds every class c with
``1 - P(c) <= q_c``; the film is **answered** when the set is exactly the class the threshold gives, and
**referred** otherwise (both classes, none, or the other one). Under exchangeability of validation and new films
this bounds, for each class separately, the share of its films that are answered wrongly by ``alpha``; per class,
because NORMAL is the minority and a marginal guarantee would hide it.

That guarantee is only as good as the exchangeability: the validation split carved from ``train/`` is far easier
than ``test/`` (EVALUATION.md), so reports give the realised per-class error of the answered films on test beside
the nominal level, never the nominal level alone.

Written by hand (a dozen lines of numpy) rather than through MAPIE or crepes: both wrap an estimator with
``predict_proba``, while here the calibrated probabilities already exist on disk and the decision must stay tied to
the model's own threshold.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from pneumolab.errors import SettingError

__all__ = ["ReferralBand"]


class ReferralBand(BaseEstimator):
    """Which films to refer, fit on validation probabilities (scikit-learn conventions).

    Args:
        alpha: Per-class share of films that may be answered wrongly (e.g. 0.02: at most 2 % of the NORMAL films
            and at most 2 % of the PNEUMONIA films answered with the other label).
    """

    def __init__(self, alpha: float = 0.02) -> None:
        if not 0 < alpha < 0.5:
            raise SettingError(f"referral alpha: must be in (0, 0.5), got {alpha}")
        self.alpha = alpha

    def fit(self, labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> ReferralBand:
        """Fit on validation labels (0 NORMAL, 1 PNEUMONIA) and calibrated P(PNEUMONIA), at the model's threshold."""
        labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=float)
        quantiles = []
        for c in (0, 1):
            p_class = probabilities[labels == c] if c else 1 - probabilities[labels == c]
            scores = np.sort(1 - p_class)
            n = len(scores)
            if not n:
                raise ValueError(f"no validation films of class {c}: cannot fit a class-conditional band")
            rank = math.ceil((n + 1) * (1 - self.alpha))
            quantiles.append(float(scores[rank - 1]) if rank <= n else 1.0)  # too few films: every class fits
        self.quantiles_ = tuple(quantiles)
        self.threshold_ = float(threshold)
        self.counts_ = (int((labels == 0).sum()), int((labels == 1).sum()))
        return self

    @property
    def band_(self) -> tuple[float, float]:
        """``(low, high)``: probabilities in ``[low, high)`` are referred (up to ties at the edges)."""
        check_is_fitted(self, "quantiles_")
        q_normal, q_pneumonia = self.quantiles_
        edges = (self.threshold_, q_normal, 1 - q_pneumonia)
        return min(edges), max(edges)

    def refers(self, probabilities: np.ndarray) -> np.ndarray:
        """Whether each film is referred (its conformal set is not exactly the threshold's label)."""
        check_is_fitted(self, "quantiles_")
        p = np.asarray(probabilities, dtype=float)
        q_normal, q_pneumonia = self.quantiles_
        has_normal = p <= q_normal
        has_pneumonia = 1 - p <= q_pneumonia
        says_pneumonia = p >= self.threshold_
        answered = np.where(says_pneumonia, has_pneumonia & ~has_normal, has_normal & ~has_pneumonia)
        return ~answered

    def describe(self) -> dict[str, Any]:
        """The facts a card records."""
        check_is_fitted(self, "quantiles_")
        low, high = self.band_
        return {
            "method": "class-conditional split conformal",
            "alpha": self.alpha,
            "quantiles": list(self.quantiles_),
            "threshold": self.threshold_,
            "band": [low, high],
            "fit_on": f"validation ({self.counts_[0]} NORMAL, {self.counts_[1]} PNEUMONIA films)",
            "counts": list(self.counts_),
            "guarantee": f"per class, at most {self.alpha:.0%} of films answered wrongly if new films are "
            "exchangeable with validation (not true of test/: see the report)",
        }

    @classmethod
    def from_saved(cls, facts: dict[str, Any]) -> ReferralBand:
        """Rebuild from `describe()` output."""
        band = cls(alpha=float(facts["alpha"]))
        band.quantiles_ = tuple(float(q) for q in facts["quantiles"])
        band.threshold_ = float(facts["threshold"])
        band.counts_ = tuple(int(c) for c in facts.get("counts", (0, 0)))
        return band
