"""pneumolab: chest X-ray pneumonia classification (NORMAL vs PNEUMONIA)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pneumolab")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

CLASSES: tuple[str, str] = ("NORMAL", "PNEUMONIA")
"""Class names in label order: index 1, PNEUMONIA, is the positive class."""

__all__ = ["CLASSES", "__version__"]
