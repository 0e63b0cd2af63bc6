"""Predict image files: expand inputs into files, read each once with its metadata, decide them in batches.

`pneumolab predict` and the benchmarks use these with either backend (any `InferenceModel`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumolab.data.io import IMAGE_SUFFIXES, load_xray_with_meta
from pneumolab.errors import ImageReadError
from pneumolab.inference.steps import InferenceModel

__all__ = ["collect_image_paths", "predict_files"]


def collect_image_paths(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (recursively) and glob patterns into image paths.

    Returns:
        ``(paths, problems)``: image files in a stable order, and ``(input, reason)`` for inputs that matched
        nothing.
    """
    import glob

    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    for item in map(str, inputs):
        candidates = (
            [Path(p) for p in sorted(glob.glob(item, recursive=True))] if glob.has_magic(item) else [Path(item)]
        )
        if not candidates:
            problems.append((item, "no file matches this pattern"))
        for candidate in candidates:
            if candidate.is_dir():
                found = sorted(p for p in candidate.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
                if not found:
                    problems.append((str(candidate), "folder holds no JPEG, PNG or DICOM file"))
                paths.extend(found)
            elif candidate.is_file():
                paths.append(candidate)
            else:
                problems.append((str(candidate), "no such file or folder"))
    return paths, problems


def predict_files(
    trained: InferenceModel, paths: Sequence[Path], *, batch_size: int = 32
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Gate and predict image files in batches (either backend); a file that cannot be read is reported, the rest
    decided.

    Returns:
        ``(rows, failures)``: per readable file ``{file, status, label, probability, threshold, reason, gate_score,
        notes}`` (`Decision.fields`; ``notes`` are odd but readable things about the file, "" when none), and
        ``(file, reason)`` for unreadable ones.
    """
    rows: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    for start in range(0, len(paths), batch_size):
        images, metas, kept = [], [], []
        for path in paths[start : start + batch_size]:
            try:
                image, meta = load_xray_with_meta(path, size=trained.cache_size)
            except ImageReadError as error:
                failures.append((str(path), error.reason))
                continue
            images.append(image)
            metas.append(meta)
            kept.append(path)
        if not images:
            continue
        decisions = trained.assess(np.stack(images), metas)
        for path, meta, decision in zip(kept, metas, decisions, strict=True):
            fields = decision.fields()
            rows.append(
                {
                    "file": str(path),
                    "status": fields.pop("status"),
                    "label": fields.pop("label"),
                    "probability": fields.pop("probability"),
                    "threshold": trained.threshold,
                    **fields,
                    "notes": "; ".join(meta.notes),
                }
            )
    return rows, failures
