"""The classification task: which classes a run learns and how each film gets its label.

A task turns the manifest (one row per image, labelled by its class folder) into the labels a run trains and is
evaluated on:

* ``binary``: NORMAL vs PNEUMONIA, the folders of the Kermany release (the default; labels are the folder's).
* ``kind``: NORMAL / BACTERIAL / VIRAL on the same folders; a PNEUMONIA film's kind comes from its file name
  (``personN_bacteria_M``, ``personN_virus_M``, see `parse_name`). A PNEUMONIA film whose name tells neither kind
  cannot be labelled: the data check names it and training refuses it, it is never dropped silently.
* ``folders``: the class folders themselves, whatever their names (K >= 2), in sorted order; every split must
  hold the same class folders.

Label order is the order of `classes`. A binary task keeps PNEUMONIA as index 1, the positive class of every
binary metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pneumolab.constants import CLASSES
from pneumolab.data.dataset import folder_classes
from pneumolab.errors import DatasetLayoutError, did_you_mean

__all__ = ["KIND_CLASSES", "PNEUMONIA_KINDS", "TASK_NAMES", "Task", "get_task", "task_for_classes", "task_labels"]

TASK_NAMES = ("binary", "kind", "folders")
KIND_CLASSES: tuple[str, ...] = ("NORMAL", "BACTERIAL", "VIRAL")
_KIND_OF_NAME = {"bacteria": "BACTERIAL", "virus": "VIRAL"}
PNEUMONIA_KINDS: tuple[str, ...] = ("BACTERIAL", "VIRAL")
"""The classes of a three-class task that together make PNEUMONIA (its derived binary view)."""


@dataclass(frozen=True)
class Task:
    """One of `TASK_NAMES`; `folder_classes` are the class folders it reads (None: whatever the dataset has)."""

    name: str

    @property
    def folder_classes(self) -> tuple[str, ...] | None:
        return None if self.name == "folders" else CLASSES

    def classes_for(self, folder_classes: Sequence[str]) -> tuple[str, ...]:
        """The task's classes, given the class folders the dataset has (in label order)."""
        if self.name == "kind":
            return KIND_CLASSES
        return tuple(folder_classes)

    def unlabelled(self, manifest: pd.DataFrame) -> pd.DataFrame:
        """Rows the task cannot label (only ``kind``: PNEUMONIA films whose name says neither bacteria nor virus)."""
        if self.name != "kind":
            return manifest.iloc[:0]
        return manifest[(manifest["label_name"] != "NORMAL") & ~manifest["kind"].isin(list(_KIND_OF_NAME))]

    def relabel(
        self, manifest: pd.DataFrame, folders: Sequence[str] | None = None
    ) -> tuple[pd.DataFrame, tuple[str, ...]]:
        """The manifest with ``label`` / ``label_name`` set to the task's labels, and the task's classes.

        `folders` are the manifest's class folders in label order (default: the task's, else the manifest's own).

        Raises:
            DatasetLayoutError: a film the task cannot label (named, with how many more there are).
        """
        classes = self.classes_for(folders or self.folder_classes or folder_classes(manifest))
        if self.name != "kind":
            return manifest, classes
        bad = self.unlabelled(manifest)
        if len(bad):
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DatasetLayoutError(
                f"{bad['path'].iat[0]}: task 'kind' needs 'bacteria' or 'virus' in a PNEUMONIA film's name{more}; "
                "rename or remove it, or use task 'binary'"
            )
        names = np.where(
            manifest["label_name"] == "NORMAL", "NORMAL", manifest["kind"].map(_KIND_OF_NAME).fillna("NORMAL")
        )
        relabelled = manifest.assign(label_name=names, label=[classes.index(n) for n in names])
        return relabelled, classes


def get_task(name: str) -> Task:
    """The task called `name`.

    Raises:
        UnknownNameError: not one of `TASK_NAMES` (with a "did you mean").
    """
    if name not in TASK_NAMES:
        raise did_you_mean("task", name, TASK_NAMES)
    return Task(name)


def task_for_classes(classes: Sequence[str]) -> Task:
    """The task a model with these classes was trained on (its card records the classes, in output order)."""
    classes = tuple(classes)
    if classes == CLASSES:
        return Task("binary")
    if classes == KIND_CLASSES:
        return Task("kind")
    return Task("folders")


def task_labels(manifest: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """Each manifest row's label as a model with `classes` numbers it (the manifest is labelled by folder).

    Raises:
        DatasetLayoutError: the dataset cannot be labelled with those classes (other class folders, or films the
            task cannot label).
    """
    task = task_for_classes(classes)
    relabelled, found = task.relabel(manifest)
    if tuple(found) != tuple(classes):
        raise DatasetLayoutError(f"the dataset's classes {list(found)} are not the model's {list(classes)}")
    return relabelled["label"].to_numpy()
