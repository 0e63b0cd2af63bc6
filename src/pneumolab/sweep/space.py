"""The search space of a sweep: which training settings vary, over what, and what the trials are ranked by.

A space file (YAML) names dotted keys of a training config (``optim.lr``, ``epochs``, ``augment.preset``,
``model.name`` ...) with a float, int or categorical range, plus the objective, sampler and pruner::

    objective: val_loss          # validation log loss of the trial's best epoch (lower is better; the default)
    sampler: tpe                 # tpe (default) or random
    pruner: median               # median (stop a trial whose epoch is worse than the median so far) or none
    prune_from: 1                # the first epoch (or fold, with --folds) after which a trial may be stopped
    budget: 0.5                  # optional: at most half the base config's training compute (sweep.compute)
    params:
      optim.lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
      epochs: {type: int, low: 2, high: 4}
      augment.preset: {type: categorical, choices: [plan, cxr]}

With a ``budget``, a point whose training compute (epochs x forward FLOPs at its image size and backbone) exceeds
that share of the base config's is not trained: the trial is pruned at once and marked ``over_budget``, it does not
count towards ``--trials``, and TPE learns the region is infeasible (Optuna's trial constraints).

The file is checked whole when it is read, before any trial starts: an unknown key (with a "did you mean"), a
bad range, or a value the training config refuses (an unknown preset, a negative rate) is one line naming it.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, model_validator

from pneumolab.config import StrictModel, TrainConfig, apply_overrides, load_yaml_model
from pneumolab.errors import SettingError, did_you_mean

__all__ = ["OBJECTIVES", "SweepSpace", "load_space", "setting_keys"]

# per-epoch validation figures of the training history; True: higher is better
OBJECTIVES = {"val_loss": False, "val_brier": False, "val_roc_auc": True, "val_balanced_accuracy": True}


class FloatRange(StrictModel):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False

    def suggest(self, trial: Any, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def extremes(self) -> list[Any]:
        return [self.low, self.high]


class IntRange(StrictModel):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False

    def suggest(self, trial: Any, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log)

    def extremes(self) -> list[Any]:
        return [self.low, self.high]


class Choice(StrictModel):
    type: Literal["categorical"]
    choices: list[str | int | float | bool] = Field(min_length=1)

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_categorical(name, self.choices)

    def extremes(self) -> list[Any]:
        return list(self.choices)


Param = Annotated[FloatRange | IntRange | Choice, Field(discriminator="type")]


def setting_keys(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config model (``optim.lr``, ``epochs`` ...)."""
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(setting_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


class SweepSpace(StrictModel):
    """A parsed space file (module doc)."""

    objective: str = "val_loss"
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "none"] = "median"
    # an EMA of the weights lags most in the first epoch, so a slow EMA looks weak there: start pruning later
    prune_from: int = Field(1, ge=1, description="first epoch (or fold) after which the pruner may stop a trial")
    budget: float | None = Field(None, gt=0, description="most training compute of a trial, as a share of the base")
    params: dict[str, Param] = Field(min_length=1)
    _source: str = PrivateAttr("space")  # the file it was read from, for error lines

    @model_validator(mode="after")
    def _checked(self) -> SweepSpace:
        if self.objective not in OBJECTIVES:
            raise ValueError(str(did_you_mean("objective", self.objective, OBJECTIVES)))
        known = setting_keys()
        for key, param in self.params.items():
            if key not in known:
                raise ValueError(str(did_you_mean("training setting", key, known)))
            if key.startswith("data."):
                raise ValueError(f"params.{key}: the data settings are the study's, not a trial's")
            if isinstance(param, FloatRange | IntRange):
                if not param.low < param.high:
                    raise ValueError(f"params.{key}: low ({param.low}) must be below high ({param.high})")
                if param.log and param.low <= 0:
                    raise ValueError(f"params.{key}: a log range needs low > 0, got {param.low}")
        return self

    @property
    def maximize(self) -> bool:
        return OBJECTIVES[self.objective]

    def check_against(self, base: TrainConfig) -> None:
        """Every end of every range (each choice) must make a valid training config from `base`, and some point
        must fit the budget."""
        for key, param in self.params.items():
            for value in param.extremes():
                try:
                    apply_overrides(base, {key: value})
                except SettingError as error:
                    raise SettingError(f"{self._source}: params.{key} = {value!r}: {error}") from None
        if self.budget is not None:
            self._check_budget(base)

    def _check_budget(self, base: TrainConfig) -> None:
        """Some point must fit the budget: the space's cheapest corner (fewest epochs, smallest images, cheapest
        backbone and head) is checked."""
        from pneumolab.sweep.compute import relative_compute  # builds models: torch only when a budget is set

        cheapest = base
        for key in ("epochs", "image_size", "model.name", "model.head"):
            if key in self.params:
                options = [apply_overrides(cheapest, {key: v}) for v in self.params[key].extremes()]
                cheapest = min(options, key=lambda config: relative_compute(config, base))
        share = relative_compute(cheapest, base)
        if share > self.budget:
            raise SettingError(
                f"{self._source}: budget {self.budget}: no point of the space fits it (the cheapest needs "
                f"{share:.2f} of the base config's training compute)"
            )


def load_space(path: str | os.PathLike[str], base: TrainConfig | None = None) -> SweepSpace:
    """Read and check a space file (and, given `base`, every range against it); one-line errors name the file."""
    space = load_yaml_model(path, SweepSpace)
    space._source = str(path)
    if base is not None:
        space.check_against(base)
    return space
