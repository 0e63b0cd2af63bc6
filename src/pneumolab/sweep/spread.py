"""Spread a comparison or a cross-validation over workers: each model (or model and fold) one point of a grid study.

``pneumolab run --study NAME`` and ``pneumolab cv --study NAME`` call these first: every worker started with the
same study and storage takes waiting points (`pneumolab.sweep.study.run_grid`) and trains and evaluates them into
the shared ``--out`` folder, exactly as the plain command would. When no point is waiting or running (a worker
with nothing left to take waits for the others), the plain command runs and finds everything done: it trains
nothing, and writes the ensemble, the report or the CV summary (whichever worker gets there last writes the
complete one; writes are atomic). The value of a point is its validation log loss.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pneumolab.config import TrainConfig
from pneumolab.cv import fold_run
from pneumolab.evaluate.runner import saved_metrics
from pneumolab.pipeline import (
    EvaluateSettings,
    PipelineConfig,
    dataset_root,
    model_train_config,
    prepare_data,
    train_and_evaluate,
)
from pneumolab.runs import RunDir
from pneumolab.sweep.study import MACHINE_LOCAL, open_storage, run_grid

__all__ = ["spread_cv", "spread_pipeline"]


def _shared(config: PipelineConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", exclude={"data": MACHINE_LOCAL})


def _definition(kind: str, config: PipelineConfig, **facts: Any) -> dict[str, Any]:
    """What the grid's workers must agree on (not where each machine mounts the data or the output)."""
    return {"kind": kind, "config": _shared(config), **facts}


def _recorded_today(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded definition read through today's settings models (settings added since are at their defaults,
    except where `EvaluateSettings.from_record` knows what an earlier pneumolab did)."""
    config = recorded["config"]
    evaluate = EvaluateSettings.from_record(config.get("evaluate", {}))
    return {**recorded, "config": _shared(PipelineConfig.model_validate({**config, "evaluate": evaluate}))}


def _point_value(config: TrainConfig, run: RunDir, settings: EvaluateSettings, progress: bool) -> float:
    """Train and evaluate one grid point's run as the plain command would; its value is the validation log loss."""
    train_and_evaluate(config, run, settings, progress=progress)
    return float(saved_metrics(run, "val")["log_loss"])


def spread_pipeline(
    config: PipelineConfig,
    out: str | os.PathLike[str],
    *,
    study: str,
    storage: str | None = None,
    data: str | os.PathLike[str] | None = None,
    only: list[str] | None = None,
    progress: bool = True,
) -> int:
    """Work on the comparison's grid (one point per model) until none is waiting; return how many this worker did."""
    names = config.model_names(only)
    data_config = prepare_data(config, dataset_root(config, data), progress=progress)
    models = {m.name: m for m in config.models}

    def work(point: dict[str, Any]) -> float:
        train_config = model_train_config(models[point["model"]], data_config)
        return _point_value(train_config, RunDir(Path(out) / point["model"]), config.evaluate, progress)

    points = [{"model": name} for name in names if not only or name in only]
    return run_grid(
        study,
        open_storage(storage, out),
        points,
        work,
        definition=_definition("run", config),
        read_recorded=_recorded_today,
    )


def spread_cv(
    config: PipelineConfig,
    out: str | os.PathLike[str],
    *,
    study: str,
    folds: int,
    design: str = "random",
    storage: str | None = None,
    data: str | os.PathLike[str] | None = None,
    only: list[str] | None = None,
    progress: bool = True,
) -> int:
    """Work on the cross-validation's grid (one point per model and fold) until none is waiting."""
    names = config.model_names(only)
    data_config = prepare_data(config, dataset_root(config, data), progress=progress)
    models = {m.name: m for m in config.models}

    def work(point: dict[str, Any]) -> float:
        model, k = point["model"], int(point["fold"])
        train_config = model_train_config(models[model], data_config, folds=folds, fold=k, split_design=design)
        return _point_value(train_config, fold_run(out, model, k), config.evaluate, progress)

    points = [{"model": name, "fold": k} for name in names if not only or name in only for k in range(folds)]
    definition = _definition("cv", config, folds=folds, design=design)
    return run_grid(
        study, open_storage(storage, out), points, work, definition=definition, read_recorded=_recorded_today
    )
