"""The patient-grouped validation split carved from train (EVALUATION.md, rule 1).

Patients are ordered by a SHA-256 of ``"{seed}/{patient_id}"`` and taken per label until the label's share is
reached. That makes the carve stratified by label, grouped by patient, seeded, and identical on every machine and
library version (a shuffled scikit-learn splitter would depend on NumPy's generator and the splitter's version).
The official ``val/`` split is folded into train before the carve; ``test/`` is never touched.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd

from pneumolab.errors import ArtefactError, DatasetLayoutError, SettingError
from pneumolab.fsutil import atomic_path

__all__ = ["SPLIT_COLUMNS", "SPLIT_EXTRA_COLUMNS", "carve_validation", "read_split", "write_split"]

SPLIT_COLUMNS = ["path", "split", "label", "patient_id"]
SPLIT_EXTRA_COLUMNS = ["kind", "sha256"]  # since the report stopped re-hashing the dataset; older files lack them


def _patient_order_key(seed: int, patient_id: str) -> str:
    return hashlib.sha256(f"{seed}/{patient_id}".encode()).hexdigest()


def carve_validation(manifest: pd.DataFrame, *, fraction: float = 0.1, seed: int = 0) -> pd.Series:
    """Assign every manifest row to ``train``, ``val`` or ``test``.

    Args:
        manifest: rows with ``split`` (the folder: train/val/test), ``label`` and ``patient_id``.
        fraction: share of the train images (per label) that goes to validation.
        seed: changes which patients are chosen.

    Returns:
        A Series aligned with `manifest`: the split each image is used in.
    """
    if not 0.0 < fraction < 1.0:
        raise SettingError(f"validation fraction must be in (0, 1), got {fraction}")
    assigned = manifest["split"].where(manifest["split"] == "test", "train")
    pool = manifest[assigned == "train"]
    if pool.empty:
        raise DatasetLayoutError("no training images to carve a validation split from")
    # A patient's label is its most frequent one (Kermany patients have a single label within train).
    patient_label = pool.groupby("patient_id")["label"].agg(lambda s: s.value_counts().idxmax())
    patient_size = pool.groupby("patient_id").size()
    val_patients: list[str] = []
    for label in sorted(patient_label.unique()):
        patients = sorted(patient_label.index[patient_label == label], key=lambda p: _patient_order_key(seed, p))
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
