"""K-class evaluation: metrics with stratified bootstrap intervals, temperature and class bias, task views.

For a task whose classes are a tuple of names (e.g. ``("NORMAL", "BACTERIAL", "VIRAL")``): labels are integers in
``[0, K)``, probabilities are ``N x K`` rows that sum to 1, and a film is called the class with the largest
``log p + bias`` (``bias`` None: the largest probability). Point estimates come from scikit-learn (log loss, Brier
and balanced accuracy from their one-line formulas, tested against it). The bootstrap recomputes them with array
operations on resampling multiplicities, as `pneumolab.evaluate.metrics` does for the binary task, and the tests
check every resampled value against the point estimate on the explicit resample.

Conventions:

* A class with no true film has no defined recall, F1, ROC-AUC or average precision: those per-class values are NaN
  (not a crash), and every ``macro_*`` average runs over the classes that have true films, as balanced accuracy
  does, so ``macro_recall == balanced_accuracy``. Precision with no call of the class is 0 (``zero_division=0``).
* ROC-AUC and average precision are one-vs-rest on the class's probability column.
* ``brier`` is the multi-class Brier score, ``mean_i sum_k (p_ik - y_ik)^2``, in [0, 2] (not halved, for any K).
* ``ece`` is top-label: the largest probability against whether its class is the true one, in the equal-width bins
  of `pneumolab.evaluate.calibration` (which computes it). It depends on the probabilities only, never on ``bias``.

`collapse` and `subtask` derive the views the literature reports: NORMAL vs PNEUMONIA by summing the pneumonia
columns, and BACTERIAL vs VIRAL among the pneumonia films.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.utils.validation import check_is_fitted

from pneumolab.errors import SettingError, did_you_mean
from pneumolab.evaluate.calibration import TemperatureScaler, expected_calibration_error, reliability_curve
from pneumolab.evaluate.metrics import resample_weights

__all__ = [
    "AGGREGATE_KEYS",
    "PER_CLASS_KEYS",
    "MulticlassTemperature",
    "check_multiclass_inputs",
    "class_bias_check",
    "collapse",
    "collapse_labels",
    "confusion",
    "fit_class_bias",
    "multiclass_bootstrap_ci",
    "multiclass_bootstrap_distribution",
    "multiclass_ece",
    "multiclass_metric_keys",
    "multiclass_metrics",
    "subtask",
    "top_label_reliability",
]

AGGREGATE_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "macro_roc_auc",
    "macro_average_precision",
    "log_loss",
    "brier",
    "ece",
)
PER_CLASS_KEYS = ("precision", "recall", "f1", "roc_auc", "average_precision")

# Rows may drift from summing to 1 by this much (float32 softmax, CSV round trips).
_SUM_TOLERANCE = 1e-4
# Bins of the ``ece`` key, the default of `calibration.expected_calibration_error`.
_ECE_BINS = 15


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise SettingError(f"classes must be a sequence of class names, got {classes!r}")
    names = tuple(classes)
    if len(names) < 2:
        raise SettingError(f"classes must name at least 2 classes, got {list(names)}")
    if not all(isinstance(name, str) and name for name in names):
        raise SettingError(f"classes must be non-empty strings, got {list(names)}")
    if len(set(names)) != len(names):
        raise SettingError(f"classes must be unique, got {list(names)}")
    return names


def _check_labels(labels: ArrayLike, n_classes: int) -> np.ndarray:
    """Labels as int64, 1-D, non-empty, each in ``[0, n_classes)``."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise SettingError(f"labels must be a non-empty 1-D array of class indices, got shape {y.shape}")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise SettingError(f"labels must be class indices 0..{n_classes - 1}, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating) and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise SettingError(f"labels must be whole class indices 0..{n_classes - 1}, got non-integer values")
    if y.min() < 0 or y.max() >= n_classes:
        bad = np.unique(y[(y < 0) | (y >= n_classes)])[:5].tolist()
        raise SettingError(f"labels must be within 0..{n_classes - 1} ({n_classes} classes), got values {bad}")
    return y.astype(np.int64)


def _check_probabilities(probabilities: ArrayLike, n_rows: int | None, n_classes: int | None) -> np.ndarray:
    """Probabilities as float64 ``n_rows x K``, finite, in [0, 1], rows summing to 1 within the tolerance.

    Rows are not renormalised: dividing by a sum that is 1 only to the last bit would split tied scores apart and
    change ROC-AUC and average precision.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise SettingError(f"probabilities must be an N x K array (K >= 2 classes), got shape {p.shape}")
    if n_classes is not None and p.shape[1] != n_classes:
        raise SettingError(f"probabilities have {p.shape[1]} columns but there are {n_classes} classes")
    if n_rows is not None and p.shape[0] != n_rows:
        raise SettingError(f"labels and probabilities differ in length: {n_rows} labels, {p.shape[0]} rows")
    if not np.isfinite(p).all():
        raise SettingError(
            f"probabilities must be finite, got NaN or inf in {int((~np.isfinite(p)).any(1).sum())} rows"
        )
    if p.min() < 0 or p.max() > 1:
        raise SettingError(f"probabilities must be within [0, 1], got values from {p.min():g} to {p.max():g}")
    sums = p.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > _SUM_TOLERANCE)
    if off.size:
        raise SettingError(
            f"probability rows must sum to 1 (within {_SUM_TOLERANCE:g}): {off.size} rows do not, "
            f"e.g. row {int(off[0])} sums to {sums[off[0]]:.6g}"
        )
    return p


def check_multiclass_inputs(
    labels: ArrayLike, probabilities: ArrayLike, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert (labels, probabilities) of a K-class task; every problem is a one-line `SettingError`.

    Classes absent from the labels are allowed (their AUC and AP are NaN downstream).

    Args:
        labels: class index per film, whole numbers in ``[0, K)``.
        probabilities: ``N x K``, finite, in [0, 1], each row summing to 1 within 1e-4.
        classes: the K class names, unique; column ``k`` is ``classes[k]``.

    Returns:
        ``(labels as int64, probabilities as float64)``, values unchanged (rows are not renormalised, which
        would break ties between scores).
    """
    names = _check_classes(classes)
    y = _check_labels(labels, len(names))
    return y, _check_probabilities(probabilities, y.size, len(names))


def _check_bias(bias: ArrayLike | None, n_classes: int) -> np.ndarray | None:
    if bias is None:
        return None
    b = np.asarray(bias, dtype=np.float64)
    if b.shape != (n_classes,) or not np.isfinite(b).all():
        raise SettingError(f"bias must be {n_classes} finite numbers (one per class), got shape {b.shape}")
    return b


def _decide(probabilities: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The called class per film: argmax of ``log p + bias`` (ties to the first class)."""
    if bias is None:
        return probabilities.argmax(axis=1)
    with np.errstate(divide="ignore"):  # log 0 = -inf is never the argmax: every row has a positive entry
        return (np.log(probabilities) + bias).argmax(axis=1)


def _check_logits(logits: ArrayLike) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2 or z.shape[0] == 0:
        raise SettingError(f"logits must be a non-empty N x K array (K >= 2 classes), got shape {z.shape}")
    if not np.isfinite(z).all():
        raise SettingError("logits must be finite")
    return z


def _check_logits_labels(logits: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    z = _check_logits(logits)
    y = _check_labels(labels, z.shape[1])
    if y.size != z.shape[0]:
        raise SettingError(f"labels and logits differ in length: {y.size} labels, {z.shape[0]} rows")
    return z, y


def _film_log_loss(true_probability: np.ndarray) -> np.ndarray:
    """``-log p(true class)`` per film, clipped to ``[eps, 1 - eps]`` as scikit-learn's ``log_loss`` clips."""
    eps = np.finfo(np.float64).eps
    return -np.log(np.clip(true_probability, eps, 1 - eps))


def _log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """scikit-learn's ``log_loss`` (clipped mean of ``-log p(true class)``), computed here because scikit-learn
    warns when rows sum to 1 only to 1e-7, as float32 softmax rows do; the tests check the two agree."""
    return float(np.mean(_film_log_loss(probabilities[np.arange(labels.size), labels])))


def _mean_defined(values: np.ndarray, defined: np.ndarray) -> np.ndarray | float:
    """Mean over the last axis restricted to the ``defined`` classes; NaN when none is."""
    if not defined.any():
        return np.full(values.shape[:-1], np.nan) if values.ndim > 1 else float("nan")
    return values[..., defined].mean(axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# Point estimates


def multiclass_metric_keys(classes: Sequence[str]) -> tuple[str, ...]:
    """The keys `multiclass_metrics` returns for these classes, in its order (a CSV's columns)."""
    names = _check_classes(classes)
    return (*AGGREGATE_KEYS, *(f"{key}/{name}" for key in PER_CLASS_KEYS for name in names))


def multiclass_metrics(
    labels: ArrayLike, probabilities: ArrayLike, classes: Sequence[str], *, bias: ArrayLike | None = None
) -> dict[str, float]:
    """Point estimates of every `multiclass_metric_keys` metric.

    Args:
        labels: class index per film, in ``[0, K)``.
        probabilities: ``N x K`` class probabilities, rows summing to 1.
        classes: the K class names (column order).
        bias: K additive log-prior offsets applied to the decision only (see `fit_class_bias`); None is zeros.

    Returns:
        ``{key: float}``: accuracy, balanced accuracy, macro precision / recall / F1 / ROC-AUC / average precision,
        log loss, multi-class Brier, top-label ECE, and ``precision/<CLASS>`` ... ``average_precision/<CLASS>``.
        Undefined values (a class with no true film) are NaN.

    Raises:
        SettingError: see `check_multiclass_inputs`; a bias that is not K finite numbers.
    """
    names = _check_classes(classes)
    y, p = check_multiclass_inputs(labels, probabilities, names)
    k = len(names)
    decisions = _decide(p, _check_bias(bias, k))
    support = np.bincount(y, minlength=k)
    present = support > 0
    both_sides = present & (support < y.size)  # ROC-AUC also needs films outside the class

    precision, recall, f1, _ = precision_recall_fscore_support(
        y, decisions, labels=np.arange(k), average=None, zero_division=0
    )
    recall = np.where(present, recall, np.nan)
    f1 = np.where(present, f1, np.nan)
    auc = np.array([roc_auc_score(y == c, p[:, c]) if both_sides[c] else np.nan for c in range(k)])
    ap = np.array([average_precision_score(y == c, p[:, c]) if present[c] else np.nan for c in range(k)])
    onehot = np.eye(k)[y]
    out: dict[str, float] = {
        "accuracy": float(np.mean(decisions == y)),
        # scikit-learn's balanced_accuracy_score is this mean; it warns when a called class has no true film.
        "balanced_accuracy": float(_mean_defined(recall, present)),
        "macro_precision": float(_mean_defined(precision, present)),
        "macro_recall": float(_mean_defined(recall, present)),
        "macro_f1": float(_mean_defined(f1, present)),
        "macro_roc_auc": float(_mean_defined(auc, both_sides)),
        "macro_average_precision": float(_mean_defined(ap, present)),
        "log_loss": _log_loss(y, p),
        "brier": float(np.mean(np.sum((p - onehot) ** 2, axis=1))),  # scikit-learn >= 1.7 has it; we need 1.4
        "ece": multiclass_ece(y, p, _ECE_BINS),
    }
    for key, values in zip(PER_CLASS_KEYS, (precision, recall, f1, auc, ap), strict=True):
        for name, value in zip(names, values, strict=True):
            out[f"{key}/{name}"] = float(value)
    return out


def confusion(
    labels: ArrayLike, probabilities: ArrayLike, classes: Sequence[str], *, bias: ArrayLike | None = None
) -> dict[str, list]:
    """The confusion matrix at the decision ``argmax(log p + bias)``, ready for ``json.dump``.

    Returns:
        ``classes`` (row and column order), ``counts`` (K x K ints, rows = true class, columns = called class) and
        ``row_normalised`` (each row divided by its total: the recalls on the diagonal; NaN for a class with no
        true film).
    """
    names = _check_classes(classes)
    y, p = check_multiclass_inputs(labels, probabilities, names)
    decisions = _decide(p, _check_bias(bias, len(names)))
    counts = confusion_matrix(y, decisions, labels=np.arange(len(names)))
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.full(counts.shape, np.nan), where=totals > 0)
    return {
        "classes": list(names),
        "counts": [[int(v) for v in row] for row in counts],
        "row_normalised": [[float(v) for v in row] for row in normalised],
    }


# ---------------------------------------------------------------------------------------------------------------
# Calibration measures


def _top_label(labels: ArrayLike, probabilities: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(correct, confidence)`` per film: whether the most probable class is the true one, and its probability."""
    p = _check_probabilities(probabilities, None, None)
    y = _check_labels(labels, p.shape[1])
    if y.size != p.shape[0]:
        raise SettingError(f"labels and probabilities differ in length: {y.size} labels, {p.shape[0]} rows")
    return (p.argmax(axis=1) == y).astype(np.int64), p.max(axis=1)


def top_label_reliability(labels: ArrayLike, probabilities: ArrayLike, n_bins: int = 10) -> dict[str, list[float]]:
    """Top-label reliability diagram: accuracy against the largest probability, in equal-width bins.

    It is `calibration.reliability_curve` (scikit-learn's ``calibration_curve``) on (correct, max probability), so
    the bins are the binary report's. Confidence is at least ``1 / K``, so the low bins stay empty.

    Returns:
        For the non-empty bins only: ``bin_centers``, ``accuracy`` (share of films whose most probable class is
        true), ``confidence`` (mean largest probability), ``counts``.
    """
    correct, confidence = _top_label(labels, probabilities)
    return reliability_curve(correct, confidence, n_bins)


def multiclass_ece(labels: ArrayLike, probabilities: ArrayLike, n_bins: int = _ECE_BINS) -> float:
    """Top-label expected calibration error, in [0, 1]: ``sum_b (n_b / N) |accuracy_b - confidence_b|``.

    The binary `calibration.expected_calibration_error` on (correct, max probability), so the bin rule is the same:
    ``n_bins`` equal-width bins ``(e_i, e_i+1]`` on [0, 1] as scikit-learn's ``calibration_curve`` assigns them.
    """
    correct, confidence = _top_label(labels, probabilities)
    return expected_calibration_error(correct, confidence, n_bins)


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap


def _weighted_auc_ap(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest ROC-AUC and average precision (scikit-learn's definitions) for each row of ``weights``.

    Sort once by score (descending), sum weights within groups of tied scores, then AUC is the Mann-Whitney
    statistic (ties count 1/2) and AP is ``sum_k (R_k - R_k-1) P_k`` over distinct thresholds.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w_sorted = weights[:, order]
    pos_sorted = np.where(positive[order], w_sorted, 0.0)
    pos_g = np.add.reduceat(pos_sorted, starts, axis=1)
    neg_g = np.add.reduceat(w_sorted - pos_sorted, starts, axis=1)
    n_pos = pos_g.sum(axis=1)
    n_neg = neg_g.sum(axis=1)
    tp_cum = np.cumsum(pos_g, axis=1)
    fp_cum = np.cumsum(neg_g, axis=1)
    wins = (pos_g * (n_neg[:, None] - fp_cum + 0.5 * neg_g)).sum(axis=1)
    pairs = n_pos * n_neg
    auc = np.divide(wins, pairs, out=np.full_like(wins, np.nan), where=pairs > 0)
    called = tp_cum + fp_cum
    precision_k = np.divide(tp_cum, called, out=np.zeros_like(tp_cum), where=called > 0)
    hits = (pos_g * precision_k).sum(axis=1)
    ap = np.divide(hits, n_pos, out=np.full_like(hits, np.nan), where=n_pos > 0)
    return auc, ap


def _resampled_metrics(
    labels: np.ndarray, probabilities: np.ndarray, decisions: np.ndarray, names: tuple[str, ...], weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Every `multiclass_metric_keys` metric for each row of ``weights`` (film multiplicities), vectorised.

    Rows are expected to keep each class's total weight positive where the data has the class (a stratified
    resample does); classes without true films in the data give NaN, as the point estimates do.
    """
    k = len(names)
    n = labels.size
    data_support = np.bincount(labels, minlength=k)
    present = data_support > 0
    both_sides = present & (data_support < n)
    total = weights.sum(axis=1)

    # Confusion counts: each film falls in one (true, called) cell; a resample's counts are a weighted sum of cells.
    cells = np.zeros((n, k * k))
    cells[np.arange(n), labels * k + decisions] = 1.0
    counts = (weights @ cells).reshape(-1, k, k)
    tp = counts[:, np.arange(k), np.arange(k)]
    support = counts.sum(axis=2)
    called = counts.sum(axis=1)
    precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    recall = np.where(present, np.divide(tp, support, out=np.zeros_like(tp), where=support > 0), np.nan)
    denominator = support + called  # 2 tp + fp + fn
    f1 = np.where(present, np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0), np.nan)

    auc = np.full((weights.shape[0], k), np.nan)
    ap = np.full((weights.shape[0], k), np.nan)
    for c in np.flatnonzero(present):
        auc_c, ap_c = _weighted_auc_ap(labels == c, probabilities[:, c], weights)
        ap[:, c] = ap_c
        if both_sides[c]:
            auc[:, c] = auc_c

    # Per-film terms of the proper scores.
    true_p = probabilities[np.arange(n), labels]
    film_log_loss = _film_log_loss(true_p)
    film_brier = np.sum(probabilities**2, axis=1) - 2 * true_p + 1

    # Top-label ECE: per bin, |sum of correct - sum of confidence| over the resample's films, divided by N.
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, _ECE_BINS + 1)
    bins = np.zeros((n, _ECE_BINS))
    bins[np.arange(n), np.searchsorted(edges[1:-1], confidence)] = 1.0
    gap = weights @ (bins * (correct - confidence)[:, None])

    out = {
        "accuracy": np.trace(counts, axis1=1, axis2=2) / total,
        "balanced_accuracy": _mean_defined(recall, present),
        "macro_precision": _mean_defined(precision, present),
        "macro_recall": _mean_defined(recall, present),
        "macro_f1": _mean_defined(f1, present),
        "macro_roc_auc": _mean_defined(auc, both_sides),
        "macro_average_precision": _mean_defined(ap, present),
        "log_loss": weights @ film_log_loss / total,
        "brier": weights @ film_brier / total,
        "ece": np.abs(gap).sum(axis=1) / total,
    }
    for key, values in zip(PER_CLASS_KEYS, (precision, recall, f1, auc, ap), strict=True):
        for c, name in enumerate(names):
            out[f"{key}/{name}"] = values[:, c]
    return out


def multiclass_bootstrap_distribution(
    labels: ArrayLike,
    probabilities: ArrayLike,
    classes: Sequence[str],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    bias: ArrayLike | None = None,
) -> dict[str, np.ndarray]:
    """Every `multiclass_metric_keys` metric on each of ``n_resamples`` stratified bootstrap resamples.

    The resamples depend only on the labels and the seed, so two models scored on the same films with the same seed
    see the same resamples: their distributions are paired and can be subtracted.

    Returns:
        ``{key: array of shape (n_resamples,)}``; all NaN for a metric undefined on the data.
    """
    names = _check_classes(classes)
    y, p = check_multiclass_inputs(labels, probabilities, names)
    decisions = _decide(p, _check_bias(bias, len(names)))
    weights = resample_weights(y, n_resamples, seed, order=range(len(names)))
    parts = [_resampled_metrics(y, p, decisions, names, w) for w in weights]
    return {key: np.concatenate([part[key] for part in parts]) for key in multiclass_metric_keys(names)}


def multiclass_bootstrap_ci(
    labels: ArrayLike,
    probabilities: ArrayLike,
    classes: Sequence[str],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    bias: ArrayLike | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every `multiclass_metric_keys` metric from a stratified bootstrap.

    The films of each true class are resampled among themselves with replacement, which keeps the class counts
    fixed (so per-class AUC stays defined) and matches how the test set was built.

    Args:
        labels: class index per film, in ``[0, K)``.
        probabilities: ``N x K`` class probabilities, rows summing to 1.
        classes: the K class names.
        n_resamples: how many resamples (EVALUATION.md asks for at least 1,000).
        seed: seed of ``np.random.default_rng``.
        level: coverage of the interval, in (0, 1).
        bias: decision offsets, as in `multiclass_metrics`.

    Returns:
        ``{key: (low, high)}``; ``(nan, nan)`` for a metric undefined on the data.
    """
    if not 0.0 < float(level) < 1.0:
        raise SettingError(f"level must be within (0, 1), got {level}")
    samples = multiclass_bootstrap_distribution(
        labels, probabilities, classes, n_resamples=n_resamples, seed=seed, bias=bias
    )
    tail = (1.0 - float(level)) / 2
    out: dict[str, tuple[float, float]] = {}
    for key, values in samples.items():
        if np.isnan(values).any():
            out[key] = (float("nan"), float("nan"))
        else:
            low, high = np.quantile(values, [tail, 1.0 - tail])
            out[key] = (float(low), float(high))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Temperature and class bias, fit on validation


def _softmax_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``softmax(logits / T)``."""
    return float(-np.mean(log_softmax(logits / temperature, axis=1)[np.arange(labels.size), labels]))


class MulticlassTemperature(TemperatureScaler):
    """Temperature scaling (Guo et al., 2017) for K classes: probabilities ``softmax(z / T)``.

    ``T`` minimises the validation negative log-likelihood, searched on ``log T`` (bounded) so it stays positive,
    as `calibration.TemperatureScaler` does for the binary task. The called class, and so every ranking metric,
    does not change.

    Args:
        bounds: the search interval of ``T``.

    Attributes:
        temperature_: the fitted ``T``.
        nll_before_: validation NLL at ``T = 1``.
        nll_after_: validation NLL at ``temperature_``.
    """

    def fit(self, logits: ArrayLike, labels: ArrayLike) -> MulticlassTemperature:
        """Fit ``temperature_`` on validation logits (``N x K``) and labels (``[0, K)``); returns ``self``."""
        self._check_settings()
        z, y = _check_logits_labels(logits, labels)
        self.search(lambda t: _softmax_nll(z, y, t))
        return self

    def predict_proba(self, logits: ArrayLike) -> np.ndarray:
        """Calibrated ``N x K`` probabilities."""
        check_is_fitted(self, "temperature_")
        return softmax(_check_logits(logits) / self.temperature_, axis=1)

    transform = predict_proba  # the binary parent's transform reads logit margins


def fit_class_bias(logits: ArrayLike, labels: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """K additive log-prior offsets for the decision ``argmax(z / T + b)``, fit on validation; ``b[0] = 0``.

    Criterion: the *class-balanced* negative log-likelihood of ``softmax(z / T + b)`` (every class weighs the same,
    whatever its number of films), minimised over ``b[1:]`` by L-BFGS from zero with its exact gradient. It is the
    smooth, convex stand-in for balanced accuracy: when the logits are right for the training prior, its minimiser
    is the prior correction ``b_k - b_0 = log(prior_0 / prior_k)``, whose decisions maximise balanced accuracy.
    Deterministic (no random start). Pass the result as ``bias`` to `multiclass_metrics` on
    ``softmax(z / T)``: ``argmax(log p + b)`` is the same decision. Whether it helps is for validation to show.

    Args:
        logits: validation ``N x K`` logits.
        labels: validation class indices; every class must have a film.
        temperature: the ``T`` already fit (e.g. `MulticlassTemperature.temperature_`), > 0.

    Returns:
        float64 array of K offsets, the first 0.
    """
    z, y = _check_logits_labels(logits, labels)
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise SettingError(f"temperature must be a positive number, got {temperature}")
    k = z.shape[1]
    support = np.bincount(y, minlength=k)
    if (support == 0).any():
        missing = np.flatnonzero(support == 0).tolist()
        raise SettingError(f"fit_class_bias needs a validation film of every class; none of class {missing}")
    scaled = z / temperature
    weights = 1.0 / (k * support[y])  # sums to 1
    onehot = np.eye(k)[y]

    def objective(free: np.ndarray) -> tuple[float, np.ndarray]:
        log_p = log_softmax(scaled + np.r_[0.0, free], axis=1)
        loss = -float(weights @ log_p[np.arange(y.size), y])
        gradient = weights @ (np.exp(log_p) - onehot)
        return loss, gradient[1:]

    result = minimize(objective, np.zeros(k - 1), jac=True, method="L-BFGS-B", options={"gtol": 1e-9})
    return np.r_[0.0, result.x]


# ---------------------------------------------------------------------------------------------------------------
# Task views


def _group_members(classes: tuple[str, ...], groups: Mapping[str, Sequence[str]]) -> list[list[int]]:
    """Column indices of each group; the groups must partition the classes."""
    if not isinstance(groups, Mapping) or not groups:
        raise SettingError(f"groups must be a non-empty mapping of group name to class names, got {groups!r}")
    seen: dict[str, str] = {}
    members = []
    for group, names in groups.items():
        if isinstance(names, str) or not names:
            raise SettingError(f"group {group!r} must list one or more class names, got {names!r}")
        for name in names:
            if name not in classes:
                raise did_you_mean("class", str(name), classes)
            if name in seen:
                raise SettingError(f"class {name!r} is in two groups, {seen[name]!r} and {group!r}")
            seen[name] = group
        members.append([classes.index(name) for name in names])
    left_out = [name for name in classes if name not in seen]
    if left_out:
        raise SettingError(f"groups must cover every class; {left_out} are in none")
    return members


def collapse(
    probabilities: ArrayLike, classes: Sequence[str], groups: Mapping[str, Sequence[str]]
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Sum class columns into groups: a coarser task from the same predictions.

    ``{"NORMAL": ["NORMAL"], "PNEUMONIA": ["BACTERIAL", "VIRAL"]}`` gives the binary view; its column 1 is the
    P(PNEUMONIA) the binary metrics take. The groups must partition the classes, so rows still sum to 1.

    Returns:
        ``(N x G probabilities, group names in the mapping's order)``.
    """
    names = _check_classes(classes)
    p = _check_probabilities(probabilities, None, len(names))
    members = _group_members(names, groups)
    return np.stack([p[:, cols].sum(axis=1) for cols in members], axis=1), tuple(groups)


def collapse_labels(labels: ArrayLike, classes: Sequence[str], groups: Mapping[str, Sequence[str]]) -> np.ndarray:
    """The group index of each film's true class, the labels that go with `collapse`'s probabilities."""
    names = _check_classes(classes)
    y = _check_labels(labels, len(names))
    lookup = np.empty(len(names), dtype=np.int64)
    for g, cols in enumerate(_group_members(names, groups)):
        lookup[cols] = g
    return lookup[y]


def subtask(
    labels: ArrayLike, probabilities: ArrayLike, classes: Sequence[str], keep: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The films whose true class is in ``keep``, as a task of those classes only.

    E.g. ``keep=("BACTERIAL", "VIRAL")``: bacterial vs viral among the pneumonia films, the comparison Kermany et al.
    report. The kept columns are renormalised to sum to 1 (the probability *given* one of the kept classes); a row
    that puts no mass on any kept class gets the uniform distribution over them.

    Returns:
        ``(labels re-indexed in the order of keep, N' x len(keep) probabilities, tuple(keep))``.
    """
    names = _check_classes(classes)
    y, p = check_multiclass_inputs(labels, probabilities, names)
    if isinstance(keep, str):
        raise SettingError(f"keep must be a sequence of class names, not the string {keep!r}")
    kept = tuple(keep)
    for name in kept:
        if name not in names:
            raise did_you_mean("class", str(name), names)
    _check_classes(kept)  # at least 2, unique
    cols = np.array([names.index(name) for name in kept])
    lookup = np.full(len(names), -1, dtype=np.int64)
    lookup[cols] = np.arange(cols.size)
    rows = lookup[y] >= 0
    if not rows.any():
        raise SettingError(f"no film's true class is one of {list(kept)}")
    sub = p[np.ix_(rows, cols)]
    sums = sub.sum(axis=1, keepdims=True)
    sub = np.divide(sub, sums, out=np.full_like(sub, 1.0 / cols.size), where=sums > 0)
    return lookup[y[rows]], sub, kept


def _balanced_accuracy(labels: np.ndarray, decided: np.ndarray) -> float:
    """Mean recall over the classes present in `labels`."""
    return float(np.mean([(decided[labels == c] == c).mean() for c in np.unique(labels)]))


def class_bias_check(
    logits: ArrayLike, labels: ArrayLike, temperature: float, *, groups: ArrayLike | None = None, folds: int = 5
) -> dict[str, Any]:
    """Whether per-class bias terms help, measured on validation without fitting and scoring on the same films.

    The bias is fit on ``folds - 1`` parts of validation and applied to the part left out (patient-grouped and
    stratified folds when `groups` are given); the out-of-fold balanced accuracy is compared with the plain
    argmax's on the same films. ``helps`` is True only when the bias is strictly better.

    Returns:
        ``{"folds", "balanced_accuracy_argmax", "balanced_accuracy_with_bias", "helps"}``.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    z, y = _check_logits_labels(logits, labels)
    groups = np.arange(y.size) if groups is None else np.asarray(groups)
    scaled = z / float(temperature)
    plain = _balanced_accuracy(y, scaled.argmax(1))
    smallest = int(np.bincount(y, minlength=z.shape[1]).min())
    folds = min(folds, smallest)
    if folds < 2:  # a class with fewer than two validation films cannot be both fit and scored
        return {"folds": 0, "balanced_accuracy_argmax": plain, "balanced_accuracy_with_bias": None, "helps": False}
    out_of_fold = np.empty_like(scaled)
    for fit_rows, held_out in StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0).split(z, y, groups):
        out_of_fold[held_out] = scaled[held_out] + fit_class_bias(z[fit_rows], y[fit_rows], temperature)

    biased = _balanced_accuracy(y, out_of_fold.argmax(1))
    return {
        "folds": folds,
        "balanced_accuracy_argmax": plain,
        "balanced_accuracy_with_bias": biased,
        "helps": biased > plain,
    }
