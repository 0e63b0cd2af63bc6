"""Test-time augmentation views, applied to whole preprocessed batches (one forward pass per view and batch).

The research plan's four views are identity, horizontal flip, vertical flip and a 90-degree rotation. Only the
identity is a film a radiologist would ever see, so the ``cxr`` set uses chest-X-ray-plausible views instead:
small rotations and zooms. Views act on the normalised float batch; areas a rotation or zoom-out uncovers are
filled with black, as in training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pneumolab.errors import did_you_mean

__all__ = ["TTA_PRESETS", "TTA_VIEWS", "apply_view", "resolve_views"]


def _affine(angle: float = 0.0, scale: float = 1.0) -> Callable[[torch.Tensor, float], torch.Tensor]:
    def view(x: torch.Tensor, black: float) -> torch.Tensor:
        return TF.affine(
            x,
            angle=angle,
            translate=[0, 0],
            scale=scale,
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
            fill=black,
        )

    return view


TTA_VIEWS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "identity": lambda x, black: x,
    "hflip": lambda x, black: torch.flip(x, dims=[3]),
    "vflip": lambda x, black: torch.flip(x, dims=[2]),
    "rot90": lambda x, black: torch.rot90(x, k=1, dims=[2, 3]),
    "rot+5": _affine(angle=5.0),
    "rot-5": _affine(angle=-5.0),
    "zoom1.1": _affine(scale=1.1),
    "zoom0.9": _affine(scale=0.9),
}
"""View name -> function of (normalised batch N x C x H x W, the normalised value of black)."""

TTA_PRESETS: dict[str, tuple[str, ...]] = {
    "plan": ("identity", "hflip", "vflip", "rot90"),
    "cxr": ("identity", "rot+5", "rot-5", "zoom1.1", "zoom0.9"),
}


def resolve_views(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name (``plan``, ``cxr``), a comma-separated list, or a list of view names -> view names."""
    if isinstance(spec, str):
        if spec in TTA_PRESETS:
            return TTA_PRESETS[spec]
        spec = [part.strip() for part in spec.split(",") if part.strip()]
    for name in spec:
        if name not in TTA_VIEWS:
            raise did_you_mean("TTA view", name, [*TTA_VIEWS, *TTA_PRESETS])
    return tuple(spec)


def apply_view(name: str, batch: torch.Tensor, normalize: tuple[float, float]) -> torch.Tensor:
    """Apply one named view to a normalised batch."""
    mean, std = normalize
    return TTA_VIEWS[name](batch, (0.0 - mean) / std)
