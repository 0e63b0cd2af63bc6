"""Binary classification metrics with stratified bootstrap confidence intervals.

Point estimates come from scikit-learn. The bootstrap recomputes every metric on thousands of resamples, where
calling scikit-learn once per resample is too slow (2,000 ``roc_auc_score`` calls take seconds), so it computes the
same quantities with array operations on resampling *multiplicities*: a resample is a count matrix ``W`` of shape
``(n_resamples, n)`` telling how often each image was drawn, and each metric is a weighted sum over images. The tests
check that every resampled value equals scikit-learn's function on the explicitly resampled arrays.

Conventions: the positive class is 1 (PNEUMONIA); an image is called positive when its probability is ``>=`` the
threshold; precision with no positive call is 0 (scikit-learn's ``zero_division=0``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pneumolab.errors import SettingError

__all__ = [
    "CI_KEYS",
    "METRIC_KEYS",
    "binary_metrics",
    "bootstrap_ci",
    "bootstrap_distribution",
    "check_binary_inputs",
    "evaluate_predictions",
]

METRIC_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "average_precision",
    "roc_auc",
)
# Keys that get an interval: the metrics at the chosen threshold, and accuracy at the fixed 0.5 the literature uses.
CI_KEYS = (*METRIC_KEYS, "accuracy_at_0.5")

# Resamples are processed in chunks of at most this many matrix cells, so memory stays bounded for large test sets.
_CHUNK_CELLS = 1 << 22


def check_binary_inputs(
    labels: ArrayLike, probabilities: ArrayLike, what: str = "probabilities", *, both_classes: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: labels 0/1 (both classes present unless `both_classes` is False), probabilities finite
    in [0, 1], same length. The one check of (labels, probabilities) for metrics, calibration and ensembles; every
    problem is a `SettingError`.

    `what` names the second array in the length message (callers that pass logits say so).
    """
    y = np.asarray(labels)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.ndim != 1 or y.size == 0:
        raise SettingError(f"labels must be a non-empty 1-D array of 0/1, got shape {y.shape}")
    if p.ndim != 1:
        hint = " (pass the PNEUMONIA column, probabilities[:, 1])" if p.ndim == 2 and p.shape[-1] == 2 else ""
        raise SettingError(f"probabilities must be a 1-D array, got shape {p.shape}{hint}")
    if p.shape != y.shape:
        raise SettingError(f"labels and {what} differ in length: {y.size} labels, {p.size} {what}")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if not np.isin(y, (0, 1)).all():
        raise SettingError(f"labels must be 0 (NORMAL) or 1 (PNEUMONIA), got values {np.unique(y)[:5].tolist()}")
    y = y.astype(np.int64)
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise SettingError("probabilities must be finite and within [0, 1]")
    n_positive = int(y.sum())
    if both_classes and n_positive in (0, y.size):
        only = "PNEUMONIA (1)" if n_positive else "NORMAL (0)"
        raise SettingError(f"need both classes in labels to evaluate, got only {only} in {y.size} images")
    return y, p


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise SettingError(f"threshold must be within [0, 1], got {threshold}")
    return threshold


def binary_metrics(labels: ArrayLike, probabilities: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Point estimates of the `METRIC_KEYS`, all from scikit-learn.

    Args:
        labels: 0 (NORMAL) / 1 (PNEUMONIA) per image; both classes must be present.
        probabilities: PNEUMONIA probability per image, in [0, 1].
        threshold: an image is called PNEUMONIA when its probability is ``>= threshold``.

    Returns:
        ``{key: float}`` for every key of `METRIC_KEYS`; specificity is the recall of class 0.

    Raises:
        SettingError: shapes differ, labels are not 0/1 or hold one class only, probabilities outside [0, 1].
    """
    y, p = check_binary_inputs(labels, probabilities)
    predicted = (p >= _check_threshold(threshold)).astype(np.int64)
    return {
        "accuracy": float(accuracy_score(y, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
        "precision": float(precision_score(y, predicted, zero_division=0)),
        "recall": float(recall_score(y, predicted, zero_division=0)),
        "specificity": float(recall_score(y, predicted, pos_label=0, zero_division=0)),
        "f1": float(f1_score(y, predicted, zero_division=0)),
        "average_precision": float(average_precision_score(y, p)),
        "roc_auc": float(roc_auc_score(y, p)),
    }


def stratified_indices(
    labels: np.ndarray, n_resamples: int, rng: np.random.Generator, order: Sequence[int] = (1, 0)
) -> np.ndarray:
    """Indices of ``n_resamples`` stratified bootstrap resamples, shape ``(n_resamples, n)``.

    The images of each class are drawn with replacement among themselves, class by class in `order` (binary:
    positives first, then negatives, from `rng`), so every resample keeps the class counts of the data and AUC is
    always defined. A class in `order` without images is skipped.
    """
    parts = []
    for label in order:
        members = np.flatnonzero(labels == label)
        if members.size:
            parts.append(members[rng.integers(0, members.size, size=(n_resamples, members.size))])
    return np.concatenate(parts, axis=1)


def multiplicities(indices: np.ndarray, n: int) -> np.ndarray:
    """How often each of the ``n`` images appears in each resample: ``(n_resamples, n)`` float counts."""
    n_resamples = indices.shape[0]
    flat = (indices + (np.arange(n_resamples) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)


def _resampled_metrics(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Every `CI_KEYS` metric for each row of ``weights`` (image multiplicities), vectorised over rows.

    Each row must give weight to both classes. The values equal scikit-learn's on the data with every image repeated
    as often as its weight says (checked by the tests to 1e-12).
    """
    y = labels.astype(bool)
    w_pos = weights[:, y]
    w_neg = weights[:, ~y]
    n_pos = w_pos.sum(axis=1)
    n_neg = w_neg.sum(axis=1)

    # Confusion counts at a fixed threshold are weighted sums of indicator vectors.
    def counts(cut: float) -> tuple[np.ndarray, np.ndarray]:
        tp = w_pos @ (probabilities[y] >= cut).astype(np.float64)
        tn = w_neg @ (probabilities[~y] < cut).astype(np.float64)
        return tp, tn

    tp, tn = counts(threshold)
    fp, fn = n_neg - tn, n_pos - tp
    called = tp + fp
    out = {
        "accuracy": (tp + tn) / (n_pos + n_neg),
        "recall": tp / n_pos,
        "specificity": tn / n_neg,
        "precision": np.divide(tp, called, out=np.zeros_like(tp), where=called > 0),
        "f1": 2 * tp / (2 * tp + fp + fn),  # the denominator holds n_pos > 0
    }
    out["balanced_accuracy"] = (out["recall"] + out["specificity"]) / 2
    tp05, tn05 = counts(0.5)
    out["accuracy_at_0.5"] = (tp05 + tn05) / (n_pos + n_neg)

    # Rank statistics: sort once by score (descending) and sum weights within groups of tied scores.
    order = np.argsort(-probabilities, kind="stable")
    sorted_scores = probabilities[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w_sorted = weights[:, order]
    pos_sorted = np.where(y[order], w_sorted, 0.0)
    pos_g = np.add.reduceat(pos_sorted, starts, axis=1)  # weighted positives per distinct score
    neg_g = np.add.reduceat(w_sorted - pos_sorted, starts, axis=1)
    tp_cum = np.cumsum(pos_g, axis=1)  # positives called at threshold = this score
    fp_cum = np.cumsum(neg_g, axis=1)

    # ROC-AUC (Mann-Whitney): each positive scores 1 per lower-scored negative and 1/2 per tied negative.
    neg_below = n_neg[:, None] - fp_cum
    out["roc_auc"] = (pos_g * (neg_below + 0.5 * neg_g)).sum(axis=1) / (n_pos * n_neg)

    # Average precision as scikit-learn defines it: sum over distinct thresholds of (R_k - R_{k-1}) P_k, no
    # interpolation. Recall only moves where positives sit, so groups without positive weight add nothing.
    called_cum = tp_cum + fp_cum
    precision_k = np.divide(tp_cum, called_cum, out=np.zeros_like(tp_cum), where=called_cum > 0)
    out["average_precision"] = (pos_g * precision_k).sum(axis=1) / n_pos
    return out


def resample_weights(
    labels: np.ndarray, n_resamples: int, seed: int, order: Sequence[int] = (1, 0)
) -> Iterator[np.ndarray]:
    """The stratified bootstrap as multiplicity matrices (`multiplicities`), in chunks that bound their memory.

    Both the binary and the K-class bootstrap draw from this, so the same labels and seed give the same resamples.
    """
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int | np.integer) or n_resamples < 1:
        raise SettingError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // labels.size)
    for start in range(0, n_resamples, chunk):
        indices = stratified_indices(labels, min(chunk, n_resamples - start), rng, order)
        yield multiplicities(indices, labels.size)


def bootstrap_distribution(
    labels: ArrayLike, probabilities: ArrayLike, threshold: float, *, n_resamples: int = 2000, seed: int = 0
) -> dict[str, np.ndarray]:
    """Every `CI_KEYS` metric on each of ``n_resamples`` stratified bootstrap resamples.

    The resamples depend only on the labels and the seed, so two models scored on the same test set with the same
    seed see the same resamples: their distributions are paired and can be subtracted for a paired comparison.

    Args:
        labels: 0 / 1 per image; both classes must be present.
        probabilities: PNEUMONIA probability per image.
        threshold: decision threshold (``>=`` is positive).
        n_resamples: how many resamples.
        seed: seed of ``np.random.default_rng``.

    Returns:
        ``{key: array of shape (n_resamples,)}`` for every key of `CI_KEYS`.
    """
    y, p = check_binary_inputs(labels, probabilities)
    threshold = _check_threshold(threshold)
    parts = [_resampled_metrics(y, p, threshold, weights) for weights in resample_weights(y, n_resamples, seed)]
    return {key: np.concatenate([part[key] for part in parts]) for key in CI_KEYS}


def bootstrap_ci(
    labels: ArrayLike,
    probabilities: ArrayLike,
    threshold: float,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile intervals of every `CI_KEYS` metric from a stratified bootstrap.

    Positives and negatives are resampled separately with replacement, which keeps the class counts fixed (so AUC is
    always defined) and matches how the test set was built (a fixed number of images per class).

    Args:
        labels: 0 / 1 per image; both classes must be present.
        probabilities: PNEUMONIA probability per image.
        threshold: decision threshold (``>=`` is positive).
        n_resamples: how many resamples (EVALUATION.md asks for at least 1,000).
        seed: seed of ``np.random.default_rng``.
        level: coverage of the interval, in (0, 1).

    Returns:
        ``{key: [low, high]}`` for every key of `CI_KEYS`.
    """
    if not 0.0 < level < 1.0:
        raise SettingError(f"level must be within (0, 1), got {level}")
    samples = bootstrap_distribution(labels, probabilities, threshold, n_resamples=n_resamples, seed=seed)
    tail = (1.0 - level) / 2
    return {key: [float(v) for v in np.quantile(values, [tail, 1.0 - tail])] for key, values in samples.items()}


def evaluate_predictions(
    labels: ArrayLike, probabilities: ArrayLike, threshold: float, *, n_resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """The metric object of DESIGN.md for one set of predictions, ready for ``json.dump``.

    Args:
        labels: 0 / 1 per image; both classes must be present.
        probabilities: PNEUMONIA probability per image.
        threshold: decision threshold (``>=`` is positive), chosen on validation.
        n_resamples: bootstrap resamples for the 95 % intervals.
        seed: bootstrap seed.

    Returns:
        The `METRIC_KEYS` (floats), ``threshold``, ``confusion_matrix`` (``[[tn, fp], [fn, tp]]``), ``n``,
        ``n_positive``, ``accuracy_at_0.5``, ``ci95`` (``{key: [low, high]}`` for `CI_KEYS`) and ``bootstrap``
        (how the intervals were made).
    """
    y, p = check_binary_inputs(labels, probabilities)
    threshold = _check_threshold(threshold)
    result: dict[str, Any] = binary_metrics(y, p, threshold)
    result["threshold"] = threshold
    matrix = confusion_matrix(y, (p >= threshold).astype(np.int64), labels=[0, 1])
    result["confusion_matrix"] = [[int(v) for v in row] for row in matrix]
    result["n"] = int(y.size)
    result["n_positive"] = int(y.sum())
    result["accuracy_at_0.5"] = float(accuracy_score(y, (p >= 0.5).astype(np.int64)))
    result["ci95"] = bootstrap_ci(y, p, threshold, n_resamples=n_resamples, seed=seed, level=0.95)
    result["bootstrap"] = {"method": "stratified percentile", "n_resamples": int(n_resamples), "seed": int(seed)}
    return result
