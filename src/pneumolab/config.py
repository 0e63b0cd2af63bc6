"""Typed configuration: pydantic models, YAML in, YAML out.

A training run is described by one `TrainConfig`. It is read from YAML (unknown keys are errors, so a typo never
passes silently), common settings are overridden by CLI flags through `apply_overrides`, and the resolved config is
saved as ``config.yaml`` beside the checkpoints. The library receives the config object, never an ``args``
namespace. Settings with a fixed set of values (model name against the registry, augmentation preset; the rest are
literals) are checked when the config is read, with a "did you mean", so a typo fails before any data is touched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pneumolab.data.augment import get_preset
from pneumolab.data.splits import check_design
from pneumolab.data.tasks import get_task
from pneumolab.errors import PneumolabError, SettingError
from pneumolab.fsutil import write_text_atomic
from pneumolab.models import model_spec

__all__ = [
    "AugmentSettings",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "StrictModel",
    "TrainConfig",
    "apply_overrides",
    "check_setting",
    "dump_config",
    "load_config",
    "load_yaml_model",
]


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_M = TypeVar("_M", bound=BaseModel)


def check_setting(check: Any, *args: Any, **kwargs: Any) -> None:
    """Run a library check (a constructor, a resolver) inside a pydantic validator: its one-line error becomes the
    validation error (pydantic reports ValueErrors only; an unknown name is a KeyError)."""
    try:
        check(*args, **kwargs)
    except PneumolabError as error:
        raise ValueError(str(error)) from None


class DataConfig(StrictModel):
    """Where the images come from and how validation is carved."""

    root: Path | None = None
    task: str = Field("binary", description="binary (NORMAL / PNEUMONIA), kind (NORMAL / BACTERIAL / VIRAL), folders")
    cache_size: int = Field(256, ge=32, description="side of the cached square images")
    cache_dir: Path | None = None
    val_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = 0
    split_design: str = Field("random", description="random, latest or earliest: which patients validation holds")
    folds: int | None = Field(None, ge=2, description="cross-validation: validation is fold `fold` of `folds`")
    fold: int | None = Field(None, ge=0)

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        check_setting(get_task, task)
        return task

    @field_validator("split_design")
    @classmethod
    def _known_design(cls, design: str) -> str:
        check_setting(check_design, design)
        return design

    @model_validator(mode="after")
    def _fold_in_range(self) -> DataConfig:
        if (self.folds is None) != (self.fold is None):
            raise ValueError("folds and fold go together (validation is fold `fold` of `folds`)")
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"fold must be in 0 .. {self.folds - 1} with {self.folds} folds, got {self.fold}")
        return self

    def carve_settings(self) -> dict[str, Any]:
        """The keyword arguments of `carve_validation` that reproduce this config's split (recorded in cards)."""
        settings: dict[str, Any] = {"fraction": self.val_fraction, "seed": self.split_seed}
        if self.split_design != "random":
            settings["design"] = self.split_design
        if self.folds is not None:
            settings.update(folds=self.folds, fold=self.fold)
        return settings


class ModelConfig(StrictModel):
    """Architecture, initial weights and head."""

    name: str = "tf_efficientnet_lite0"
    weights: str = Field("imagenet", description="imagenet, none, or a weights file")
    head: Literal["linear", "plan", "attention"] = "linear"
    drop_rate: float = Field(0.2, ge=0, lt=1)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        check_setting(model_spec, name)
        return name


class AugmentSettings(StrictModel):
    """Which augmentation preset trains the model."""

    preset: str = "cxr"

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str) -> str:
        check_setting(get_preset, preset)
        return preset


class OptimConfig(StrictModel):
    """Optimiser and learning-rate schedule (cosine annealing with linear warm-up)."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(0.5, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="final lr as a share of lr")
    grad_clip: float | None = Field(1.0, gt=0)


class LossConfig(StrictModel):
    """Class weighting of the cross-entropy (the plan's formula by default) and sampling."""

    class_weights: Literal["plan", "balanced", "none", "custom"] = "plan"
    custom_weights: list[float] | None = None
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    sampler: Literal["uniform", "weighted"] = "uniform"


class TrainConfig(StrictModel):
    """Everything that defines one training run."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    strategy: Literal["finetune", "features"] = "finetune"
    freeze: Literal["full", "plan", "linear", "gradual"] = "full"
    gradual_every: int = Field(1, ge=1, description="epochs between unfreezing steps (freeze: gradual)")
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    image_size: int = Field(224, ge=32)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    ema: bool = False
    ema_decay: float = Field(0.998, gt=0, lt=1)
    early_stopping: int | None = Field(None, ge=1, description="stop after this many epochs without improvement")
    select_metric: Literal["val_loss", "val_roc_auc", "val_balanced_accuracy"] = "val_loss"
    feature_views: int = Field(4, ge=1, description="augmented views per image (strategy: features)")
    head_epochs: int = Field(60, ge=1, description="head training epochs (strategy: features)")
    seed: int = 0
    deterministic: bool = False
    threads: int | None = Field(None, ge=1, description="CPU threads (default: all cores)")
    max_batches: int | None = Field(None, ge=1, description="cap on training batches per epoch (smoke tests)")
    tensorboard: bool = False
    mlflow: bool = False


def _one_line(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    message = first["msg"].removeprefix("Value error, ")  # our checks' messages stand alone
    return f"{source}: {where}: {message}{more}"


def load_yaml_model(path: str | os.PathLike[str], model: type[_M]) -> _M:
    """Read a YAML file into a pydantic `model`; every problem is one `SettingError` line naming the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise SettingError(f"{path}: no such config file") from None
    except yaml.YAMLError as error:
        raise SettingError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SettingError(f"{path}: a config must be a mapping of settings")
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise SettingError(_one_line(error, str(path))) from None


def load_config(path: str | os.PathLike[str] | None = None) -> TrainConfig:
    """Read a YAML config (missing keys take their defaults); no path gives the defaults."""
    return TrainConfig() if path is None else load_yaml_model(path, TrainConfig)


def apply_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return a copy with dotted keys (``"model.name"``, ``"epochs"``) set; None values are ignored."""
    raw = config.model_dump()
    for key, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise SettingError(_one_line(error, "settings")) from None


def dump_config(config: TrainConfig, dest: str | os.PathLike[str] | None = None) -> str:
    """The config as YAML text; written atomically to `dest` when given."""
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    if dest is not None:
        write_text_atomic(dest, text)
    return text
