"""The one description of how a model sees a film: cache side, crop, input side, normalisation.

A `Preprocessing` is built once by the trainer, then from a checkpoint or a card, and read by training's validation,
every inference backend and the export check, so the four numbers are never copied field by field. Its transform,
`eval_transform`, is `BatchAugment`'s path with every random op off (the same `pneumolab.data.geometry` steps), so
training and evaluation see the same geometry and intensities.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pneumolab.data.geometry import affine_grid, check_output_settings, normalise, presize, resample, to_float
from pneumolab.errors import SettingError

__all__ = ["DEFAULT_CACHE_SIZE", "Preprocessing", "eval_transform"]

DEFAULT_CACHE_SIZE = 256  # checkpoints written before the cache size was recorded used this side


def eval_transform(
    images_u8: Tensor, *, image_size: int, crop_fraction: float, normalize: tuple[float, float]
) -> Tensor:
    """The deterministic evaluation preprocessing: center crop, resize, normalise.

    The one preprocessing that evaluate, predict and serve use. It is `BatchAugment`'s path with every random op
    off, so training and evaluation see the same geometry and intensities.

    Args:
        images_u8: uint8 ``N x 1 x S x S`` (or ``N x S x S``) on any device.
        image_size: output side ``H``.
        crop_fraction: share of the side kept around the centre (1 = the whole image; the plan uses 224/256).
        normalize: the model's single-channel ``(mean, std)`` for [0, 1] intensities.

    Returns:
        float32 ``N x 1 x H x H`` on the images' device.
    """
    check_output_settings(image_size, normalize)
    if not 0.0 < crop_fraction <= 1.0:
        raise SettingError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
    x = presize(to_float(images_u8), image_size, crop_fraction)
    theta = torch.tensor([[crop_fraction, 0.0, 0.0], [0.0, crop_fraction, 0.0]], device=x.device)
    return normalise(resample(x, affine_grid(theta.expand(x.shape[0], 2, 3), image_size)), normalize)


@dataclass(frozen=True)
class Preprocessing:
    """File -> ``load_xray(size=cache_size)`` -> centre crop `crop_fraction` -> resize to `image_size` -> normalise."""

    image_size: int
    crop_fraction: float
    normalize: tuple[float, float]
    cache_size: int = DEFAULT_CACHE_SIZE

    def transform(self, images_u8: Tensor) -> Tensor:
        """uint8 ``N x 1 x S x S`` (S = `cache_size`) -> normalised float32 ``N x 1 x H x H`` on the same device."""
        return eval_transform(
            images_u8, image_size=self.image_size, crop_fraction=self.crop_fraction, normalize=self.normalize
        )

    def describe(self) -> dict[str, Any]:
        """The fields as a card or checkpoint records them."""
        return {
            "image_size": self.image_size,
            "crop_fraction": self.crop_fraction,
            "normalize": list(self.normalize),
            "cache_size": self.cache_size,
        }

    @classmethod
    def from_facts(cls, facts: Mapping[str, Any]) -> Preprocessing:
        """From a card or checkpoint's fields (KeyError when one of the first three is missing)."""
        return cls(
            image_size=int(facts["image_size"]),
            crop_fraction=float(facts["crop_fraction"]),
            normalize=(float(facts["normalize"][0]), float(facts["normalize"][1])),
            cache_size=int(facts.get("cache_size") or DEFAULT_CACHE_SIZE),
        )
