"""The registry and every registered spec: names, metadata, and that the spec's layer paths fit the model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from pneumolab.errors import UnknownNameError
from pneumolab.models import (
    HEADS,
    Classifier,
    FreezeGroup,
    ModelSpec,
    create_model,
    list_models,
    model_spec,
    register_model,
)

EXPECTED = {
    "resnet18",
    "resnet50",
    "resnet101",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "mobilenet_v2",
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "tf_efficientnet_lite2",
}
NATIVE_SIZE = {"efficientnet_b1": 240, "efficientnet_b2": 260, "efficientnet_b3": 300}
NATIVE_SIZE |= {"tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}


def test_list_models() -> None:
    assert set(list_models()) == EXPECTED
    assert list_models() == sorted(EXPECTED)
    assert list_models("resnet*") == ["resnet101", "resnet18", "resnet50"]
    assert list_models("tf_efficientnet_lite?") == [
        "tf_efficientnet_lite0",
        "tf_efficientnet_lite1",
        "tf_efficientnet_lite2",
    ]
    assert list_models("vit*") == []


@pytest.mark.parametrize(
    ("call", "wrong", "hint"),
    [
        (lambda: model_spec("resnet5"), "model 'resnet5'", "resnet50"),
        (lambda: create_model("densenet12", weights="none"), "model 'densenet12'", "densenet121"),
        (lambda: create_model("resnet18", weights="none", head="atention"), "head 'atention'", "attention"),
    ],
)
def test_unknown_names_suggest(call, wrong: str, hint: str) -> None:
    with pytest.raises(UnknownNameError, match="did you mean") as info:
        call()
    assert wrong in str(info.value)
    assert hint in str(info.value)


def test_register_model_rejects_a_duplicate_and_a_misnamed_builder() -> None:
    spec = model_spec("resnet18")
    with pytest.raises(ValueError, match="twice"):
        register_model("resnet18")(lambda: spec)
    with pytest.raises(ValueError, match="decorates a builder of"):
        register_model("resnet18_copy")(lambda: spec)
    assert "resnet18_copy" not in list_models()


@pytest.mark.parametrize("name", list_models())
def test_spec_metadata(name: str) -> None:
    spec = model_spec(name)
    assert isinstance(spec, ModelSpec)
    assert spec.name == name
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.input_size = 1  # type: ignore[misc]
    assert spec.input_size == NATIVE_SIZE.get(name, 224)
    lite = name.startswith("tf_efficientnet_lite")
    assert spec.mean == ((0.5,) * 3 if lite else (0.485, 0.456, 0.406))
    assert spec.std == ((0.5,) * 3 if lite else (0.229, 0.224, 0.225))
    assert spec.gray_mean == pytest.approx(sum(spec.mean) / 3)
    assert spec.gray_std == pytest.approx(sum(spec.std) / 3)
    assert spec.normalization(1) == ((spec.gray_mean,), (spec.gray_std,))
    assert spec.normalization(3) == (spec.mean, spec.std)
    assert spec.has_offline_imagenet == (lite or name == "mobilenet_v2")
    assert spec.imagenet_source
    assert all(isinstance(group, FreezeGroup) for group in spec.freeze_groups)
    assert spec.group_names[0] == "stem"
    assert set(spec.plan_groups) <= set(spec.group_names)
    # plan trains the top of the network: its groups are the last ones
    assert spec.group_names[-len(spec.plan_groups) :] == spec.plan_groups


@pytest.mark.parametrize("name", list_models())
def test_spec_paths_fit_the_model(name: str) -> None:
    """feature_dim, first_conv, gradcam_layer and the freeze groups describe the model that create_model builds."""
    spec = model_spec(name)
    model = create_model(name, weights="none").eval()
    assert isinstance(model, Classifier)
    assert model.spec is spec
    assert model.weights_source == "random"

    first_conv = model.get_submodule(spec.first_conv)
    assert isinstance(first_conv, nn.Conv2d)
    assert first_conv.in_channels == 1
    assert first_conv.weight.shape[1] == 1

    # every parameter is in exactly one group (the head being the last one)
    for param_name, _ in model.named_parameters():
        owners = [group.name for group in spec.freeze_groups if group.matches(param_name)]
        owners += ["head"] if param_name.startswith("head.") else []
        assert len(owners) == 1, (param_name, owners)
    for group in spec.freeze_groups:
        for prefix in group.prefixes:
            assert any(n.startswith(prefix + ".") for n, _ in model.named_parameters()), prefix

    # the Grad-CAM layer's output is the last feature map, and nothing changes it in place afterwards
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(spec.gradcam_layer).register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        model(x)
        features = model.forward_features(x)
    handle.remove()
    assert features.shape[:2] == (2, spec.feature_dim)
    torch.testing.assert_close(seen[0], features)


@pytest.mark.parametrize("name", ["densenet121", "resnet18", "tf_efficientnet_lite0"])
def test_gradcam_layer_hooks_get_gradients(name: str) -> None:
    """Hooks as pytorch-grad-cam sets them (forward hook, then a tensor hook on the output) see the gradient."""
    model = create_model(name, weights="none").eval()
    activations: list[torch.Tensor] = []
    gradients: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        activations.append(output.detach().clone())
        output.register_hook(gradients.append)

    handle = model.get_submodule(model.spec.gradcam_layer).register_forward_hook(keep)
    x = torch.randn(1, 1, 64, 64)
    model(x)[0, 1].backward()
    handle.remove()
    assert gradients[0].shape == activations[0].shape
    assert gradients[0].abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(activations[0], model.forward_features(x))


def test_heads_are_the_three_documented() -> None:
    assert set(HEADS) == {"linear", "plan", "attention"}
