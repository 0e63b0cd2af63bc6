"""`pneumolab cv`: K-fold patient-grouped, label-stratified cross-validation of a pipeline config's models.

For each model, fold k trains on the other K-1 folds of ``train/`` (`pneumolab.data.splits.assign_folds`: every
patient in exactly one validation fold, deterministic like the single carve) and is evaluated like any run of
``pneumolab run`` (operating point on its validation fold, then test). When all K folds are evaluated, the model's
folder gets the out-of-fold predictions, the fold summary and the CV ensemble (`pneumolab.evaluate.crossval`)::

    OUT/<model>/fold-<k>/        a normal run folder (trained on the other folds)
    OUT/<model>/oof.csv          every training film once, predicted by the fold model that did not see it
    OUT/<model>/cv.json          per metric: mean, std and fold values (validation and test); pooled out-of-fold
                                 metrics; the CV ensemble's test metrics
    OUT/<model>/cv-ensemble/     mean of the K fold models, operating point fit on the out-of-fold predictions

Like ``run``, it is idempotent and resumable, and `folds_to_run` trains a subset (`pneumolab sweep` spreads the folds
over workers this way); the summary is written once every fold is there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pneumolab.data.splits import check_design
from pneumolab.errors import SettingError
from pneumolab.pipeline import (
    PipelineConfig,
    dataset_root,
    model_train_config,
    prepare_data,
    run_evaluated,
    train_and_evaluate,
)
from pneumolab.progress import stderr_console
from pneumolab.runs import RunDir

__all__ = ["fold_run", "run_cv", "summarise_model"]


def fold_run(out: str | os.PathLike[str], model: str, fold: int) -> RunDir:
    """The run folder of `model`'s fold `fold` under `out`."""
    return RunDir(Path(out) / model / f"fold-{fold}")


def _check(folds: int, design: str, folds_to_run: Sequence[int] | None) -> None:
    if folds < 2:
        raise SettingError(f"--folds: cross-validation needs at least 2 folds, got {folds}")
    check_design(design)
    outside = sorted(set(folds_to_run or ()) - set(range(folds)))
    if outside:
        raise SettingError(f"--fold: {outside} not in 0 .. {folds - 1}")


def summarise_model(config: PipelineConfig, out: str | os.PathLike[str], model: str, folds: int, design: str):
    """Write the model's out-of-fold predictions, CV ensemble and cv.json when all its folds are evaluated; return
    the summary, or None while a fold is missing."""
    from pneumolab.evaluate.crossval import summarise_cv

    runs = [fold_run(out, model, k) for k in range(folds)]
    if not all(run_evaluated(run) for run in runs):
        return None
    return summarise_cv(
        runs,
        Path(out) / model,
        threshold_method=config.evaluate.threshold,
        target_sensitivity=config.evaluate.target_sensitivity,
        n_resamples=config.evaluate.resamples,
        model=model,
        design=design,
    )


def run_cv(
    config: PipelineConfig,
    out: str | os.PathLike[str],
    *,
    folds: int = 5,
    design: str = "random",
    data: str | os.PathLike[str] | None = None,
    only: list[str] | None = None,
    folds_to_run: Sequence[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Cross-validate the config's models (or `only` these) into `out`; return ``{model: cv summary or None}``.

    Args:
        design: which patients make each fold (`pneumolab.data.splits`: random, or time-ordered by patient number).
        folds_to_run: train and evaluate just these folds (all when None); the summary waits for the rest.
    """
    _check(folds, design, folds_to_run)
    config.model_names(only)  # unknown names fail before any work
    data_config = prepare_data(config, dataset_root(config, data), progress=progress)
    summaries: dict[str, Any] = {}
    for model in config.models:
        if only and model.name not in only:
            continue
        for k in range(folds) if folds_to_run is None else folds_to_run:
            stderr_console.print(f"[bold]cv[/bold] {model.name}: fold {k + 1} of {folds}", highlight=False)
            train_config = model_train_config(model, data_config, folds=folds, fold=k, split_design=design)
            train_and_evaluate(train_config, fold_run(out, model.name, k), config.evaluate, progress=progress)
        summaries[model.name] = summarise_model(config, out, model.name, folds, design)
    return summaries
