"""The recipes shipped with the package: pipeline configs by name, so `pneumolab run` needs no file of its own.

The package's ``pneumolab/configs/`` is a link to the repository's ``configs/`` folder in the source tree (a wheel
holds the files). ``--config`` takes a file, or the name of a shipped recipe (``three-class``, or the default,
`DEFAULT_RECIPE`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pneumolab.errors import SettingError, did_you_mean

__all__ = ["DEFAULT_RECIPE", "list_recipes", "recipe_path"]

DEFAULT_RECIPE = "mobilenetv2-128-kermany-binary"
"""The recipe `make run` and `pneumolab run` use without ``--config`` (``configs/default.yaml`` before 0.2.0)."""


def _recipes_dir() -> Path:
    return Path(__file__).resolve().parent / "configs"


def list_recipes() -> list[str]:
    """The names of the shipped recipes, sorted.

    Returns:
        The pipeline configs' file names without ``.yaml``; search-space files beside them are left out.
    """
    folder = _recipes_dir()
    files = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    return [p.stem for p in files if re.search(r"^models:", p.read_text(), re.MULTILINE)]


def recipe_path(config: str | os.PathLike[str] | None = None) -> Path:
    """The config file `config` means: an existing file as given, else a shipped recipe by name; None: the default.

    Raises:
        SettingError: `config` is the old name ``default``.
        UnknownNameError: `config` is neither a file nor a shipped recipe (with the closest names).
    """
    if config is None:
        config = DEFAULT_RECIPE
    path = Path(config)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    shipped = _recipes_dir() / f"{name}.yaml"
    if shipped.is_file() and (path.parent == Path(".") or path.parent.name == "configs"):
        return shipped
    if name == "default":  # renamed in 0.2.0: say so rather than suggest the older default-224
        raise SettingError(f"{config}: no such file; the default recipe is {DEFAULT_RECIPE} since pneumolab 0.2.0 "
                           f"(configs/{DEFAULT_RECIPE}.yaml), or leave --config out")  # fmt: skip
    raise did_you_mean("config (no such file, nor a shipped recipe)", str(config), list_recipes())
