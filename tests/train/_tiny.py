"""The tiny training settings the tests share: resnet18 from random weights at 64 px, small batches, two threads."""

from __future__ import annotations

from pathlib import Path

from pneumolab.config import TrainConfig, apply_overrides

TINY = {
    "model.name": "resnet18",
    "model.weights": "none",
    "image_size": 64,
    "data.cache_size": 72,
    "batch_size": 8,
    "threads": 2,
}


def tiny_config(root: Path, cache: Path, **overrides) -> TrainConfig:
    """`TINY` on the dataset at `root` (cache under `cache`, a quarter for validation), plus `overrides`."""
    settings = {**TINY, "data.root": str(root), "data.cache_dir": str(cache), "data.val_fraction": 0.25}
    return apply_overrides(TrainConfig(), {**settings, **overrides})
