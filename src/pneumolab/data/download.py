"""Fetch the chest X-ray data: Kaggle (kagglehub), PneumoniaMNIST+ (Zenodo .npz) or any zip at a URL.

Downloads are resumable and checksum-verified, and land atomically: a file appears under its final name only
once it is complete and verified, a folder only once it is fully written. A download that starts on https never
follows a redirect to plain http, and one larger than `DEFAULT_MAX_BYTES` (or the ``max_bytes`` given) is stopped
at that size. Failures become one-line `DownloadError`s; when the host cannot be reached, the message says how to
supply the data by hand (`MANUAL_HINT`).

Each `download_*` returns the folder it produced; the caller finds the `train/` / `test/` root inside it.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import io
import os
import posixpath
import re
import shutil
import socket
import stat
import urllib.request
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import numpy as np
from PIL import Image
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from pneumolab.constants import CLASSES, __version__
from pneumolab.errors import DownloadError, UnknownNameError
from pneumolab.progress import stderr_console

__all__ = [
    "DEFAULT_MAX_BYTES",
    "KAGGLE_HANDLE",
    "MANUAL_HINT",
    "download_kaggle",
    "download_medmnist",
    "download_url",
    "fetch",
    "npz_to_folders",
    "redirect_refusal",
    "safe_extract_zip",
]

KAGGLE_HANDLE = "paultimothymooney/chest-xray-pneumonia"
"""The Kermany et al. chest X-ray dataset on Kaggle (5,856 images, NORMAL / PNEUMONIA)."""

MANUAL_HINT = (
    "To supply the data by hand: download "
    "https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia "
    "(or Mendeley doi:10.17632/rscbjbr9sj.2), unzip it, point --data at the folder holding train/ and test/, "
    "then run `pneumolab data check DIR`."
)
"""One line telling how to get the dataset without this module; appended to every "cannot reach" error."""

TIMEOUT_S = 30.0
"""Seconds any single network operation (connect, one read) may block before the download counts as failed."""

DEFAULT_MAX_BYTES = int(os.environ.get("PNEUMOLAB_MAX_DOWNLOAD_BYTES", 16 << 30))
"""The largest file `fetch` takes (16 GiB unless ``PNEUMOLAB_MAX_DOWNLOAD_BYTES`` says otherwise): a server that
sends more, or never stops, is cut off there rather than filling the disk."""

_CONNECT_RETRIES = 2  # a refused or failed connect is tried again after 0 s and 0.5 s (httpcore's backoff)

_CHUNK = 1 << 20
_USER_AGENT = f"pneumolab/{__version__}"
_KAGGLE_DONE = ".pneumolab-complete"  # our own marker, so a finished Kaggle download is reused offline

_MEDMNIST_SPLITS = ("train", "val", "test")
# Copied from medmnist 3.0.2's INFO["pneumoniamnist"]; used when medmnist is not installed.
_MEDMNIST_SOURCES: dict[int, tuple[str, str]] = {
    28: (
        "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
        "28209eda62fecd6e6a2d98b1501bb15f",
    ),
    64: (
        "https://zenodo.org/records/10519652/files/pneumoniamnist_64.npz?download=1",
        "8f4eceb4ccffa70c672198ea285246c6",
    ),
    128: (
        "https://zenodo.org/records/10519652/files/pneumoniamnist_128.npz?download=1",
        "05b46931834c231683c68f40c47b2971",
    ),
    224: (
        "https://zenodo.org/records/10519652/files/pneumoniamnist_224.npz?download=1",
        "d6a3c71de1b945ea11211b03746c1fe1",
    ),
}


# --------------------------------------------------------------------------------------------------- sources


def download_kaggle(to: Path, *, progress: bool = True) -> Path:
    """Download the Kaggle chest X-ray dataset with kagglehub into ``to/chest-xray-pneumonia/``.

    A finished download is reused without touching the network.

    Args:
        to: Folder to download into.
        progress: Show kagglehub's progress bar (on stderr); False mutes stderr during the download.

    Returns:
        The folder kagglehub filled (the images sit in ``chest_xray/`` below it).

    Raises:
        DownloadError: kagglehub is missing, Kaggle cannot be reached, refuses the request, or the target
            folder holds an unfinished download.
    """
    out = Path(to) / KAGGLE_HANDLE.split("/")[1]
    if (out / _KAGGLE_DONE).is_file():
        return out
    try:
        import kagglehub
    except ImportError:
        raise DownloadError(f'kagglehub is not installed: pip install "pneumolab[download]". {MANUAL_HINT}') from None
    # kagglehub's tqdm bar reads its settings at import, so silencing it means muting stderr for the call.
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            path = Path(kagglehub.dataset_download(KAGGLE_HANDLE, output_dir=str(out)))
    except FileExistsError:  # kagglehub refuses a non-empty output_dir that it did not finish
        raise DownloadError(
            f"{out}: not empty but holds no finished Kaggle download; remove it and run again"
        ) from None
    except Exception as err:
        converted = _kaggle_error(err)
        if converted is None:
            raise
        raise converted from err
    (out / _KAGGLE_DONE).touch()
    return path


def download_medmnist(to: Path, *, size: int = 224, progress: bool = True) -> Path:
    """Download PneumoniaMNIST(+) at ``size`` px and unpack it into class folders.

    Args:
        to: Folder to download into; the .npz goes to ``to/downloads/``.
        size: Image side: 28, 64, 128 or 224.
        progress: Show a progress bar on stderr.

    Returns:
        ``to/pneumoniamnist_{size}/`` holding ``{train,val,test}/{NORMAL,PNEUMONIA}/*.png``.

    Raises:
        UnknownNameError: ``size`` is not one MedMNIST offers.
        DownloadError: The download or its MD5 check failed, or the .npz is unreadable.
    """
    to = Path(to)
    url, md5 = _medmnist_source(size)
    out = to / f"pneumoniamnist_{size}"
    if _is_filled_dir(out):
        return out
    npz = fetch(url, to / "downloads" / f"pneumoniamnist_{size}.npz", md5=md5, progress=progress)
    return npz_to_folders(npz, out)


def download_url(
    url: str, to: Path, *, sha256: str | None = None, md5: str | None = None, progress: bool = True
) -> Path:
    """Download a zip archive and extract it safely.

    Args:
        url: http(s) URL of a .zip file.
        to: Folder to work in: the archive goes to ``to/downloads/<name>``, its contents to ``to/<stem>/``.
        sha256: Expected SHA-256 of the archive (hex), if known.
        md5: Expected MD5 of the archive (hex), if known.
        progress: Show a progress bar on stderr.

    Returns:
        The extraction folder ``to/<archive stem>/``; if it already exists and is not empty, it is returned
        at once without any request.

    Raises:
        DownloadError: The download, its checksum or the extraction failed.
    """
    to = Path(to)
    name = _url_filename(url)
    out = to / PurePosixPath(name).stem
    if _is_filled_dir(out):
        return out
    archive = fetch(url, to / "downloads" / name, sha256=sha256, md5=md5, progress=progress)
    return safe_extract_zip(archive, out)


# ------------------------------------------------------------------------------------------------- transfer


def fetch(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    max_bytes: int | None = None,
) -> Path:
    """Download one file to ``dest``, resuming a previous partial download.

    Bytes stream into ``dest`` + ``.part``; a later call resumes it with an HTTP Range request. The file is
    renamed to ``dest`` only once its length and checksums are verified.

    Args:
        url: http(s) URL.
        dest: Final path of the file.
        sha256: Expected SHA-256 (hex), if known.
        md5: Expected MD5 (hex), if known.
        progress: Show a progress bar (bytes, speed, ETA) on stderr.
        max_bytes: The largest file taken (default `DEFAULT_MAX_BYTES`): a larger declared length is refused before
            its body is read, a longer body is cut off there.

    Returns:
        ``dest``. If it already exists and matches the checksums (or none are given), nothing is downloaded.

    Raises:
        DownloadError: Host unreachable, HTTP error, transfer cut off (the ``.part`` is kept, so call again to
            resume), checksum mismatch or a file over `max_bytes` (the ``.part`` is deleted), or a redirect from
            https to http.
    """
    dest = Path(dest)
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        raise DownloadError(f"{url}: only http and https URLs can be downloaded")
    if dest.is_file() and _digests_match(dest, sha256=sha256, md5=md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    limit = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    with _client(url) as client:
        try:
            while not _transfer(client, url, part, progress=progress, limit=limit):
                part.unlink()  # the server cannot continue this .part: start again from zero
        except _TooLarge as error:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{url}: larger than the download limit of {limit:,} bytes ({error}); pass a larger limit "
                "(PNEUMOLAB_MAX_DOWNLOAD_BYTES) if this file is expected"
            ) from None
    _verify(part, dest, sha256=sha256, md5=md5)
    os.replace(part, dest)
    return dest


def _client(url: str) -> httpx.Client:
    """An httpx client that retries failed connects, follows redirects and uses the proxy from the environment.

    httpx reads proxy variables only when it builds the transport itself, so the proxy for ``url`` is looked up
    here (``http_proxy`` / ``https_proxy`` / ``all_proxy``, honouring ``no_proxy``) as urllib would.
    """
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        proxy = None
    elif "://" not in proxy:
        proxy = f"http://{proxy}"

    def no_downgrade(request: httpx.Request) -> None:  # called for every request, each redirect's too
        reason = redirect_refusal(url, str(request.url))
        if reason:
            raise DownloadError(f"{url}: {reason}")

    return httpx.Client(
        transport=httpx.HTTPTransport(retries=_CONNECT_RETRIES, proxy=proxy),
        timeout=TIMEOUT_S,
        event_hooks={"request": [no_downgrade]},
        follow_redirects=True,  # Zenodo answers file URLs with a redirect
        # identity: the bytes on disk, their length and Range offsets are the file's, never a decoded body's
        headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
    )


def redirect_refusal(origin: str, target: str) -> str | None:
    """Why a download that started at `origin` must not go on at `target` (None: it may): one that started
    encrypted never continues over plain http, where anyone on the path could swap the file."""
    if urlsplit(origin).scheme == "https" and urlsplit(target).scheme != "https":
        shown = urlsplit(target)._replace(query="", fragment="").geturl()
        return f"redirected from https to {shown}; refused (a download that starts encrypted stays encrypted)"
    return None


class _TooLarge(Exception):
    """The file is over the download limit (the message says how much was declared or received)."""


def _transfer(client: httpx.Client, url: str, part: Path, *, progress: bool, limit: int) -> bool:
    """Bring ``part`` to the full length of the file at ``url``.

    Returns:
        True when ``part`` now holds the whole file; False when the existing ``part`` cannot be continued and
        must be discarded (only ever when ``part`` was not empty, so a retry from zero cannot return False).
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = client.send(client.build_request("GET", url, headers=headers), stream=True)
    except httpx.TransportError as err:  # refused, unresolvable, timed out, reset, bad status line
        raise _unreachable(urlsplit(url).hostname or url, err) from None
    except httpx.HTTPError as err:  # too many redirects
        raise DownloadError(f"{url}: {_reason(err)}") from None
    with contextlib.closing(response):
        if response.status_code == 416 and offset:  # nothing left past offset: complete, or longer than the file
            return _content_range(response.headers.get("Content-Range"))[1] in (None, offset)
        if not response.is_success:
            raise DownloadError(f"{url}: HTTP {response.status_code} {response.reason_phrase}")
        if response.status_code == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                return False
        else:  # 200: the server ignored the Range header and sends everything again
            offset, total = 0, None
        if total is None and response.headers.get("Content-Length", "").isdigit():
            total = offset + int(response.headers["Content-Length"])
        if total is not None and total > limit:
            raise _TooLarge(f"the server declares {total:,}")
        mode = "ab" if offset else "wb"
        received, reason = _stream(response, part, mode=mode, done=offset, total=total, progress=progress, limit=limit)
    have = offset + received
    if (total is not None and have != total) or reason:
        expected = f" of {total}" if total is not None else ""
        why = f" ({reason})" if reason else ""
        raise DownloadError(
            f"{url}: transfer cut off after {have}{expected} bytes{why}; {part.name} is kept, run again to resume"
        )
    return True


def _stream(
    response: httpx.Response, part: Path, *, mode: str, done: int, total: int | None, progress: bool, limit: int
) -> tuple[int, str | None]:
    """Copy the response body into ``part``; return bytes received and why reading broke off, if it did. Raise
    `_TooLarge` (the connection then closes) once the file would pass `limit` bytes."""
    received = 0
    bar = _progress_bar(part.name.removesuffix(".part"), done, total, progress)
    with open(part, mode) as out, bar as advance:
        try:
            for chunk in response.iter_raw():  # as received: a re-chunking buffer would lose its bytes on a cut
                if done + received + len(chunk) > limit:
                    raise _TooLarge(f"stopped after {done + received:,}")
                out.write(chunk)
                received += len(chunk)
                advance(len(chunk))
        except httpx.TransportError as err:  # a broken connection or a read timeout, not a disk error
            return received, _reason(err)
    return received, None


@contextlib.contextmanager
def _progress_bar(label: str, done: int, total: int | None, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yield a function that advances a transient byte progress bar on stderr (a no-op when disabled).

    `pneumolab.progress.progress_bar` counts items and needs a known total; a download counts bytes (shown as
    MB, with speed) and may not know its length, so it gets these columns on the same stderr console.
    """
    if not enabled:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    columns += (TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr_console, transient=True) as bar:
        task = bar.add_task(label, total=total, completed=done)
        yield lambda n: bar.advance(task, n)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` or ``bytes */TOTAL`` into (start, total); unknown parts are None."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total.isdigit() else None)


def _unreachable(host: str, err: BaseException) -> DownloadError:
    return DownloadError(f"cannot reach {host}: {_reason(err)}. {MANUAL_HINT}")


def _reason(err: BaseException) -> str:
    """The most specific reason in an exception chain, e.g. 'Name or service not known', on one line."""
    pending, seen = [err], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        if isinstance(current, TimeoutError):
            return "timed out"
        linked = (getattr(current, "reason", None), current.__cause__, current.__context__, *current.args)
        pending.extend(e for e in linked if isinstance(e, BaseException))
    return " ".join(str(err).split()) or type(err).__name__


# -------------------------------------------------------------------------------------------------- checksums


def _expected_digests(sha256: str | None, md5: str | None) -> dict[str, str]:
    given = {"sha256": sha256, "md5": md5}
    return {algo: digest.strip().lower() for algo, digest in given.items() if digest}


def _hash_file(path: Path, algos: Mapping[str, str]) -> dict[str, str]:
    """Hex digests of ``path`` for each algorithm named in ``algos``, reading the file once."""
    hashers = {algo: hashlib.new(algo, usedforsecurity=False) for algo in algos}
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {algo: hasher.hexdigest() for algo, hasher in hashers.items()}


def _digests_match(path: Path, *, sha256: str | None, md5: str | None) -> bool:
    expected = _expected_digests(sha256, md5)
    return not expected or _hash_file(path, expected) == expected


def _verify(part: Path, dest: Path, *, sha256: str | None, md5: str | None) -> None:
    """Raise (and delete ``part``) unless ``part`` matches every given checksum."""
    expected = _expected_digests(sha256, md5)
    if not expected:
        return
    actual = _hash_file(part, expected)
    for algo, want in expected.items():
        if actual[algo] != want:
            part.unlink()
            raise DownloadError(
                f"{dest}: {algo} mismatch: expected {want}, got {actual[algo]}; "
                "the bad download was deleted, run again to fetch it afresh"
            )


# ------------------------------------------------------------------------------------------------- archives


def safe_extract_zip(archive: Path, to: Path) -> Path:
    """Extract a zip archive into ``to``, refusing archives that could write outside it.

    Every member is checked before anything is written: absolute paths, drive letters, ``..`` that escapes
    ``to`` and symbolic links make the whole archive refused. ``__MACOSX/`` folders and dot-files are skipped.
    Files are written into a hidden sibling folder that is renamed to ``to`` at the end, so an interrupted
    extraction leaves nothing that looks complete.

    Args:
        archive: The .zip file.
        to: Folder to create; it must not exist yet or be empty.

    Returns:
        ``to``.

    Raises:
        DownloadError: The archive is unsafe, corrupt or missing, or ``to`` already holds files.
    """
    archive, to = Path(archive), Path(to)
    if not archive.is_file():
        raise DownloadError(f"{archive}: no such archive")
    if _is_filled_dir(to) or to.is_file():
        raise DownloadError(f"{to}: already exists; remove it to extract {archive.name} again")
    try:
        with zipfile.ZipFile(archive) as zf:
            members = _checked_members(zf, archive, to)
            with _staged(to) as tmp:
                for info, rel in members:
                    _extract_member(zf, info, tmp.joinpath(*rel.parts))
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        raise DownloadError(f"{archive}: not a readable zip archive ({err})") from None
    return to


def _checked_members(zf: zipfile.ZipFile, archive: Path, to: Path) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Every member to extract with its normalised relative path; raise if any member is unsafe."""
    root = to.resolve()
    kept = []
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")  # zips made on Windows may use backslashes
        problem = _unsafe(info, name, root)
        if problem:
            raise DownloadError(f"{archive}: refusing to extract, member {info.filename!r} {problem}")
        rel = PurePosixPath(posixpath.normpath(name))
        if rel.parts and rel.parts != (".",) and not _is_junk(rel):
            kept.append((info, rel))
    return kept


def _unsafe(info: zipfile.ZipInfo, name: str, root: Path) -> str | None:
    """Why a member must not be extracted, or None when it is safe."""
    if name.startswith("/"):
        return "has an absolute path"
    if re.match(r"[A-Za-z]:", name):
        return "has a drive letter"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    if not (root / name).resolve().is_relative_to(root):
        return "escapes the target folder"
    return None


def _is_junk(rel: PurePosixPath) -> bool:
    """macOS resource forks and dot-files (the Kaggle zip holds a ``chest_xray/__MACOSX/`` copy)."""
    return any(part == "__MACOSX" or part.startswith(".") for part in rel.parts)


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


@contextlib.contextmanager
def _staged(final: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to fill; it becomes ``final`` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not tempfile.mkdtemp: its 0o700 mode would stick to the final folder
    try:
        yield tmp
        if final.is_dir():
            final.rmdir()  # callers made sure it is empty; rename cannot replace a folder
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_filled_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _url_filename(url: str) -> str:
    """The file name a URL points at; unquoted first, so ``%2F`` cannot smuggle in a folder."""
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    return name if name not in ("", ".", "..") else "download.zip"


# ------------------------------------------------------------------------------------------------ MedMNIST


def npz_to_folders(npz_path: Path, out_dir: Path) -> Path:
    """Unpack a MedMNIST .npz into ``out_dir/{train,val,test}/{NORMAL,PNEUMONIA}/{split}_{index:05d}.png``.

    Label 0 is NORMAL, 1 is PNEUMONIA; ``index`` is the image's position in its split's array. Splits missing
    from the file are skipped. The folder is written under a temporary name and renamed when complete.

    Args:
        npz_path: File with ``{split}_images`` (uint8, N x H x W) and ``{split}_labels`` (N or N x 1) arrays.
        out_dir: Folder to create; if it already holds files it is returned untouched.

    Returns:
        ``out_dir``.

    Raises:
        DownloadError: The file is unreadable or its arrays are not MedMNIST-shaped.
    """
    npz_path, out_dir = Path(npz_path), Path(out_dir)
    if _is_filled_dir(out_dir):
        return out_dir
    try:
        arrays = np.load(npz_path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DownloadError(f"{npz_path}: not a readable .npz file ({err})") from None
    with arrays:
        splits = [split for split in _MEDMNIST_SPLITS if f"{split}_images" in arrays.files]
        if not splits:
            raise DownloadError(f"{npz_path}: no train_images / val_images / test_images arrays")
        with _staged(out_dir) as tmp:
            for split in splits:
                images, labels = _load_split(arrays, split, npz_path)
                _write_split(tmp / split, split, images, labels)
    return out_dir


def _load_split(arrays: Any, split: str, npz_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One split's images (N x H x W uint8) and labels (N ints in {0, 1}), checked."""
    try:
        images = np.asarray(arrays[f"{split}_images"])
        labels = np.asarray(arrays[f"{split}_labels"]).reshape(-1)
    except KeyError:
        raise DownloadError(f"{npz_path}: has {split}_images but no {split}_labels") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DownloadError(f"{npz_path}: cannot read the {split} arrays ({err})") from None
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DownloadError(f"{npz_path}: {split}_images is {images.dtype} {images.shape}, expected uint8 N x H x W")
    if len(labels) != len(images) or not np.isin(labels, (0, 1)).all():
        raise DownloadError(f"{npz_path}: {split}_labels must hold one 0/1 label per image")
    return images, labels.astype(np.int64)


def _write_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(root / CLASSES[label] / f"{split}_{index:05d}.png")


def _medmnist_source(size: int) -> tuple[str, str]:
    """URL and MD5 of PneumoniaMNIST at ``size`` px: the installed medmnist's, else the built-in table's."""
    if size not in _MEDMNIST_SOURCES:
        sizes = ", ".join(map(str, _MEDMNIST_SOURCES))
        raise UnknownNameError(f"PneumoniaMNIST has no size {size} (sizes: {sizes})")
    info = _installed_medmnist_info()
    suffix = "" if size == 28 else f"_{size}"
    url, md5 = info.get(f"url{suffix}"), info.get(f"MD5{suffix}")
    if isinstance(url, str) and isinstance(md5, str):
        return url, md5
    return _MEDMNIST_SOURCES[size]


def _installed_medmnist_info() -> dict[str, Any]:
    """``medmnist.INFO["pneumoniamnist"]``, or {} when medmnist is not installed.

    Read from ``medmnist/info.py`` as a literal instead of importing medmnist, whose ``__init__`` imports
    torch (seconds), creates ``~/.medmnist`` and may print to stdout.
    """
    try:
        spec = importlib.util.find_spec("medmnist")
        if spec is None or not spec.submodule_search_locations:
            return {}
        source = Path(next(iter(spec.submodule_search_locations)), "info.py").read_text(encoding="utf-8")
        for node in ast.parse(source).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "INFO" for t in node.targets):
                info = ast.literal_eval(node.value)
                return dict(info.get("pneumoniamnist", {}))
    except (ImportError, OSError, SyntaxError, ValueError, TypeError, AttributeError):
        pass  # an unexpected medmnist version: the built-in table is right for the files we know
    return {}


# ---------------------------------------------------------------------------------------------------- Kaggle


def _kaggle_error(err: Exception) -> DownloadError | None:
    """A one-line DownloadError for a kagglehub / requests failure; None for other errors (bugs)."""
    import requests

    offline = (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError, socket.gaierror)
    if isinstance(err, offline):
        return _unreachable(_kaggle_host(err), err)
    if isinstance(err, requests.RequestException) or type(err).__module__.startswith("kagglehub"):
        message = " ".join(str(err).split()) or type(err).__name__
        return DownloadError(f"Kaggle download of {KAGGLE_HANDLE} failed: {message}. {MANUAL_HINT}")
    return None


def _kaggle_host(err: BaseException) -> str:
    request = getattr(err, "request", None)
    host = urlsplit(getattr(request, "url", None) or "").hostname
    if host:
        return host
    match = re.search(r"host='([^']+)'", str(err))
    return match.group(1) if match else "www.kaggle.com"
