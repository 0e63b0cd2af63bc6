"""The library's exceptions, in one place, each subclassing a built-in.

Every user-facing error carries one line that names the offending file (or setting) and the reason, so the
CLI can print it as is and exit with status 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from os import PathLike

__all__ = [
    "ArtefactError",
    "DatasetLayoutError",
    "DownloadError",
    "ImageReadError",
    "InputRefusedError",
    "MissingExtraError",
    "OutputError",
    "PneumolabError",
    "SettingError",
    "UnknownNameError",
    "did_you_mean",
]


class PneumolabError(Exception):
    """Base of every error that is the user's input, not a bug: the CLI prints it on one line and exits 2."""


class ImageReadError(PneumolabError, ValueError):
    """A file could not be read as an X-ray image (empty, truncated, not an image, unsupported, too large)."""

    def __init__(self, path: str | PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class InputRefusedError(PneumolabError, ValueError):
    """The input gate refused a readable file: it is not a frontal chest X-ray (by its metadata or its content)."""

    def __init__(self, path: str | PathLike[str], reason: str, gate_score: float | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.gate_score = gate_score
        super().__init__(f"{self.path}: refused: {reason}")


class ArtefactError(PneumolabError, ValueError):
    """A model or run file (checkpoint, card, weights, gate arrays, ONNX graph, a run folder's files) is missing,
    unreadable, of another format, or does not match what describes it."""


class MissingExtraError(PneumolabError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra to install."""


class DatasetLayoutError(PneumolabError, ValueError):
    """A dataset folder does not have the expected layout."""


class DownloadError(PneumolabError, OSError):
    """A download failed (offline, bad checksum, unsafe archive)."""


class OutputError(PneumolabError, OSError):
    """An output cannot be written: its destination holds something pneumolab must not replace (without
    ``--force``), or the disk is full."""


class SettingError(PneumolabError, ValueError):
    """A setting (flag, config value) is out of its allowed range or inconsistent with another."""


class UnknownNameError(PneumolabError, KeyError):
    """A name (model, preset, source ...) is not one of the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def did_you_mean(kind: str, name: str, known: Iterable[str]) -> UnknownNameError:
    """Build an `UnknownNameError` that suggests the closest known names."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}{hint} (known: {', '.join(known)})")
