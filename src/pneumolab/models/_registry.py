"""The model registry: names to `ModelSpec`s, filled by `@register_model` (timm style)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from pneumolab.errors import did_you_mean
from pneumolab.models._spec import ModelSpec

__all__ = ["list_models", "model_spec", "register_model"]

_SPECS: dict[str, ModelSpec] = {}

SpecBuilder = Callable[[], ModelSpec]


def register_model(name: str) -> Callable[[SpecBuilder], SpecBuilder]:
    """Register a model under `name`; decorates a function that returns the model's `ModelSpec`.

    The spec's `family` selects how the network is built, loaded and wrapped (see `create_model`), so a new
    variant of a known family needs only its spec::

        @register_model("resnet34")
        def resnet34() -> ModelSpec:
            return _resnet("resnet34", feature_dim=512, weights="ResNet34_Weights.IMAGENET1K_V1")

    Args:
        name: Registry name; must equal the spec's `name`.

    Returns:
        The decorator; it returns the function unchanged.
    """

    def decorate(builder: SpecBuilder) -> SpecBuilder:
        spec = builder()
        if spec.name != name:
            raise ValueError(f"register_model({name!r}) decorates a builder of {spec.name!r}")
        if name in _SPECS:
            raise ValueError(f"model {name!r} is registered twice")
        _SPECS[name] = spec
        return builder

    return decorate


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style `pattern` (``"efficientnet_*"``), sorted."""
    return sorted(fnmatch.filter(_SPECS, pattern))


def model_spec(name: str) -> ModelSpec:
    """The `ModelSpec` of a registered model.

    Raises:
        UnknownNameError: `name` is not registered (the message suggests close names).
    """
    try:
        return _SPECS[name]
    except KeyError:
        raise did_you_mean("model", name, _SPECS) from None
