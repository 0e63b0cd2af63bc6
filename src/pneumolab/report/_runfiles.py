"""Read what a run folder holds, for plots and reports: every file is optional, nothing is recomputed.

A trained run has ``config.yaml``, ``split.csv``, ``history.csv`` and ``env.json``; after evaluation
``operating_point.json``, ``predictions/{val,test}[_tta].csv`` and ``metrics/{val,test}[_tta].json``, and, since the
input gate and referral band, ``gate/scores.csv`` and ``metrics/selective.json`` (with ``gate`` and ``referral`` in
the operating point). An ensemble folder has the predictions, metrics and an ``env.json`` with an ``ensemble`` entry,
but no history and no gate. A missing file is ``None`` here; a file that exists but cannot be read raises
`ArtefactError` naming the file and the reason.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pneumolab.errors import ArtefactError

SPLITS = ("val", "test")
SPLIT_NAMES = {"val": "validation", "test": "test"}
PREDICTION_COLUMNS = ("path", "label", "probability", "prediction")
SPLIT_FILE_COLUMNS = ("path", "split", "patient_id")
GATE_SCORE_COLUMNS = ("group", "name", "gate_score", "refused")

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

    @property
    def key(self) -> str:
        """The file stem: ``test`` or ``test_tta``."""
        return f"{self.split}_tta" if self.tta else self.split

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
        """``[[tn, fp], [fn, tp]]`` from the metrics file, else counted from the predictions' decisions."""
        cm = (self.metrics or {}).get("confusion_matrix")
        if cm is not None:
            array = np.asarray(cm)
            if array.shape == (2, 2):
                return array.astype(np.int64)
        if self.predictions is not None:
            y = self.predictions["label"].to_numpy()
            pred = self.predictions["prediction"].to_numpy()
            return np.array([[np.sum((y == t) & (pred == p)) for p in (0, 1)] for t in (0, 1)], dtype=np.int64)
        return None

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
        return self.evaluations.get(f"{split}_tta" if tta else split)

    def threshold(self, split: str, tta: bool = False) -> float | None:
        """The decision threshold of a variant: its metrics file, else the operating point's."""
        evaluation = self.evaluation(split, tta)
        value = evaluation.metric("threshold") if evaluation else None
        if value is None and self.operating_point:
            variants = self.operating_point.get("variants") or {}
            point = variants.get("tta" if tta else "plain") or self.operating_point
            value = finite(point.get("threshold"))
        return value

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


def _read_predictions(path: Path) -> pd.DataFrame | None:
    table = _read_csv(path)
    if table is None:
        return None
    _require_columns(table, PREDICTION_COLUMNS, path)
    if table.empty:
        return None
    table["path"] = table["path"].astype(str)
    for column in ("label", "prediction"):
        values = pd.to_numeric(table[column], errors="coerce")
        if not values.isin((0, 1)).all():
            raise ArtefactError(f"{path}: column {column!r} must hold 0 (NORMAL) or 1 (PNEUMONIA) only")
        table[column] = values.astype(np.int64)
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
    run = RunFiles(
        path=path,
        config=_read_yaml(path / "config.yaml"),
        env=_read_json(path / "env.json"),
        history=_read_history(path / "history.csv"),
        operating_point=_read_json(path / "operating_point.json"),
        split_table=read_split_table(path / "split.csv"),
        gate_scores=read_gate_scores(path / "gate" / "scores.csv"),
        selective=_read_json(path / "metrics" / "selective.json"),
    )
    for split in SPLITS:
        for tta in (False, True):
            stem = f"{split}_tta" if tta else split
            metrics = _read_json(path / "metrics" / f"{stem}.json")
            predictions = _read_predictions(path / "predictions" / f"{stem}.csv")
            if metrics is not None or predictions is not None:
                run.evaluations[stem] = Evaluation(split, tta, metrics, predictions)
    known = (run.config, run.env, run.history, run.operating_point)
    if all(v is None for v in known) and not run.evaluations:
        raise ArtefactError(
            f"{path}: not a run folder (none of config.yaml, env.json, history.csv, metrics/, predictions/)"
        )
    return run
