"""`create_model`: registry name + weight source + head -> `Classifier`."""

from __future__ import annotations

import math
import os

from torch import nn

from pneumolab.errors import SettingError, did_you_mean
from pneumolab.models._builders import family_ops
from pneumolab.models._classifier import Classifier
from pneumolab.models._heads import HEADS
from pneumolab.models._registry import model_spec
from pneumolab.models._weights import apply_state_dict, read_weights_file

__all__ = ["create_model"]


def create_model(
    name: str,
    *,
    weights: str | os.PathLike[str] = "imagenet",
    head: str = "linear",
    num_classes: int = 2,
    in_chans: int = 1,
    drop_rate: float = 0.0,
) -> Classifier:
    """Build a registered model as a `Classifier`.

    Args:
        name: Registry name (see `list_models`).
        weights: ``"imagenet"`` (pretrained backbone, new head), ``"none"`` (random init) or the path of a
            ``.safetensors``/``.pt``/``.pth`` file holding a whole `Classifier` state_dict (built with the same
            `head`, `num_classes` and `in_chans`).
        head: Head name: ``"linear"``, ``"plan"`` or ``"attention"`` (see `HEADS`).
        num_classes: Number of outputs.
        in_chans: Input channels. With 1 (gray X-rays) the first convolution's pretrained RGB kernels are summed
            into one channel, which equals feeding the gray image as three identical channels, at a third of
            the first layer's cost.
        drop_rate: Dropout before the head's last linear layer (the ``"plan"`` head has its own rates).

    Returns:
        The model, in training mode, on the CPU, with every parameter trainable (see `apply_freeze`).

    Raises:
        UnknownNameError: Unknown model or head name.
        SettingError: `num_classes`, `in_chans` or `drop_rate` out of range.
        WeightsUnavailableError: ImageNet weights unavailable offline, or the weights file does not exist.
        WeightsFileError: The weights file cannot be read or does not fit the model.
    """
    spec = model_spec(name)
    # Check cheap settings before any weights are read.
    if head not in HEADS:
        raise did_you_mean("head", head, HEADS)
    if num_classes < 1:
        raise SettingError(f"num_classes must be at least 1, got {num_classes}")
    if in_chans < 1:
        raise SettingError(f"in_chans must be at least 1, got {in_chans}")
    if not 0.0 <= drop_rate < 1.0:
        raise SettingError(f"drop_rate must be in [0, 1), got {drop_rate}")

    kind = weights if weights in ("imagenet", "none") else "file"
    pretrained = kind == "imagenet"
    state = read_weights_file(weights) if kind == "file" else None  # a bad path fails before any building
    family = family_ops(spec)
    network = family.build(spec)
    if pretrained:
        family.load_imagenet(network, spec)
        source = f"imagenet:{spec.imagenet_source}"
    else:
        source = "random"
    model = Classifier(
        spec,
        family.backbone(network),
        num_classes=num_classes,
        head=head,
        drop_rate=drop_rate,
        in_chans=in_chans,
        weights_source=source,
    )
    _adapt_first_conv(model.get_submodule(spec.first_conv), in_chans, pretrained=pretrained)
    if state is not None:
        apply_state_dict(model, state, weights)
        model.weights_source = f"file:{os.fspath(weights)}"
    return model


def _adapt_first_conv(conv: nn.Module, in_chans: int, *, pretrained: bool) -> None:
    """Give the first convolution `in_chans` input channels, in place (the module keeps its class and padding).

    Pretrained RGB kernels are summed (1 channel) or repeated and rescaled (timm's `adapt_input_conv`); random
    kernels are sliced or repeated instead, which keeps the architecture's own initialisation scale.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"first_conv is a {type(conv).__name__}, not a Conv2d")
    if conv.in_channels == in_chans:
        return
    weight = conv.weight.detach()
    if pretrained:
        from timm.models import adapt_input_conv

        adapted = adapt_input_conv(in_chans, weight)
    else:
        repeats = math.ceil(in_chans / weight.shape[1])
        adapted = weight.repeat(1, repeats, 1, 1)[:, :in_chans].clone()
    conv.weight = nn.Parameter(adapted.contiguous(), requires_grad=conv.weight.requires_grad)
    conv.in_channels = in_chans  # forward reads only the weight; this keeps repr and reset_parameters right
