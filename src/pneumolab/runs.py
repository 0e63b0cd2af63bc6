"""One run = one folder. Everything after training reads these files; nothing recomputes what a file holds.

```
RUN/config.yaml              the resolved TrainConfig
RUN/split.csv                path, split, label, patient_id of every image
RUN/history.csv              one row per finished epoch
RUN/checkpoints/last.pt      everything needed to resume (model, optimiser, schedule, scaler, EMA, epoch)
RUN/checkpoints/best.pt      the model of the best validation epoch, with its metadata
RUN/env.json                 versions, git sha, hardware, data fingerprint
RUN/predictions/, metrics/, plots/   written by evaluation and reports
RUN/.train.lock              flock-ed while a process trains the run (holds its pid and host)
```
Checkpoints hold only tensors and plain Python values, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from pneumolab.errors import ArtefactError, SettingError
from pneumolab.fsutil import atomic_path, write_json_atomic

__all__ = ["LOCK_FILE", "RunDir", "environment_info", "load_checkpoint", "save_checkpoint", "write_environment"]

LOCK_FILE = ".train.lock"


class RunDir:
    """Paths and small I/O helpers of a run folder."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def split(self) -> Path:
        return self.path / "split.csv"

    @property
    def history(self) -> Path:
        return self.path / "history.csv"

    @property
    def env(self) -> Path:
        return self.path / "env.json"

    @property
    def operating_point(self) -> Path:
        """Threshold, temperature and TTA fit on validation (written by evaluation, read by export and predict)."""
        return self.path / "operating_point.json"

    def used_suffix(self) -> str | None:
        """``"_tta"`` when the operating point uses the TTA variant, ``""`` for the plain one, None before
        evaluation: the suffix of the predictions and metrics files the model stands by."""
        if not self.operating_point.is_file():
            return None
        return "_tta" if json.loads(self.operating_point.read_text()).get("tta") else ""

    @property
    def gate(self) -> Path:
        """The input gate's arrays (``gate.safetensors``), fit during evaluation; its facts: the operating point."""
        return self.path / "gate.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    def create(self) -> RunDir:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        return self

    @contextlib.contextmanager
    def lock(self) -> Iterator[RunDir]:
        """Hold the run folder's exclusive lock (an flock on ``RUN/.train.lock``) for the block: one trainer per
        folder. Another process's lock is a `SettingError` at once; the kernel drops a lock whose process died, so a
        killed run never blocks its resume."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SettingError(
                f"{self.path}: another process is training this run ({holder}); wait for it to finish, or choose "
                "another --out"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            yield self
        finally:
            os.close(fd)  # releases the lock; the file stays (removing it would race with the next locker)

    def read_history(self) -> list[dict[str, str]]:
        if not self.history.is_file():
            return []
        with self.history.open(newline="") as f:
            return list(csv.DictReader(f))

    def write_history(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite history.csv atomically (a few hundred rows at most, so a rewrite per epoch is cheap)."""
        if not rows:
            return
        with atomic_path(self.history) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def save_checkpoint(state: dict[str, Any], dest: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary name, then rename: a killed run never leaves half a checkpoint."""
    with atomic_path(dest) as tmp:
        torch.save(state, tmp)
    return Path(dest)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: no arbitrary code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # corrupt file, foreign pickle: one clear line
        raise ArtefactError(f"{path}: not a loadable checkpoint ({type(error).__name__}: {error})") from None


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(**extra: Any) -> dict[str, Any]:
    """Versions, git sha and hardware, for ``env.json``; `extra` adds fields such as the data fingerprint."""
    cuda = torch.cuda.is_available()
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {
            name: _package_version(name)
            for name in ("pneumolab", "torch", "torchvision", "timm", "numpy", "scikit-learn", "pillow")
        },
        "git_sha": _git_sha(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_device_count": torch.cuda.device_count() if cuda else 0,
    }
    info.update(extra)
    return info


def write_environment(run: RunDir, **extra: Any) -> Path:
    """Write ``env.json`` for a run."""
    return write_json_atomic(run.env, environment_info(**extra))
