"""Overlap of test films with train/val films, read from split.csv, and the metrics without them."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pneumolab.evaluate.metrics import evaluate_predictions
from pneumolab.evaluate.overlap import overlap_masks, overlap_rows


def _split() -> pd.DataFrame:
    rows = [
        ("train/NORMAL/IM-0001-0001.jpeg", "train", 0, "IM-0001", "a"),
        ("train/PNEUMONIA/person1_bacteria_1.jpeg", "train", 1, "person1", "b"),
        ("val/PNEUMONIA/person2_virus_2.jpeg", "val", 1, "person2", "c"),
        ("test/PNEUMONIA/person1_virus_9.jpeg", "test", 1, "person1", "d"),  # shares person1
        ("test/NORMAL/IM-0009-0001.jpeg", "test", 0, "IM-0009", "a"),  # the bytes of a train film
        ("test/NORMAL/odd.jpeg", "test", 0, "file:odd", "e"),
        ("test/PNEUMONIA/person7_bacteria_3.jpeg", "test", 1, "person7", "f"),
    ]
    return pd.DataFrame(rows, columns=["path", "split", "label", "patient_id", "sha256"])


def test_masks_come_from_the_split_file():
    split = _split()
    test = split.loc[split["split"] == "test", "path"].tolist()
    shared, duplicates, facts = overlap_masks(test, split)
    assert shared.tolist() == [True, False, False, False] and facts["shared_patients"] == 1
    assert duplicates.tolist() == [False, True, False, False]
    _, none, facts = overlap_masks(test, split.drop(columns="sha256"))
    assert none is None and "no SHA-256" in facts["note"]


def test_rows_are_the_metrics_of_each_subset():
    split = _split()
    test = split[split["split"] == "test"]
    labels, probabilities = test["label"].to_numpy(), np.array([0.9, 0.2, 0.4, 0.7])
    shared, duplicates, _ = overlap_masks(test["path"].tolist(), split)
    rows = overlap_rows(labels, probabilities, 0.5, shared, duplicates, n_resamples=50)
    names = [row["name"] for row in rows]
    assert names == ["all test images", "without shared patients", "without exact duplicates",
                     "without shared patients or exact duplicates"]  # fmt: skip
    kept = ~shared & ~duplicates
    expected = evaluate_predictions(labels[kept], probabilities[kept], 0.5, n_resamples=50)
    assert rows[-1]["n"] == 2 and rows[-1]["removed"] == 2
    assert rows[-1]["metrics"]["accuracy"] == expected["accuracy"]
    one_class = overlap_rows(labels[:2], probabilities[:2], 0.5, np.array([False, True]), None, n_resamples=50)
    assert one_class[1]["metrics"] is None and one_class[1]["why"]
