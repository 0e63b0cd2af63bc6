"""Cross-validation results, read from the fold runs' saved evaluations (no model runs again).

Each fold run was trained on K-1 folds of ``train/`` and evaluated (`pneumolab.evaluate.runner.evaluate_run`) on
its validation fold and on test. From those files come:

- the out-of-fold predictions: every training film once, predicted by the one fold model that did not train on it
  (each in the variant, plain or TTA, its fold's operating point uses);
- per metric, the mean, standard deviation (n - 1) and the fold values, on validation and on test: how stable a
  figure is, and how much the test figures of models trained the same way vary;
- the CV ensemble: the mean of the K fold models' probabilities, with its operating point fit on the out-of-fold
  predictions (all of ``train/`` instead of one carve) and evaluated once on test.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumolab.errors import ArtefactError
from pneumolab.evaluate.calibration import ThresholdSelector
from pneumolab.evaluate.runner import (
    aligned_member_predictions,
    member_classes,
    member_predictions,
    saved_metrics,
    stack_probabilities,
    write_ensemble,
)
from pneumolab.fsutil import atomic_path, write_json_atomic
from pneumolab.runs import RunDir

__all__ = ["CV_FILE", "OOF_FILE", "cv_ensemble", "fold_summary", "out_of_fold_predictions", "summarise_cv"]

CV_FILE = "cv.json"
OOF_FILE = "oof.csv"
# proper scoring rules first: they keep ranking models after ROC-AUC saturates near 1
BINARY_KEYS = ("log_loss", "brier", "roc_auc", "average_precision", "accuracy", "balanced_accuracy", "recall",
               "specificity", "ece")  # fmt: skip
MULTICLASS_KEYS = ("log_loss", "brier", "macro_roc_auc", "accuracy", "balanced_accuracy", "macro_f1")


def out_of_fold_predictions(fold_runs: list[RunDir]) -> pd.DataFrame:
    """The fold runs' validation predictions, one table sorted by path with a ``fold`` column; a film predicted by
    two folds is an error (the runs are not folds of one partition)."""
    frames = [member_predictions(run, "val").assign(fold=k) for k, run in enumerate(fold_runs)]
    oof = pd.concat(frames, ignore_index=True)
    twice = oof["path"][oof["path"].duplicated()]
    if len(twice):
        raise ArtefactError(f"{twice.iloc[0]}: in the validation fold of more than one run (not one partition)")
    return oof.sort_values("path", ignore_index=True)


def _spread(values: list[float]) -> dict[str, Any]:
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    return {
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else None,
        "values": values,
    }


def fold_summary(fold_runs: list[RunDir]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"val" | "test": {metric: {"mean", "std", "values"}}}`` over the folds' used variants."""
    metrics = {split: [saved_metrics(run, split) for run in fold_runs] for split in ("val", "test")}
    keys = MULTICLASS_KEYS if "macro_f1" in metrics["val"][0] else BINARY_KEYS
    return {
        split: {key: _spread([m.get(key) for m in per_fold]) for key in keys if key in per_fold[0]}
        for split, per_fold in metrics.items()
    }


def cv_ensemble(
    fold_runs: list[RunDir],
    out: str | os.PathLike[str],
    *,
    threshold_method: str = "balanced_accuracy",
    target_sensitivity: float | None = None,
    n_resamples: int = 2000,
    oof: pd.DataFrame | None = None,
) -> dict[str, dict[str, Any]]:
    """Write the CV ensemble's folder (an ensemble folder like ``pneumolab run``'s, servable the same way): the
    mean of the fold models on test, its operating point fit on the out-of-fold predictions, which are its ``val``
    (`oof`, when the caller has read them already).
    """
    oof = out_of_fold_predictions(fold_runs) if oof is None else oof
    tests = aligned_member_predictions(fold_runs, "test")
    classes = member_classes(fold_runs, tests)
    k = len(fold_runs)
    combiner: dict[str, Any] = {"method": "mean", "combines": "probabilities", "weights": [1.0 / k] * k}
    if classes is not None:
        combiner["n_classes"] = len(classes)
    return write_ensemble(
        fold_runs,
        out,
        {"val": oof["path"], "test": tests[0]["path"]},
        {"val": oof["label"].to_numpy(), "test": tests[0]["label"].to_numpy()},
        {"val": stack_probabilities([oof], classes)[0], "test": stack_probabilities(tests, classes).mean(0)},
        classes,
        combiner,
        ThresholdSelector(threshold_method, target_sensitivity=target_sensitivity),
        n_resamples,
        cv={"folds": k, "val": "out-of-fold predictions: each training film by the fold model not trained on it"},
    )


def summarise_cv(
    fold_runs: list[RunDir],
    out: str | os.PathLike[str],
    *,
    threshold_method: str = "balanced_accuracy",
    target_sensitivity: float | None = None,
    n_resamples: int = 2000,
    **facts: Any,
) -> dict[str, Any]:
    """Write ``out/oof.csv``, the CV ensemble (``out/cv-ensemble/``) and ``out/cv.json`` (the fold summary, the
    pooled out-of-fold metrics and the CV ensemble's test metrics, plus `facts`); return what cv.json holds."""
    out = Path(out)
    oof = out_of_fold_predictions(fold_runs)
    with atomic_path(out / OOF_FILE) as tmp:
        oof.to_csv(tmp, index=False, float_format="%.7g")
    ensemble = cv_ensemble(
        fold_runs,
        out / "cv-ensemble",
        threshold_method=threshold_method,
        target_sensitivity=target_sensitivity,
        n_resamples=n_resamples,
        oof=oof,
    )
    summary = fold_summary(fold_runs)
    keys = list(summary["val"])
    result = {
        **facts,
        "folds": len(fold_runs),
        "runs": [str(run.path) for run in fold_runs],
        "per_fold": summary,
        "out_of_fold": {key: ensemble["val"].get(key) for key in keys} | {"n": ensemble["val"]["n"]},
        "cv_ensemble_test": {key: ensemble["test"].get(key) for key in keys} | {"n": ensemble["test"]["n"]},
        "cv_ensemble": str(out / "cv-ensemble"),
    }
    write_json_atomic(out / CV_FILE, result)
    return result
