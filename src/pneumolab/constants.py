"""Facts every layer may read, kept below all of them so that no module imports the package root.

The root (`pneumolab/__init__.py`) re-exports the public API lazily and imports nothing else of the package; any
module that needs the version or the binary task's class names imports them from here.
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["CLASSES", "__version__"]

try:
    __version__ = version("pneumolab")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

CLASSES: tuple[str, str] = ("NORMAL", "PNEUMONIA")
"""The binary task's class names in label order: index 1, PNEUMONIA, is the positive class. A trained model's own
classes come from its checkpoint or card (`InferenceModel.classes`)."""
