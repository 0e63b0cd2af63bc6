"""Dataset discovery and the manifest: one row per image with its split, label, patient and byte hash.

The accepted layout is the Kaggle one, ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.{jpeg,jpg,png,dcm}``, or any
set of class folders when the caller asks for them to be read (``classes=None``; the ``folders`` task): ``val/`` is
optional, folder names are matched case-insensitively, the nested ``chest_xray/chest_xray/`` of the Kaggle zip is
found, and ``__MACOSX`` and dot-files are ignored. Patient ids come from the file names (see `parse_name`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pneumolab import CLASSES
from pneumolab.data.io import IMAGE_SUFFIXES
from pneumolab.errors import DatasetLayoutError
from pneumolab.fsutil import file_sha256

__all__ = [
    "EXPECTED_LAYOUT",
    "FOLDERS_LAYOUT",
    "MANIFEST_COLUMNS",
    "SPLITS",
    "NameInfo",
    "build_manifest",
    "find_dataset_root",
    "folder_classes",
    "parse_name",
    "scan_dataset",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
EXPECTED_LAYOUT = "expected ROOT/{train,test}/{NORMAL,PNEUMONIA}/*.{jpeg,jpg,png,dcm} (val/ optional)"
FOLDERS_LAYOUT = "expected ROOT/{train,test}/<CLASS>/*.{jpeg,jpg,png,dcm}, the same class folders in every split"
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


def scan_dataset(
    root: str | os.PathLike[str], classes: Sequence[str] | None = CLASSES
) -> tuple[list[tuple[str, str, str]], list[str]]:
    """List the images of a dataset root.

    Args:
        classes: the class folder names the layout must use (matched case-insensitively); None reads them from
            the folders, which must then be the same in every split.

    Returns:
        ``(images, skipped)``: images as ``(relative path, split, class name)`` sorted by path, and the relative
        paths of files that were not images (unknown suffix), which a data check reports.

    Raises:
        DatasetLayoutError: a split without class folders, an unknown class folder (or, reading them, splits with
            different ones), files outside class folders, or a split with no images.
    """
    root = Path(root)
    splits = _subdirs(root)
    expected = {name.lower(): name for name in classes} if classes is not None else None
    layout = EXPECTED_LAYOUT if classes is not None else FOLDERS_LAYOUT
    images: list[tuple[str, str, str]] = []
    skipped: list[str] = []
    seen: tuple[str, Path] | None = None  # the first split's class folders, which the others must match
    for split in SPLITS:
        if split not in splits:
            continue
        split_dir = splits[split]
        stray = [p.name for p in split_dir.iterdir() if p.is_file() and not _is_hidden(p.name)]
        folders = _subdirs(split_dir)
        if not folders:
            what = f"files ({stray[0]}, ...) but " if stray else ""
            raise DatasetLayoutError(f"{split_dir}: {what}no class folder; {layout}")
        if expected is not None:
            unknown = sorted(set(folders) - set(expected))
            if unknown:
                raise DatasetLayoutError(f"{split_dir}: unknown class folder {folders[unknown[0]].name!r}; {layout}")
            names = expected
        else:
            names = {key: folder.name for key, folder in folders.items()}
            listing = ", ".join(sorted(names.values()))
            if seen is None:
                seen = (listing, split_dir)
            elif listing != seen[0]:
                raise DatasetLayoutError(
                    f"{split_dir}: class folders {listing} differ from {seen[1]}'s ({seen[0]}); {layout}"
                )
        if stray:
            raise DatasetLayoutError(f"{split_dir / stray[0]}: file outside a class folder; {layout}")
        found = 0
        for key, class_dir in folders.items():
            for dirpath, dirnames, filenames in os.walk(class_dir):
                dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
                for filename in sorted(filenames):
                    if _is_hidden(filename):
                        continue
                    rel = (Path(dirpath) / filename).relative_to(root).as_posix()
                    if Path(filename).suffix.lower() in IMAGE_SUFFIXES:
                        images.append((rel, split, names[key]))
                        found += 1
                    else:
                        skipped.append(rel)
        if not found:
            raise DatasetLayoutError(f"{split_dir}: split has no images; {layout}")
    if not images:
        raise DatasetLayoutError(f"{root}: no split folder with images; {layout}")
    images.sort()
    return images, skipped


def folder_classes(manifest: pd.DataFrame) -> tuple[str, ...]:
    """The class names of a manifest in label order (its ``label`` / ``label_name`` pairs)."""
    pairs = manifest[["label", "label_name"]].drop_duplicates().sort_values("label")
    return tuple(pairs["label_name"])


def build_manifest(root: str | os.PathLike[str], classes: Sequence[str] | None = CLASSES) -> pd.DataFrame:
    """Scan `root` (a dataset root, see `find_dataset_root`) into the manifest.

    Columns: ``path`` (relative to root, POSIX), ``split`` (the folder it came from), ``label`` (index into
    `classes`, or into the sorted folder names when `classes` is None), ``label_name``, ``patient_id``,
    ``patient_from_name``, ``kind`` and ``sha256``.
    """
    root = Path(root)
    images, _ = scan_dataset(root, classes)
    order = tuple(classes) if classes is not None else tuple(sorted({name for _, _, name in images}, key=str.lower))
    rows = []
    for rel, split, label_name in images:
        info = parse_name(Path(rel).name, label_name)
        rows.append(
            (
                rel,
                split,
                order.index(label_name),
                label_name,
                info.patient_id,
                info.from_name,
                info.kind,
                file_sha256(root / rel),
            )
        )
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
