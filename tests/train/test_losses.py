"""Class weights (the research plan's formula and the alternatives), the weighted loss and the sampler weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from pneumolab.errors import SettingError, UnknownNameError
from pneumolab.train.losses import SCHEMES, class_weights, make_loss, weighted_sampler_weights

# Kermany's official train split: 1,341 NORMAL (0) and 3,875 PNEUMONIA (1).
KERMANY = np.array([0] * 1341 + [1] * 3875)


def test_plan_weights_for_kermany_by_hand():
    n, k = 5216, 2
    w0, w1 = n / (k * 1341), n / (k * 3875)  # 1.9448..., 0.6730...
    w0 *= 1.3  # NORMAL is the minority: 2.5283...
    want = [w0 / (w0 + w1), w1 / (w0 + w1)]  # [0.7898..., 0.2102...]
    assert math.isclose(want[0], 0.78976, abs_tol=1e-5) and math.isclose(want[1], 0.21024, abs_tol=1e-5)
    got = class_weights(KERMANY, "plan")
    assert got.dtype == torch.float32 and got.shape == (2,)
    assert torch.allclose(got, torch.tensor(want), atol=1e-7)
    assert math.isclose(got.sum().item(), 1.0, rel_tol=1e-6)


def test_plan_boosts_whichever_class_is_rarer():
    flipped = class_weights(1 - KERMANY, "plan")
    assert torch.allclose(flipped, class_weights(KERMANY, "plan").flip(0))
    assert torch.allclose(class_weights(KERMANY, "plan", minority_boost=1.0), torch.tensor([3875, 1341]) / 5216)


def test_balanced_is_sklearns_balanced():
    got = class_weights(KERMANY, "balanced")
    assert torch.allclose(got, torch.tensor([5216 / (2 * 1341), 5216 / (2 * 3875)]))
    # Weighted counts are equal: every class carries N / K.
    assert torch.allclose(got * torch.tensor([1341.0, 3875.0]), torch.tensor([2608.0, 2608.0]))


def test_three_classes():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
    balanced = class_weights(labels, "balanced", num_classes=3)
    assert torch.allclose(balanced, torch.tensor([12 / 12, 12 / 6, 12 / 18]))
    plan = class_weights(labels, "plan", num_classes=3)
    raw = torch.tensor([1.0, 2.0 * 1.3, 2 / 3])
    assert torch.allclose(plan, raw / raw.sum())


def test_none_and_custom():
    assert torch.equal(class_weights(KERMANY, "none"), torch.ones(2))
    assert torch.allclose(class_weights(KERMANY, "custom", custom=[2.0, 0.5]), torch.tensor([2.0, 0.5]))


def test_tensor_labels_give_the_same_weights_on_their_device():
    got = class_weights(torch.from_numpy(KERMANY), "plan")
    assert torch.equal(got, class_weights(KERMANY, "plan"))
    assert got.device == torch.device("cpu")


@pytest.mark.parametrize("scheme", ["plan", "balanced"])
def test_a_class_without_examples_is_an_error(scheme):
    with pytest.raises(SettingError, match="class 1 has no training examples"):
        class_weights(np.zeros(10, dtype=int), scheme)


def test_none_and_custom_do_not_need_every_class():
    assert torch.equal(class_weights(np.zeros(10, dtype=int), "none"), torch.ones(2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheme": "custom"}, "needs the weights"),
        ({"scheme": "custom", "custom": [1.0]}, "2 positive numbers"),
        ({"scheme": "custom", "custom": [1.0, 0.0]}, "2 positive numbers"),
        ({"scheme": "custom", "custom": [1.0, float("nan")]}, "2 positive numbers"),
        ({"scheme": "plan", "custom": [1.0, 2.0]}, "scheme 'custom'"),
        ({"scheme": "plan", "minority_boost": 0.0}, "minority_boost"),
        ({"scheme": "plan", "num_classes": 0}, "num_classes"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(SettingError, match=match):
        class_weights(KERMANY, **kwargs)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.array([0, 1, 2]), r"\[0, 2\)"),
        (np.array([-1, 0, 1]), r"\[0, 2\)"),
        (np.array([0.5, 1.0]), "integer"),
        (np.array([], dtype=int), "non-empty"),
        (np.zeros((2, 2), dtype=int), "1-D"),
    ],
)
def test_bad_labels(labels, match):
    with pytest.raises(SettingError, match=match):
        class_weights(labels, "balanced")


def test_unknown_scheme_suggests_the_closest():
    with pytest.raises(UnknownNameError, match="did you mean balanced"):
        class_weights(KERMANY, "balance")
    assert set(SCHEMES) == {"plan", "balanced", "none", "custom"}


def test_make_loss_is_weighted_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.5], [0.1, 1.2], [1.0, 1.0], [-0.5, 0.3]])
    targets = torch.tensor([0, 1, 1, 0])
    weights = torch.tensor([0.8, 0.2])
    # -log softmax of the target, weighted per example, divided by the sum of the weights used.
    log_p = [logits[i, targets[i]] - torch.logsumexp(logits[i], 0) for i in range(4)]
    w = [weights[targets[i]] for i in range(4)]
    want = -sum(wi * lp for wi, lp in zip(w, log_p, strict=True)) / sum(w)
    assert torch.allclose(make_loss(weights)(logits, targets), want)
    plain = -sum(log_p) / 4
    assert torch.allclose(make_loss(None)(logits, targets), plain)


def test_make_loss_label_smoothing_and_errors():
    loss = make_loss(torch.tensor([0.5, 0.5]), label_smoothing=0.1)
    assert isinstance(loss, torch.nn.CrossEntropyLoss) and loss.label_smoothing == 0.1
    with pytest.raises(SettingError, match="label_smoothing"):
        make_loss(None, label_smoothing=1.0)
    with pytest.raises(SettingError, match="positive"):
        make_loss(torch.tensor([1.0, -1.0]))


def test_sampler_weights_give_every_class_the_same_total():
    weights = weighted_sampler_weights(KERMANY)
    assert weights.shape == (5216,) and weights.dtype == torch.float64
    assert torch.allclose(weights[KERMANY == 0].sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(weights[KERMANY == 1].sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(weighted_sampler_weights(torch.from_numpy(KERMANY)), weights)
    drawn = list(WeightedRandomSampler(weights, 20_000, generator=torch.Generator().manual_seed(0)))
    assert abs(np.mean(KERMANY[drawn]) - 0.5) < 0.02
