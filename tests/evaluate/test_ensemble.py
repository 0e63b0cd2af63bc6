"""Ensemble combiners fit on validation predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit, logit, softmax
from sklearn.exceptions import NotFittedError
from sklearn.metrics import log_loss, roc_auc_score

from pneumolab.errors import SettingError, UnknownNameError
from pneumolab.evaluate import EnsembleCombiner


def members_and_labels(n: int, noise: tuple[float, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Members that see a shared latent signal through their own noise (a larger noise, a worse member)."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < expit(signal)).astype(int)
    members = np.stack([expit(signal + rng.normal(0.0, scale, n)) for scale in noise])
    return members, labels


def test_mean_equals_numpy_mean() -> None:
    members, labels = members_and_labels(300, (0.5, 1.0, 2.0))
    combiner = EnsembleCombiner("mean").fit(members, labels)
    np.testing.assert_array_equal(combiner.predict_proba(members), np.mean(members, axis=0))
    np.testing.assert_array_equal(combiner.weights_, np.full(3, 1 / 3))
    assert combiner.describe() == {"method": "mean", "combines": "probabilities", "weights": [1 / 3] * 3}


def test_weighted_puts_the_weight_on_the_informative_member() -> None:
    rng = np.random.default_rng(1)
    informative, labels = members_and_labels(2_000, (0.3,), seed=1)
    members = np.vstack([rng.random((1, 2_000)), informative, rng.random((2, 2_000))])
    combiner = EnsembleCombiner("weighted").fit(members, labels)
    weights = combiner.weights_
    assert weights.sum() == pytest.approx(1.0) and (weights >= 0).all()
    assert weights[1] > 0.95
    # It is the validation log-likelihood's optimum, so it beats the plain mean there.
    mean = EnsembleCombiner("mean").fit(members, labels)
    assert log_loss(labels, combiner.predict_proba(members)) < log_loss(labels, mean.predict_proba(members))
    np.testing.assert_allclose(combiner.predict_proba(members), weights @ members)


def test_weighted_with_equal_members_stays_uniform() -> None:
    members, labels = members_and_labels(500, (1.0,))
    combiner = EnsembleCombiner("weighted").fit(np.vstack([members, members]), labels)
    np.testing.assert_allclose(combiner.weights_, [0.5, 0.5], atol=1e-9)


@pytest.mark.parametrize("c", [1.0, None])
def test_stacking_beats_the_worst_member_on_held_out_data(c: float | None) -> None:
    noise = (0.7, 1.5, 3.0)
    val_members, val_labels = members_and_labels(1_500, noise, seed=2)
    test_members, test_labels = members_and_labels(1_500, noise, seed=3)
    combiner = EnsembleCombiner("stacking", C=c, seed=0).fit(val_members, val_labels)
    stacked = combiner.predict_proba(test_members)
    assert stacked.shape == (1_500,)
    member_auc = [roc_auc_score(test_labels, member) for member in test_members]
    member_loss = [log_loss(test_labels, member) for member in test_members]
    assert roc_auc_score(test_labels, stacked) > min(member_auc)
    assert log_loss(test_labels, stacked) < max(member_loss)
    # The best member gets the largest coefficient.
    assert int(np.argmax(combiner.weights_)) == 0
    description = combiner.describe()
    json.dumps(description)
    assert description["method"] == "stacking" and len(description["coefficients"]) == 3
    assert description["C_chosen_by"] == ("fixed" if c else "cross-validated log-loss")


def test_members_as_a_list_and_probabilities_of_zero_or_one() -> None:
    members, labels = members_and_labels(200, (0.5, 1.0))
    members[0, :5] = 1.0
    members[1, 5:10] = 0.0
    rows = [members[0], members[1].tolist()]
    for method in ("mean", "weighted", "stacking"):
        probabilities = EnsembleCombiner(method).fit(rows, labels).predict_proba(rows)
        assert np.isfinite(probabilities).all() and probabilities.min() >= 0 and probabilities.max() <= 1


def test_members_disagreeing_in_n() -> None:
    members, labels = members_and_labels(100, (0.5, 1.0))
    with pytest.raises(SettingError, match="members disagree in the number of images N: \\[100, 99\\]"):
        EnsembleCombiner().fit([members[0], members[1][:99]], labels)


def test_labels_of_the_wrong_length() -> None:
    members, labels = members_and_labels(100, (0.5, 1.0))
    with pytest.raises(SettingError, match="labels must have one entry per image: 100 images"):
        EnsembleCombiner().fit(members, labels[:90])


def test_predicting_with_another_number_of_members() -> None:
    members, labels = members_and_labels(100, (0.5, 1.0))
    combiner = EnsembleCombiner("weighted").fit(members, labels)
    with pytest.raises(SettingError, match="fit on 2 members, got 3"):
        combiner.predict_proba(np.vstack([members, members[:1]]))


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (np.full(10, 0.5), "n_members x N"),
        (np.zeros((2, 0)), "non-empty"),
        (np.full((2, 4), 1.5), "within \\[0, 1\\]"),
        ([], "n_members x N"),
    ],
)
def test_bad_member_arrays(members: object, message: str) -> None:
    with pytest.raises(SettingError, match=message):
        EnsembleCombiner().fit(members, np.array([0, 1, 0, 1]))


def test_unknown_method_and_bad_c() -> None:
    with pytest.raises(UnknownNameError, match="did you mean stacking"):
        EnsembleCombiner("stacked")
    with pytest.raises(SettingError, match="C must be positive"):
        EnsembleCombiner("stacking", C=0.0)


def test_single_class_and_unfitted() -> None:
    with pytest.raises(SettingError, match="need both classes"):
        EnsembleCombiner().fit(np.full((2, 3), 0.5), [1, 1, 1])
    with pytest.raises(NotFittedError):
        EnsembleCombiner().predict_proba(np.full((2, 3), 0.5))


@pytest.mark.parametrize(("method", "c"), [("mean", 1.0), ("weighted", 1.0), ("stacking", 1.0), ("stacking", None)])
def test_a_saved_combiner_predicts_as_the_fitted_one(method: str, c: float | None) -> None:
    members, labels = members_and_labels(400, (0.5, 1.5))
    fitted = EnsembleCombiner(method, C=c).fit(members, labels)
    saved = json.loads(json.dumps(fitted.describe()))  # as an ensemble's card holds it
    again = EnsembleCombiner.from_saved(saved)
    fresh, _ = members_and_labels(200, (0.5, 1.5), seed=3)
    np.testing.assert_allclose(again.predict_proba(fresh), fitted.predict_proba(fresh), rtol=0, atol=1e-12)
    assert again.describe() == saved
    if method == "stacking":  # the closed form is the logistic regression's own prediction
        regression = fitted.model_.predict_proba(logit(fresh).T)[:, 1]  # no member is near 0 or 1 here: no clipping
        np.testing.assert_allclose(fitted.predict_proba(fresh), regression, atol=1e-12)


def class_members_and_labels(n: int, noise: tuple[float, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three-class members (n_members x N x 3) that see shared latent logits through their own noise."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(0.0, 2.0, (n, 3))
    labels = np.array([rng.choice(3, p=p) for p in softmax(latent, axis=1)])
    members = np.stack([softmax(latent + rng.normal(0.0, scale, (n, 3)), axis=1) for scale in noise])
    return members, labels


def test_k_class_mean_and_weighted_pool_class_probabilities() -> None:
    rng = np.random.default_rng(4)
    informative, labels = class_members_and_labels(1_500, (0.3,), seed=4)
    noise = softmax(rng.normal(0.0, 1.0, (2, 1_500, 3)), axis=2)
    members = np.concatenate([noise[:1], informative, noise[1:]])
    mean = EnsembleCombiner("mean").fit(members, labels)
    np.testing.assert_allclose(mean.predict_proba(members), members.mean(axis=0))
    weighted = EnsembleCombiner("weighted").fit(members, labels)
    assert weighted.weights_.argmax() == 1 and weighted.weights_[1] > 0.8
    assert weighted.weights_.sum() == pytest.approx(1.0)
    combined = weighted.predict_proba(members)
    np.testing.assert_allclose(combined.sum(axis=1), 1.0)
    assert log_loss(labels, combined) < log_loss(labels, mean.predict_proba(members))


def test_k_class_stacking_is_a_multinomial_regression_and_survives_saving() -> None:
    val, val_labels = class_members_and_labels(1_200, (0.7, 2.5), seed=5)
    test, test_labels = class_members_and_labels(1_200, (0.7, 2.5), seed=6)
    fitted = EnsembleCombiner("stacking").fit(val, val_labels)
    stacked = fitted.predict_proba(test)
    features = np.log(np.clip(test, 1e-6, 1.0)).transpose(1, 0, 2).reshape(len(test_labels), -1)
    np.testing.assert_allclose(stacked, fitted.model_.predict_proba(features), atol=1e-10)
    assert log_loss(test_labels, stacked) < log_loss(test_labels, test[1])  # better than the worse member
    saved = json.loads(json.dumps(fitted.describe()))
    assert saved["combines"] == "log-probabilities" and saved["n_classes"] == 3
    again = EnsembleCombiner.from_saved(saved)
    np.testing.assert_allclose(again.predict_proba(test), stacked, atol=1e-12)
    with pytest.raises(SettingError, match="2 members of 3 classes"):
        again.predict_proba(test[:1])
    with pytest.raises(SettingError, match="sum to 1"):
        EnsembleCombiner("mean").fit(val * 2, val_labels)
