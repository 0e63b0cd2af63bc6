"""Read what a run folder holds, for plots and reports: every file is optional, nothing is recomputed.

A trained run has ``config.yaml``, ``split.csv``, ``history.csv`` and ``env.json``; after evaluation
``operating_point.json``, ``predictions/{val,test}[_tta].csv`` and ``metrics/{val,test}[_tta].json``, and, since the
input gate and referral band, ``gate/scores.csv`` and ``metrics/selective.json`` (with ``gate`` and ``referral`` in
the operating point). An ensemble folder has the predictions, metrics and an ``env.json`` with an ``ensemble`` entry,
but no history and no gate. Every path and column is `pneumolab.runs`'s. A missing file is ``None`` here; a file
that exists but cannot be read raises `ArtefactError` naming the file and the reason.

A K-class run (``data.task: kind`` or ``folders`` with more than two classes) writes predictions
``path,label,prediction,probability,p_<CLASS>...,logit_<CLASS>...`` (label and prediction are class indices,
``probability`` is P(not the first class), P(PNEUMONIA) for NORMAL-first tasks) and metrics that name their
``classes``. An evaluation is K-class when its metrics name more than two classes or, without metrics, its
predictions have more than two ``p_`` columns; `Evaluation.pneumonia_view` turns it into the binary evaluation of
its pneumonia-vs-normal view, which the binary parts of the report (comparison columns, calibration, overlap,
reliability) read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy.special import logsumexp

from pneumolab.constants import CLASSES
from pneumolab.errors import ArtefactError
from pneumolab.runs import (
    BINARY_PREDICTION_COLUMNS,
    EVALUATED_SPLITS,
    GATE_SCORE_COLUMNS,
    TTA_SUFFIX,
    RunDir,
    class_logit_columns,
    class_probability_columns,
    predicted_classes,
)

SPLITS = EVALUATED_SPLITS
SPLIT_NAMES = {"val": "validation", "test": "test"}
# every predictions table has these; ``logit`` may be absent (runs evaluated before it was written)
PREDICTION_COLUMNS = tuple(c for c in BINARY_PREDICTION_COLUMNS if c != "logit")
PNEUMONIA_VIEW = "pneumonia_vs_normal"
KIND_VIEW = "bacterial_vs_viral"
SPLIT_FILE_COLUMNS = ("path", "split", "patient_id")

# gate/scores.csv groups: (short name for legends, what the group is)
GATE_GROUPS = {
    "val": ("validation", "validation films (the limit was set on them)"),
    "test": ("test", "test films (real chest X-rays: every refusal is a false refusal)"),
    "far-ood": (
        "far OOD",
        "far out-of-distribution: photos, documents, charts, noise, DICOM test files that pass the metadata check",
    ),
    "far-ood-metadata": (
        "far OOD, metadata",
        "DICOM test files refused by their metadata (modality, body part, view, frames) before the content gate",
    ),
    "near-rot90": ("near: rot90", "near out-of-distribution: test films turned a quarter"),
    "near-negated": ("near: negated", "near out-of-distribution: test films with inverted polarity"),
    "near-corner_zoom": ("near: corner zoom", "near out-of-distribution: the top-left quarter of test films blown up"),
    "near-lateral_crop": (
        "near: lateral crop",
        "near out-of-distribution: the middle third of test films stretched to full width (lateral-looking)",
    ),
}


@dataclass(frozen=True)
class Evaluation:
    """The files of one evaluated variant: a split, with or without test-time augmentation."""

    split: str
    tta: bool
    metrics: dict[str, Any] | None = None
    predictions: pd.DataFrame | None = None
    classes: tuple[str, ...] = CLASSES
    """Class names in label order: ``NORMAL, PNEUMONIA`` for a binary evaluation."""

    @property
    def is_multiclass(self) -> bool:
        """Whether this is a K-class evaluation (more than two classes)."""
        return len(self.classes) > 2

    @property
    def key(self) -> str:
        """The file stem: ``test`` or ``test_tta``."""
        return f"{self.split}{TTA_SUFFIX}" if self.tta else self.split

    @property
    def label(self) -> str:
        """Human name: ``test`` or ``test + TTA``."""
        name = SPLIT_NAMES.get(self.split, self.split)
        return f"{name} + TTA" if self.tta else name

    def metric(self, key: str) -> float | None:
        """A finite metric value, or None when absent."""
        return finite(self.metrics.get(key)) if self.metrics else None

    def interval(self, key: str) -> tuple[float, float] | None:
        """The 95 % interval of a metric, or None when absent."""
        ci = (self.metrics or {}).get("ci95") or {}
        pair = ci.get(key)
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            return None
        low, high = finite(pair[0]), finite(pair[1])
        return None if low is None or high is None else (low, high)

    def confusion(self) -> np.ndarray | None:
        """``[[tn, fp], [fn, tp]]`` from the metrics file, else counted from the predictions' decisions.

        A K-class evaluation gives its K x K counts (rows: true class, columns: called class), from the metrics
        file's ``confusion`` entry, else counted from the predictions.
        """
        k = len(self.classes)
        if self.is_multiclass:
            cm = ((self.metrics or {}).get("confusion") or {}).get("counts")
        else:
            cm = (self.metrics or {}).get("confusion_matrix")
        if cm is not None:
            try:
                array = np.asarray(cm, dtype=np.float64)
            except (TypeError, ValueError):
                array = np.zeros(0)
            if array.shape == (k, k) and np.isfinite(array).all():
                return array.astype(np.int64)
        if self.predictions is not None:
            y = self.predictions["label"].to_numpy()
            pred = self.predictions["prediction"].to_numpy()
            return np.array([[np.sum((y == t) & (pred == p)) for p in range(k)] for t in range(k)], dtype=np.int64)
        return None

    def class_probabilities(self) -> np.ndarray | None:
        """The N x K calibrated class probabilities (``p_<CLASS>`` columns) of a K-class evaluation, else None."""
        if not self.is_multiclass or self.predictions is None:
            return None
        return self.predictions[class_probability_columns(self.classes)].to_numpy(dtype=np.float64)

    def class_logits(self) -> np.ndarray | None:
        """The N x K raw logits (``logit_<CLASS>``) of a K-class evaluation, or None when not all are saved."""
        if not self.is_multiclass or self.predictions is None:
            return None
        columns = class_logit_columns(self.classes)
        if any(c not in self.predictions for c in columns):
            return None
        values = self.predictions[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        return values if values.size and np.isfinite(values).all() else None

    def view_metrics(self, view: str) -> dict[str, Any] | None:
        """A K-class evaluation's binary view (``pneumonia_vs_normal``, ``bacterial_vs_viral``) metric object."""
        value = ((self.metrics or {}).get("views") or {}).get(view)
        return value if isinstance(value, dict) else None

    @cached_property
    def pneumonia_view(self) -> Evaluation | None:
        """The pneumonia-vs-normal view of a K-class evaluation as a binary evaluation; None otherwise.

        Its metrics are the metrics file's ``views.pneumonia_vs_normal`` (with the K-class ``temperature``,
        ``threshold_method`` and speed added); its predictions have ``label`` 1 for every film not of the first
        class, ``probability`` P(PNEUMONIA) = 1 - P(first class), ``prediction`` that probability at the view's
        threshold (without one, the argmax's call: not the first class), and ``logit`` the margin
        ``logsumexp(pneumonia logits) - logit of the first class``, whose sigmoid is P(PNEUMONIA) before temperature
        scaling and class bias. None for a K-class task whose first class is not NORMAL.
        """
        if not self.is_multiclass or self.classes[0] != CLASSES[0]:
            return None
        metrics = self.view_metrics(PNEUMONIA_VIEW)
        if metrics is not None:
            metrics = dict(metrics)
            for key in ("temperature", "threshold_method", "inference_images_per_s", "eval_seconds"):
                if key in (self.metrics or {}):
                    metrics.setdefault(key, self.metrics[key])
        table = None
        if self.predictions is not None:
            threshold = finite((metrics or {}).get("threshold"))
            probability = self.predictions["probability"].to_numpy(dtype=np.float64)
            called = probability >= threshold if threshold is not None else self.predictions["prediction"] != 0
            logits = self.class_logits()
            table = pd.DataFrame(
                {
                    "path": self.predictions["path"],
                    "label": (self.predictions["label"] != 0).astype(np.int64),
                    "probability": probability,
                    "prediction": np.asarray(called, dtype=np.int64),
                    "logit": np.nan if logits is None else logsumexp(logits[:, 1:], axis=1) - logits[:, 0],
                }
            )
        if metrics is None and table is None:
            return None
        return Evaluation(self.split, self.tta, metrics, table)

    def logits(self) -> np.ndarray | None:
        """The saved logit margins (logit1 - logit0, before temperature scaling), or None when not every image has one.

        An ensemble's predictions have no ``logit`` column, or an empty one.
        """
        if self.predictions is None or "logit" not in self.predictions:
            return None
        values = pd.to_numeric(self.predictions["logit"], errors="coerce").to_numpy(dtype=np.float64)
        return values if values.size and np.isfinite(values).all() else None


@dataclass
class RunFiles:
    """Everything a run folder holds that a report shows; absent files are None."""

    path: Path
    config: dict[str, Any] | None = None
    env: dict[str, Any] | None = None
    history: pd.DataFrame | None = None
    operating_point: dict[str, Any] | None = None
    split_table: pd.DataFrame | None = None
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    gate_scores: pd.DataFrame | None = None
    selective: dict[str, Any] | None = None
    overlap: dict[str, Any] | None = None  # metrics/overlap.json, as evaluation wrote it

    @property
    def run_dir(self) -> RunDir:
        """The folder's paths (`pneumolab.runs.RunDir`)."""
        return RunDir(self.path)

    @property
    def name(self) -> str:
        """The run's name: its folder name."""
        return self.path.name or self.path.resolve().name

    @property
    def ensemble(self) -> dict[str, Any] | None:
        """The ``ensemble`` entry of env.json, for an ensemble folder."""
        value = (self.env or {}).get("ensemble")
        return value if isinstance(value, dict) else None

    def evaluation(self, split: str, tta: bool = False) -> Evaluation | None:
        """The evaluated variant, or None when neither its metrics nor its predictions exist."""
        return self.evaluations.get(f"{split}{TTA_SUFFIX}" if tta else split)

    @property
    def classes(self) -> tuple[str, ...]:
        """The run's classes in label order: its first K-class evaluation's, else ``NORMAL, PNEUMONIA``."""
        return next((e.classes for e in self.evaluations.values() if e.is_multiclass), CLASSES)

    @property
    def is_multiclass(self) -> bool:
        """Whether the run's evaluations are K-class (more than two classes)."""
        return len(self.classes) > 2

    def threshold(self, split: str, tta: bool = False) -> float | None:
        """The decision threshold of a variant: its metrics file, else the operating point's.

        For a K-class variant, which decides by argmax, it is the threshold of its pneumonia-vs-normal view.
        """
        evaluation = self.evaluation(split, tta)
        if evaluation is not None and evaluation.is_multiclass:
            evaluation = evaluation.pneumonia_view
        value = evaluation.metric("threshold") if evaluation else None
        if value is None and self.operating_point:
            variants = self.operating_point.get("variants") or {}
            point = variants.get("tta" if tta else "plain") or self.operating_point
            value = finite(point.get("threshold"))
        return value

    def variant_point(self, tta: bool = False) -> dict[str, Any] | None:
        """The operating point of one variant (plain or TTA): its ``variants`` entry, else the whole point."""
        if not self.operating_point:
            return None
        point = (self.operating_point.get("variants") or {}).get("tta" if tta else "plain")
        return point if isinstance(point, dict) else self.operating_point

    @property
    def chosen_tta(self) -> bool | None:
        """Whether the operating point chose the TTA variant (None when not evaluated)."""
        if not self.operating_point:
            return None
        return bool(self.operating_point.get("tta"))

    @property
    def gate_facts(self) -> dict[str, Any] | None:
        """The input gate's facts (`FeatureGate.describe`): the operating point's, else ``metrics/selective.json``'s."""
        return _facts(self.operating_point, "gate") or _facts(self.selective, "gate")

    @property
    def referral_facts(self) -> dict[str, Any] | None:
        """The referral band's facts (`ReferralBand.describe`): the operating point's, else the selective file's."""
        return _facts(self.operating_point, "referral") or _facts(self.selective, "referral")

    @property
    def best_epoch(self) -> int | None:
        """The selected epoch: env.json's training summary, else the best validation loss of the history."""
        summary = (self.env or {}).get("train_summary") or {}
        if finite(summary.get("best_epoch")) is not None:
            return int(summary["best_epoch"])
        history = self.history
        if history is not None and "val_loss" in history and history["val_loss"].notna().any():
            return int(history.loc[history["val_loss"].idxmin(), "epoch"])
        return None


def _facts(mapping: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    value = (mapping or {}).get(key)
    return value if isinstance(value, dict) and value else None


def finite(value: Any) -> float | None:
    """`value` as a float when it is a finite number, else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtefactError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(value, dict):
        raise ArtefactError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_yaml(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ArtefactError(f"{path}: not readable YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise ArtefactError(f"{path}: expected a mapping of settings")
    return value


def _read_csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ArtefactError(f"{path}: not a readable CSV table ({str(error).splitlines()[0]})") from None


def _read_history(path: Path) -> pd.DataFrame | None:
    table = _read_csv(path)
    if table is None or table.empty:
        return None
    if "epoch" not in table:
        raise ArtefactError(f"{path}: no 'epoch' column")
    for column in table.columns:
        table[column] = pd.to_numeric(table[column], errors="coerce")
    return table.dropna(subset=["epoch"]).sort_values("epoch").reset_index(drop=True)


def _require_columns(table: pd.DataFrame, columns, path: Path) -> None:
    missing = [c for c in columns if c not in table]
    if missing:
        raise ArtefactError(f"{path}: missing column(s) {', '.join(missing)}")


def _metric_classes(metrics: dict[str, Any] | None, path: Path) -> tuple[str, ...] | None:
    """The ``classes`` a metrics file names, when it names more than two (a K-class evaluation)."""
    classes = (metrics or {}).get("classes")
    if classes is None:
        return None
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise ArtefactError(f"{path}: 'classes' must be a list of class names")
    return tuple(classes) if len(classes) > 2 else None


def _column_classes(table: pd.DataFrame) -> tuple[str, ...] | None:
    """The classes of the ``p_<CLASS>`` columns of a predictions table, when there are more than two."""
    classes = predicted_classes(table.columns)
    return classes if len(classes) > 2 else None


def _read_predictions(path: Path, classes: tuple[str, ...] | None = None) -> pd.DataFrame | None:
    """A predictions CSV; K-class (`classes`, else its ``p_`` columns, naming more than two) or binary."""
    table = _read_csv(path)
    if table is None:
        return None
    _require_columns(table, PREDICTION_COLUMNS, path)
    classes = classes or _column_classes(table)
    if classes is not None:
        _require_columns(table, class_probability_columns(classes), path)
    if table.empty:
        return None
    table["path"] = table["path"].astype(str)
    for column in ("label", "prediction"):
        values = pd.to_numeric(table[column], errors="coerce")
        if classes is None and not values.isin((0, 1)).all():
            raise ArtefactError(f"{path}: column {column!r} must hold 0 (NORMAL) or 1 (PNEUMONIA) only")
        if classes is not None and not values.isin(range(len(classes))).all():
            raise ArtefactError(
                f"{path}: column {column!r} must hold class indices 0 to {len(classes) - 1} ({', '.join(classes)}) only"
            )
        table[column] = values.astype(np.int64)
    for column in class_probability_columns(classes or ()):
        values = pd.to_numeric(table[column], errors="coerce")
        if not (values.notna().all() and values.between(0, 1).all()):
            raise ArtefactError(f"{path}: column {column!r} must hold numbers within [0, 1]")
        table[column] = values.astype(float)
    probability = pd.to_numeric(table["probability"], errors="coerce")
    if not (probability.notna().all() and probability.between(0, 1).all()):
        raise ArtefactError(f"{path}: column 'probability' must hold numbers within [0, 1]")
    table["probability"] = probability.astype(float)
    return table


_TRUTH = {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}


def read_gate_scores(path: Path) -> pd.DataFrame | None:
    """``gate/scores.csv`` (``group``, ``name``, ``gate_score``, ``refused``), or None when absent or empty.

    ``gate_score`` is a float (NaN for files refused by their metadata, which the content gate never scored),
    ``refused`` a bool.

    Raises:
        ArtefactError: the file exists but is unreadable, lacks a column or holds a ``refused`` that is not a truth
            value.
    """
    table = _read_csv(path)
    if table is None:
        return None
    _require_columns(table, GATE_SCORE_COLUMNS, path)
    if table.empty:
        return None
    table["group"] = table["group"].astype(str)
    table["name"] = table["name"].astype(str)
    table["gate_score"] = pd.to_numeric(table["gate_score"], errors="coerce").astype(float)
    if table["refused"].dtype != bool:
        refused = table["refused"].astype(str).str.strip().str.lower().map(_TRUTH)
        if refused.isna().any():
            raise ArtefactError(f"{path}: column 'refused' must hold True or False only")
        table["refused"] = refused.astype(bool)
    return table


def read_split_table(path: Path) -> pd.DataFrame | None:
    """``split.csv`` (``path``, ``split``, ``patient_id``, ...) with text columns as text, or None when absent.

    Raises:
        ArtefactError: the file exists but is unreadable or lacks one of those columns.
    """
    table = _read_csv(path)
    if table is None:
        return None
    _require_columns(table, SPLIT_FILE_COLUMNS, path)
    for column in SPLIT_FILE_COLUMNS:
        table[column] = table[column].astype(str)
    return table


def read_config(path: Path) -> dict[str, Any] | None:
    """``config.yaml`` as a mapping, or None when absent (see `read_run`)."""
    return _read_yaml(path)


def read_run(run_dir: str | os.PathLike[str]) -> RunFiles:
    """Read every report-relevant file of a run folder that exists.

    Args:
        run_dir: a training run or ensemble folder.

    Returns:
        The files' contents; missing files are None (or absent from ``evaluations``).

    Raises:
        ArtefactError: the folder does not exist, holds none of the run files, or a file is unreadable.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ArtefactError(f"{path}: no such run folder")
    folder = RunDir(path)
    run = RunFiles(
        path=path,
        config=_read_yaml(folder.config),
        env=_read_json(folder.env),
        history=_read_history(folder.history),
        operating_point=_read_json(folder.operating_point),
        split_table=read_split_table(folder.split),
        gate_scores=read_gate_scores(folder.gate_scores),
        selective=_read_json(folder.selective_metrics),
        overlap=_read_json(folder.overlap_metrics),
    )
    for split in SPLITS:
        for tta in (False, True):
            suffix = TTA_SUFFIX if tta else ""
            stem = f"{split}{suffix}"
            metrics_path = folder.metrics(stem)
            metrics = _read_json(metrics_path)
            classes = _metric_classes(metrics, metrics_path)
            predictions = _read_predictions(folder.predictions(split, suffix), classes)
            if classes is None and predictions is not None:
                classes = _column_classes(predictions)
            if metrics is not None or predictions is not None:
                run.evaluations[stem] = Evaluation(split, tta, metrics, predictions, classes or CLASSES)
    known = (run.config, run.env, run.history, run.operating_point)
    if all(v is None for v in known) and not run.evaluations:
        raise ArtefactError(
            f"{path}: not a run folder (none of config.yaml, env.json, history.csv, metrics/, predictions/)"
        )
    return run
