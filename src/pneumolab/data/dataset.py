"""Dataset discovery and the manifest: one row per image with its split, label, patient and byte hash.

The accepted layout is the Kaggle one, ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.{jpeg,jpg,png,dcm}``, or any
set of class folders when the caller asks for them to be read (``classes=None``; the ``folders`` task): ``val/`` is
optional, folder names are matched case-insensitively, the nested ``chest_xray/chest_xray/`` of the Kaggle zip is
found, and ``__MACOSX`` and dot-files are ignored. Patient ids come from the file names (see `parse_name`).

The other layout is a labels CSV (`LABELS_CSV_LAYOUT`), the way other public datasets (RSNA, NIH, CheXpert,
PadChest) and a hospital's export arrive: columns ``file`` and ``label``, optional ``patient_id`` and ``split``,
paths relative to the CSV's folder. Its dataset root is the CSV file itself (or a folder holding ``labels.csv``
and no split folders); `image_root` gives the folder its paths start from. Without a ``split`` column every film is
in ``test``: evaluation and the site commands read them all, and training needs the column (train / val / test).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pneumolab.constants import CLASSES
from pneumolab.data.io import IMAGE_SUFFIXES
from pneumolab.errors import DatasetLayoutError
from pneumolab.fsutil import file_sha256

__all__ = [
    "EXPECTED_LAYOUT",
    "FOLDERS_LAYOUT",
    "LABELS_CSV",
    "LABELS_CSV_LAYOUT",
    "MANIFEST_COLUMNS",
    "SPLITS",
    "NameInfo",
    "build_manifest",
    "find_dataset_root",
    "folder_classes",
    "image_root",
    "parse_name",
    "scan_dataset",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
EXPECTED_LAYOUT = "expected ROOT/{train,test}/{NORMAL,PNEUMONIA}/*.{jpeg,jpg,png,dcm} (val/ optional)"
FOLDERS_LAYOUT = "expected ROOT/{train,test}/<CLASS>/*.{jpeg,jpg,png,dcm}, the same class folders in every split"
LABELS_CSV = "labels.csv"  # the name that makes a folder without split folders a labels-CSV dataset
LABELS_CSV_LAYOUT = "expected a labels CSV with columns file,label[,patient_id][,split], paths relative to the CSV"
_CSV_DEFAULT_SPLIT = "test"  # no split column: every film is evaluated (training needs the column)
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


def image_root(root: str | os.PathLike[str]) -> Path:
    """The folder a dataset root's manifest paths are relative to: the root itself, or a labels CSV's folder."""
    root = Path(root)
    return root.parent if root.suffix.lower() == ".csv" else root


def find_dataset_root(path: str | os.PathLike[str], max_depth: int = 3) -> Path:
    """Return the folder under `path` (itself included) that holds the ``train``/``test`` split folders, or the
    labels CSV (`path` itself, or ``labels.csv`` in a folder without split folders).

    Raises:
        DatasetLayoutError: no such folder within `max_depth` levels.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise DatasetLayoutError(f"{path}: no such file; {LABELS_CSV_LAYOUT}")
        return path
    if path.is_dir() and (path / LABELS_CSV).is_file() and not any(s in _subdirs(path) for s in SPLITS):
        return path / LABELS_CSV
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
    if root.suffix.lower() == ".csv":
        table = _read_labels_csv(root, classes)
        return list(zip(table["path"], table["split"], table["label_name"], strict=True)), []
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


def _read_labels_csv(csv: Path, classes: Sequence[str] | None) -> pd.DataFrame:
    """A labels CSV as a table: ``path`` (POSIX, as written), ``split``, ``label_name`` (the class's own spelling),
    ``patient`` (empty when not given), sorted by path; a one-line error names the file and the row."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True, index_col=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DatasetLayoutError(f"{csv}: not a readable CSV ({error}); {LABELS_CSV_LAYOUT}") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("file", "label") if c not in table.columns]
    if missing:
        raise DatasetLayoutError(f"{csv}: no {missing[0]!r} column (has {', '.join(table.columns)}); "
                                 f"{LABELS_CSV_LAYOUT}")  # fmt: skip
    if not len(table):
        raise DatasetLayoutError(f"{csv}: no rows; {LABELS_CSV_LAYOUT}")
    if classes is not None:
        names = {name.lower(): name for name in classes}
    else:
        names = {label.strip().lower(): label.strip() for label in sorted(table["label"], key=str.lower)}
    folder = csv.parent
    rows = []
    for line, record in enumerate(table.itertuples(index=False), start=2):  # line 1 is the header
        file, label = str(record.file).strip(), str(record.label).strip()
        where = f"{csv}, line {line}"
        if label.lower() not in names:
            raise DatasetLayoutError(f"{where}: unknown label {label!r} (expected {', '.join(names.values())})")
        if not file:
            raise DatasetLayoutError(f"{where}: empty file name; {LABELS_CSV_LAYOUT}")
        if Path(file).suffix.lower() not in IMAGE_SUFFIXES:
            raise DatasetLayoutError(f"{where}: {file} is not an image file (.jpeg, .jpg, .png, .dcm)")
        if not (folder / file).is_file():
            raise DatasetLayoutError(f"{where}: {folder / file} does not exist (paths are relative to the CSV)")
        split = str(getattr(record, "split", "") or _CSV_DEFAULT_SPLIT).strip().lower()
        if split not in SPLITS:
            raise DatasetLayoutError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        patient = str(getattr(record, "patient_id", "")).strip()
        rows.append((Path(file).as_posix(), split, names[label.lower()], patient))
    out = pd.DataFrame(rows, columns=["path", "split", "label_name", "patient"])
    repeated = out["path"][out["path"].duplicated()]
    if len(repeated):
        raise DatasetLayoutError(f"{csv}: {repeated.iloc[0]} is listed twice")
    return out.sort_values("path", kind="stable").reset_index(drop=True)


def folder_classes(manifest: pd.DataFrame) -> tuple[str, ...]:
    """The class names of a manifest in label order (its ``label`` / ``label_name`` pairs)."""
    pairs = manifest[["label", "label_name"]].drop_duplicates().sort_values("label")
    return tuple(pairs["label_name"])


def build_manifest(root: str | os.PathLike[str], classes: Sequence[str] | None = CLASSES) -> pd.DataFrame:
    """Scan `root` (a dataset root, see `find_dataset_root`) into the manifest.

    Columns: ``path`` (relative to `image_root`, POSIX), ``split`` (the folder it came from), ``label`` (index into
    `classes`, or into the sorted folder names when `classes` is None), ``label_name``, ``patient_id``,
    ``patient_from_name``, ``kind`` and ``sha256``.
    """
    root = Path(root)
    images, _ = scan_dataset(root, classes)
    patients: dict[str, str] = {}  # a labels CSV's patient_id column, where given
    if root.suffix.lower() == ".csv":
        table = _read_labels_csv(root, classes)
        patients = {p: q for p, q in zip(table["path"], table["patient"], strict=True) if q}
    order = tuple(classes) if classes is not None else tuple(sorted({name for _, _, name in images}, key=str.lower))
    files = image_root(root)
    rows = []
    for rel, split, label_name in images:
        info = parse_name(Path(rel).name, label_name)
        given = patients.get(rel)
        rows.append(
            (
                rel,
                split,
                order.index(label_name),
                label_name,
                given or info.patient_id,
                bool(given) or info.from_name,
                info.kind,
                file_sha256(files / rel),
            )
        )
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
