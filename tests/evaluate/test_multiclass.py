"""K-class evaluation: point estimates equal scikit-learn's, every vectorised bootstrap value equals the point
estimate on the explicitly resampled films, and temperature / class bias recover what synthetic data was built with."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import sklearn
from scipy.special import logit, softmax
from sklearn.calibration import calibration_curve
from sklearn.exceptions import NotFittedError
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

from pneumolab.errors import SettingError, UnknownNameError
from pneumolab.evaluate.metrics import binary_metrics, multiplicities, stratified_indices
from pneumolab.evaluate.multiclass import (
    MulticlassTemperature,
    _decide,
    _resampled_metrics,
    check_multiclass_inputs,
    collapse,
    collapse_labels,
    confusion,
    fit_class_bias,
    multiclass_bootstrap_ci,
    multiclass_bootstrap_distribution,
    multiclass_ece,
    multiclass_metric_keys,
    multiclass_metrics,
    subtask,
    top_label_reliability,
)

CLASSES = ("NORMAL", "BACTERIAL", "VIRAL")
GROUPS = {"NORMAL": ["NORMAL"], "PNEUMONIA": ["BACTERIAL", "VIRAL"]}
SKLEARN_MULTICLASS_BRIER = tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 7)


def make_data(kind: str = "continuous", n: int = 624, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A Kermany-like three-class test set (234 / 242 / 148 at n = 624), softmax outputs.

    ``"ties"`` draws every row from six probability vectors, so scores tie within and across classes.
    """
    rng = np.random.default_rng(seed)
    counts = np.round(n * np.array([234, 242, 148]) / 624).astype(int)
    counts[1] += n - counts.sum()
    y = np.repeat(np.arange(3), counts)
    rng.shuffle(y)
    if kind == "ties":
        table = np.array(
            [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.4, 0.4, 0.2], [1, 0, 0], [0.3, 0.3, 0.4]]
        )
        choice = np.where(rng.random(n) < 0.5, y, rng.integers(0, table.shape[0], n))
        return y, table[choice]
    z = rng.normal(size=(n, 3))
    z[np.arange(n), y] += 1.5
    return y, softmax(2.0 * z, axis=1)  # over-confident, so ECE is well above its noise


def assert_close(actual: dict[str, float], expected: dict[str, float], atol: float = 1e-10) -> None:
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=atol, nan_ok=True), key


# --------------------------------------------------------------------------------------------------------------------
# Point estimates


@pytest.mark.parametrize("bias", [None, np.array([0.0, -0.4, 0.7])])
def test_metrics_agree_with_sklearn(bias: np.ndarray | None) -> None:
    y, p = make_data()
    out = multiclass_metrics(y, p, CLASSES, bias=bias)
    assert tuple(out) == multiclass_metric_keys(CLASSES)
    pred = p.argmax(axis=1) if bias is None else (np.log(p) + bias).argmax(axis=1)
    if bias is not None:
        assert (pred != p.argmax(axis=1)).sum() > 10  # the bias really moves decisions
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, zero_division=0)
    onehot = label_binarize(y, classes=[0, 1, 2])
    expected = {
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "macro_precision": precision.mean(),
        "macro_recall": recall.mean(),
        "macro_f1": f1.mean(),
        "macro_roc_auc": roc_auc_score(y, p, multi_class="ovr", average="macro"),
        "macro_average_precision": average_precision_score(onehot, p, average="macro"),
        "log_loss": log_loss(y, p),
        "brier": np.mean(np.sum((p - onehot) ** 2, axis=1)),
    }
    for c, name in enumerate(CLASSES):
        expected[f"precision/{name}"] = precision[c]
        expected[f"recall/{name}"] = recall[c]
        expected[f"f1/{name}"] = f1[c]
        expected[f"roc_auc/{name}"] = roc_auc_score(y == c, p[:, c])
        expected[f"average_precision/{name}"] = average_precision_score(y == c, p[:, c])
    assert_close(out, expected)
    if SKLEARN_MULTICLASS_BRIER:
        assert out["brier"] == pytest.approx(brier_score_loss(y, p, labels=[0, 1, 2], scale_by_half=False))
    matrix = confusion(y, p, CLASSES, bias=bias)
    assert matrix["counts"] == confusion_matrix(y, pred).tolist()
    assert np.allclose(np.diag(matrix["row_normalised"]), recall)


def test_perfect_predictor_scores_perfectly_without_warnings() -> None:
    y = np.array([0, 1, 2, 2, 1, 0, 2])
    p = np.eye(3)[y]  # exact zeros: log 0 under a bias must not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = multiclass_metrics(y, p, CLASSES, bias=[0.0, 3.0, -3.0])
    for key in multiclass_metric_keys(CLASSES):
        if key in ("log_loss", "brier", "ece"):
            assert out[key] == pytest.approx(0.0, abs=1e-12), key
        else:
            assert out[key] == 1.0, key


def test_class_absent_from_labels_gives_nan_not_crash() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)  # no VIRAL film
    p = softmax(rng.normal(size=(80, 3)) + 2 * np.eye(3)[y], axis=1)
    pred = p.argmax(axis=1)
    assert (pred == 2).any()  # VIRAL is called, wrongly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = multiclass_metrics(y, p, CLASSES)
        ci = multiclass_bootstrap_ci(y, p, CLASSES, n_resamples=50)
    for key in ("recall/VIRAL", "f1/VIRAL", "roc_auc/VIRAL", "average_precision/VIRAL"):
        assert np.isnan(out[key]) and all(np.isnan(ci[key])), key
    assert out["precision/VIRAL"] == 0.0  # every VIRAL call is wrong
    present = [roc_auc_score(y == c, p[:, c]) for c in (0, 1)]
    assert out["macro_roc_auc"] == pytest.approx(np.mean(present))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns that a called class has no true film
        assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert out["macro_recall"] == out["balanced_accuracy"]
    assert out["log_loss"] == pytest.approx(log_loss(y, p, labels=[0, 1, 2]))
    finite = [key for key in out if not np.isnan(out[key])]
    assert len(finite) == len(out) - 4 and all(np.isfinite(ci[key]).all() for key in finite)
    assert all(np.isnan(confusion(y, p, CLASSES)["row_normalised"][2]))


def test_two_classes_match_the_binary_metrics_at_a_threshold() -> None:
    """K = 2 with bias ``(0, -logit(t))`` is the binary decision ``p >= t`` (continuous scores: no ties)."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    p1 = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0.001, 0.999)
    threshold = 0.62
    out = multiclass_metrics(y, np.c_[1 - p1, p1], ("NORMAL", "PNEUMONIA"), bias=[0.0, -logit(threshold)])
    binary = binary_metrics(y, p1, threshold)
    pairs = {
        "accuracy": "accuracy",
        "balanced_accuracy": "balanced_accuracy",
        "recall/PNEUMONIA": "recall",
        "recall/NORMAL": "specificity",
        "precision/PNEUMONIA": "precision",
        "f1/PNEUMONIA": "f1",
        "roc_auc/PNEUMONIA": "roc_auc",
        "average_precision/PNEUMONIA": "average_precision",
    }
    for ours, theirs in pairs.items():
        assert out[ours] == pytest.approx(binary[theirs], abs=1e-12), ours


# --------------------------------------------------------------------------------------------------------------------
# Bootstrap


@pytest.mark.parametrize(("kind", "bias"), [("continuous", None), ("ties", None), ("continuous", [0.0, 0.5, -0.2])])
def test_every_resampled_value_equals_the_point_estimate_on_the_resample(kind: str, bias: list | None) -> None:
    y, p = make_data(kind, n=150)
    y, p = check_multiclass_inputs(y, p, CLASSES)
    b = None if bias is None else np.asarray(bias)
    decisions = _decide(p, b)
    indices = stratified_indices(y, 25, order=range(3), rng=np.random.default_rng(0))
    resampled = _resampled_metrics(y, p, decisions, CLASSES, multiplicities(indices, y.size))
    for r in range(indices.shape[0]):
        expected = multiclass_metrics(y[indices[r]], p[indices[r]], CLASSES, bias=b)
        assert_close({key: values[r] for key, values in resampled.items()}, expected)


def test_resamples_are_stratified() -> None:
    y, _ = make_data(n=200)
    indices = stratified_indices(y, 300, order=range(3), rng=np.random.default_rng(1))
    assert indices.shape == (300, 200)
    counts = np.stack([np.bincount(y[row], minlength=3) for row in indices])
    assert (counts == np.bincount(y)).all()
    # Degenerate: a class with one film holds that film exactly once in every resample, so its recall never moves.
    y1 = y.copy()
    y1[y1 == 2] = 1
    y1[7] = 2
    indices_of_7 = (stratified_indices(y1, 300, order=range(3), rng=np.random.default_rng(2)) == 7).sum(axis=1)
    assert indices_of_7.min() == 1
    assert indices_of_7.max() == 1
    _, p = make_data(n=200)
    point = multiclass_metrics(y1, p, CLASSES)["recall/VIRAL"]
    assert multiclass_bootstrap_ci(y1, p, CLASSES, n_resamples=200)["recall/VIRAL"] == (point, point)


def test_intervals_contain_the_point_estimate_are_seeded_and_fast() -> None:
    y, p = make_data()
    point = multiclass_metrics(y, p, CLASSES)
    start = time.perf_counter()
    ci = multiclass_bootstrap_ci(y, p, CLASSES, n_resamples=1000, seed=4)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0  # about 0.1 s on one core
    assert set(ci) == set(point)
    for key, (low, high) in ci.items():
        assert low < point[key] < high, key
    assert multiclass_bootstrap_ci(y, p, CLASSES, n_resamples=1000, seed=4) == ci
    assert multiclass_bootstrap_ci(y, p, CLASSES, n_resamples=1000, seed=5) != ci
    narrow = multiclass_bootstrap_ci(y, p, CLASSES, n_resamples=1000, seed=4, level=0.5)
    assert all(ci[k][0] <= narrow[k][0] <= narrow[k][1] <= ci[k][1] for k in ci)
    paired = multiclass_bootstrap_distribution(y, p, CLASSES, n_resamples=1000, seed=4)
    assert all(paired[k].shape == (1000,) for k in ci)


@pytest.mark.parametrize(("kwargs", "message"), [({"n_resamples": 0}, "n_resamples"), ({"level": 1.0}, "level")])
def test_bootstrap_settings_are_checked(kwargs: dict, message: str) -> None:
    y, p = make_data(n=60)
    with pytest.raises(SettingError, match=message):
        multiclass_bootstrap_ci(y, p, CLASSES, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Calibration


def test_top_label_reliability_and_ece_follow_calibration_curve() -> None:
    y, p = make_data()
    correct = (p.argmax(axis=1) == y).astype(int)
    confidence = p.max(axis=1)
    curve = top_label_reliability(y, p, n_bins=10)
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=10)
    assert np.allclose(curve["accuracy"], accuracy) and np.allclose(curve["confidence"], mean_confidence)
    assert sum(curve["counts"]) == y.size and min(curve["bin_centers"]) > 1 / 3 - 0.1
    edges = np.linspace(0, 1, 16)
    bins = np.searchsorted(edges[1:-1], confidence)  # scikit-learn's rule: (e_i, e_i+1], 0 in the first bin
    expected = sum(abs(correct[bins == b].sum() - confidence[bins == b].sum()) for b in range(15)) / y.size
    assert multiclass_ece(y, p) == pytest.approx(expected, abs=1e-12)
    assert multiclass_metrics(y, p, CLASSES)["ece"] == pytest.approx(expected, abs=1e-12)
    assert expected > 0.05  # the data is over-confident on purpose


def test_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, size=(20000, 3))
    y = np.array([rng.choice(3, p=row) for row in softmax(true_logits, axis=1)])
    logits = 2.5 * true_logits  # over-confident by T = 2.5
    scaler = MulticlassTemperature().fit(logits, y)
    assert scaler.temperature_ == pytest.approx(2.5, rel=0.05)
    assert scaler.nll_after_ < scaler.nll_before_
    calibrated = scaler.predict_proba(logits)
    assert np.allclose(calibrated.sum(axis=1), 1) and (calibrated.argmax(1) == logits.argmax(1)).all()
    assert scaler.nll_after_ == pytest.approx(log_loss(y, calibrated))
    with pytest.raises(NotFittedError):
        MulticlassTemperature().predict_proba(logits)
    with pytest.raises(SettingError, match="bounds"):
        MulticlassTemperature(bounds=(2.0, 3.0))
    with pytest.raises(SettingError, match="differ in length"):
        MulticlassTemperature().fit(logits, y[:-1])


def shifted_prior_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Films from priors (0.7, 0.2, 0.1) with the exact posterior logits for those priors (a model that learnt
    the training prior): its argmax favours NORMAL, which costs balanced accuracy."""
    rng = np.random.default_rng(seed)
    priors = np.array([0.7, 0.2, 0.1])
    means = np.array([[0.0, 0.0], [1.2, 0.0], [0.6, 1.0]])
    y = rng.choice(3, size=n, p=priors)
    x = means[y] + rng.normal(size=(n, 2))
    logits = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(axis=2) + np.log(priors)
    return logits, y


def test_class_bias_undoes_a_shifted_prior_and_helps_balanced_accuracy() -> None:
    val_logits, val_y = shifted_prior_set(6000, seed=1)
    bias = fit_class_bias(val_logits, val_y, temperature=1.0)
    assert bias[0] == 0.0 and bias.shape == (3,)
    assert bias[1:] == pytest.approx(np.log([0.7 / 0.2, 0.7 / 0.1]), abs=0.2)  # the prior correction
    assert (fit_class_bias(val_logits, val_y, temperature=1.0) == bias).all()  # deterministic
    test_logits, test_y = shifted_prior_set(6000, seed=2)
    p = softmax(test_logits, axis=1)
    before = multiclass_metrics(test_y, p, CLASSES)["balanced_accuracy"]
    after = multiclass_metrics(test_y, p, CLASSES, bias=bias)["balanced_accuracy"]
    assert after > before + 0.05
    with pytest.raises(SettingError, match="every class"):
        fit_class_bias(val_logits[val_y < 2], val_y[val_y < 2])
    with pytest.raises(SettingError, match="temperature"):
        fit_class_bias(val_logits, val_y, temperature=0.0)


# --------------------------------------------------------------------------------------------------------------------
# Task views


def test_collapse_sums_columns_into_the_binary_view() -> None:
    y, p = make_data()
    binary, names = collapse(p, CLASSES, GROUPS)
    assert names == ("NORMAL", "PNEUMONIA") and binary.shape == (y.size, 2)
    assert np.allclose(binary.sum(axis=1), 1)
    assert np.allclose(binary[:, 1], p[:, 1].astype(float) + p[:, 2], atol=1e-6)
    binary_y = collapse_labels(y, CLASSES, GROUPS)
    assert (binary_y == (y > 0)).all()
    assert binary_metrics(binary_y, binary[:, 1])["roc_auc"] == pytest.approx(roc_auc_score(y > 0, p[:, 1] + p[:, 2]))
    with pytest.raises(UnknownNameError, match="did you mean VIRAL"):
        collapse(p, CLASSES, {"NORMAL": ["NORMAL"], "PNEUMONIA": ["BACTERIAL", "VIRALL"]})
    with pytest.raises(SettingError, match="two groups"):
        collapse(p, CLASSES, {"A": ["NORMAL", "VIRAL"], "B": ["BACTERIAL", "VIRAL"]})
    with pytest.raises(SettingError, match="in none"):
        collapse(p, CLASSES, {"A": ["NORMAL"], "B": ["BACTERIAL"]})


def test_subtask_keeps_the_films_and_renormalises_the_columns() -> None:
    y, p = make_data()
    sub_y, sub_p, names = subtask(y, p, CLASSES, ["VIRAL", "BACTERIAL"])
    assert names == ("VIRAL", "BACTERIAL")
    assert sub_y.size == (y > 0).sum() and (sub_y == (y[y > 0] == 1)).all()  # label order follows keep
    assert np.allclose(sub_p.sum(axis=1), 1)
    kept = p[y > 0].astype(float)
    assert np.allclose(sub_p[:, 0], kept[:, 2] / (kept[:, 1] + kept[:, 2]))
    # A row with no mass on the kept classes carries no information between them: uniform.
    _, uniform, _ = subtask([2, 1], [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], CLASSES, ["NORMAL", "VIRAL"])
    assert uniform.tolist() == [[0.5, 0.5]]
    out = multiclass_metrics(sub_y, sub_p, names)
    assert out["roc_auc/BACTERIAL"] == pytest.approx(roc_auc_score(sub_y == 1, sub_p[:, 1]))
    with pytest.raises(UnknownNameError):
        subtask(y, p, CLASSES, ["BACTERIA", "VIRAL"])
    with pytest.raises(SettingError, match="at least 2"):
        subtask(y, p, CLASSES, ["VIRAL"])
    with pytest.raises(SettingError, match="no film"):
        subtask(np.zeros(3, int), np.eye(3), CLASSES, ["BACTERIAL", "VIRAL"])


# --------------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("labels", "probabilities", "classes", "message"),
    [
        ([0, 1], [[0.5, 0.3, 0.2]], CLASSES, "differ in length"),
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], CLASSES, "2 columns but there are 3 classes"),
        ([0, 1], [0.5, 0.5], CLASSES, "N x K"),
        ([0, 1], [[0.5, 0.3, 0.3], [0.2, 0.3, 0.5]], CLASSES, r"row 0 sums to 1\.1"),
        ([0, 3], [[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], CLASSES, r"within 0\.\.2 .* got values \[3\]"),
        ([0, -1], [[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], CLASSES, r"got values \[-1\]"),
        ([0, 1.5], [[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], CLASSES, "whole class indices"),
        ([], np.zeros((0, 3)), CLASSES, "non-empty"),
        ([0, 1], [[np.nan, 0.5, 0.5], [0.2, 0.3, 0.5]], CLASSES, "NaN"),
        ([0, 1], [[-0.1, 0.6, 0.5], [0.2, 0.3, 0.5]], CLASSES, r"within \[0, 1\]"),
        ([0, 1], [[1.00005, 0.0, 0.0], [0.2, 0.3, 0.5]], CLASSES, r"within \[0, 1\]"),
        ([0, 1], [[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], ("A", "B", "A"), "unique"),
        ([0, 1], [[0.5, 0.5], [0.2, 0.8]], "AB", "sequence of class names"),
    ],
)
def test_validator_rejects_bad_inputs_in_one_line(labels, probabilities, classes, message: str) -> None:
    with pytest.raises(SettingError, match=message) as caught:
        check_multiclass_inputs(labels, probabilities, classes)
    assert "\n" not in str(caught.value)


def test_rows_within_tolerance_pass_unchanged_and_float32_softmax_scores_quietly() -> None:
    rows = np.array([[0.5, 0.3, 0.20004], [0.2, 0.3, 0.5]], dtype=np.float32)
    y, p = check_multiclass_inputs([0, 2], rows, CLASSES)
    assert y.dtype == np.int64 and p.dtype == np.float64 and (p == rows).all()  # not renormalised: ties survive
    labels, p = make_data()
    p32 = p.astype(np.float32)  # rows sum to 1 only to ~1e-7, which scikit-learn's log_loss warns about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = multiclass_metrics(labels, p32, CLASSES)
    assert_close(out, multiclass_metrics(labels, p, CLASSES), atol=1e-6)
    with pytest.raises(SettingError, match="bias must be 3 finite numbers"):
        multiclass_metrics(labels, p, CLASSES, bias=[0.0, 1.0])
