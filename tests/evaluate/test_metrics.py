"""Metrics: point estimates equal scikit-learn's, and every vectorised bootstrap value equals scikit-learn's function
on the explicitly resampled arrays."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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
from pneumolab.evaluate import CI_KEYS, METRIC_KEYS, binary_metrics, bootstrap_ci, evaluate_predictions
from pneumolab.evaluate import metrics as metrics_module
from pneumolab.evaluate.metrics import (
    _resampled_metrics,
    bootstrap_distribution,
    multiplicities,
    stratified_indices,
)


def sklearn_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """The reference: scikit-learn on plain arrays."""
    pred = (p >= threshold).astype(int)
    return {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "precision": precision_score(y, pred, zero_division=0),
        "recall": recall_score(y, pred),
        "specificity": recall_score(y, pred, pos_label=0),
        "f1": f1_score(y, pred, zero_division=0),
        "average_precision": average_precision_score(y, p),
        "roc_auc": roc_auc_score(y, p),
        "accuracy_at_0.5": accuracy_score(y, (p >= 0.5).astype(int)),
    }


def make_data(kind: str, n: int = 624, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Kermany-like test sets: 62.5 % PNEUMONIA, scores continuous or with many ties."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=int)
    y[: round(n * 0.625)] = 1
    rng.shuffle(y)
    p = np.clip(rng.normal(0.35 + 0.35 * y, 0.2), 0, 1)
    if kind == "ties":
        p = np.round(p, 1)  # 11 distinct values: ties within and across classes
    elif kind == "few":
        p = rng.choice([0.2, 0.5, 0.8], size=n)  # the threshold coincides with a score
    return y, p


DATASETS = ["continuous", "ties", "few"]


@pytest.mark.parametrize("kind", DATASETS)
@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.8])
def test_point_estimates_equal_sklearn(kind: str, threshold: float) -> None:
    y, p = make_data(kind)
    got = binary_metrics(y, p, threshold)
    want = sklearn_metrics(y, p, threshold)
    assert list(got) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-15), key
        assert type(got[key]) is float


@pytest.mark.parametrize("kind", DATASETS)
@pytest.mark.parametrize("threshold", [0.5, 0.41])
def test_resampled_values_equal_sklearn_on_explicit_resamples(kind: str, threshold: float) -> None:
    y, p = make_data(kind, n=300)
    indices = stratified_indices(y, 6, np.random.default_rng(3))
    values = _resampled_metrics(y, p, threshold, multiplicities(indices, y.size))
    for b, rows in enumerate(indices):
        want = sklearn_metrics(y[rows], p[rows], threshold)
        for key in CI_KEYS:
            assert abs(values[key][b] - want[key]) <= 1e-12, (key, b)


def test_public_distribution_uses_the_checked_resamples() -> None:
    y, p = make_data("ties", n=200)
    samples = bootstrap_distribution(y, p, 0.5, n_resamples=50, seed=7)
    indices = stratified_indices(y, 50, np.random.default_rng(7))
    for b in (0, 17, 49):
        want = sklearn_metrics(y[indices[b]], p[indices[b]], 0.5)
        for key in CI_KEYS:
            assert abs(samples[key][b] - want[key]) <= 1e-12, (key, b)


def test_chunked_resamples_equal_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    y, p = make_data("ties", n=100)
    monkeypatch.setattr(metrics_module, "_CHUNK_CELLS", 100 * 4)  # 4 resamples per chunk: 3 chunks for 10
    samples = bootstrap_distribution(y, p, 0.5, n_resamples=10, seed=2)
    rng = np.random.default_rng(2)
    indices = np.concatenate([stratified_indices(y, size, rng) for size in (4, 4, 2)])
    for b in range(10):
        want = sklearn_metrics(y[indices[b]], p[indices[b]], 0.5)
        for key in CI_KEYS:
            assert abs(samples[key][b] - want[key]) <= 1e-12, (key, b)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(0, 1), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5, 0.7, 0.9, 1.0]), st.integers(0, 3)),
        min_size=2,
        max_size=25,
    ),
    threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]),
)
def test_weighted_metrics_equal_sklearn_on_repeated_data(data: list[tuple[int, float, int]], threshold: float) -> None:
    """Any multiplicities (zeros included) give scikit-learn's values on the data repeated accordingly."""
    y = np.array([row[0] for row in data])
    p = np.array([row[1] for row in data])
    w = np.array([row[2] for row in data])
    repeated = np.repeat(np.arange(y.size), w)
    if len(set(y[repeated].tolist())) < 2:
        return  # each resample has both classes by construction
    values = _resampled_metrics(y, p, threshold, w[None, :].astype(float))
    want = sklearn_metrics(y[repeated], p[repeated], threshold)
    for key in CI_KEYS:
        assert abs(values[key][0] - want[key]) <= 1e-12, key


def test_stratified_resamples_keep_class_counts() -> None:
    y, _ = make_data("continuous", n=120)
    indices = stratified_indices(y, 30, np.random.default_rng(0))
    assert indices.shape == (30, 120)
    assert (y[indices].sum(axis=1) == y.sum()).all()


def test_bootstrap_of_624_images_2000_resamples_is_fast() -> None:
    y, p = make_data("ties")
    bootstrap_ci(y, p, 0.5, n_resamples=50)  # warm-up (imports, caches)
    start = time.perf_counter()
    intervals = bootstrap_ci(y, p, 0.5, n_resamples=2000, seed=0)
    elapsed = time.perf_counter() - start
    print(f"bootstrap of 624 images x 2000 resamples, all {len(intervals)} metrics: {elapsed * 1000:.0f} ms")
    assert elapsed < 1.5


def test_evaluate_predictions_is_the_design_metric_object() -> None:
    y, p = make_data("continuous")
    result = evaluate_predictions(y, p, 0.42, n_resamples=400, seed=0)
    json.dumps(result, allow_nan=False)
    for key in METRIC_KEYS:
        assert type(result[key]) is float
    assert result["threshold"] == 0.42
    assert result["n"] == 624 and result["n_positive"] == 390
    assert result["confusion_matrix"] == confusion_matrix(y, (p >= 0.42).astype(int)).tolist()
    assert result["accuracy_at_0.5"] == accuracy_score(y, (p >= 0.5).astype(int))
    assert set(result["ci95"]) == set(CI_KEYS)
    for key in CI_KEYS:
        low, high = result["ci95"][key]
        assert 0 <= low <= result[key] <= high <= 1, key
    assert result["bootstrap"] == {"method": "stratified percentile", "n_resamples": 400, "seed": 0}
    # Same seed, same intervals; the interval of accuracy is about 2 x 1.96 x its binomial standard error.
    assert evaluate_predictions(y, p, 0.42, n_resamples=400, seed=0)["ci95"] == result["ci95"]
    acc = result["accuracy"]
    width = result["ci95"]["accuracy"][1] - result["ci95"]["accuracy"][0]
    assert width == pytest.approx(2 * 1.96 * np.sqrt(acc * (1 - acc) / 624), rel=0.25)


def test_seed_changes_the_resamples() -> None:
    y, p = make_data("continuous", n=200)
    a = bootstrap_distribution(y, p, 0.5, n_resamples=20, seed=0)["roc_auc"]
    b = bootstrap_distribution(y, p, 0.5, n_resamples=20, seed=1)["roc_auc"]
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_all_predictions_one_class(threshold: float) -> None:
    y, p = make_data("continuous", n=200)
    p = np.clip(p, 0.01, 0.99)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero_division=0: no UndefinedMetricWarning
        result = evaluate_predictions(y, p, threshold, n_resamples=100)
    if threshold == 1.0:  # everything called NORMAL
        assert result["precision"] == 0.0 and result["recall"] == 0.0 and result["f1"] == 0.0
        assert result["ci95"]["precision"] == [0.0, 0.0]
        assert result["confusion_matrix"][0][1] == 0 and result["confusion_matrix"][1][1] == 0
    else:  # everything called PNEUMONIA
        assert result["recall"] == 1.0 and result["specificity"] == 0.0
        assert result["precision"] == pytest.approx(y.mean())


@pytest.mark.parametrize(
    ("labels", "probabilities", "message"),
    [
        ([1, 1, 1], [0.2, 0.5, 0.9], "need both classes"),
        ([0, 0], [0.2, 0.5], "need both classes"),
        ([0, 1, 1], [0.2, 0.5], "differ in length"),
        ([0, 1, 2], [0.2, 0.5, 0.1], "0 \\(NORMAL\\) or 1"),
        ([0, 1], [0.2, 1.5], "within \\[0, 1\\]"),
        ([0, 1], [0.2, np.nan], "finite"),
        ([0, 1], [[0.8, 0.2], [0.1, 0.9]], "probabilities\\[:, 1\\]"),
        ([], [], "non-empty"),
    ],
)
def test_bad_inputs_raise_setting_error(labels: list, probabilities: list, message: str) -> None:
    with pytest.raises(SettingError, match=message):
        binary_metrics(labels, probabilities)
    with pytest.raises(SettingError, match=message):
        evaluate_predictions(labels, probabilities, 0.5, n_resamples=10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"n_resamples": 0}, "n_resamples"),
        ({"n_resamples": 10.0}, "n_resamples"),
        ({"level": 1.0}, "level"),
    ],
)
def test_bad_settings_raise_setting_error(kwargs: dict, message: str) -> None:
    y, p = make_data("continuous", n=50)
    arguments = {"threshold": 0.5, "n_resamples": 10, **kwargs}
    with pytest.raises(SettingError, match=message):
        bootstrap_ci(y, p, **arguments)


def test_boolean_labels_are_accepted() -> None:
    y, p = make_data("continuous", n=80)
    assert binary_metrics(y.astype(bool), p) == binary_metrics(y, p)
