"""Forward and backward passes of every registered model and head, on a tiny CPU batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pneumolab.errors import SettingError
from pneumolab.models import AttentionHead, LinearHead, PlanHead, create_model, list_models, model_spec

# The smallest member of each family, for the checks that need not run on every model.
ONE_PER_FAMILY = ["resnet18", "densenet121", "efficientnet_b0", "mobilenet_v2", "tf_efficientnet_lite0"]


def _train_step(model: nn.Module, in_chans: int = 1) -> torch.Tensor:
    x = torch.randn(2, in_chans, 64, 64)  # 64 px: the smallest size every model takes (a 2 x 2 last map)
    logits = model(x)
    loss = F.cross_entropy(logits, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    return logits


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name: str) -> None:
    model = create_model(name, weights="none")
    logits = _train_step(model)
    assert logits.shape == (2, 2)
    grad = model.get_submodule(model.spec.first_conv).weight.grad
    assert grad is not None
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
@pytest.mark.parametrize("head", ["plan", "attention"])
def test_heads_on_every_family(name: str, head: str) -> None:
    model = create_model(name, weights="none", head=head, num_classes=3, drop_rate=0.2)
    assert model.head_name == head
    x = torch.randn(2, 1, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert model.get_submodule(model.spec.first_conv).weight.grad is not None


@pytest.mark.parametrize(("head", "cls"), [("linear", LinearHead), ("plan", PlanHead), ("attention", AttentionHead)])
def test_head_structure(head: str, cls: type[nn.Module]) -> None:
    model = create_model("resnet18", weights="none", head=head, drop_rate=0.25)
    assert isinstance(model.head, cls)
    assert model.head.fc.out_features == 2
    if head == "plan":  # the research plan's head, exactly
        assert (model.head.drop1.p, model.head.drop2.p) == (0.4, 0.3)
        assert (model.head.fc1.in_features, model.head.fc1.out_features, model.head.fc.in_features) == (512, 512, 512)
    else:
        assert model.head.drop.p == 0.25


def test_attention_head_attends() -> None:
    """The CBAM head reweights channels and positions: zeroing one position changes the output through both."""
    head = AttentionHead(32, 2).eval()
    features = torch.rand(1, 32, 4, 4)
    with torch.no_grad():
        channel = head.channel_attention(features)
        spatial = head.spatial_attention(channel)
    assert channel.shape == spatial.shape == features.shape
    assert not torch.allclose(channel, features)
    assert not torch.allclose(spatial, channel)
    assert head.channel_attention.mlp[0].out_channels == 8  # 32 // 16 = 2, raised to the floor of 8


def test_reset_classifier_and_create_kwargs() -> None:
    model = create_model("mobilenet_v2", weights="none")
    model.reset_classifier(5, head="attention")
    assert isinstance(model.head, AttentionHead)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    model.reset_classifier(3)  # keeps the head kind
    assert isinstance(model.head, AttentionHead)
    assert model.create_kwargs == {
        "name": "mobilenet_v2",
        "head": "attention",
        "num_classes": 3,
        "in_chans": 1,
        "drop_rate": 0.0,
    }
    again = create_model(**model.create_kwargs, weights="none")
    assert again.state_dict().keys() == model.state_dict().keys()


def test_three_channels_keep_rgb() -> None:
    model = create_model("resnet18", weights="none", in_chans=3)
    assert model.backbone.conv1.weight.shape[1] == 3
    assert _train_step(model, in_chans=3).shape == (2, 2)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"in_chans": 0}, {"drop_rate": 1.0}, {"drop_rate": -0.1}])
def test_bad_settings(kwargs: dict) -> None:
    with pytest.raises(SettingError):
        create_model("resnet18", weights="none", **kwargs)


def test_gray_normalisation_is_the_mean_of_rgb() -> None:
    assert model_spec("resnet50").gray_mean == pytest.approx(0.449)
    assert model_spec("resnet50").gray_std == pytest.approx(0.226)
    assert model_spec("tf_efficientnet_lite0").normalization(1) == ((0.5,), (0.5,))
