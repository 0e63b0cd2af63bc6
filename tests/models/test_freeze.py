"""Freezing policies, frozen BatchNorm statistics and parameter counts."""

from __future__ import annotations

import pytest
import torch

from pneumolab.errors import SettingError, UnknownNameError
from pneumolab.models import (
    FREEZE_POLICIES,
    apply_freeze,
    count_parameters,
    create_model,
    list_models,
    set_frozen_batchnorm_eval,
)


def _trainable(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_resnet50_plan_trains_layer4_and_head_only() -> None:
    model = create_model("resnet50", weights="none")
    assert apply_freeze(model, "plan") == ["layer4", "head"]
    trainable = _trainable(model)
    assert trainable
    assert all(name.startswith(("backbone.layer4.", "head.")) for name in trainable)
    assert any(name.startswith("backbone.layer4.") for name in trainable)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert "backbone.conv1.weight" in frozen
    assert "backbone.layer3.0.conv1.weight" in frozen


def test_densenet121_plan_trains_denseblock4_norm5_and_head_only() -> None:
    model = create_model("densenet121", weights="none")
    assert apply_freeze(model, "plan") == ["denseblock4", "head"]
    trainable = _trainable(model)
    prefixes = ("backbone.features.denseblock4.", "backbone.features.norm5.", "head.")
    assert all(name.startswith(prefixes) for name in trainable)
    assert "backbone.features.norm5.weight" in trainable
    assert not any(name.startswith("backbone.features.transition3.") for name in trainable)


@pytest.mark.parametrize("name", list_models())
def test_policies_on_every_model(name: str) -> None:
    model = create_model(name, weights="none")
    total, _ = count_parameters(model)
    head = sum(p.numel() for p in model.head.parameters())

    assert apply_freeze(model, "linear") == ["head"]
    assert all(name.startswith("head.") for name in _trainable(model))
    assert count_parameters(model) == (total, head)

    plan = apply_freeze(model, "plan")
    assert plan == [*model.spec.plan_groups, "head"]
    assert head < count_parameters(model)[1] < total

    assert apply_freeze(model, "full") == [*model.spec.group_names, "head"]
    assert count_parameters(model) == (total, total)


def test_gradual_grows_with_epoch() -> None:
    model = create_model("resnet18", weights="none")
    seen = [apply_freeze(model, "gradual", epoch=epoch, gradual_every=2) for epoch in range(14)]
    assert seen[0] == seen[1] == ["head"]
    assert seen[2] == ["layer4", "head"]
    assert seen[4] == ["layer3", "layer4", "head"]
    assert seen[10] == seen[13] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    counts = []
    for epoch in range(12):
        apply_freeze(model, "gradual", epoch=epoch)
        counts.append(count_parameters(model)[1])
    assert counts == sorted(counts)
    assert counts[0] < counts[5] == counts[-1] == count_parameters(model)[0]


def test_policy_errors() -> None:
    model = create_model("mobilenet_v2", weights="none")
    with pytest.raises(UnknownNameError, match="did you mean gradual"):
        apply_freeze(model, "graduel")
    with pytest.raises(SettingError):
        apply_freeze(model, "gradual", gradual_every=0)
    with pytest.raises(SettingError):
        apply_freeze(model, "gradual", epoch=-1)
    assert set(FREEZE_POLICIES) == {"full", "plan", "linear", "gradual"}


@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_lite0"])
def test_frozen_batchnorm_keeps_its_statistics(name: str) -> None:
    model = create_model(name, weights="none")
    apply_freeze(model, "plan")
    model.train()
    switched = set_frozen_batchnorm_eval(model)
    assert switched > 0
    frozen_bn = model.get_submodule("backbone.bn1")  # the stem's BatchNorm in both
    trained_bn = model.get_submodule("backbone.layer4.1.bn2" if name == "resnet18" else "backbone.bn2")
    assert not frozen_bn.training
    assert trained_bn.training
    before_frozen = frozen_bn.running_mean.clone()
    before_trained = trained_bn.running_mean.clone()
    model(torch.randn(2, 1, 64, 64) * 3 + 1)
    torch.testing.assert_close(frozen_bn.running_mean, before_frozen)
    assert not torch.allclose(trained_bn.running_mean, before_trained)


def test_full_policy_leaves_batchnorm_training() -> None:
    model = create_model("resnet18", weights="none")
    apply_freeze(model, "full")
    model.train()
    assert set_frozen_batchnorm_eval(model) == 0
    assert all(module.training for module in model.modules())
