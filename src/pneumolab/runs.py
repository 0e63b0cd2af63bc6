"""One run = one folder. Everything after training reads these files; nothing recomputes what a file holds.

`RunDir` names every path of a run folder, and the constants below name the columns of its tables: the trainer,
the evaluation, the report and the loaders all take them from here, and the reference page
(``docs/reference/run-folder.md``) is generated from them. Checkpoints hold only tensors and plain Python values, so
they load with ``torch.load(weights_only=True)``.
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
from collections.abc import Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumolab.errors import ArtefactError, SettingError
from pneumolab.fsutil import atomic_path, write_json_atomic

if TYPE_CHECKING:
    import torch

__all__ = [
    "BINARY_PREDICTION_COLUMNS",
    "CLASS_LOGIT_PREFIX",
    "CLASS_PROBABILITY_PREFIX",
    "EVALUATED_SPLITS",
    "GATE_SCORE_COLUMNS",
    "LOCK_FILE",
    "TTA_SUFFIX",
    "VARIANT_SUFFIXES",
    "RunDir",
    "class_logit_columns",
    "class_prediction_columns",
    "class_probability_columns",
    "environment_info",
    "load_checkpoint",
    "predicted_classes",
    "save_checkpoint",
    "write_environment",
]

LOCK_FILE = ".train.lock"
EVALUATED_SPLITS = ("val", "test")  # the splits evaluation writes predictions and metrics for
TTA_SUFFIX = "_tta"  # the file-name suffix of the variant with TTA views
VARIANT_SUFFIXES = ("", TTA_SUFFIX)  # plain, with TTA views
BINARY_PREDICTION_COLUMNS = ("path", "label", "probability", "prediction", "logit")
CLASS_PROBABILITY_PREFIX = "p_"
CLASS_LOGIT_PREFIX = "logit_"
GATE_SCORE_COLUMNS = ("group", "name", "gate_score", "refused")


def class_probability_columns(classes: Iterable[str]) -> list[str]:
    """The ``p_<CLASS>`` columns (calibrated probabilities) of a K-class predictions CSV, in label order."""
    return [CLASS_PROBABILITY_PREFIX + c for c in classes]


def class_logit_columns(classes: Iterable[str]) -> list[str]:
    """The ``logit_<CLASS>`` columns (raw logits) of a K-class predictions CSV, in label order."""
    return [CLASS_LOGIT_PREFIX + c for c in classes]


def class_prediction_columns(classes: Iterable[str]) -> tuple[str, ...]:
    """The columns of a K-class predictions CSV, in order.

    ``label`` and ``prediction`` are class indices (``prediction`` the argmax), ``probability`` is 1 - P(first
    class), P(PNEUMONIA) for NORMAL-first tasks; then one ``p_<CLASS>`` (calibrated probability) and one
    ``logit_<CLASS>`` column (empty for an ensemble) per class, in label order.

    Args:
        classes: the model's classes in label order.
    """
    classes = list(classes)
    return ("path", "label", "prediction", "probability", *class_probability_columns(classes),
            *class_logit_columns(classes))  # fmt: skip


def predicted_classes(columns: Iterable[Any]) -> tuple[str, ...]:
    """The classes a predictions table's ``p_<CLASS>`` columns name, in order; empty for a binary table."""
    prefix = CLASS_PROBABILITY_PREFIX
    return tuple(str(c).removeprefix(prefix) for c in columns if str(c).startswith(prefix))


class RunDir:
    """Paths and small I/O helpers of a run folder."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def config(self) -> Path:
        """The resolved training config."""
        return self.path / "config.yaml"

    @property
    def split(self) -> Path:
        """Path, split, label, patient id (and kind, SHA-256) of every film (`pneumolab.data.splits`)."""
        return self.path / "split.csv"

    @property
    def history(self) -> Path:
        """One row per finished epoch."""
        return self.path / "history.csv"

    @property
    def env(self) -> Path:
        """Versions, git sha, hardware, data fingerprint (an ensemble's: its members and combiner)."""
        return self.path / "env.json"

    @property
    def checkpoints(self) -> Path:
        """The folder of the checkpoints."""
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        """Everything needed to resume (model, optimiser, schedule, scaler, EMA, epoch)."""
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        """The model of the best validation epoch, with its metadata."""
        return self.checkpoints / "best.pt"

    @property
    def lock_file(self) -> Path:
        """Locked (flock) while a process trains the run; holds its pid and host (`lock`)."""
        return self.path / LOCK_FILE

    @property
    def tensorboard(self) -> Path:
        """TensorBoard scalars, when the config asks for them."""
        return self.path / "tensorboard"

    @property
    def operating_point(self) -> Path:
        """Threshold, temperature and TTA fit on validation (written by evaluation, read by export and predict)."""
        return self.path / "operating_point.json"

    def used_suffix(self) -> str | None:
        """``"_tta"`` when the operating point uses the TTA variant, ``""`` for the plain one, None before
        evaluation: the suffix of the predictions and metrics files the model stands by."""
        if not self.operating_point.is_file():
            return None
        return TTA_SUFFIX if json.loads(self.operating_point.read_text()).get("tta") else ""

    @property
    def gate(self) -> Path:
        """The input gate's arrays (``gate.safetensors``), fit during evaluation; its facts: the operating point."""
        return self.path / "gate.safetensors"

    @property
    def gate_scores(self) -> Path:
        """The gate score of every val / test / out-of-distribution film scored (columns: `GATE_SCORE_COLUMNS`)."""
        return self.path / "gate" / "scores.csv"

    def predictions(self, split: str, suffix: str = "") -> Path:
        """One split's predictions, per film (``split``: val or test; ``suffix``: "" plain, "_tta" with TTA views).

        Binary columns: `BINARY_PREDICTION_COLUMNS` (``probability`` the calibrated P(PNEUMONIA), ``prediction``
        whether it reaches the threshold, ``logit`` the PNEUMONIA-minus-NORMAL margin, empty for an ensemble);
        K classes: `class_prediction_columns`.
        """
        return self.path / "predictions" / f"{split}{suffix}.csv"

    def metrics(self, name: str) -> Path:
        """A metrics file: ``{split}{suffix}`` (the metric object with 95 % bootstrap intervals; a K-class run's with
        ``classes``, ``confusion``, ``views``), or ``selective``, ``overlap``, ``stress``."""
        return self.path / "metrics" / f"{name}.json"

    @property
    def selective_metrics(self) -> Path:
        """What the input gate (and a binary model's referral band) did to val and test."""
        return self.metrics("selective")

    @property
    def overlap_metrics(self) -> Path:
        """The used test variant's metrics without the films that overlap train/val."""
        return self.metrics("overlap")

    @property
    def stress_metrics(self) -> Path:
        """The stress evaluation, ``{split: stress block}`` (``evaluate --stress``)."""
        return self.metrics("stress")

    @property
    def plots(self) -> Path:
        """The run's plots as PNG files, when plotted."""
        return self.path / "plots"

    @property
    def stress_plots(self) -> Path:
        """Grad-CAM of the films the stress evaluation flipped most."""
        return self.plots / "stress"

    def stress_plot(self, split: str, index: int) -> Path:
        """Grad-CAM of a split's `index`-th flipper, clean beside the perturbation that moved it most."""
        return self.stress_plots / f"{split}-{index}.png"

    def create(self) -> RunDir:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        return self

    @contextlib.contextmanager
    def lock(self) -> Iterator[RunDir]:
        """Hold the run folder's exclusive lock (an flock on ``RUN/.train.lock``) for the block: one trainer per
        folder. Another process's lock is a `SettingError` at once; the kernel drops a lock whose process died, so a
        killed run never blocks its resume."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
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
    import torch  # here, not at the top: the report reads run folders without loading torch

    with atomic_path(dest) as tmp:
        torch.save(state, tmp)
    return Path(dest)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: no arbitrary code from the file)."""
    import torch

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
    import torch

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
