"""The patient-grouped validation split carved from train (EVALUATION.md, rule 1), and K-fold cross-validation.

Per label, patients are put in an order and validation takes them from its start until the label's share is
reached. That makes the carve stratified by label, grouped by patient, and identical on every machine and library
version (a shuffled scikit-learn splitter would depend on NumPy's generator and the splitter's version). The order
is the split design:

- ``random`` (default): a SHA-256 of ``"{seed}/{patient_id}"``, so the seed changes which patients are chosen;
- ``latest`` / ``earliest``: the patient's number in the release (``person1234``, ``IM-0115``, ``NORMAL2-IM-1427``
  numbered within its series), highest or lowest first: a time-ordered hold-out, since the release numbers
  patients in sequence.

K folds cut the same order into K contiguous blocks of about equal image count per label, so every patient is in
exactly one validation fold. The official ``val/`` split is folded into train first; ``test/`` is never touched.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pneumolab.errors import ArtefactError, DatasetLayoutError, SettingError
from pneumolab.fsutil import atomic_path

__all__ = [
    "SPLIT_COLUMNS",
    "SPLIT_DESIGNS",
    "SPLIT_EXTRA_COLUMNS",
    "assign_folds",
    "carve_validation",
    "check_design",
    "read_split",
    "write_split",
]

SPLIT_COLUMNS = ["path", "split", "label", "patient_id"]
SPLIT_EXTRA_COLUMNS = ["kind", "sha256"]  # since the report stopped re-hashing the dataset; older files lack them


SPLIT_DESIGNS = ("random", "latest", "earliest")
_NUMBERED = re.compile(r"^(?P<series>\D*)(?P<number>\d+)$")


def check_design(design: str) -> str:
    """`design` if it is one of `SPLIT_DESIGNS`, else a one-line `SettingError`."""
    if design not in SPLIT_DESIGNS:
        raise SettingError(f"unknown split design {design!r}; choose one of {', '.join(SPLIT_DESIGNS)}")
    return design


def _random_key(seed: int, patient_id: str) -> str:
    return hashlib.sha256(f"{seed}/{patient_id}".encode()).hexdigest()


def _release_number(patient_id: str) -> tuple[int, str, int]:
    """(0, series, number) for a numbered patient (``person12`` -> ("person", 12)); unnumbered ones sort last."""
    match = _NUMBERED.match(patient_id)
    return (0, match["series"], int(match["number"])) if match else (1, patient_id, 0)


def _ordered_patients(patients, design: str, seed: int) -> list[str]:
    if design == "random":
        return sorted(patients, key=lambda p: _random_key(seed, p))
    by_number = sorted(patients, key=_release_number)
    return by_number[::-1] if design == "latest" else by_number


def _patients_by_label(manifest: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series]:
    """The train pool's split column (train or test), each patient's label and each patient's film count."""
    assigned = manifest["split"].where(manifest["split"] == "test", "train")
    pool = manifest[assigned == "train"]
    if pool.empty:
        raise DatasetLayoutError("no training images to carve a validation split from")
    # A patient's label is its most frequent one (Kermany patients have a single label within train).
    patient_label = pool.groupby("patient_id")["label"].agg(lambda s: s.value_counts().idxmax())
    return assigned, patient_label, pool.groupby("patient_id").size()


def assign_folds(manifest: pd.DataFrame, *, folds: int, seed: int = 0, design: str = "random") -> pd.Series:
    """Each manifest row's validation fold (0 .. folds-1; -1 for test rows): per label, the design's patient order
    cut into `folds` contiguous blocks of about equal image count (a patient goes where its films' midpoint falls).
    """
    check_design(design)
    if folds < 2:
        raise SettingError(f"cross-validation needs at least 2 folds, got {folds}")
    assigned, patient_label, patient_size = _patients_by_label(manifest)
    fold_of: dict[str, int] = {}
    for label in sorted(patient_label.unique()):
        patients = _ordered_patients(patient_label.index[patient_label == label], design, seed)
        sizes = patient_size[patients].to_numpy(dtype=float)
        if len(patients) < folds:
            raise DatasetLayoutError(f"label {label}: {len(patients)} patients cannot fill {folds} folds")
        midpoints = np.cumsum(sizes) - sizes / 2
        fold_of.update(zip(patients, np.minimum((folds * midpoints / sizes.sum()).astype(int), folds - 1), strict=True))
    fold = manifest["patient_id"].map(fold_of).where(assigned == "train", -1)
    return fold.astype(int)


def carve_validation(
    manifest: pd.DataFrame,
    *,
    fraction: float = 0.1,
    seed: int = 0,
    design: str = "random",
    folds: int | None = None,
    fold: int | None = None,
) -> pd.Series:
    """Assign every manifest row to ``train``, ``val`` or ``test``.

    Args:
        manifest: rows with ``split`` (the folder: train/val/test), ``label`` and ``patient_id``.
        fraction: share of the train images (per label) that goes to validation (ignored with `folds`).
        seed: changes which patients the ``random`` design chooses.
        design: the patient order validation is taken from (module doc).
        folds, fold: validation is fold `fold` of `assign_folds` with `folds` folds, instead of a `fraction`.

    Returns:
        A Series aligned with `manifest`: the split each image is used in.
    """
    check_design(design)
    if folds is not None:
        if fold is None or not 0 <= fold < folds:
            raise SettingError(f"fold must be in 0 .. {folds - 1} with {folds} folds, got {fold}")
        in_fold = assign_folds(manifest, folds=folds, seed=seed, design=design).to_numpy()
        splits = manifest["split"].where(manifest["split"] == "test", "train")
        return splits.mask(in_fold == fold, "val")
    if not 0.0 < fraction < 1.0:
        raise SettingError(f"validation fraction must be in (0, 1), got {fraction}")
    assigned, patient_label, patient_size = _patients_by_label(manifest)
    val_patients: list[str] = []
    for label in sorted(patient_label.unique()):
        patients = _ordered_patients(patient_label.index[patient_label == label], design, seed)
        target = fraction * int(patient_size[patients].sum())
        taken = 0
        for patient in patients:
            if taken >= target:
                break
            # Stop where one more patient would move us further from the target than we are.
            if taken and abs(taken + patient_size[patient] - target) > abs(taken - target):
                break
            val_patients.append(patient)
            taken += int(patient_size[patient])
    is_val = (assigned == "train") & manifest["patient_id"].isin(val_patients)
    return assigned.mask(is_val, "val")


def write_split(manifest: pd.DataFrame, splits: pd.Series, dest: str | os.PathLike[str]) -> Path:
    """Write ``split.csv`` (path, split, label, patient_id, and the manifest's kind and sha256) atomically.

    The kind and SHA-256 travel with the split so that a report checks test/train overlap (byte-identical files)
    and breaks errors down by pneumonia kind from the run folder alone, without the dataset at hand.
    """
    extra = [c for c in SPLIT_EXTRA_COLUMNS if c in manifest.columns]
    table = manifest[["path", "label", "patient_id", *extra]].assign(split=splits.to_numpy())[[*SPLIT_COLUMNS, *extra]]
    with atomic_path(dest) as tmp:
        table.to_csv(tmp, index=False)
    return Path(dest)


def read_split(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a ``split.csv`` written by `write_split`."""
    table = pd.read_csv(
        path, dtype={"path": str, "split": str, "label": int, "patient_id": str, "kind": str, "sha256": str}
    )
    missing = set(SPLIT_COLUMNS) - set(table.columns)
    if missing:
        raise ArtefactError(f"{path}: not a split file, missing columns {sorted(missing)}")
    return table
