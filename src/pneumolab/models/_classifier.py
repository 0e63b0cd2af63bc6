"""`Classifier`: one interface (backbone, head, Grad-CAM layer, weight provenance) for every architecture."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pneumolab.models._heads import build_head
from pneumolab.models._spec import ModelSpec

__all__ = ["Classifier"]


class Classifier(nn.Module):
    """A backbone that yields the last feature map and a head that turns it into logits.

    Built by `create_model`; every architecture exposes the same attributes, so training, Grad-CAM, export and
    serving code never needs to know which one it holds.

    Attributes:
        spec: The architecture's `ModelSpec` (input size, normalisation, Grad-CAM layer, freeze groups).
        backbone: Module mapping N x in_chans x H x W (normalised) to the feature map N x feature_dim x h x w.
        head: Module mapping the feature map to N x num_classes logits.
        head_name: Name of the head in `HEADS`.
        num_classes: Number of outputs.
        in_chans: Number of input channels (1: gray, the first conv holds the summed RGB kernels).
        drop_rate: Dropout rate of the head.
        weights_source: Where the weights came from: ``"imagenet:<source>"``, ``"random"`` or ``"file:<path>"``.
    """

    def __init__(
        self,
        spec: ModelSpec,
        backbone: nn.Module,
        *,
        num_classes: int = 2,
        head: str = "linear",
        drop_rate: float = 0.0,
        in_chans: int = 1,
        weights_source: str = "random",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.in_chans = in_chans
        self.weights_source = weights_source
        self.head_name = head
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.head = build_head(head, spec.feature_dim, num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, N x feature_dim x h x w."""
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits, N x num_classes, from a feature map."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, N x num_classes, from normalised images N x in_chans x H x W."""
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, head: str | None = None, *, drop_rate: float | None = None) -> None:
        """Replace the head with a freshly initialised one (same kind unless `head` names another).

        Args:
            num_classes: Number of outputs of the new head.
            head: Name in `HEADS`; the current head's name if None.
            drop_rate: Dropout rate; the current one if None.
        """
        head = self.head_name if head is None else head
        drop_rate = self.drop_rate if drop_rate is None else drop_rate
        self.head = build_head(head, self.spec.feature_dim, num_classes, drop_rate)
        self.head_name, self.num_classes, self.drop_rate = head, num_classes, drop_rate

    @property
    def create_kwargs(self) -> dict[str, Any]:
        """Arguments that make `create_model(**kwargs, weights=...)` rebuild this architecture (for model cards)."""
        return {
            "name": self.spec.name,
            "head": self.head_name,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "drop_rate": self.drop_rate,
        }

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, in_chans={self.in_chans}, weights_source={self.weights_source!r}"
