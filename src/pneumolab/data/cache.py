"""The decode-once cache: every image decoded once into a uint8 ``N x S x S`` memory-mapped array.

A cache folder is ``CACHE_ROOT/<key>/`` holding ``images.npy`` (open with ``mmap_mode="r"``), ``manifest.csv``
(row i describes image i) and ``meta.json``. The key is a hash of the cache format, the size ``S`` and every
image's relative path, split, label and byte hash, so a changed dataset gets a new cache and an unchanged one is
found again without decoding anything. The folder is built under a temporary name and renamed at the end: an
interrupted prepare leaves nothing that looks valid, and the next prepare removes what a killed one left.

The image array's blocks are reserved on disk (``posix_fallocate``) before anything is written through the memory
map: a full disk is then one `OutputError` naming the folder, never a SIGBUS in the middle of decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import platformdirs

from pneumolab.constants import CLASSES
from pneumolab.data.dataset import build_manifest, find_dataset_root, image_root
from pneumolab.data.io import load_xray
from pneumolab.errors import ArtefactError, ImageReadError, OutputError, SettingError
from pneumolab.fsutil import atomic_dir
from pneumolab.progress import progress_bar

__all__ = ["CACHE_FORMAT", "DatasetCache", "cache_key", "default_cache_root", "prepare_cache"]

CACHE_FORMAT = 1
_CHUNK = 64  # images per worker task: large enough to amortise the task overhead, small for a smooth bar


def default_cache_root() -> Path:
    """``$PNEUMOLAB_CACHE`` if set, else the user's cache folder (e.g. ``~/.cache/pneumolab``)."""
    env = os.environ.get("PNEUMOLAB_CACHE")
    return Path(env) if env else platformdirs.user_cache_path("pneumolab") / "datasets"


def cache_key(manifest: pd.DataFrame, size: int) -> str:
    """Hash of the cache format, the image size and the identity of every image."""
    digest = hashlib.sha256(f"format={CACHE_FORMAT};size={size}\n".encode())
    for row in manifest[["path", "split", "label", "sha256"]].itertuples(index=False):
        digest.update(f"{row.path}\t{row.split}\t{row.label}\t{row.sha256}\n".encode())
    return digest.hexdigest()[:20]


@dataclass(frozen=True)
class DatasetCache:
    """An opened cache: ``images[i]`` is the uint8 S x S image of ``manifest.iloc[i]``."""

    path: Path
    root: Path
    size: int
    images: np.ndarray
    manifest: pd.DataFrame

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> DatasetCache:
        """Open a finished cache folder (memory-mapped, read-only)."""
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        images = np.load(path / "images.npy", mmap_mode="r")
        manifest = pd.read_csv(path / "manifest.csv", dtype={"path": str, "patient_id": str, "sha256": str})
        if images.shape != (len(manifest), meta["size"], meta["size"]):
            raise ArtefactError(f"{path}: cache is inconsistent (images {images.shape}, {len(manifest)} rows)")
        return cls(path, Path(meta["root"]), int(meta["size"]), images, manifest)


def _reserve(images_path: Path, n: int, size: int, dest: Path) -> None:
    """Create the ``.npy`` memory map's file with all its blocks allocated: a sparse file would meet a full disk
    only when a page is written through the map, which the kernel answers with SIGBUS."""
    need = f"{n * size * size / 2**20:,.1f} MiB"
    hint = "free some space, or set --cache (PNEUMOLAB_CACHE) to another disk"
    free = shutil.disk_usage(images_path.parent).free
    if n * size * size > free:
        raise OutputError(f"{dest}: the cache needs {need} and the disk has {free / 2**20:,.1f} MiB free; {hint}")
    images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(n, size, size))
    offset, length = images.offset, images.size
    del images  # workers open the file themselves
    fd = os.open(images_path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, offset, max(length, 1))
    except OSError as error:  # ENOSPC (another writer took the space meanwhile), EFBIG (a file size limit)
        raise OutputError(f"{dest}: cannot reserve {need} for the cache ({error.strerror}); {hint}") from None
    finally:
        os.close(fd)


def _decode_chunk(images_path: str, root: str, rel_paths: list[str], start: int, size: int) -> list[tuple]:
    """Worker: decode images into rows ``start..`` of the memmap; return ``(index, reason)`` for failures."""
    images = np.load(images_path, mmap_mode="r+")
    failures = []
    for offset, rel in enumerate(rel_paths):
        try:
            images[start + offset] = load_xray(Path(root) / rel, size=size)
        except ImageReadError as error:
            failures.append((start + offset, error.reason))
    images.flush()
    return failures


def _decode_all(images_path: Path, root: Path, rel_paths: list[str], size: int, workers: int, progress: bool):
    failures: list[tuple[int, str]] = []
    chunks = [(start, rel_paths[start : start + _CHUNK]) for start in range(0, len(rel_paths), _CHUNK)]
    with progress_bar(len(rel_paths), "decoding", enabled=progress) as advance:
        if min(workers, len(chunks)) <= 1:  # one chunk: a worker process would only add its start-up
            for start, chunk in chunks:
                failures += _decode_chunk(str(images_path), str(root), chunk, start, size)
                advance(len(chunk))
            return failures
        # spawn: workers must not inherit a parent that may hold torch threads or open files
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {
                pool.submit(_decode_chunk, str(images_path), str(root), chunk, start, size): len(chunk)
                for start, chunk in chunks
            }
            for future in as_completed(futures):
                failures += future.result()
                advance(futures[future])
    return sorted(failures)


def prepare_cache(
    data: str | os.PathLike[str],
    *,
    size: int = 256,
    cache_root: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    skip_unreadable: bool = False,
    progress: bool = True,
    classes: Sequence[str] | None = CLASSES,
) -> tuple[DatasetCache, bool]:
    """Build (or find) the decode-once cache of a dataset.

    Args:
        data: the dataset folder (its root is located with `find_dataset_root`).
        size: side S of the cached square images.
        cache_root: where cache folders live; default `default_cache_root()`.
        workers: decoding processes; default the number of cores.
        skip_unreadable: drop unreadable files (listed in ``meta.json``) instead of failing.
        progress: show a progress bar on stderr.
        classes: the class folders the dataset must have; None reads them from its folders (`build_manifest`).

    Returns:
        ``(cache, built)``: the opened cache and whether it was built now (False: it already existed).

    Raises:
        ImageReadError: a file could not be read and `skip_unreadable` is False.
    """
    if size < 8:
        raise SettingError(f"cache size must be at least 8 pixels, got {size}")
    root = find_dataset_root(data).resolve()
    manifest = build_manifest(root, classes)
    key = cache_key(manifest, size)
    dest = Path(cache_root or default_cache_root()) / key
    if (dest / "meta.json").is_file():
        return replace(DatasetCache.open(dest), root=root), False
    workers = workers or os.cpu_count() or 1
    started = time.perf_counter()
    with atomic_dir(dest, keep_existing=True) as tmp:
        images_path = tmp / "images.npy"
        _reserve(images_path, len(manifest), size, dest)
        failures = _decode_all(images_path, image_root(root), manifest["path"].tolist(), size, workers, progress)
        unreadable = [{"path": manifest["path"].iat[i], "reason": reason} for i, reason in failures]
        if failures and not skip_unreadable:
            first = unreadable[0]
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            reason = f"{first['reason']}{more}; fix or pass --skip-unreadable"
            raise ImageReadError(image_root(root) / first["path"], reason)
        if failures:
            keep = np.setdiff1d(np.arange(len(manifest)), [i for i, _ in failures])
            decoded = np.load(images_path, mmap_mode="r")[keep]
            np.save(images_path, decoded)
            manifest = manifest.iloc[keep].reset_index(drop=True)
        manifest.to_csv(tmp / "manifest.csv", index=False)
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "root": str(root),
            "size": size,
            "n": len(manifest),
            "unreadable": unreadable,
            "seconds": round(time.perf_counter() - started, 2),
        }
        # meta.json last: its presence marks a finished cache even before the folder rename
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return replace(DatasetCache.open(dest), root=root), True
