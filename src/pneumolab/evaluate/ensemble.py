"""Combine several models' probabilities into one, fit on validation predictions only.

Members may differ in architecture and input size: the combiner only sees their probabilities, one row per member
and one column per image, aligned by image: ``n_members x N`` PNEUMONIA probabilities for binary members, or
``n_members x N x K`` class probabilities for K-class members (the same three methods, `EnsembleCombiner`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize
from scipy.special import expit, logit, softmax
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.utils.validation import check_is_fitted

from pneumolab.errors import SettingError, did_you_mean
from pneumolab.evaluate.metrics import check_binary_inputs

__all__ = ["ENSEMBLE_METHODS", "EnsembleCombiner"]

ENSEMBLE_METHODS = ("mean", "weighted", "stacking")

# Probabilities are clipped before logs and log-odds: a member that says exactly 0 or 1 would otherwise give -inf.
_EPS = 1e-6
# The C grid of the cross-validated stacker (C=None).
_CS = np.logspace(-3, 3, 7)


def _members(member_probabilities: ArrayLike | Sequence[ArrayLike]) -> np.ndarray:
    """``n_members x N`` float array from an array or a list of per-member arrays, checked."""
    if isinstance(member_probabilities, np.ndarray):
        rows = list(member_probabilities) if member_probabilities.ndim == 2 else None
    else:
        rows = [np.asarray(row, dtype=np.float64) for row in member_probabilities]
    if rows is None or not rows or any(row.ndim != 1 for row in rows):
        shape = np.shape(member_probabilities) if isinstance(member_probabilities, np.ndarray) else "ragged"
        raise SettingError(f"member probabilities must be n_members x N (one row per model), got shape {shape}")
    lengths = [row.size for row in rows]
    if len(set(lengths)) > 1:
        raise SettingError(f"members disagree in the number of images N: {lengths}; align their predictions by image")
    stacked = np.asarray(rows, dtype=np.float64)
    if stacked.shape[1] == 0 or not np.isfinite(stacked).all() or stacked.min() < 0 or stacked.max() > 1:
        raise SettingError("member probabilities must be non-empty, finite and within [0, 1]")
    return stacked


def _class_members(member_probabilities: ArrayLike) -> np.ndarray:
    """``n_members x N x K`` float array of class probabilities, checked (rows sum to 1)."""
    stacked = np.asarray(member_probabilities, dtype=np.float64)
    if stacked.ndim != 3 or 0 in stacked.shape or stacked.shape[2] < 2:
        raise SettingError(f"K-class member probabilities must be n_members x N x K, got shape {stacked.shape}")
    if not np.isfinite(stacked).all() or stacked.min() < 0 or np.abs(stacked.sum(axis=2) - 1).max() > 1e-4:
        raise SettingError("K-class member probabilities must be finite, non-negative and sum to 1 per image")
    return stacked


def _is_class_stack(member_probabilities: ArrayLike | Sequence[ArrayLike]) -> bool:
    """K-class members (each an N x K array) rather than binary ones (each N PNEUMONIA probabilities)."""
    first = member_probabilities[0] if len(member_probabilities) else None
    return first is not None and np.ndim(first) == 2


def _log_probabilities(members: np.ndarray) -> np.ndarray:
    """``N x (n_members K)`` features for the K-class stacker: each member's clipped log-probabilities."""
    return np.log(np.clip(members, _EPS, 1.0)).transpose(1, 0, 2).reshape(members.shape[1], -1)


def _log_odds(members: np.ndarray) -> np.ndarray:
    """``N x n_members`` features for the stacker: each member's clipped log-odds."""
    return logit(np.clip(members, _EPS, 1 - _EPS)).T


class EnsembleCombiner(BaseEstimator):
    """Fit, on validation predictions, how to combine members' PNEUMONIA probabilities.

    Methods:

    * ``"mean"``: the plain mean of the probabilities (nothing is learned; ``weights_`` is uniform).
    * ``"weighted"``: a weighted mean of the probabilities (a linear opinion pool) with non-negative weights summing
      to 1 that maximise the validation log-likelihood. The weights are a softmax of free parameters, optimised with
      L-BFGS from uniform weights; the log-likelihood is concave in the weights, so the optimum is global. A useless
      member's weight goes towards 0 (never exactly).
    * ``"stacking"``: scikit-learn's ``LogisticRegression`` on the members' log-odds (probabilities clipped to
      ``[1e-6, 1 - 1e-6]``); for K-class members a multinomial one on their log-probabilities. ``C`` is fixed (1.0)
      by default: a validation split carved from ``train/`` is nearly separable here (validation ROC-AUC ~0.999),
      where cross-validating ``C`` on log-loss runs to the grid's largest value and yields an over-confident stacker
      on the harder test set. ``C=None`` cross-validates it anyway (stratified folds, shuffled with `seed`, scored
      by log-loss).

    Args:
        method: one of `ENSEMBLE_METHODS`.
        C: inverse regularisation strength of the stacker; None cross-validates it. Used by ``"stacking"`` only.
        seed: shuffles the cross-validation folds of ``C=None``.

    Attributes:
        n_members_: members seen in ``fit``.
        weights_: ``"mean"`` / ``"weighted"``: the weight of each member's probability (sum 1). ``"stacking"``: the
            logistic regression's coefficient on each member's log-odds (any sign, no fixed sum).
        intercept_: ``"stacking"`` only: the logistic regression's intercept.
        model_: ``"stacking"`` only: the fitted ``LogisticRegression``.
    """

    def __init__(self, method: str = "mean", *, C: float | None = 1.0, seed: int = 0) -> None:
        self.method = method
        self.C = C
        self.seed = seed
        self._check_settings()

    def _check_settings(self) -> None:
        if self.method not in ENSEMBLE_METHODS:
            raise did_you_mean("ensemble method", str(self.method), ENSEMBLE_METHODS)
        if self.C is not None and not float(self.C) > 0:
            raise SettingError(f"C must be positive (or None to cross-validate it), got {self.C}")

    def fit(self, member_probabilities: ArrayLike | Sequence[ArrayLike], labels: ArrayLike) -> EnsembleCombiner:
        """Fit on validation: ``n_members x N`` probabilities and N labels (0/1), or ``n_members x N x K`` class
        probabilities and N labels in ``[0, K)``; returns ``self``."""
        self._check_settings()
        if _is_class_stack(member_probabilities):
            return self._fit_classes(_class_members(member_probabilities), labels)
        self.n_classes_ = 2
        members = _members(member_probabilities)
        if np.shape(labels) != (members.shape[1],):
            raise SettingError(
                f"labels must have one entry per image: {members.shape[1]} images, shape {np.shape(labels)}"
            )
        y, _ = check_binary_inputs(labels, members[0])
        self.n_members_ = members.shape[0]
        if self.method == "mean":
            self.weights_ = np.full(self.n_members_, 1.0 / self.n_members_)
        elif self.method == "weighted":
            self.weights_ = self._fit_weights(members, y)
        else:
            self.model_ = self._fit_stacker(_log_odds(members), y)
            self.weights_ = self.model_.coef_[0].copy()
            self.intercept_ = float(self.model_.intercept_[0])
            self.C_ = float(self.model_.C)
            self.C_chosen_by_ = "fixed" if self.C is not None else "cross-validated log-loss"
        return self

    def _fit_classes(self, members: np.ndarray, labels: ArrayLike) -> EnsembleCombiner:
        n_members, n, k = members.shape
        y = np.asarray(labels)
        if y.shape != (n,) or not np.isin(y, np.arange(k)).all():
            raise SettingError(f"labels must be N = {n} class indices in [0, {k}), got shape {y.shape}")
        y = y.astype(np.int64)
        self.n_members_, self.n_classes_ = n_members, k
        if self.method == "mean":
            self.weights_ = np.full(n_members, 1.0 / n_members)
        elif self.method == "weighted":
            self.weights_ = self._fit_weights(members[:, np.arange(n), y], np.ones(n))
        else:
            self.model_ = self._fit_stacker(_log_probabilities(members), y)
            self.weights_ = self.model_.coef_.copy()  # K x (n_members K)
            self.intercept_ = self.model_.intercept_.copy()
            self.C_ = float(self.model_.C)
            self.C_chosen_by_ = "fixed" if self.C is not None else "cross-validated log-loss"
        return self

    @staticmethod
    def _fit_weights(members: np.ndarray, y: np.ndarray) -> np.ndarray:
        # K classes pass each member's probability of the true class with y = 1: the same pool likelihood
        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w = softmax(theta)
            mixed = np.clip(w @ members, _EPS, 1 - _EPS)
            nll = -np.mean(y * np.log(mixed) + (1 - y) * np.log1p(-mixed))
            grad_w = -(members @ (y / mixed - (1 - y) / (1 - mixed))) / y.size
            return float(nll), w * (grad_w - w @ grad_w)  # chain rule through the softmax

        result = minimize(loss, np.zeros(members.shape[0]), jac=True, method="L-BFGS-B", options={"gtol": 1e-9})
        return softmax(result.x)

    def _fit_stacker(self, features: np.ndarray, y: np.ndarray) -> LogisticRegression:
        if self.C is not None:
            return LogisticRegression(C=float(self.C)).fit(features, y)
        n_splits = min(5, int(np.bincount(y).min()))
        if n_splits < 2:
            raise SettingError("stacking with C=None needs at least 2 images of each class to cross-validate C")
        folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=self.seed)
        search = GridSearchCV(LogisticRegression(), {"C": _CS}, scoring="neg_log_loss", cv=folds)
        return search.fit(features, y).best_estimator_

    def predict_proba(self, member_probabilities: ArrayLike | Sequence[ArrayLike]) -> np.ndarray:
        """The ensemble's PNEUMONIA probability per image, shape ``(N,)``, from ``n_members x N`` probabilities;
        for a K-class combiner its class probabilities, ``N x K``, from ``n_members x N x K``."""
        check_is_fitted(self, "weights_")
        if getattr(self, "n_classes_", 2) > 2 or _is_class_stack(member_probabilities):
            return self._predict_classes(_class_members(member_probabilities))
        members = _members(member_probabilities)
        if members.shape[0] != self.n_members_:
            raise SettingError(f"the combiner was fit on {self.n_members_} members, got {members.shape[0]}")
        if self.method == "stacking":  # the logistic regression's own formula, from its saved coefficients
            return expit(_log_odds(members) @ self.weights_ + self.intercept_)
        if self.method == "mean":
            return members.mean(axis=0)
        return self.weights_ @ members

    def _predict_classes(self, members: np.ndarray) -> np.ndarray:
        if members.shape[0] != self.n_members_ or members.shape[2] != self.n_classes_:
            raise SettingError(f"the combiner was fit on {self.n_members_} members of {self.n_classes_} classes, "
                               f"got {members.shape[0]} of {members.shape[2]}")  # fmt: skip
        if self.method == "stacking":  # the multinomial regression's own formula, from its saved coefficients
            return softmax(_log_probabilities(members) @ self.weights_.T + self.intercept_, axis=1)
        return np.tensordot(self.weights_, members, axes=1)

    def describe(self) -> dict[str, Any]:
        """The method and what was learned, JSON-ready, for reports."""
        check_is_fitted(self, "weights_")
        classes = {"n_classes": self.n_classes_} if getattr(self, "n_classes_", 2) > 2 else {}
        if self.method != "stacking":
            return {"method": self.method, "combines": "probabilities", "weights": self.weights_.tolist(), **classes}
        return {
            "method": "stacking",
            "combines": "log-probabilities" if classes else "log-odds",
            "coefficients": self.weights_.tolist(),
            "intercept": self.intercept_.tolist() if classes else self.intercept_,
            "C": self.C_,
            "C_chosen_by": self.C_chosen_by_,
            **classes,
        }

    @classmethod
    def from_saved(cls, facts: dict[str, Any]) -> EnsembleCombiner:
        """A fitted combiner from `describe()` output (an ensemble artefact's card); KeyError when a part is missing."""
        combiner = cls(facts["method"], C=facts.get("C", 1.0))
        combiner.n_classes_ = int(facts.get("n_classes", 2))
        if combiner.method == "stacking":
            combiner.weights_ = np.asarray(facts["coefficients"], dtype=np.float64)
            intercept = facts["intercept"]
            combiner.intercept_ = (
                np.asarray(intercept, dtype=np.float64) if combiner.n_classes_ > 2 else float(intercept)
            )
            combiner.C_, combiner.C_chosen_by_ = float(facts["C"]), str(facts.get("C_chosen_by", "fixed"))
        else:
            combiner.weights_ = np.asarray(facts["weights"], dtype=np.float64)
        combiner.n_members_ = len(combiner.weights_)
        if combiner.method == "stacking" and combiner.n_classes_ > 2:
            combiner.n_members_ = combiner.weights_.shape[1] // combiner.n_classes_
        return combiner
