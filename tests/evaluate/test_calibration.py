"""Threshold selection, temperature scaling and calibration error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit, logit
from sklearn.calibration import calibration_curve
from sklearn.exceptions import NotFittedError
from sklearn.metrics import log_loss, recall_score

from pneumolab.errors import SettingError, UnknownNameError
from pneumolab.evaluate import (
    TemperatureScaler,
    ThresholdSelector,
    expected_calibration_error,
    reliability_curve,
)

# Constructed validation set: 5 PNEUMONIA, 4 NORMAL, no ties.
#   p >= 0.5 : sensitivity 4/5, specificity 4/4  (Youden 0.80, F1 8/9)
#   p >= 0.4 : sensitivity 5/5, specificity 3/4  (Youden 0.75, F1 10/11)
POSITIVES = [0.4, 0.5, 0.6, 0.8, 0.9]
NEGATIVES = [0.1, 0.2, 0.3, 0.45]
LABELS = np.array([1] * len(POSITIVES) + [0] * len(NEGATIVES))
SCORES = np.array(POSITIVES + NEGATIVES)


@pytest.mark.parametrize(
    ("method", "kwargs", "expected"),
    [
        ("balanced_accuracy", {}, (0.5 + 0.45) / 2),
        ("youden", {}, (0.5 + 0.45) / 2),
        ("f1", {}, (0.4 + 0.3) / 2),
        ("target_sensitivity", {"target_sensitivity": 0.9}, (0.4 + 0.3) / 2),
        ("target_sensitivity", {"target_sensitivity": 0.8}, (0.5 + 0.45) / 2),
        ("target_sensitivity", {"target_sensitivity": 0.6}, (0.6 + 0.5) / 2),
        ("fixed", {}, 0.5),
        ("fixed", {"fixed": 0.3}, 0.3),
    ],
)
def test_thresholds_on_constructed_data(method: str, kwargs: dict, expected: float) -> None:
    selector = ThresholdSelector(method, **kwargs).fit(LABELS, SCORES)
    assert selector.threshold_ == pytest.approx(expected, abs=1e-15)
    predicted = selector.predict(SCORES)
    assert predicted.dtype == np.int64
    assert selector.validation_sensitivity_ == recall_score(LABELS, predicted)
    assert selector.validation_specificity_ == recall_score(LABELS, predicted, pos_label=0)


def test_ties_go_to_the_lower_threshold() -> None:
    # p >= 0.7: sensitivity 1/2, specificity 1; p >= 0.4: sensitivity 1, specificity 1/2: the same Youden's J.
    labels = np.array([1, 1, 0, 0])
    scores = np.array([0.8, 0.4, 0.6, 0.2])
    assert ThresholdSelector("youden").fit(labels, scores).threshold_ == pytest.approx(0.3)


def test_the_lowest_score_gives_half_way_to_zero() -> None:
    labels = np.array([1, 1, 0, 0])
    scores = np.array([0.8, 0.2, 0.6, 0.4])  # sensitivity 1 needs every image called PNEUMONIA
    selector = ThresholdSelector("target_sensitivity", target_sensitivity=0.99).fit(labels, scores)
    assert selector.threshold_ == pytest.approx(0.1)
    assert selector.validation_sensitivity_ == 1.0


def test_adjacent_float_scores_keep_the_validation_decisions() -> None:
    low = 0.5
    high = np.nextafter(low, 1.0)  # no float lies between: the midpoint rounds onto one of them
    selector = ThresholdSelector("youden").fit([1, 0], [high, low])
    assert selector.predict([high, low]).tolist() == [1, 0]


scores_strategy = st.lists(
    st.tuples(st.integers(0, 1), st.sampled_from([0.05, 0.1, 0.2, 0.3, 0.5, 0.55, 0.7, 0.9, 0.95])),
    min_size=2,
    max_size=30,
).filter(lambda rows: len({label for label, _ in rows}) == 2)


@settings(max_examples=60, deadline=None)
@given(rows=scores_strategy, target=st.sampled_from([0.5, 0.8, 0.9, 0.95]))
def test_target_sensitivity_is_met_at_the_highest_threshold(rows: list, target: float) -> None:
    labels = np.array([label for label, _ in rows])
    scores = np.array([score for _, score in rows])
    selector = ThresholdSelector("target_sensitivity", target_sensitivity=target).fit(labels, scores)
    assert selector.validation_sensitivity_ >= target
    # The next higher candidate, which calls the lowest score above the threshold NORMAL, would miss the target.
    above = scores[scores > selector.threshold_]
    if above.size:
        assert recall_score(labels, (scores > above.min()).astype(int)) < target
    # The threshold lies strictly between validation scores (or below all of them).
    assert selector.threshold_ not in set(scores.tolist())


@settings(max_examples=60, deadline=None)
@given(rows=scores_strategy)
def test_youden_and_balanced_accuracy_reach_the_best_balanced_accuracy(rows: list) -> None:
    labels = np.array([label for label, _ in rows])
    scores = np.array([score for _, score in rows])
    youden = ThresholdSelector("youden").fit(labels, scores)
    balanced = ThresholdSelector("balanced_accuracy").fit(labels, scores)
    assert youden.threshold_ == balanced.threshold_
    called = scores[None, :] >= scores[:, None]  # one row per candidate cut: every validation score
    sensitivity = (called & (labels == 1)).sum(axis=1) / (labels == 1).sum()
    specificity = (~called & (labels == 0)).sum(axis=1) / (labels == 0).sum()
    best = (sensitivity + specificity).max()
    got = youden.validation_sensitivity_ + youden.validation_specificity_
    assert got == pytest.approx(best, abs=1e-12)


def test_describe() -> None:
    assert ThresholdSelector().describe() == "max balanced accuracy on validation"
    target = ThresholdSelector("target_sensitivity", target_sensitivity=0.95)
    assert target.describe() == "sensitivity >= 0.95 on validation"
    assert ThresholdSelector("fixed").describe() == "fixed at 0.5"
    assert "F1" in ThresholdSelector("f1").describe()
    assert "Youden" in ThresholdSelector("youden").describe()


def test_unknown_method_suggests_the_closest() -> None:
    with pytest.raises(UnknownNameError, match="did you mean youden"):
        ThresholdSelector("yuoden")


@pytest.mark.parametrize("target", [None, 0.0, 1.0, 1.5, -0.1])
def test_bad_target_sensitivity(target: float | None) -> None:
    with pytest.raises(SettingError, match="target_sensitivity"):
        ThresholdSelector("target_sensitivity", target_sensitivity=target)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "youden", "target_sensitivity": 0.9}, "only used by method 'target_sensitivity'"),
        ({"method": "f1", "fixed": 0.4}, "only used by method 'fixed'"),
        ({"method": "fixed", "fixed": 1.2}, "within \\[0, 1\\]"),
    ],
)
def test_inconsistent_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(SettingError, match=message):
        ThresholdSelector(**kwargs)


def test_settings_are_rechecked_in_fit_and_predict_needs_fit() -> None:
    selector = ThresholdSelector()
    with pytest.raises(NotFittedError):
        selector.predict([0.5])
    selector.set_params(method="f2")
    with pytest.raises(UnknownNameError):
        selector.fit(LABELS, SCORES)
    with pytest.raises(SettingError, match="need both classes"):
        ThresholdSelector().fit([1, 1], [0.2, 0.7])


def overconfident_logits(n: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z), and the logits of a model that says ``temperature * z``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.5, 2.0, n)
    labels = (rng.random(n) < expit(z)).astype(int)
    return temperature * z, labels


def test_temperature_recovers_a_known_overconfidence() -> None:
    margins, labels = overconfident_logits(40_000, 2.0)
    scaler = TemperatureScaler().fit(margins, labels)
    assert scaler.temperature_ == pytest.approx(2.0, abs=0.15)
    assert scaler.nll_after_ <= scaler.nll_before_
    before = log_loss(labels, expit(margins))
    after = log_loss(labels, scaler.transform(margins))
    assert after <= before
    assert scaler.nll_after_ == pytest.approx(after, rel=1e-6)


def test_temperature_accepts_two_column_logits() -> None:
    margins, labels = overconfident_logits(2_000, 3.0, seed=1)
    rng = np.random.default_rng(2)
    logits = np.stack([rng.normal(size=margins.size), np.zeros(margins.size)], axis=1)
    logits[:, 1] = logits[:, 0] + margins  # any shift of both columns leaves the softmax unchanged
    from_pairs = TemperatureScaler().fit(logits, labels)
    from_margins = TemperatureScaler().fit(margins, labels)
    assert from_pairs.temperature_ == pytest.approx(from_margins.temperature_, rel=1e-6)
    np.testing.assert_allclose(from_pairs.transform(logits), expit(margins / from_pairs.temperature_), rtol=1e-6)


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (np.zeros((4, 3)), [0, 1, 0, 1], "N x 2 or N margins"),
        ([0.1, np.inf], [0, 1], "finite"),
        ([0.1, 0.3, 0.2], [0, 1], "labels and logits differ in length"),
        ([0.1, 0.3], [1, 1], "need both classes"),
    ],
)
def test_temperature_bad_inputs(logits: object, labels: list, message: str) -> None:
    with pytest.raises(SettingError, match=message):
        TemperatureScaler().fit(logits, labels)


def test_temperature_bad_bounds_and_unfitted() -> None:
    with pytest.raises(SettingError, match="bounds"):
        TemperatureScaler(bounds=(2.0, 10.0))
    with pytest.raises(NotFittedError):
        TemperatureScaler().transform([0.0])


def calibrated(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probabilities = rng.random(n)
    return (rng.random(n) < probabilities).astype(int), probabilities


def test_ece_of_calibrated_and_overconfident_probabilities() -> None:
    labels, probabilities = calibrated(20_000)
    assert expected_calibration_error(labels, probabilities) < 0.03
    overconfident = expit(3 * logit(np.clip(probabilities, 1e-6, 1 - 1e-6)))
    assert expected_calibration_error(labels, overconfident) > 0.1


def test_reliability_curve_matches_sklearn_and_ece() -> None:
    labels, probabilities = calibrated(3_000, seed=3)
    probabilities = np.r_[probabilities, 0.0, 1.0, 0.5]  # edges: 0 in the first bin, 1 in the last
    labels = np.r_[labels, 0, 1, 1]
    curve = reliability_curve(labels, probabilities, n_bins=10)
    true, predicted = calibration_curve(labels, probabilities, n_bins=10)
    np.testing.assert_allclose(curve["accuracy"], true, rtol=0, atol=1e-15)
    np.testing.assert_allclose(curve["confidence"], predicted, rtol=0, atol=1e-15)
    assert sum(curve["counts"]) == labels.size
    assert curve["bin_centers"][0] == pytest.approx(0.05)
    weighted = np.abs(np.array(curve["accuracy"]) - curve["confidence"]) @ np.array(curve["counts"]) / labels.size
    assert expected_calibration_error(labels, probabilities, n_bins=10) == pytest.approx(weighted, abs=1e-12)


def test_reliability_curve_drops_empty_bins() -> None:
    curve = reliability_curve([0, 1, 1], [0.05, 0.93, 0.97], n_bins=10)
    assert curve == {"bin_centers": [0.05, 0.95], "accuracy": [0.0, 1.0], "confidence": [0.05, 0.95], "counts": [1, 2]}


@pytest.mark.parametrize(
    ("labels", "probabilities", "n_bins", "message"),
    [
        ([0, 1], [0.1, 0.2], 0, "n_bins"),
        ([0, 1], [0.1, 1.2], 10, "within \\[0, 1\\]"),
        ([0, 2], [0.1, 0.2], 10, "0 \\(NORMAL\\) or 1"),
        ([0, 1, 1], [0.1, 0.2], 10, "differ in length"),
    ],
)
def test_calibration_bad_inputs(labels: list, probabilities: list, n_bins: int, message: str) -> None:
    with pytest.raises(SettingError, match=message):
        expected_calibration_error(labels, probabilities, n_bins=n_bins)
