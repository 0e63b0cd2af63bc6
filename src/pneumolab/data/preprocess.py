"""The one description of how a model sees a film: cache side, crop, input side, normalisation.

A `Preprocessing` is built once from a card or a checkpoint and read by every inference backend (and the export
check), so the four numbers are never copied field by field. The transform itself is the evaluation path of the
augmentation module (`eval_transform`: `BatchAugment` with every random op off), so training's validation and
inference see the same geometry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from pneumolab.data.augment import eval_transform

__all__ = ["DEFAULT_CACHE_SIZE", "Preprocessing"]

DEFAULT_CACHE_SIZE = 256  # checkpoints written before the cache size was recorded used this side


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
