"""`pneumolab run`, the main job: prepare -> train each configured model -> evaluate -> ensemble -> report.

Idempotent and resumable: a model whose run finished is reused, an interrupted one resumes from ``last.pt``,
evaluations whose files are newer than the checkpoint are reused, and the ensemble and report are cheap
recomputations from files. One pipeline config (``configs/*.yaml``) lists the models; each model's ``train``
block is a `TrainConfig` whose ``data`` settings come from the pipeline's.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pneumolab.config import DataConfig, StrictModel, TrainConfig, check_setting, load_yaml_model
from pneumolab.data.tasks import get_task
from pneumolab.data.tta import resolve_views
from pneumolab.errors import DatasetLayoutError, SettingError
from pneumolab.evaluate.calibration import ThresholdSelector
from pneumolab.evaluate.ensemble import EnsembleCombiner
from pneumolab.evaluate.stress import parse_cases
from pneumolab.fsutil import write_json_atomic
from pneumolab.progress import stderr_console
from pneumolab.runs import RunDir

__all__ = [
    "EvaluateSettings",
    "ModelRun",
    "PipelineConfig",
    "dataset_root",
    "load_pipeline_config",
    "model_train_config",
    "prepare_data",
    "run_evaluated",
    "run_pipeline",
    "train_and_evaluate",
]

DEFAULT_DATA = Path("data/chest_xray")


class ModelRun(StrictModel):
    """One model of the comparison: a run name and its training settings."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    train: TrainConfig = Field(default_factory=TrainConfig)


class EvaluateSettings(StrictModel):
    """How every model is evaluated: TTA views (a preset or comma-separated views), the threshold rule, and the
    validation metric that chooses between TTA and plain (a proper scoring rule by default)."""

    tta: str | None = "cxr"
    threshold: str = "balanced_accuracy"
    target_sensitivity: float | None = None
    choose_by: Literal["log_loss", "brier", "roc_auc", "stress_log_loss"] = "log_loss"
    resamples: int = Field(2000, ge=100)
    # the stress evaluation after each model's evaluation, on validation and test (the report's Robustness part):
    # a named set (selection, framing, standard) or name:strength cases; None = not run
    stress: str | None = None

    @classmethod
    def from_record(cls, recorded: dict[str, Any]) -> EvaluateSettings:
        """Settings recorded by an earlier pneumolab: one from before `choose_by` existed chose on ROC-AUC."""
        return cls.model_validate({"choose_by": "roc_auc", **recorded})

    @model_validator(mode="after")
    def _checked(self) -> EvaluateSettings:
        if self.tta:
            check_setting(resolve_views, self.tta)
        check_setting(ThresholdSelector, self.threshold, target_sensitivity=self.target_sensitivity)
        if self.stress:
            check_setting(parse_cases, self.stress)
        return self


class EnsembleSettings(StrictModel):
    """How the models are combined (fit on validation), and which of them (None: every model of the config)."""

    method: str = "mean"
    members: list[str] | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        check_setting(EnsembleCombiner, method)
        return method


class PipelineConfig(StrictModel):
    """A whole comparison: data, the models, how they are evaluated, and their ensemble."""

    title: str = "pneumolab report"
    data: DataConfig = Field(default_factory=DataConfig)
    models: list[ModelRun] = Field(min_length=1)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    ensemble: EnsembleSettings | None = None

    def model_names(self, only: list[str] | None = None) -> list[str]:
        """Every model's name; `only` (e.g. ``--only``) must name models of this config."""
        names = [m.name for m in self.models]
        unknown = sorted(set(only or []) - set(names))
        if unknown:
            raise SettingError(f"--only: {unknown} are not models of this config ({', '.join(names)})")
        return names

    @model_validator(mode="after")
    def _members_are_models(self) -> PipelineConfig:
        names = [m.name for m in self.models]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"models: {twice} named more than once (each run needs its own folder)")
        members = self.ensemble.members if self.ensemble is not None else None
        unknown = sorted(set(members or []) - set(names))
        if unknown:
            raise ValueError(f"ensemble.members: {unknown} are not models of this config ({', '.join(names)})")
        return self


def load_pipeline_config(path: str | os.PathLike[str]) -> PipelineConfig:
    """Read a pipeline YAML (one-line errors, like `pneumolab.config.load_config`)."""
    return load_yaml_model(path, PipelineConfig)


def _trained(run: RunDir) -> bool:
    return run.env.is_file() and "train_summary" in json.loads(run.env.read_text())


def _run_finished(run: RunDir) -> bool:
    return run.best.is_file() and _trained(run)


def run_evaluated(run: RunDir) -> bool:
    """Trained and evaluated: enough to join the ensemble and report, which read only saved predictions. A run
    brought back from another machine without its checkpoints (too large to carry) counts."""
    return _trained(run) and run.operating_point.is_file()


def _log(message: str) -> None:
    stderr_console.print(f"[bold]run[/bold] {message}", highlight=False)


def model_train_config(model: ModelRun, data: DataConfig, **data_updates: Any) -> TrainConfig:
    """A model's training config under the pipeline's data settings (with `data.root` set), except what the model's
    own data block sets (e.g. a larger cache_size); `data_updates` (a fold, say) override both."""
    own = model.train.data.model_dump(exclude_unset=True)
    return model.train.model_copy(update={"data": data.model_copy(update={**own, "root": data.root, **data_updates})})


def train_and_evaluate(
    config: TrainConfig,
    run: RunDir,
    settings: EvaluateSettings,
    *,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Train `run` (reused when finished, resumed when interrupted), then evaluate it (reused when its saved
    evaluation was made with these settings). Returns the evaluation's metric objects."""
    from pneumolab.evaluate.runner import evaluate_run, stress_model
    from pneumolab.train.api import train

    if _run_finished(run):
        _log(f"{run.path.name}: trained already, reusing {run.path}")
    else:
        resume = run.last.is_file()
        _log(f"{run.path.name}: {'resuming' if resume else 'training'} {config.model.name}")
        train(config, run.path, resume=resume, progress=progress)
    _log(f"{run.path.name}: evaluating")
    results = evaluate_run(
        run.path,
        data=config.data.root,
        tta=settings.tta,
        threshold_method=settings.threshold,
        target_sensitivity=settings.target_sensitivity,
        choose_by=settings.choose_by,
        n_resamples=settings.resamples,
        progress=progress,
    )
    if settings.stress:
        _log(f"{run.path.name}: stress evaluation ({settings.stress})")
        stress_model(run.path, data=config.data.root, cases=settings.stress, progress=progress)
    return results


def dataset_root(config: PipelineConfig, data: str | os.PathLike[str] | None) -> Path:
    """The dataset a pipeline runs on (`data`, else the config's, else data/chest_xray); a missing one is an error
    that says how to get it."""
    root = Path(data) if data else (config.data.root or DEFAULT_DATA)
    if not root.exists():
        raise DatasetLayoutError(
            f"{root}: no dataset here; get it with `pneumolab data download --to {root.parent}` "
            "or pass --data DIR (or make run DATA=DIR)"
        )
    return root


def prepare_data(config: PipelineConfig, root: Path, *, progress: bool = True) -> DataConfig:
    """Decode the dataset into the cache once (every run then reads it); the pipeline's data settings at `root`."""
    from pneumolab.data.cache import prepare_cache

    data_config = config.data.model_copy(update={"root": root})
    _log(f"preparing the cache of {root}")
    prepare_cache(
        root,
        size=data_config.cache_size,
        cache_root=data_config.cache_dir,
        progress=progress,
        classes=get_task(data_config.task).folder_classes,
    )
    return data_config


def run_pipeline(
    config: PipelineConfig,
    out: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    only: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole job into `out` (``out/<model name>/`` runs, ``out/ensemble/``, ``out/report/``).

    Args:
        only: train and evaluate just these models (e.g. to split a comparison across machines); the others
            join the ensemble and the report when their runs are already finished and evaluated in `out`.
    """
    from pneumolab.evaluate.runner import ensemble_runs
    from pneumolab.report import build_report

    started = time.perf_counter()
    out = Path(out)
    names = config.model_names(only)
    data_config = prepare_data(config, dataset_root(config, data), progress=progress)

    timings: dict[str, float] = {}
    run_dirs = []
    for model in config.models:
        run = RunDir(out / model.name)
        if only and model.name not in only:
            if run_evaluated(run):
                run_dirs.append(run.path)
            continue
        run_dirs.append(run.path)
        step_started = time.perf_counter()
        train_and_evaluate(model_train_config(model, data_config), run, config.evaluate, progress=progress)
        timings[model.name] = round(time.perf_counter() - step_started, 1)

    report_runs = list(run_dirs)
    members = (config.ensemble.members or names) if config.ensemble is not None else []  # checked on load
    ready = {Path(r).name for r in run_dirs}
    if len(members) >= 2 and not set(members) <= ready:
        _log(f"ensemble skipped: {', '.join(sorted(set(members) - ready))} not finished yet")
    elif config.ensemble is not None and len(members) >= 2:
        _log(f"ensemble ({config.ensemble.method}) of {', '.join(members)}")
        ensemble_runs(
            [out / n for n in members],
            out / "ensemble",
            method=config.ensemble.method,
            threshold_method=config.evaluate.threshold,
            target_sensitivity=config.evaluate.target_sensitivity,
            n_resamples=config.evaluate.resamples,
        )
        report_runs.append(out / "ensemble")

    _log("writing the report")
    files = build_report(report_runs, out / "report", title=config.title)
    summary = {
        "out": str(out),
        "report": str(files["html"]),
        "runs": [str(r) for r in report_runs],
        "seconds_per_model": timings,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(out / "pipeline.json", summary)
    return summary
