"""A site's films as the model sees them, and the model's validation reference to compare them with.

`score_films` runs a model once over uint8 films: calibrated P(PNEUMONIA) over its TTA views, the logit margin
before calibration (what a recalibration refits), the input gate's score and its pooled features (channel mean + std
at the gate's layers, concatenated: the "network's features" the shift tests compare), and `film_statistics`: how
each film is framed and exposed, read from its pixels (what the stress evaluation perturbs: framing, exposure,
contrast), so that a check can say what about the films differs, not only that they do.

The reference is the same scores of the films the model's operating point was fit on. It is found, in order:

1. ``reference.npz`` in the artefact folder: `site calibrate` writes one for every artefact it makes (the local
   films the new operating point was fit on), so a calibrated model carries its own reference to any machine.
2. a cached one (user cache folder, keyed by the weights' SHA-256, backend and precision), computed once by
3. ``reference_data``: the dataset the model was trained on; its validation split is carved again from the card's
   split settings (the carve is patient-grouped and reproduces anywhere) and scored.

Computed rather than shipped for the bundled models: their files stay byte for byte what their cards describe, and
a reference must come from the backend and precision that will score the local films (bf16 and fp32 features differ
enough to move the gate by several percent; `pneumolab.gate`), which only the machine running the check knows.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from pneumolab.data.cache import default_cache_root, prepare_cache
from pneumolab.data.splits import carve_validation
from pneumolab.data.tasks import task_for_classes, task_labels
from pneumolab.errors import ArtefactError, DatasetLayoutError, SettingError
from pneumolab.evaluate.gating import collect_gate_features
from pneumolab.fsutil import atomic_path
from pneumolab.inference.files import collect_image_paths
from pneumolab.inference.steps import InferenceModel
from pneumolab.progress import progress_bar

__all__ = [
    "REFERENCE_FILE",
    "STATISTICS",
    "FilmScores",
    "film_statistics",
    "labelled_films",
    "load_reference",
    "read_films",
    "save_reference",
    "score_films",
]

REFERENCE_FILE = "reference.npz"
# film_statistics' columns, and what each says (the names the check's report and page use)
STATISTICS = {
    "exposure": "mean intensity of the central half of the film (0 black, 1 white)",
    "contrast": "standard deviation of the central half's intensity",
    "edge_to_centre": "mean intensity of the outer eighth all round over the centre's: higher when the frame is "
    "tighter (body at the edges), lower with a looser frame (air, collimation)",
    "dark_border": "share of the outer eighth darker than 4 % (a black, collimated border)",
}
_EDGE = 8  # the ring is the outer 1/8 of the side all round
_DARK = 0.04 * 255


@dataclass(frozen=True)
class FilmScores:
    """One row per film: what the model makes of it (and, for labelled films, the truth)."""

    probabilities: np.ndarray  # calibrated P(PNEUMONIA), TTA views averaged
    margins: np.ndarray  # logit(PNEUMONIA) - logit(NORMAL) before the temperature, views averaged
    gate_scores: np.ndarray  # the content gate's score (NaN without a gate)
    refused: np.ndarray  # bool: the gate refuses the film
    features: np.ndarray  # N x D pooled gate features (N x 0 without a gate)
    labels: np.ndarray | None = None  # 0 NORMAL / 1 PNEUMONIA
    patients: np.ndarray | None = None
    statistics: np.ndarray | None = None  # N x len(STATISTICS) (None in references written before 0.2.0)

    def __len__(self) -> int:
        return len(self.probabilities)

    def subset(self, rows: np.ndarray) -> FilmScores:
        """The same scores for `rows` only."""
        return FilmScores(
            **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows] for f in fields(self)}
        )


def check_binary(model: InferenceModel) -> None:
    """The site commands are written for one threshold on P(PNEUMONIA); other models are refused in one line."""
    if len(model.classes) != 2:
        raise SettingError(
            f"{model.source}: a {len(model.classes)}-class model; site check and calibrate "
            "need a binary (NORMAL / PNEUMONIA) model"
        )


def film_statistics(images: np.ndarray) -> np.ndarray:
    """`STATISTICS` of uint8 N x S x S films, one row per film (module doc); a chunk of films at a time, so that a
    site's thousands of films are never all copied to float at once."""
    rows = [_statistics(images[start : start + 256]) for start in range(0, len(images), 256)]
    return np.concatenate(rows) if rows else np.empty((0, len(STATISTICS)), np.float32)


def _statistics(chunk: np.ndarray) -> np.ndarray:
    films = np.asarray(chunk, np.float32).reshape(len(chunk), *np.shape(chunk)[-2:])
    side = films.shape[-1]
    ring = max(1, side // _EDGE)
    centre = films[:, side // 4 : side - side // 4, side // 4 : side - side // 4].reshape(len(films), -1)
    edges = np.ones((side, side), bool)
    edges[ring:-ring, ring:-ring] = False
    outer = films[:, edges]
    centre_mean = centre.mean(axis=1)
    return np.stack(
        [
            centre_mean / 255,
            centre.std(axis=1) / 255,
            outer.mean(axis=1) / np.maximum(centre_mean, 1.0),
            (outer < _DARK).mean(axis=1),
        ],
        axis=1,
    ).astype(np.float32)


def score_films(model: InferenceModel, images: np.ndarray, *, progress: bool = True, **truth: Any) -> FilmScores:
    """Score uint8 N x S x S films (at the model's cache size); `truth` may give ``labels`` and ``patients``."""
    check_binary(model)
    views = model.tta or ("identity",)
    parts = []
    with progress_bar(len(images), "score", enabled=progress) as advance:
        for start in range(0, len(images), 64):
            parts.append(model.logits(images[start : start + 64], views=views))
            advance(min(64, len(images) - start))
    logits = np.concatenate([p.numpy() for p in parts]) if parts else np.empty((0, 2), np.float32)
    import torch

    probabilities = model.probabilities(torch.from_numpy(logits))
    gate = model.gate
    if gate is not None and len(images):
        taken = collect_gate_features(model, images, gate.layers, label="features", progress=progress)
        scores = gate.score(taken)
        refused = gate.refuses(scores)
        features = np.concatenate(taken, axis=1).astype(np.float32)
    else:
        scores, refused = np.full(len(images), np.nan), np.zeros(len(images), bool)
        features = np.empty((len(images), 0), np.float32)
    return FilmScores(
        probabilities=np.asarray(probabilities, np.float64),
        margins=(logits[:, 1] - logits[:, 0]).astype(np.float64),
        gate_scores=np.asarray(scores, np.float64),
        refused=np.asarray(refused, bool),
        features=features,
        statistics=film_statistics(images),
        labels=None if truth.get("labels") is None else np.asarray(truth["labels"]),
        patients=None if truth.get("patients") is None else np.asarray(truth["patients"]).astype(str),
    )


def read_films(model: InferenceModel, inputs: list[str | os.PathLike[str]]) -> tuple[list[Path], np.ndarray]:
    """Unlabelled films: every image under the given files and folders, read at the model's cache size."""
    paths, problems = collect_image_paths(inputs)
    if problems:
        where, reason = problems[0]
        raise DatasetLayoutError(f"{where}: {reason}")
    return paths, model.load_images(paths)


def labelled_films(
    model: InferenceModel, data: str | os.PathLike[str], *, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Labelled local films (Kaggle folders or a labels CSV; every split pooled): images, labels in the model's
    classes, patient ids and paths, through the decode-once cache."""
    task = task_for_classes(model.classes)
    cache, _ = prepare_cache(data, size=model.cache_size, progress=progress, classes=task.folder_classes)
    labels = task_labels(cache.manifest, model.classes)
    return (
        np.array(cache.images),  # a writable copy: torch warns on a read-only memmap
        np.asarray(labels),
        cache.manifest["patient_id"].to_numpy().astype(str),
        cache.manifest["path"].tolist(),
    )


def save_reference(scores: FilmScores, dest: Path, **facts: Any) -> Path:
    """Write a reference (scores with labels, plus string `facts`) as a compressed npz, atomically."""
    arrays = {f.name: getattr(scores, f.name) for f in fields(scores) if getattr(scores, f.name) is not None}
    arrays.pop("patients", None)  # not needed by any test, and patient ids are not the artefact's to carry
    arrays["features"] = arrays["features"].astype(np.float16)  # half the size; the tests standardise anyway
    with atomic_path(dest) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays, **{f"fact_{k}": np.asarray(str(v)) for k, v in facts.items()})
    return dest


def _read_reference(path: Path) -> tuple[FilmScores, dict[str, str]]:
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {key: saved[key] for key in saved.files}
    except (OSError, ValueError) as error:
        raise ArtefactError(f"{path}: not a readable site reference ({error})") from None
    facts = {key[5:]: str(arrays.pop(key)) for key in list(arrays) if key.startswith("fact_")}
    arrays["features"] = arrays["features"].astype(np.float32)
    try:
        return FilmScores(**arrays), facts
    except TypeError as error:
        raise ArtefactError(f"{path}: not a site reference ({error})") from None


def _cache_file(model: InferenceModel) -> Path:
    source = Path(model.source)
    card = source / "card.json"
    identity = card.read_bytes() if card.is_file() else str(source.resolve()).encode()
    key = hashlib.sha256(identity + f"|{model.backend}|{model.compute_precision}|statistics".encode()).hexdigest()[:20]
    return default_cache_root().parent / "site-references" / f"{key}.npz"


def load_reference(
    model: InferenceModel, reference_data: str | os.PathLike[str] | None = None, *, progress: bool = True
) -> tuple[FilmScores, dict[str, str]]:
    """The model's reference scores and where they came from (module doc for the order)."""
    stored = Path(model.source) / REFERENCE_FILE
    if stored.is_file():
        return _read_reference(stored)
    cached = _cache_file(model)
    if cached.is_file():
        return _read_reference(cached)
    if reference_data is None:
        raise ArtefactError(
            f"{model.source}: no validation reference stored with this model; pass --reference-data DIR (the "
            "dataset it was trained on) once, and it is computed from the validation split and cached"
        )
    split = model.card().get("validation_split")
    if not split:
        raise ArtefactError(f"{model.source}: the card records no validation split, so no reference can be carved")
    task = task_for_classes(model.classes)
    cache, _ = prepare_cache(reference_data, size=model.cache_size, progress=progress, classes=task.folder_classes)
    manifest = cache.manifest.assign(label=task_labels(cache.manifest, model.classes))
    rows = np.flatnonzero(carve_validation(manifest, **split).to_numpy() == "val")
    if not len(rows):
        raise DatasetLayoutError(f"{reference_data}: no validation films for this card's split")
    scores = score_films(
        model,
        np.asarray(cache.images[rows]),
        progress=progress,
        labels=manifest["label"].to_numpy()[rows],
        patients=manifest["patient_id"].to_numpy()[rows],
    )
    facts = {
        "source": f"validation split of {reference_data} ({len(rows)} films)",
        "backend": model.backend,
        "precision": model.compute_precision,
    }
    save_reference(scores, cached, **facts)
    return scores, facts
