"""Test metrics without the test films that overlap the run's training and validation films.

Two kinds of overlap, both read from the run's ``split.csv`` (no image is read again):

* shared patients: a test film whose patient id (parsed from its name when the split was written) also names a
  train/val film. The release numbers patients across its folders; whether the same id is the same child is not
  said, so the metrics are shown with and without them.
* exact duplicates: a test film whose SHA-256 equals a train/val film's (``split.csv``'s ``sha256``; a split file
  from before it recorded them has no duplicate check, said in ``duplicates_facts``).

`evaluate_run` writes the result of the variant the model uses to the run's ``overlap_metrics``
(``metrics/overlap.json``, `pneumolab.runs.RunDir`); the report reads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pneumolab.errors import PneumolabError
from pneumolab.evaluate.metrics import evaluate_predictions

__all__ = ["overlap_masks", "overlap_rows"]


def overlap_masks(test_paths: list[str], split: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """``(shared, duplicates, facts)`` over `test_paths` from a ``split.csv`` table.

    `shared` marks test films whose patient id names a train/val film (ids made one per file, ``file:...``, never
    match); `duplicates` marks those byte-identical to a train/val film, or is None when the table records no
    SHA-256 (``facts["note"]`` says why).
    """
    by_path = split.drop_duplicates("path").set_index("path")
    train = by_path[by_path["split"] != "test"]
    missing = [p for p in test_paths if p not in by_path.index]
    if missing:
        return np.zeros(len(test_paths), bool), None, {"note": f"{len(missing):,} test films not in split.csv"}
    patients = by_path.loc[test_paths, "patient_id"].astype(str)
    shared = (patients.isin(set(train["patient_id"].astype(str))) & ~patients.str.startswith("file:")).to_numpy()
    # the report's words for where the hashes came from: recorded in split.csv (no dataset root read)
    facts: dict[str, Any] = {
        "root": None,
        "n_train_hashed": len(train),
        "n_test_hashed": len(test_paths),
        "shared_patients": int(patients[shared].nunique()),
    }
    if "sha256" not in by_path.columns or by_path["sha256"].isna().any():
        return shared, None, {**facts, "note": "split.csv records no SHA-256: exact duplicates not checked"}
    duplicates = by_path.loc[test_paths, "sha256"].isin(set(train["sha256"])).to_numpy()
    return shared, duplicates, facts


def overlap_rows(
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    shared: np.ndarray,
    duplicates: np.ndarray | None,
    *,
    n_resamples: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The binary metric object of all test films and of each subset without an overlap that occurs.

    Returns:
        ``[{"name", "n", "removed", "metrics" (None when undefined, e.g. one class left), "why"}]``, all films first.
    """
    subsets = [("all test images", np.ones(len(labels), dtype=bool))]
    if shared.any():
        subsets.append(("without shared patients", ~shared))
    if duplicates is not None and duplicates.any():
        subsets.append(("without exact duplicates", ~duplicates))
        if shared.any() and (duplicates & ~shared).any():
            subsets.append(("without shared patients or exact duplicates", ~shared & ~duplicates))
    rows = []
    for name, kept in subsets:
        row: dict[str, Any] = {"name": name, "n": int(kept.sum()), "removed": int((~kept).sum()), "why": None}
        try:
            row["metrics"] = evaluate_predictions(
                labels[kept], probabilities[kept], threshold, n_resamples=n_resamples, seed=seed
            )
        except PneumolabError as error:
            row["metrics"], row["why"] = None, str(error)
        rows.append(row)
    return rows
