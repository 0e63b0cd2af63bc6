"""Training callbacks: the loop's named hooks (history, checkpoints, early stopping, loggers), run in order.

A callback implements any of ``on_fit_start(trainer)``, ``on_epoch_end(trainer, row)`` and ``on_fit_end(trainer)``.
An error inside one is re-raised naming the callback and the hook, so a failing logger is easy to find.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pneumolab.progress import stderr_console
from pneumolab.runs import save_checkpoint

if TYPE_CHECKING:
    from pneumolab.train.loop import Trainer

__all__ = [
    "Callback",
    "CheckpointCallback",
    "HistoryCallback",
    "MLflowCallback",
    "PrintCallback",
    "TensorBoardCallback",
    "run_hook",
]


class Callback:
    """Base class: every hook is a no-op."""

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        pass

    def on_fit_end(self, trainer: Trainer) -> None:
        pass


class CallbackError(RuntimeError):
    """A callback failed; the message names it and the hook."""


def run_hook(callbacks: list[Callback], hook: str, *args: Any) -> None:
    """Call `hook` on every callback in order, naming the culprit if one raises."""
    for callback in callbacks:
        try:
            getattr(callback, hook)(*args)
        except Exception as error:
            raise CallbackError(f"callback {type(callback).__name__}.{hook} failed: {error}") from error


class HistoryCallback(Callback):
    """Append the epoch's row to ``history.csv``."""

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        trainer.history.append(row)
        trainer.run.write_history(trainer.history)


class CheckpointCallback(Callback):
    """Save ``best.pt`` when this epoch is the best so far on validation, then ``last.pt`` every epoch.

    ``last.pt`` is written after ``best.pt`` so that a resumed run never lacks the best model it had.
    """

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if trainer.best_epoch == row["epoch"]:
            save_checkpoint(trainer.model_checkpoint(row), trainer.run.best)
        save_checkpoint(trainer.resume_checkpoint(), trainer.run.last)


class PrintCallback(Callback):
    """One line per epoch on stderr (the progress bar shows the batches)."""

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
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

    def on_fit_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(trainer.run.path / "tensorboard"))

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, int(row["epoch"]))
        self.writer.flush()

    def on_fit_end(self, trainer: Trainer) -> None:
        self.writer.close()


class MLflowCallback(Callback):
    """Parameters and per-epoch metrics to MLflow (optional extra ``mlflow``)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=trainer.run.path.name)
        mlflow.log_params({"model": trainer.config.model.name, **trainer.config.optim.model_dump()})

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        metrics = {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, int | float)}
        self.mlflow.log_metrics(metrics, step=int(row["epoch"]))

    def on_fit_end(self, trainer: Trainer) -> None:
        self.mlflow.end_run()
