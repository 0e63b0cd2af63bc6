"""The training compute of a config, for a sweep's compute budget: image passes x the model's forward cost.

Compute = epochs x images per epoch x forward FLOPs of one image at the config's image size, counted by torch's
FLOP counter (`torch.utils.flop_counter.FlopCounterMode`) on the model built without weights. A sweep compares a
trial's compute with its base config's, so only the ratio matters: the backward pass scales with the forward one
for fully fine-tuned models (the freezing policy and the ``features`` strategy are not counted; a budget over
spaces that vary them compares image passes only).
"""

from __future__ import annotations

from functools import cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from pneumolab.config import TrainConfig
from pneumolab.models import create_model

__all__ = ["forward_flops", "relative_compute", "training_compute"]


@cache
def forward_flops(name: str, head: str, image_size: int) -> int:
    """FLOPs of one forward pass of one gray image through model `name` with `head` at `image_size`."""
    model = create_model(name, weights="none", head=head).eval()
    image = torch.zeros(1, model.in_chans, image_size, image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    return counter.get_total_flops()


def training_compute(config: TrainConfig) -> float:
    """Training FLOPs per training image: epochs x forward FLOPs (the image count is the study's, a constant;
    ``max_batches``, a smoke-test cap, is not counted)."""
    return float(config.epochs * forward_flops(config.model.name, config.model.head, config.image_size))


def relative_compute(config: TrainConfig, base: TrainConfig) -> float:
    """`config`'s training compute as a share of `base`'s (0.5: half)."""
    return training_compute(config) / training_compute(base)
