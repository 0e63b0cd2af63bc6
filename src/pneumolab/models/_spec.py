"""`ModelSpec`: the metadata of one registered architecture and its ImageNet weights."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FreezeGroup", "ModelSpec"]


@dataclass(frozen=True)
class FreezeGroup:
    """A named group of parameters that freezing policies switch on or off together (one stage of the network).

    Attributes:
        name: Short name reported by `apply_freeze`, e.g. ``"layer4"``.
        prefixes: Dotted module paths inside `Classifier` whose parameters belong to the group.
    """

    name: str
    prefixes: tuple[str, ...]

    def matches(self, param_name: str) -> bool:
        """Whether a parameter name (``model.named_parameters()``) lies under one of the group's prefixes."""
        return any(param_name.startswith(prefix + ".") for prefix in self.prefixes)


@dataclass(frozen=True)
class ModelSpec:
    """What a registered architecture needs beside its code: input size, normalisation, layers and weight source.

    Preprocessing, Grad-CAM and freezing read everything they need from here, so they work for any model.

    Attributes:
        name: Registry name, e.g. ``"resnet50"``.
        family: ``"resnet"``, ``"densenet"``, ``"efficientnet"``, ``"mobilenet"`` or ``"tf_efficientnet_lite"``.
        input_size: The architecture's native square input side in pixels (the size its ImageNet weights expect).
        mean: RGB normalisation mean of the ImageNet weights (inputs scaled to [0, 1] first).
        std: RGB normalisation standard deviation of the ImageNet weights.
        feature_dim: Channels of the last feature map, i.e. the head's input width.
        gradcam_layer: Dotted path inside `Classifier` of the module whose output is the last feature map.
        first_conv: Dotted path inside `Classifier` of the first convolution (the one adapted to ``in_chans``).
        freeze_groups: Parameter groups from the stem to the last stage; the head is the implicit last group.
        plan_groups: Names of the groups the ``"plan"`` freezing policy trains besides the head.
        imagenet_source: Human-readable origin of the ImageNet weights (package, weight enum, file name).
        imagenet_id: Machine-readable weight identifier: a torchvision weight enum
            (``"ResNet50_Weights.IMAGENET1K_V2"``) or ``"package:Class"`` of a weights package.
        has_offline_imagenet: Whether the ImageNet weights come from a pip package (usable without a model hub).
        gray_mean: Mean to use with one input channel: the mean of `mean` (the first conv sums the RGB kernels).
        gray_std: Standard deviation to use with one input channel: the mean of `std`.
    """

    name: str
    family: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    gradcam_layer: str
    first_conv: str
    freeze_groups: tuple[FreezeGroup, ...]
    plan_groups: tuple[str, ...]
    imagenet_source: str
    imagenet_id: str
    has_offline_imagenet: bool = False
    gray_mean: float = field(init=False)
    gray_std: float = field(init=False)

    def __post_init__(self) -> None:
        # Rounded so that cards and logs show 0.449, not 0.44900000000000007.
        object.__setattr__(self, "gray_mean", round(sum(self.mean) / 3, 6))
        object.__setattr__(self, "gray_std", round(sum(self.std) / 3, 6))
        unknown = set(self.plan_groups) - set(self.group_names)
        if unknown:  # a registration bug, not a user error
            raise ValueError(f"{self.name}: plan_groups {sorted(unknown)} are not among {self.group_names}")

    @property
    def group_names(self) -> tuple[str, ...]:
        """Names of the freeze groups, stem first, without the head."""
        return tuple(group.name for group in self.freeze_groups)

    def normalization(self, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) for inputs with `in_chans` channels: gray values for 1, RGB values for 3."""
        if in_chans == 1:
            return (self.gray_mean,), (self.gray_std,)
        if in_chans == 3:
            return self.mean, self.std
        raise ValueError(f"{self.name}: no normalisation for {in_chans} input channels (1 or 3)")
