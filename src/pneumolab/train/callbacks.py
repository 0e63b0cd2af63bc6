"""Training callbacks: the loop's named hooks (history, checkpoints, early stopping, loggers), run by `order`.

A callback implements any of ``on_fit_start(trainer)``, ``on_epoch_end(trainer, row)`` and ``on_fit_end(trainer)``.
It sees the trainer only through `TrainerState`, so this module needs nothing from the loop. Callbacks run by their
integer ``order``, lower first (ties keep the order given); the defaults leave gaps between them, and a callback
that sets no order runs after all of them. An error inside one is re-raised naming the callback and the hook, so a
failing logger is easy to find.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Protocol

from pneumolab.config import TrainConfig
from pneumolab.errors import SettingError
from pneumolab.progress import stderr_console
from pneumolab.runs import RunDir, save_checkpoint

__all__ = [
    "Callback",
    "CallbackError",
    "CheckpointCallback",
    "EarlyStoppingCallback",
    "HistoryCallback",
    "MLflowCallback",
    "PrintCallback",
    "TensorBoardCallback",
    "TrainerState",
    "in_order",
    "run_hook",
]


class TrainerState(Protocol):
    """What callbacks read from a trainer; they write only `history` (append) and `should_stop`."""

    config: TrainConfig
    run: RunDir
    history: list[dict[str, Any]]
    best_epoch: int | None
    epochs_since_best: int
    should_stop: bool

    def model_checkpoint(self, row: dict[str, Any]) -> dict[str, Any]:
        """The best-model checkpoint of the epoch `row` describes."""
        ...

    def resume_checkpoint(self) -> dict[str, Any]:
        """Everything needed to continue after the last finished epoch."""
        ...


class Callback:
    """Base class: every hook is a no-op; ``order`` places it among the others (lower runs first)."""

    order: ClassVar[int] = 100

    def on_fit_start(self, trainer: TrainerState) -> None:
        pass

    def on_epoch_end(self, trainer: TrainerState, row: dict[str, Any]) -> None:
        pass

    def on_fit_end(self, trainer: TrainerState) -> None:
        pass


class CallbackError(RuntimeError):
    """A callback failed; the message names it and the hook."""


def in_order(callbacks: Iterable[Callback]) -> list[Callback]:
    """The callbacks sorted by ``order``; the sort is stable, so ties keep the order given."""
    return sorted(callbacks, key=lambda callback: callback.order)


def run_hook(callbacks: list[Callback], hook: str, *args: Any) -> None:
    """Call `hook` on every callback in list order, naming the culprit if one raises."""
    for callback in callbacks:
        try:
            getattr(callback, hook)(*args)
        except Exception as error:
            raise CallbackError(f"callback {type(callback).__name__}.{hook} failed: {error}") from error


class HistoryCallback(Callback):
    """Append the epoch's row to the trainer's history and to ``history.csv``."""

    order = 10

    def on_epoch_end(self, trainer: TrainerState, row: dict[str, Any]) -> None:
        trainer.history.append(row)
        trainer.run.write_history(trainer.history)


class CheckpointCallback(Callback):
    """Save ``best.pt`` when this epoch is the best so far on validation, then ``last.pt`` every epoch.

    ``last.pt`` is written after ``best.pt`` so that a resumed run never lacks the best model it had. It runs after
    `HistoryCallback` because the resume state names the last finished epoch from ``trainer.history``.
    """

    order = 20

    def on_epoch_end(self, trainer: TrainerState, row: dict[str, Any]) -> None:
        if trainer.best_epoch == row["epoch"]:
            save_checkpoint(trainer.model_checkpoint(row), trainer.run.best)
        save_checkpoint(trainer.resume_checkpoint(), trainer.run.last)


class EarlyStoppingCallback(Callback):
    """Ask the trainer to stop after `patience` epochs in a row without a new best validation metric.

    The trainer counts those epochs (``epochs_since_best``, saved in ``last.pt``), so a resumed run keeps its count.
    """

    order = 30

    def __init__(self, patience: int) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise SettingError(f"early stopping patience must be a positive integer, got {patience!r}")
        self.patience = patience

    def on_epoch_end(self, trainer: TrainerState, row: dict[str, Any]) -> None:
        if trainer.epochs_since_best >= self.patience:
            trainer.should_stop = True


class PrintCallback(Callback):
    """One line per epoch on stderr (the progress bar shows the batches)."""

    order = 40

    def on_epoch_end(self, trainer: TrainerState, row: dict[str, Any]) -> None:
        best = " *" if trainer.best_epoch == row["epoch"] else ""
        stderr_console.print(
            f"epoch {row['epoch']}/{trainer.config.epochs}  loss {row['train_loss']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val_auc {row['val_roc_auc']:.4f}  "
            f"val_bacc {row['val_balanced_accuracy']:.4f}  lr {row['lr']:.2e}  "
            f"{row['train_images_per_s']:.1f} img/s{best}",
            highlight=False,
        )


class TensorBoardCallback(Callback):
    """Scalars into ``RUN/tensorboard`` (needs the ``tensorboard`` package)."""

    order = 50

    def on_fit_start(self, trainer: TrainerState) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(trainer.run.tensorboard))

    def on_epoch_end(self, trainer: TrainerState, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, int(row["epoch"]))
        self.writer.flush()

    def on_fit_end(self, trainer: TrainerState) -> None:
        self.writer.close()


class MLflowCallback(Callback):
    """Parameters and per-epoch metrics to MLflow (optional extra ``mlflow``)."""

    order = 50

    def on_fit_start(self, trainer: TrainerState) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=trainer.run.path.name)
        mlflow.log_params({"model": trainer.config.model.name, **trainer.config.optim.model_dump()})

    def on_epoch_end(self, trainer: TrainerState, row: dict[str, Any]) -> None:
        metrics = {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, int | float)}
        self.mlflow.log_metrics(metrics, step=int(row["epoch"]))

    def on_fit_end(self, trainer: TrainerState) -> None:
        self.mlflow.end_run()
