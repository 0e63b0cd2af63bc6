"""The binary views of a K-class model, so it can stand on the same tables as the binary models.

* ``pneumonia_vs_normal``: P(PNEUMONIA) = 1 - P(NORMAL) (for NORMAL / BACTERIAL / VIRAL, P(BACTERIAL) + P(VIRAL)),
  against the films' NORMAL / not-NORMAL truth: every binary metric of `pneumolab.evaluate.metrics`.
* ``bacterial_vs_viral``: among the films that truly are pneumonia, P(VIRAL | pneumonia) = P(VIRAL) / (P(BACTERIAL)
  + P(VIRAL)), VIRAL as the positive class (sensitivity = viral films called viral): Kermany et al.'s second task.

Each view's threshold is fit on validation by the run's threshold rule (`ThresholdSelector`), as a binary model's
is, and applied unchanged to test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pneumolab.evaluate.calibration import ThresholdSelector, expected_calibration_error
from pneumolab.evaluate.metrics import evaluate_predictions
from pneumolab.evaluate.multiclass import subtask

__all__ = ["VIEWS", "binary_views", "derived_thresholds", "view_metrics"]

VIEWS = ("pneumonia_vs_normal", "bacterial_vs_viral")
_KINDS = ("BACTERIAL", "VIRAL")


def binary_views(
    labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{view: (0/1 labels, positive-class probability)}`` for the views these classes allow."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=float)
    views: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if classes[0] == "NORMAL":
        views["pneumonia_vs_normal"] = ((labels != 0).astype(int), 1.0 - probabilities[:, 0])
    if all(kind in classes for kind in _KINDS):
        kept_labels, kept, _ = subtask(labels, probabilities, classes, _KINDS)
        if len(kept_labels):
            views["bacterial_vs_viral"] = (kept_labels, kept[:, 1])
    return views


def derived_thresholds(
    labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], selector: ThresholdSelector
) -> dict[str, float]:
    """Each view's threshold, fit on validation `labels` / `probabilities` by `selector`'s rule."""
    thresholds = {}
    for view, (y, p) in binary_views(labels, probabilities, classes).items():
        if len(set(y.tolist())) == 2:
            thresholds[view] = float(selector.fit(y, p).threshold_)
    return thresholds


def view_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    thresholds: dict[str, float],
    *,
    n_resamples: int,
) -> dict[str, dict[str, Any]]:
    """The binary metric object (with intervals and ECE) of every view that has a validation threshold."""
    out = {}
    for view, (y, p) in binary_views(labels, probabilities, classes).items():
        if view in thresholds and len(set(y.tolist())) == 2:
            metrics = evaluate_predictions(y, p, thresholds[view], n_resamples=n_resamples)
            metrics.update(
                ece=expected_calibration_error(y, p),
                positive="VIRAL" if view == "bacterial_vs_viral" else "PNEUMONIA",
            )
            out[view] = metrics
    return out
