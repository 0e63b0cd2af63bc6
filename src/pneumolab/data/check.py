"""`pneumolab data check`: counts, patients, unreadable files, duplicates and leakage across splits.

Every image is decoded once (in parallel) to prove it is readable and to take a perceptual hash (DCT hash of
``imagehash``) for near duplicates; exact duplicates are files with the same SHA-256.
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from itertools import combinations
from multiprocessing import get_context
from typing import Any

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from pneumolab.data.dataset import (
    SPLITS,
    build_manifest,
    find_dataset_root,
    folder_classes,
    image_root,
    scan_dataset,
)
from pneumolab.data.io import load_xray
from pneumolab.data.tasks import get_task
from pneumolab.errors import ImageReadError
from pneumolab.progress import progress_bar

__all__ = ["NEAR_DUPLICATE_BITS", "check_dataset", "near_duplicate_pairs"]

NEAR_DUPLICATE_BITS = 12
"""Hamming distance (of 256-bit perceptual hashes) at or under which two images count as near duplicates.

On the shared dataset, byte-identical files differ by 0-3 bits and the closest distinct films by 40 or more, so
12 catches re-encoded, re-sized or re-windowed copies with a wide margin."""
_HASH_SIZE = 16  # 16 x 16 = 256 bits: chest X-rays look alike, so 64-bit hashes collide too often
_HASH_INPUT = 128  # decode at this size; the hash itself looks at 64 x 64
_CHUNK = 32  # files per worker task


def _hash_image(path: str) -> tuple[str | None, str | None]:
    """Worker: ``(hex perceptual hash, None)`` or ``(None, reason)`` for an unreadable file."""
    try:
        pixels = load_xray(path, size=_HASH_INPUT)
    except ImageReadError as error:
        return None, error.reason
    return str(imagehash.phash(Image.fromarray(pixels), hash_size=_HASH_SIZE)), None


def _hash_all(paths: list[str], workers: int, progress: bool) -> list[tuple[str | None, str | None]]:
    with progress_bar(len(paths), "checking", enabled=progress) as advance:
        if workers <= 1 or len(paths) <= _CHUNK:  # one chunk: a worker process would only add its start-up
            results = []
            for path in paths:
                results.append(_hash_image(path))
                advance(1)
            return results
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            results = []
            for result in pool.map(_hash_image, paths, chunksize=_CHUNK):
                results.append(result)
                advance(1)
            return results


def near_duplicate_pairs(hex_hashes: list[str], max_bits: int = NEAR_DUPLICATE_BITS) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, whose hashes differ in at most `max_bits` bits (vectorised)."""
    if len(hex_hashes) < 2:
        return []
    words = np.array([np.frombuffer(bytes.fromhex(h), dtype=">u8") for h in hex_hashes]).astype(np.uint64)
    pairs = []
    for i in range(len(words) - 1):
        distance = np.bitwise_count(words[i + 1 :] ^ words[i]).sum(axis=1)
        pairs.extend((i, i + 1 + int(j)) for j in np.flatnonzero(distance <= max_bits))
    return pairs


def _groups_from_pairs(pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components (union-find) of the pair graph, each sorted, ordered by first member."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in parent:
        groups[find(i)].append(i)
    return sorted(sorted(g) for g in groups.values())


def _describe_groups(manifest: pd.DataFrame, groups: list[list[int]]) -> list[dict[str, Any]]:
    described = []
    for group in groups:
        rows = manifest.iloc[group]
        described.append(
            {
                "paths": rows["path"].tolist(),
                "splits": sorted(set(rows["split"])),
                "labels": sorted(set(rows["label_name"])),
                "patients": sorted(set(rows["patient_id"])),
            }
        )
    return described


def _summary(groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "n_groups": len(groups),
        "n_images": sum(len(g["paths"]) for g in groups),
        "cross_split_groups": sum(len(g["splits"]) > 1 for g in groups),
        "conflicting_label_groups": sum(len(g["labels"]) > 1 for g in groups),
        "cross_patient_groups": sum(len(g["patients"]) > 1 for g in groups),
        "groups": groups,
    }


def _patients_across_splits(manifest: pd.DataFrame) -> dict[str, Any]:
    named = manifest[manifest["patient_from_name"]]
    patients = {split: set(named.loc[named["split"] == split, "patient_id"]) for split in SPLITS}
    crossing = {}
    for a, b in combinations(SPLITS, 2):
        shared = sorted(patients[a] & patients[b])
        if patients[a] and patients[b]:
            crossing[f"{a}&{b}"] = {"n": len(shared), "examples": shared[:5]}
    return crossing


def check_dataset(
    data: str | os.PathLike[str],
    *,
    workers: int | None = None,
    near_bits: int = NEAR_DUPLICATE_BITS,
    progress: bool = True,
    task: str = "binary",
) -> dict[str, Any]:
    """Check a dataset folder for a task (`pneumolab.data.tasks`) and return the report (a JSON-ready dict).

    Keys: ``root``; ``task`` and its ``classes``; ``counts`` (split -> class -> readable images, with ``total``);
    ``unlabelled`` (path, reason: files the task cannot label, which training refuses); ``patients`` (split -> count);
    ``patient_ids_from_file_name`` / ``patient_ids_one_per_file`` (names matching no known pattern);
    ``unreadable`` (path, reason); ``skipped`` (files that are not images); ``exact_duplicates`` and
    ``near_duplicates`` (groups with their splits, labels and patients, and summary counts); and
    ``patients_across_splits``. Counts cover readable images only.
    """
    chosen = get_task(task)
    root = find_dataset_root(data).resolve()
    manifest = build_manifest(root, chosen.folder_classes)
    _, skipped = scan_dataset(root, chosen.folder_classes)
    folders = chosen.folder_classes or folder_classes(manifest)
    bad = chosen.unlabelled(manifest)
    unlabelled = [{"path": path, "reason": f"task {task!r}: the name says neither bacteria nor virus"}
                  for path in bad["path"]]  # fmt: skip
    labelled, classes = chosen.relabel(manifest.drop(bad.index), folders)
    task_label = dict(zip(labelled["path"], labelled["label_name"], strict=True))
    results = _hash_all([str(image_root(root) / p) for p in manifest["path"]], workers or os.cpu_count() or 1, progress)
    manifest["phash"] = [h for h, _ in results]
    unreadable = [
        {"path": path, "reason": reason}
        for path, (_, reason) in zip(manifest["path"], results, strict=True)
        if reason is not None
    ]
    readable = manifest[manifest["phash"].notna()].reset_index(drop=True)

    counts = {}
    for split in SPLITS:
        rows = readable[readable["split"] == split]
        if len(rows):
            names = rows["path"].map(task_label)
            per_class = {name: int((names == name).sum()) for name in classes}
            counts[split] = {**per_class, "total": len(rows)}
    patients = {split: int(readable.loc[readable["split"] == split, "patient_id"].nunique()) for split in counts}

    exact = [list(idx) for idx in readable.groupby("sha256").indices.values() if len(idx) > 1]
    exact_groups = sorted(sorted(int(i) for i in g) for g in exact)
    exact_group_of = {i: n for n, g in enumerate(exact_groups) for i in g}
    near_pairs = [
        (i, j)
        for i, j in near_duplicate_pairs(readable["phash"].tolist(), near_bits)
        if exact_group_of.get(i, -1) != exact_group_of.get(j, -2)
    ]
    near_groups = _groups_from_pairs(near_pairs)

    return {
        "root": str(root),
        "task": task,
        "classes": list(classes),
        "n_images": len(readable),
        "counts": counts,
        "unlabelled": unlabelled,
        "patients": patients,
        "patient_ids_from_file_name": int(readable["patient_from_name"].sum()),
        "patient_ids_one_per_file": int((~readable["patient_from_name"]).sum()),
        "unreadable": unreadable,
        "skipped": skipped,
        "exact_duplicates": _summary(_describe_groups(readable, exact_groups)),
        "near_duplicates": {"max_bits": near_bits, **_summary(_describe_groups(readable, near_groups))},
        "patients_across_splits": _patients_across_splits(readable),
    }
