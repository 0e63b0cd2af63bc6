"""Atomic writes: an artefact appears under its final name complete, or not at all, and never at a user's expense.

Every write is built under a hidden temporary name beside its destination (``.pneumolab-tmp-<pid>-<host>-...``),
flushed to disk (the file, then its folder) and renamed into place. A folder that replaces an existing one is
swapped in with one ``renameat2(RENAME_EXCHANGE)`` where the file system has it (the old copy then leaves under the
temporary name and is removed); elsewhere the old copy is renamed aside (``.pneumolab-old-...``) first, so a crash
between the two renames leaves the old copy, which the next writer puts back. Either way a crash leaves the old or
the new copy under the destination's name, never neither.

A folder written for a user-named destination (``--out``) states its `FolderKind`: an existing folder of another
kind (a user's folder with their files in it) is refused with an `OutputError` unless ``force`` is given.

Temporary names carry the writer's pid and host, so the next writer to the same folder removes those of writers
that died (``kill -9``); concurrent writers to one destination publish one after the other (a `flock` on the
parent folder), each whole. A full disk (``ENOSPC``, ``EDQUOT``, ``EFBIG``) is one `OutputError` naming the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumolab.errors import OutputError

__all__ = [
    "FolderKind",
    "atomic_dir",
    "atomic_path",
    "check_destination",
    "clean_stale",
    "file_sha256",
    "fsync_tree",
    "process_alive",
    "write_json_atomic",
    "write_text_atomic",
]

_PREFIX = ".pneumolab-"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # another host's pids mean nothing here
_STALE = re.compile(r"\.pneumolab-(tmp|old)-(\d+)-([0-9a-f]{8})-[^.]{8}\.(.+)\.tmp")
_NAME_ROOM = 180  # bytes of the destination's name kept in a temporary name (names are at most 255 bytes)
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass(frozen=True)
class FolderKind:
    """What a folder artefact is: an existing folder of this kind may be replaced, any other is refused.

    Attributes:
        name: what the folder is, for messages (``"model artefact"``).
        marker: a file every folder of this kind holds (``card.json``).
        contents: the only top-level names it may hold; None when it may hold anything beside the marker.
    """

    name: str
    marker: str
    contents: tuple[str, ...] | None = None

    def foreign(self, folder: Path) -> str | None:
        """Why `folder` is not one of this kind (None: it is, or it is empty)."""
        names = sorted(p.name for p in folder.iterdir())
        if not names:
            return None
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        if self.marker not in names:
            return f"holds {shown}, not a {self.name}"
        extra = [n for n in names if self.contents is not None and n not in self.contents]
        if extra:
            return f"holds {', '.join(extra[:3])} besides a {self.name}'s files"
        return None


def check_destination(dest: str | os.PathLike[str], kind: FolderKind | None, *, force: bool = False) -> None:
    """Raise `OutputError` when `dest` exists and may not be replaced by a folder of `kind` (None: any folder is).

    Writers call it before the work as well, so a refusal comes at once, not after an hour of it."""
    dest = Path(dest)
    if force or not os.path.lexists(dest):
        return
    if not dest.is_dir():
        reason = "exists and is not a folder"
    elif kind is None:
        return
    else:
        reason = kind.foreign(dest)
        if reason is None:
            return
    raise OutputError(f"{dest}: {reason}; choose another folder, or pass --force to replace it")


# ----------------------------------------------------------------------------------------------- temporaries


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_prefix(role: str) -> str:
    return f"{_PREFIX}{role}-{os.getpid()}-{_HOST}-"


def _temp_suffix(dest: Path) -> str:
    name = os.fsencode(dest.name)[:_NAME_ROOM].decode(errors="ignore")
    return f".{name}.tmp"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(parent: str | os.PathLike[str]) -> list[str]:
    """Remove the temporaries that dead writers on this host left in `parent`; put back an old copy that a writer
    killed mid-swap left aside while its destination is missing. Returns the names handled."""
    parent = Path(parent)
    handled = []
    try:
        entries = [e.name for e in os.scandir(parent) if e.name.startswith(_PREFIX)]
    except OSError:
        return handled
    for name in entries:
        match = _STALE.fullmatch(name)
        if not match:
            continue
        role, pid, host, dest_name = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        if host != _HOST or pid == os.getpid() or process_alive(pid):
            continue
        entry = parent / name
        if role == "old" and len(os.fsencode(dest_name)) >= _NAME_ROOM:
            continue  # the name was cut to fit: leave the old copy where it is rather than guess its name
        if role == "old" and not os.path.lexists(parent / dest_name):
            with contextlib.suppress(OSError):  # another writer restored it first
                os.rename(entry, parent / dest_name)
        else:
            _remove(entry)
        handled.append(name)
    return handled


# ------------------------------------------------------------------------------------------------ durability


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """fsync every file and folder under `path` (and `path` itself), so a rename never publishes unflushed bytes."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        for root, _, files in os.walk(path):
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    _fsync(Path(root, name))
            _fsync(Path(root))
    elif path.is_file():
        _fsync(path)


@contextlib.contextmanager
def _parent_locked(parent: Path) -> Iterator[None]:
    """Hold an exclusive flock on the parent folder: pneumolab's writers into it publish one at a time."""
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # a file system without flock (some NFS): publish unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` in one step (Linux renameat2); False where the system or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _publish(tmp: Path, dest: Path) -> None:
    """Put `tmp` in place of `dest` (which exists): swapped in one step, or the old copy renamed aside first."""
    if _exchange(tmp, dest):
        _remove(tmp)  # now the old copy
        return
    aside = dest.parent / f"{_temp_prefix('old')}{secrets.token_hex(4)}{_temp_suffix(dest)}"
    os.rename(dest, aside)
    os.rename(tmp, dest)  # a crash before this line leaves the old copy aside; `clean_stale` puts it back
    _fsync(dest.parent)
    _remove(aside)


def _full_disk(error: OSError, dest: Path) -> OutputError:
    why = {errno.EFBIG: "file too large for this file system or the process's file size limit"}
    reason = why.get(error.errno, os.strerror(error.errno or 0).lower())
    return OutputError(f"{dest}: cannot write ({reason}); free some space or write elsewhere")


# ------------------------------------------------------------------------------------------------------ writers


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give the result the permissions open() would."""
    os.chmod(path, mode & ~_umask())


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is flushed and renamed onto `dest`, on error removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix("tmp"), suffix=_temp_suffix(dest), dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    _usual_mode(tmp, 0o666)
    try:
        yield tmp
        fsync_tree(tmp)
        os.replace(tmp, dest)
        _fsync(dest.parent)
    except OSError as error:
        if error.errno in _FULL:
            raise _full_disk(error, dest) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(
    dest: str | os.PathLike[str],
    *,
    kind: FolderKind | None = None,
    force: bool = False,
    keep_existing: bool = False,
) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success it replaces `dest`, on error it is removed.

    Args:
        dest: the folder to write.
        kind: what the folder is; an existing `dest` of another kind (not empty) is refused with `OutputError`,
            before the work and again when publishing. None: `dest` is a name pneumolab owns; any folder there is
            replaced.
        force: replace an existing `dest` whatever it holds.
        keep_existing: a `dest` that appeared meanwhile (another process built the same content-keyed folder) is
            kept and the new copy dropped, so no reader ever sees its folder deleted.
    """
    dest = Path(dest)
    if not keep_existing:
        check_destination(dest, kind, force=force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix("tmp"), suffix=_temp_suffix(dest), dir=dest.parent))
    _usual_mode(tmp, 0o777)
    try:
        yield tmp
        fsync_tree(tmp)
        with _parent_locked(dest.parent):
            if os.path.lexists(dest):
                if keep_existing:
                    return
                check_destination(dest, kind, force=force)  # another writer may have put a folder there meanwhile
                _publish(tmp, dest)
            else:
                os.rename(tmp, dest)
            _fsync(dest.parent)
    except OSError as error:
        if error.errno in _FULL:
            raise _full_disk(error, dest) from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(dest: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `dest` atomically and return the path."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def write_json_atomic(dest: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` as indented JSON to `dest` atomically and return the path."""
    return write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
