"""`pneumolab sweep`: an Optuna search over a training config's settings, each trial a normal run folder.

The base is one model of a pipeline config (its data and evaluation settings are the study's); the space file
(`pneumolab.sweep.space`) says what varies. A trial trains ``OUT/trials/trial-<n>/`` and its value is the
objective at the trial's best epoch, read from its training history: validation only, test never read, no
evaluation run. Weak trials are pruned from their per-epoch validation figures (Optuna's median pruner). With
`folds`, a trial trains every fold (``trial-<n>/fold-<k>/``) and its value is the mean over folds, reported fold by
fold to the pruner. The chosen configuration is then evaluated once, by ``pneumolab run --config`` on the best
config that ``--show`` writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar

import optuna
from optuna.trial import Trial

from pneumolab.config import DataConfig, TrainConfig, apply_overrides
from pneumolab.errors import SettingError
from pneumolab.pipeline import EvaluateSettings, PipelineConfig, dataset_root, model_train_config, prepare_data
from pneumolab.runs import RunDir
from pneumolab.sweep.compute import relative_compute
from pneumolab.sweep.space import SweepSpace
from pneumolab.sweep.study import MACHINE_LOCAL, OVER_BUDGET, open_storage, open_study, run_worker
from pneumolab.train.callbacks import Callback, TrainerState

__all__ = ["PruningCallback", "base_model", "run_sweep", "trial_dir"]


class PruningCallback(Callback):
    """Report the objective after each epoch; when Optuna's pruner says the trial is weak, stop its training."""

    order: ClassVar[int] = 60

    def __init__(self, trial: Trial, objective: str) -> None:
        self.trial, self.objective, self.pruned = trial, objective, False

    def on_epoch_end(self, trainer: TrainerState, row: dict[str, Any]) -> None:
        value = float(row[self.objective])
        if math.isfinite(value):
            self.trial.report(value, int(row["epoch"]))
        if self.trial.should_prune():
            self.pruned = trainer.should_stop = True


def base_model(config: PipelineConfig, model: str | None) -> Any:
    """The pipeline model a sweep starts from: `model`, or the config's only one."""
    if model is None:
        if len(config.models) > 1:
            names = ", ".join(m.name for m in config.models)
            raise SettingError(f"the config has {len(config.models)} models ({names}); say which with --model")
        return config.models[0]
    config.model_names([model])
    return next(m for m in config.models if m.name == model)


def _definition(base: TrainConfig, space: SweepSpace, folds: int | None, pipeline: dict[str, Any]) -> dict[str, Any]:
    """What a search's workers must agree on: the base config, the space, the folds, the pipeline around them."""
    return {
        "kind": "search",
        "base": base.model_dump(mode="json", exclude={"data": MACHINE_LOCAL}),
        "space": space.model_dump(mode="json"),
        "folds": folds,
        "pipeline": pipeline,
    }


def _recorded_today(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded definition read through today's settings models, so that a setting added to pneumolab since the
    study began (recorded nowhere, so at its default) is no change and the study resumes."""
    pipeline = recorded["pipeline"]
    return _definition(
        TrainConfig.model_validate(recorded["base"]),
        SweepSpace.model_validate(recorded["space"]),
        recorded["folds"],
        {
            **pipeline,
            "data": DataConfig.model_validate(pipeline["data"]).model_dump(mode="json", exclude=MACHINE_LOCAL),
            "evaluate": EvaluateSettings.from_record(pipeline["evaluate"]).model_dump(mode="json"),
        },
    )


def trial_dir(out: str | os.PathLike[str], number: int) -> Path:
    return Path(out) / "trials" / f"trial-{number:04d}"


def _best_value(run: RunDir, objective: str, maximize: bool) -> float:
    """The objective at the run's best epoch (the one ``best.pt`` holds), from its history."""
    summary = json.loads(run.env.read_text())["train_summary"]
    row = next(r for r in run.read_history() if int(r["epoch"]) == summary["best_epoch"])
    value = float(row[objective])
    if not math.isfinite(value):  # e.g. ROC-AUC while a class is missing from validation
        return -math.inf if maximize else math.inf
    return value


def run_sweep(
    config: PipelineConfig,
    space: SweepSpace,
    *,
    study_name: str,
    out: str | os.PathLike[str],
    storage: str | None = None,
    trials: int = 20,
    model: str | None = None,
    folds: int | None = None,
    data: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Join (or start) the study and work on it until it holds `trials` finished trials; return a summary."""
    from pneumolab.train.api import train

    chosen = base_model(config, model)
    root = dataset_root(config, data)
    base = model_train_config(chosen, config.data.model_copy(update={"root": root}))
    space.check_against(base)  # every range against the base, before any work
    prepare_data(config, root, progress=progress)
    sampler = optuna.samplers.TPESampler() if space.sampler == "tpe" else optuna.samplers.RandomSampler()
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=space.prune_from)
        if space.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    definition = _definition(
        base,
        space,
        folds,
        # what `--show` needs to write the best config as a pipeline `pneumolab run` accepts
        {
            "title": config.title,
            "data": config.data.model_dump(mode="json", exclude=MACHINE_LOCAL),
            "evaluate": config.evaluate.model_dump(mode="json"),
            "model": chosen.name,
        },
    )
    study = open_study(
        study_name,
        open_storage(storage, out),
        maximize=space.maximize,
        sampler=sampler,
        pruner=pruner,
        definition=definition,
        read_recorded=_recorded_today,
    )

    def objective(trial: Trial) -> float:
        values = {key: param.suggest(trial, key) for key, param in space.params.items()}
        trial_config = apply_overrides(base, values)
        compute = relative_compute(trial_config, base)
        trial.set_user_attr("compute", round(compute, 4))
        if space.budget is not None:
            trial.set_constraint("compute", compute - space.budget)  # > 0 infeasible: TPE learns to avoid it
            if compute > space.budget:
                trial.set_user_attr(OVER_BUDGET, True)
                raise optuna.TrialPruned()  # not trained, not counted towards `trials`
        root = trial_dir(out, trial.number)
        trial.set_user_attr("run", str(root))
        if folds is None:
            pruning = PruningCallback(trial, space.objective)
            train(trial_config, root, resume=RunDir(root).last.is_file(), progress=progress, callbacks=[pruning])
            if pruning.pruned:
                raise optuna.TrialPruned()
            return _best_value(RunDir(root), space.objective, space.maximize)
        fold_values = []
        for k in range(folds):
            fold_config = apply_overrides(trial_config, {"data.folds": folds, "data.fold": k})
            run = RunDir(root / f"fold-{k}")
            train(fold_config, run.path, resume=run.last.is_file(), progress=progress)
            fold_values.append(_best_value(run, space.objective, space.maximize))
            trial.report(sum(fold_values) / len(fold_values), k + 1)  # steps count from 1, like epochs
            if trial.should_prune():
                raise optuna.TrialPruned()
        trial.set_user_attr("fold_values", fold_values)
        return sum(fold_values) / folds

    done = run_worker(study, objective, trials=trials)
    return {"study": study_name, "trials_by_this_worker": done, "trials_in_study": len(study.trials)}
