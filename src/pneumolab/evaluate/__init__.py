"""Evaluation: metrics with stratified bootstrap intervals, thresholds and calibration fit on validation, ensembles.

Everything that learns (threshold, temperature, ensemble weights, stacker) is fit on validation predictions only;
the test set is scored once with what was learned (docs/EVALUATION.md).
"""

from pneumolab.evaluate.calibration import (
    THRESHOLD_METHODS,
    TemperatureScaler,
    ThresholdSelector,
    expected_calibration_error,
    reliability_curve,
)
from pneumolab.evaluate.ensemble import ENSEMBLE_METHODS, EnsembleCombiner
from pneumolab.evaluate.metrics import (
    CI_KEYS,
    METRIC_KEYS,
    binary_metrics,
    bootstrap_ci,
    bootstrap_distribution,
    evaluate_predictions,
)

__all__ = [
    "CI_KEYS",
    "ENSEMBLE_METHODS",
    "METRIC_KEYS",
    "THRESHOLD_METHODS",
    "EnsembleCombiner",
    "TemperatureScaler",
    "ThresholdSelector",
    "binary_metrics",
    "bootstrap_ci",
    "bootstrap_distribution",
    "evaluate_predictions",
    "expected_calibration_error",
    "reliability_curve",
]
