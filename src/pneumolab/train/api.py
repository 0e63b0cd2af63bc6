"""`train`: one entry point for both strategies, with the run-folder rules (new, resume, refuse to overwrite)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumolab.config import TrainConfig, load_config
from pneumolab.errors import ArtefactError, SettingError
from pneumolab.fsutil import write_json_atomic
from pneumolab.runs import RunDir

if TYPE_CHECKING:
    from pneumolab.train.callbacks import Callback

__all__ = ["default_run_dir", "train"]


def default_run_dir(config: TrainConfig, root: str | os.PathLike[str] = "runs") -> Path:
    """``runs/<model>-<YYYYmmdd-HHMMSS>``."""
    return Path(root) / f"{config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(
    config: TrainConfig,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train into the run folder `out` and return a summary (best epoch, its metric, wall time).

    With `resume`, the run's own ``config.yaml`` is used and training continues after the last finished epoch.
    Without it, a folder that already holds a run is refused rather than overwritten, and so is a folder another
    process is training (`RunDir.lock`). `callbacks` run beside the default ones (history, checkpoints, printing,
    and early stopping and loggers as the config asks), by ``order``.
    """
    run = RunDir(out)
    if resume and not run.config.is_file():  # before the lock, which would create the folder
        raise ArtefactError(f"{run.path}: nothing to resume (no config.yaml)")
    # one trainer per run folder: rank 0 holds the lock (torchrun's other ranks train the same run with it)
    with run.lock() if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        return _train_locked(config, run, resume=resume, progress=progress, callbacks=callbacks)


def _train_locked(
    config: TrainConfig, run: RunDir, *, resume: bool, progress: bool, callbacks: Sequence[Callback]
) -> dict[str, Any]:
    if resume:
        if not run.config.is_file():
            raise ArtefactError(f"{run.path}: nothing to resume (no config.yaml)")
        config = load_config(run.config)
    elif run.config.is_file() or run.last.is_file():
        raise SettingError(f"{run.path}: already holds a run; pass --resume to continue it or choose another --out")

    if config.strategy == "features":
        from pneumolab.train.features import FeatureTrainer as trainer_class
    else:
        from pneumolab.train.loop import Trainer as trainer_class
    trainer = trainer_class(config, run, resume=resume, progress=progress, callbacks=callbacks)
    summary = trainer.fit()
    if trainer.is_main:
        env = json.loads(run.env.read_text()) if run.env.is_file() else {}
        env["train_summary"] = summary
        write_json_atomic(run.env, env)
    return summary
