"""The errors that only the models layer raises; both are `PneumolabError`s, so the CLI prints them on one line."""

from __future__ import annotations

from pneumolab.errors import PneumolabError

__all__ = ["WeightsFileError", "WeightsUnavailableError"]


class WeightsUnavailableError(PneumolabError, FileNotFoundError):
    """Weights that were asked for cannot be had: ImageNet weights offline, or a weights file that does not exist."""


class WeightsFileError(PneumolabError, ValueError):
    """A weights file exists but cannot be used: unreadable, or its keys or shapes do not fit the model."""
