"""pneumolab: chest X-ray pneumonia classification, from the dataset to a served model.

The public API lives in `pneumolab.api` and is re-exported here lazily (PEP 562): ``import pneumolab`` loads no
deep-learning library; ``pneumolab.load_model`` imports what it needs on first use. No module of the package imports
this root (shared constants are in `pneumolab.constants`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pneumolab.constants import __version__

if TYPE_CHECKING:
    from pneumolab.api import (
        Model,
        Prediction,
        Predictions,
        evaluate_model,
        list_bundled,
        list_models,
        list_recipes,
        load_model,
        run,
        train_model,
        training_config,
    )

__all__ = [
    "Model",
    "Prediction",
    "Predictions",
    "__version__",
    "evaluate_model",
    "list_bundled",
    "list_models",
    "list_recipes",
    "load_model",
    "run",
    "train_model",
    "training_config",
]

_LAZY = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    """Import `pneumolab.api` on first use of one of its names."""
    if name in _LAZY:
        value = getattr(importlib.import_module("pneumolab.api"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'pneumolab' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, the lazy ones included."""
    return sorted({*globals(), *__all__})
