"""Dataset discovery and the manifest: one row per image with its split, label, patient and byte hash.

The accepted layout is the Kaggle one, ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.{jpeg,jpg,png,dcm}``: ``val/`` is
optional, folder names are matched case-insensitively, the nested ``chest_xray/chest_xray/`` of the Kaggle zip is
found, and ``__MACOSX`` and dot-files are ignored. Patient ids come from the file names (see `parse_name`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pneumolab import CLASSES
from pneumolab.data.io import IMAGE_SUFFIXES
from pneumolab.errors import DatasetLayoutError
from pneumolab.fsutil import file_sha256

__all__ = [
    "EXPECTED_LAYOUT",
    "MANIFEST_COLUMNS",
    "SPLITS",
    "NameInfo",
    "build_manifest",
    "find_dataset_root",
    "parse_name",
    "scan_dataset",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
EXPECTED_LAYOUT = "expected ROOT/{train,test}/{NORMAL,PNEUMONIA}/*.{jpeg,jpg,png,dcm} (val/ optional)"
MANIFEST_COLUMNS = [
    "path",
    "split",
    "label",
    "label_name",
    "patient_id",
    "patient_from_name",
    "kind",
    "sha256",
]

# Patient ids in the Kermany file names; NORMAL2-IM must be tried before IM.
_NAME_PATTERNS = (
    re.compile(r"^(?P<patient>person\d+)_(?P<kind>bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^(?P<patient>NORMAL2-IM-\d+)-\d+", re.IGNORECASE),
    re.compile(r"^(?P<patient>IM-\d+)-\d+", re.IGNORECASE),
)
_KIND_WORDS = re.compile(r"bacteria|virus", re.IGNORECASE)


@dataclass(frozen=True)
class NameInfo:
    """What a file name says about its image."""

    patient_id: str
    kind: str  # "bacteria", "virus", "none" (NORMAL) or "unknown"
    from_name: bool  # False: the name matched no known pattern, so the file is its own patient


def parse_name(filename: str, label_name: str) -> NameInfo:
    """Patient id and pneumonia kind from a Kermany file name.

    ``personN_bacteria_M`` -> ``personN``; ``IM-XXXX-YYYY`` -> ``IM-XXXX``; ``NORMAL2-IM-XXXX-YYYY`` ->
    ``NORMAL2-IM-XXXX``. Names that match none of these fall back to one patient per file.
    """
    stem = Path(filename).stem
    for pattern in _NAME_PATTERNS:
        match = pattern.match(stem)
        if match:
            kind = match.groupdict().get("kind")
            kind = kind.lower() if kind else ("none" if label_name == "NORMAL" else "unknown")
            return NameInfo(match["patient"], kind, True)
    if label_name == "NORMAL":
        kind = "none"
    else:
        word = _KIND_WORDS.search(stem)
        kind = word.group(0).lower() if word else "unknown"
    return NameInfo(f"file:{stem}", kind, False)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _subdirs(folder: Path) -> dict[str, Path]:
    """Visible sub-folders of `folder` keyed by lower-case name."""
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir() and not _is_hidden(p.name)}


def find_dataset_root(path: str | os.PathLike[str], max_depth: int = 3) -> Path:
    """Return the folder under `path` (itself included) that holds the ``train``/``test`` split folders.

    Raises:
        DatasetLayoutError: no such folder within `max_depth` levels.
    """
    path = Path(path)
    if not path.is_dir():
        raise DatasetLayoutError(f"{path}: no such folder; {EXPECTED_LAYOUT}")
    frontier = [path]
    for _ in range(max_depth + 1):
        next_frontier = []
        for folder in frontier:
            subdirs = _subdirs(folder)
            if any(split in subdirs for split in SPLITS):
                return folder
            next_frontier.extend(subdirs.values())
        frontier = next_frontier
    raise DatasetLayoutError(f"{path}: no train/, val/ or test/ folder found; {EXPECTED_LAYOUT}")


def scan_dataset(root: str | os.PathLike[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """List the images of a dataset root.

    Returns:
        ``(images, skipped)``: images as ``(relative path, split, label name)`` sorted by path, and the relative
        paths of files that were not images (unknown suffix), which a data check reports.

    Raises:
        DatasetLayoutError: a split without class folders, an unknown class folder, files outside class folders,
            or a split with no images.
    """
    root = Path(root)
    splits = _subdirs(root)
    class_names = {name.lower(): name for name in CLASSES}
    images: list[tuple[str, str, str]] = []
    skipped: list[str] = []
    for split in SPLITS:
        if split not in splits:
            continue
        split_dir = splits[split]
        stray = [p.name for p in split_dir.iterdir() if p.is_file() and not _is_hidden(p.name)]
        classes = _subdirs(split_dir)
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise DatasetLayoutError(
                f"{split_dir}: unknown class folder {classes[unknown[0]].name!r}; {EXPECTED_LAYOUT}"
            )
        if not classes:
            what = f"files ({stray[0]}, ...) but " if stray else ""
            raise DatasetLayoutError(f"{split_dir}: {what}no class folder; {EXPECTED_LAYOUT}")
        if stray:
            raise DatasetLayoutError(f"{split_dir / stray[0]}: file outside a class folder; {EXPECTED_LAYOUT}")
        found = 0
        for key, class_dir in classes.items():
            for dirpath, dirnames, filenames in os.walk(class_dir):
                dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
                for filename in sorted(filenames):
                    if _is_hidden(filename):
                        continue
                    rel = (Path(dirpath) / filename).relative_to(root).as_posix()
                    if Path(filename).suffix.lower() in IMAGE_SUFFIXES:
                        images.append((rel, split, class_names[key]))
                        found += 1
                    else:
                        skipped.append(rel)
        if not found:
            raise DatasetLayoutError(f"{split_dir}: split has no images; {EXPECTED_LAYOUT}")
    if not images:
        raise DatasetLayoutError(f"{root}: no split folder with images; {EXPECTED_LAYOUT}")
    images.sort()
    return images, skipped


def build_manifest(root: str | os.PathLike[str]) -> pd.DataFrame:
    """Scan `root` (a dataset root, see `find_dataset_root`) into the manifest.

    Columns: ``path`` (relative to root, POSIX), ``split`` (the folder it came from), ``label`` (index into
    `pneumolab.CLASSES`), ``label_name``, ``patient_id``, ``patient_from_name``, ``kind`` and ``sha256``.
    """
    root = Path(root)
    images, _ = scan_dataset(root)
    rows = []
    for rel, split, label_name in images:
        info = parse_name(Path(rel).name, label_name)
        rows.append(
            (
                rel,
                split,
                CLASSES.index(label_name),
                label_name,
                info.patient_id,
                info.from_name,
                info.kind,
                file_sha256(root / rel),
            )
        )
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
