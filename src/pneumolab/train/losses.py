"""Class weights, the weighted cross-entropy and the weighted-sampler option for the imbalanced classes.

Kermany's training split is about 1 NORMAL to 3 PNEUMONIA. Two remedies, usable alone or together:

* weight the loss (`class_weights` + `make_loss`): the research plan's scheme by default;
* or draw the classes equally often (`weighted_sampler_weights` for `torch.utils.data.WeightedRandomSampler`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pneumolab.errors import SettingError, did_you_mean

__all__ = ["SCHEMES", "class_weights", "make_loss", "weighted_sampler_weights"]

SCHEMES = ("plan", "balanced", "none", "custom")


def _counts(labels: np.ndarray | Tensor, num_classes: int | None) -> np.ndarray:
    """Examples per class; `num_classes` None means as many as the largest label needs."""
    array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise SettingError(f"labels must be a non-empty 1-D array of class indices, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(array == np.round(array)):
            raise SettingError(f"labels must be integer class indices, got dtype {array.dtype}")
        array = array.astype(np.int64)
    low, high = int(array.min()), int(array.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        raise SettingError(f"labels must lie in [0, {num_classes}), got values from {low} to {high}")
    return np.bincount(array, minlength=num_classes or 0)


def class_weights(
    labels: np.ndarray | Tensor,
    scheme: str = "plan",
    *,
    num_classes: int = 2,
    custom: Sequence[float] | None = None,
    minority_boost: float = 1.3,
) -> Tensor:
    """Per-class weights for `make_loss`.

    Schemes (``N`` examples, ``K`` classes, ``n_k`` examples of class ``k``):

    * ``"plan"``: the research plan's formula: ``N / (K n_k)``, the rarest class's weight times `minority_boost`,
      then normalised to sum 1. For Kermany's train split (1,341 NORMAL, 3,875 PNEUMONIA): ``[0.7898, 0.2102]``.
    * ``"balanced"``: ``N / (K n_k)``, scikit-learn's ``class_weight="balanced"`` (not normalised).
    * ``"none"``: all ones (plain cross-entropy).
    * ``"custom"``: the `custom` values, one positive number per class.

    Args:
        labels: class index of every training example (NumPy or torch, integer).
        scheme: one of `SCHEMES`.
        num_classes: ``K``.
        custom: the weights for ``"custom"`` (and only for it).
        minority_boost: the ``"plan"`` factor for the rarest class (ties: the lowest index, as ``np.argmin``).

    Returns:
        float32 tensor of ``K`` weights, on the labels' device when they are a tensor, else on CPU.

    Raises:
        UnknownNameError: unknown `scheme`.
        SettingError: a class without examples (``"plan"``, ``"balanced"``), bad labels or bad `custom` values.
    """
    if scheme not in SCHEMES:
        raise did_you_mean("class-weight scheme", scheme, SCHEMES)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise SettingError(f"num_classes must be a positive integer, got {num_classes!r}")
    if custom is not None and scheme != "custom":
        raise SettingError(f"custom class weights are given but the scheme is {scheme!r}; use scheme 'custom'")
    device = labels.device if isinstance(labels, Tensor) else torch.device("cpu")
    counts = _counts(labels, num_classes)

    if scheme == "none":
        weights = np.ones(num_classes)
    elif scheme == "custom":
        if custom is None:
            raise SettingError("class-weight scheme 'custom' needs the weights (one per class)")
        weights = np.asarray(custom, dtype=np.float64)
        if weights.shape != (num_classes,) or not np.all(np.isfinite(weights) & (weights > 0)):
            raise SettingError(f"custom class weights must be {num_classes} positive numbers, got {list(custom)}")
    else:
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            raise SettingError(
                f"class {int(empty[0])} has no training examples, so class weights {scheme!r} are undefined "
                f"(counts per class: {counts.tolist()})"
            )
        weights = counts.sum() / (num_classes * counts.astype(np.float64))
        if scheme == "plan":
            if not minority_boost > 0:
                raise SettingError(f"minority_boost must be > 0, got {minority_boost!r}")
            weights[np.argmin(counts)] *= minority_boost
            weights /= weights.sum()
    return torch.as_tensor(weights, dtype=torch.float32, device=device)


def make_loss(weights: Tensor | None, *, label_smoothing: float = 0.0) -> nn.Module:
    """The training loss: cross-entropy with optional class `weights` and label smoothing.

    The weights are a buffer of the module, so ``loss.to(device)`` moves them with it.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise SettingError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.ndim != 1 or not bool(torch.all(torch.isfinite(weights) & (weights > 0))):
            raise SettingError(f"class weights must be a 1-D tensor of positive numbers, got {weights.tolist()}")
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)


def weighted_sampler_weights(labels: np.ndarray | Tensor) -> Tensor:
    """Per-example weights ``1 / count(label)`` for `torch.utils.data.WeightedRandomSampler` (the sampler option).

    Every class then has the same total weight, so a sampler drawing with replacement shows the classes equally
    often on average.

    Returns:
        float64 tensor with one weight per example, on CPU (the sampler draws there).
    """
    array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    counts = _counts(array, None)
    return torch.as_tensor(1.0 / counts[array.astype(np.int64)], dtype=torch.float64)
