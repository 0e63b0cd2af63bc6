"""Fit a model's input gate (on its training split) and referral band (on validation), and measure both.

EVALUATION.md rule 8: the gate and the band are fit on train / validation like the threshold; on test they are only
measured: how many films were refused or referred, and the accuracy of the rest, beside the figures for all films.

Files a run gets (`write_gate_scores`): ``gate/scores.csv`` (`pneumolab.runs.RunDir.gate_scores`) with one row per
scored image: ``group`` (``val``, ``test``, ``far-ood``, ``near-<kind>`` made from test films), ``name``,
``gate_score``, ``refused``.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pneumolab.constants import CLASSES
from pneumolab.data.io import load_xray_with_meta
from pneumolab.data.ood import NEAR_KINDS, dicom_test_files, far_ood_pictures, near_ood
from pneumolab.errors import ImageReadError
from pneumolab.fsutil import atomic_path
from pneumolab.gate import FeatureGate, GateSet, check_metadata, default_gate_layers
from pneumolab.hardware import resolve_precision
from pneumolab.inference.steps import InferenceModel
from pneumolab.progress import progress_bar
from pneumolab.referral import ReferralBand
from pneumolab.runs import GATE_SCORE_COLUMNS

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_KEEP",
    "collect_gate_features",
    "fit_band",
    "fit_gate",
    "ood_corpus",
    "score_groups",
    "selective_summary",
    "write_gate_scores",
]

DEFAULT_KEEP = 0.995  # share of validation films the gate answers
DEFAULT_ALPHA = 0.02  # per-class share of films the band may leave answered wrongly (nominal)


def collect_gate_features(
    trained: InferenceModel, images: np.ndarray, layers: tuple[str, ...], *, label: str = "gate", progress: bool = True
) -> list[np.ndarray]:
    """The gate's features (one array per layer) of uint8 N x S x S images, in batches with a progress bar."""
    parts = []
    with progress_bar(len(images), label, enabled=progress) as advance:
        for start in range(0, len(images), 64):
            parts.append(trained.features(images[start : start + 64], layers))
            advance(min(64, len(images) - start))
    return [np.concatenate(layer) for layer in zip(*parts, strict=True)]


def fit_gate(
    trained: InferenceModel,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    *,
    keep: float = DEFAULT_KEEP,
    progress: bool = True,
) -> GateSet:
    """Fit the content gate: class statistics on the training films, standardisation and limit on validation.

    Once in the model's own precision and, when that is not fp32, once more in fp32 (what ONNX Runtime runs), so
    each backend scores with a gate fit on features like its own (`GateSet`).
    """
    network = getattr(trained, "model", None)
    if network is None:
        raise TypeError("fitting a gate needs the PyTorch model (TrainedModel)")
    layers = default_gate_layers(network)
    own = trained.precision
    gates = []
    try:
        for precision in dict.fromkeys([own.name, "fp32"]):
            trained.precision = resolve_precision(precision, trained.device)
            tag = f"gate ({precision})"
            train = collect_gate_features(trained, train_images, layers, label=f"{tag}: train", progress=progress)
            val = collect_gate_features(trained, val_images, layers, label=f"{tag}: val", progress=progress)
            gates.append(FeatureGate(keep=keep, layers=layers, precision=precision).fit(train, train_labels, val))
    finally:
        trained.precision = own
    return GateSet(gates)


def fit_band(labels: np.ndarray, probabilities: np.ndarray, threshold: float, *, alpha: float = DEFAULT_ALPHA):
    """Fit the referral band on validation labels and calibrated probabilities at the model's threshold."""
    return ReferralBand(alpha=alpha).fit(labels, probabilities, threshold)


def ood_corpus(cache_size: int, test_films: np.ndarray | None = None) -> dict[str, tuple[list[str], np.ndarray]]:
    """Out-of-distribution images as the model would see them: ``{group: (names, uint8 N x S x S)}``.

    ``far-ood``: pictures and synthetic images (`pneumolab.data.ood`) and pydicom's test files that the metadata
    check lets through (the others are refused before the content gate sees them: ``far-ood-metadata``, counted
    apart); ``near-<kind>``: made from `test_films` when given.
    """
    names, images, refused_by_metadata = _far_ood(cache_size)
    groups = {"far-ood": (list(names), images.copy())}  # the cached array stays read-only
    groups["far-ood-metadata"] = (list(refused_by_metadata), np.empty((0, cache_size, cache_size), np.uint8))
    if test_films is not None and len(test_films):
        for kind in NEAR_KINDS:
            groups[f"near-{kind}"] = ([f"test-{i}" for i in range(len(test_films))], near_ood(test_films, kind))
    return groups


@functools.cache
def _far_ood(cache_size: int) -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...]]:
    """The far out-of-distribution images at `cache_size` (read-only), and the DICOM files the metadata check
    refuses: the same for every evaluation of a process, so read once (the DICOM files take seconds)."""
    names, images = [], []
    for name, pixels in far_ood_pictures():
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")  # through the real read path, as an upload would come
        names.append(name)
        images.append(load_xray_with_meta(buffer.getvalue(), size=cache_size, name=name)[0])
    refused_by_metadata = []
    for path, modality in dicom_test_files():
        try:
            image, meta = load_xray_with_meta(path, size=cache_size)
        except ImageReadError:
            continue  # pydicom's deliberately broken files
        if check_metadata(meta) is not None:
            refused_by_metadata.append(f"dicom-{modality or 'none'}-{path.name}")
            continue
        names.append(f"dicom-{modality or 'none'}-{path.name}")
        images.append(image)
    stacked = np.stack(images)
    stacked.flags.writeable = False
    return tuple(names), stacked, tuple(refused_by_metadata)


def score_groups(
    trained: InferenceModel, groups: dict[str, tuple[list[str], np.ndarray]], *, progress: bool = True
) -> pd.DataFrame:
    """``group, name, gate_score, refused`` for each image of each group (metadata refusals score NaN)."""
    gate = trained.gate
    frames = []
    for group, (names, images) in groups.items():
        if len(images):
            features = collect_gate_features(trained, images, gate.layers, label=f"gate: {group}", progress=progress)
            scores = gate.score(features)
            refused = gate.refuses(scores)
        else:
            scores, refused = np.full(len(names), np.nan), np.ones(len(names), bool)
        values = (group, names, scores, refused)
        frames.append(pd.DataFrame(dict(zip(GATE_SCORE_COLUMNS, values, strict=True))))
    return pd.concat(frames, ignore_index=True)


def write_gate_scores(dest, table: pd.DataFrame) -> None:
    """Write ``gate/scores.csv`` atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")


def selective_summary(
    labels: np.ndarray,
    predictions: np.ndarray,
    *,
    classes: Sequence[str] = CLASSES,
    refused: np.ndarray | None = None,
    referred: np.ndarray | None = None,
) -> dict[str, Any]:
    """What the gate and band did to a labelled split: counts, accuracy of the answered films, per-class shares.

    `predictions` are the model's labels (binary: ``probability >= threshold``; K classes: the argmax). Per class:
    ``answered`` share and ``wrong_answered`` share (films of that class answered with another label, over all
    films of the class), which the band's nominal level bounds on validation.
    """
    labels = np.asarray(labels).astype(int)
    n = len(labels)
    refused = np.zeros(n, bool) if refused is None else np.asarray(refused, bool)
    referred = (np.zeros(n, bool) if referred is None else np.asarray(referred, bool)) & ~refused
    answered = ~refused & ~referred
    correct = np.asarray(predictions).astype(int) == labels
    per_class = {}
    for c, name in enumerate(classes):
        of_class = labels == c
        total = int(of_class.sum())
        per_class[name] = {
            "n": total,
            "answered": float(answered[of_class].mean()) if total else None,
            "wrong_answered": float((answered & ~correct)[of_class].mean()) if total else None,
        }
    return {
        "n": n,
        "refused": int(refused.sum()),
        "referred": int(referred.sum()),
        "answered": int(answered.sum()),
        "coverage": float(answered.mean()) if n else None,
        "accuracy_answered": float(correct[answered].mean()) if answered.any() else None,
        "accuracy_all": float(correct.mean()) if n else None,
        "per_class": per_class,
    }
