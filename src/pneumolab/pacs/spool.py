"""The durable spool and the journal: nothing acknowledged is ever lost, and every study's story is on disk.

Layout under the spool folder::

    tmp/                       instances being written (temporary names; cleared on start)
    incoming/<study>/<sop>.dcm received, acknowledged, waiting for the study's quiet period
    work/<batch>/              a batch handed to the worker: its instances, then results/ and outcome.json
    done/<batch>/              sent: outcome.json (the instances are removed); seen.txt lists processed SOP UIDs
    failed/<batch>/            could not be sent after the retries: reason.json beside everything else
    journal.jsonl              one JSON object a line: time, study, batch, event, counts and reasons

An instance is written under a temporary name, flushed and fsync'ed, then renamed into ``incoming/`` and the
folder fsync'ed: only then does the C-STORE handler answer success. A batch moves between folders by rename, so a
``kill -9`` at any moment leaves every instance in exactly one place, and `Spool.recover` resumes from there.

Study folders are named by the Study Instance UID (UIDs are digits and dots), never by a patient's name or id;
neither appears in the journal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Spool", "StoredInstance", "batch_study", "safe_uid"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def safe_uid(uid: str) -> str | None:
    """`uid` when it is a well-formed DICOM UID (safe as a file name), else None."""
    uid = str(uid).strip().rstrip("\x00")
    return uid if 0 < len(uid) <= 64 and _UID.match(uid) else None


def batch_study(batch: Path) -> str:
    """The Study Instance UID a batch folder (``<study>~<time>~<n>``, `Spool.take_batch`) belongs to."""
    return batch.name.split("~")[0]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class StoredInstance:
    """Where one acknowledged instance lies, and how many bytes it has."""

    study: str
    sop: str
    path: Path
    size: int


class Spool:
    """The spool folder (module doc): durable writes, batches by rename, and the journal.

    Args:
        root: The spool folder (created).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        for name in ("tmp", "incoming", "work", "done", "failed"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self.journal_path = self.root / "journal.jsonl"
        # the handler's rename into incoming/<study> and the dispatcher's rename of that folder take turns
        self._lock = threading.Lock()
        self._journal_lock = threading.Lock()
        self._batch_counter = 0

    # --- receiving ---------------------------------------------------------------------------------------

    def store(self, study: str, sop: str, parts: list[bytes]) -> StoredInstance:
        """Write an instance's bytes durably into ``incoming/<study>/<sop>.dcm`` (temporary name, fsync, rename,
        fsync of the folder); a duplicate SOP Instance UID replaces the earlier copy."""
        tmp = self.root / "tmp" / f"{sop}.{threading.get_ident()}.{time.monotonic_ns()}.part"
        size = 0
        with open(tmp, "wb") as fp:
            for part in parts:
                fp.write(part)
                size += len(part)
            fp.flush()
            os.fsync(fp.fileno())
        with self._lock:
            folder = self.root / "incoming" / study
            created = not folder.is_dir()
            folder.mkdir(exist_ok=True)
            target = folder / f"{sop}.dcm"
            os.replace(tmp, target)
            _fsync_dir(folder)
            if created:
                _fsync_dir(folder.parent)
        return StoredInstance(study, sop, target, size)

    def free_bytes(self) -> int:
        """Free bytes on the spool's file system."""
        return shutil.disk_usage(self.root).free

    # --- batches -----------------------------------------------------------------------------------------

    def pending_studies(self) -> dict[str, float]:
        """Studies in ``incoming/`` and the time (epoch seconds) their last instance arrived."""
        out = {}
        for folder in (self.root / "incoming").iterdir():
            times = [p.stat().st_mtime for p in folder.glob("*.dcm")]
            out[folder.name] = max(times, default=folder.stat().st_mtime)
        return out

    def take_batch(self, study: str) -> Path:
        """Move ``incoming/<study>`` to ``work/<batch>`` (one rename); later instances start a new folder."""
        with self._lock:
            self._batch_counter += 1
            batch = f"{study}~{time.time_ns()}~{self._batch_counter}"
            target = self.root / "work" / batch
            os.replace(self.root / "incoming" / study, target)
            _fsync_dir(self.root / "work")
        return target

    def work_batches(self) -> list[Path]:
        """Batches handed out and not finished (after a restart: to be resumed), oldest first."""
        return sorted((self.root / "work").iterdir(), key=lambda p: p.name.split("~")[1:])

    def seen(self, study: str) -> set[str]:
        """SOP Instance UIDs of this study processed in earlier batches."""
        file = self.root / "done" / study / "seen.txt"
        return set(file.read_text().split()) if file.is_file() else set()

    def finish(self, batch: Path, outcome: dict[str, Any], *, failed_reason: str | None = None) -> Path:
        """Close a batch: sent (``done/``; its instances removed, their UIDs added to the study's seen list) or
        failed (``failed/`` with ``reason.json``, everything kept)."""
        study = batch_study(batch)
        if failed_reason is not None:
            (batch / "reason.json").write_text(json.dumps({"reason": failed_reason}) + "\n")
            target = self.root / "failed" / batch.name
            os.replace(batch, target)
            return target
        done = self.root / "done" / study
        done.mkdir(parents=True, exist_ok=True)
        sops = [p.stem for p in batch.glob("*.dcm")]
        with open(done / "seen.txt", "a") as fp:
            fp.write("".join(f"{s}\n" for s in sops))
            fp.flush()
            os.fsync(fp.fileno())
        (done / f"{batch.name}.json").write_text(json.dumps(outcome) + "\n")
        shutil.rmtree(batch)
        return done

    def recover(self) -> None:
        """After a crash: drop half-written temporary files (never acknowledged)."""
        for part in (self.root / "tmp").glob("*.part"):
            part.unlink(missing_ok=True)

    # --- journal -----------------------------------------------------------------------------------------

    def journal(self, event: str, **fields: Any) -> None:
        """Append one event (time, event, fields) to the journal, fsync'ed."""
        line = json.dumps({"time": round(time.time(), 3), "event": event, **fields}, sort_keys=False) + "\n"
        with self._journal_lock, open(self.journal_path, "a") as fp:
            fp.write(line)
            fp.flush()
            os.fsync(fp.fileno())

    def events(self) -> Iterator[dict[str, Any]]:
        """The journal's events in order (a torn last line after a crash is skipped)."""
        if not self.journal_path.is_file():
            return
        for line in self.journal_path.read_text().splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
