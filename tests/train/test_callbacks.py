"""Callbacks: run by `order` among the defaults, user callbacks added to them, early stopping in both strategies."""

from __future__ import annotations

import pytest
import torch

from pneumolab.errors import ArtefactError, SettingError
from pneumolab.runs import RunDir, load_checkpoint, save_checkpoint
from pneumolab.train.api import train
from pneumolab.train.callbacks import (
    Callback,
    CheckpointCallback,
    EarlyStoppingCallback,
    HistoryCallback,
    PrintCallback,
    in_order,
)
from tests.train._tiny import tiny_config


class Recorder(Callback):
    """Notes, in a shared log, when it ran and how much of the defaults' work it could already see."""

    def __init__(self, log: list[tuple]) -> None:
        self.log = log

    def on_fit_start(self, trainer) -> None:
        self.log.append((type(self).__name__, "fit_start"))

    def on_epoch_end(self, trainer, row) -> None:
        last = trainer.run.last
        last_epoch = torch.load(last, mmap=True, weights_only=True)["epoch"] if last.is_file() else None
        self.log.append((type(self).__name__, row["epoch"], len(trainer.history), last_epoch))

    def on_fit_end(self, trainer) -> None:
        self.log.append((type(self).__name__, "fit_end"))


class BeforeHistory(Recorder):
    order = HistoryCallback.order - 1


class BetweenHistoryAndCheckpoint(Recorder):
    order = (HistoryCallback.order + CheckpointCallback.order) // 2


class AfterTheDefaults(Recorder):
    """Sets no order: the default places it after every built-in callback."""


def test_in_order_sorts_by_order_and_keeps_ties_as_given() -> None:
    log: list[tuple] = []
    first, second = AfterTheDefaults(log), AfterTheDefaults(log)
    history, checkpoint, printer = HistoryCallback(), CheckpointCallback(), PrintCallback()
    early = EarlyStoppingCallback(2)
    ordered = in_order([first, printer, early, checkpoint, second, history])
    assert ordered == [history, checkpoint, early, printer, first, second]


def test_user_callbacks_run_by_order_beside_the_defaults(make_dataset, tmp_path) -> None:
    root = make_dataset(per_class=12)
    config = tiny_config(root, tmp_path / "cache", epochs=2, max_batches=2)
    log: list[tuple] = []
    # given in reverse: `order` decides, not the list
    callbacks = [AfterTheDefaults(log), BetweenHistoryAndCheckpoint(log), BeforeHistory(log)]
    summary = train(config, tmp_path / "run", progress=False, callbacks=callbacks)

    names = ["BeforeHistory", "BetweenHistoryAndCheckpoint", "AfterTheDefaults"]
    assert log[:3] == [(name, "fit_start") for name in names]
    assert log[-3:] == [(name, "fit_end") for name in names]
    # (callback, epoch, rows in trainer.history, epoch in last.pt): history is appended at order 10, last.pt at 20
    assert log[3:-3] == [
        ("BeforeHistory", 1, 0, None),
        ("BetweenHistoryAndCheckpoint", 1, 1, None),
        ("AfterTheDefaults", 1, 1, 1),
        ("BeforeHistory", 2, 1, 1),
        ("BetweenHistoryAndCheckpoint", 2, 2, 1),
        ("AfterTheDefaults", 2, 2, 2),
    ]
    # the default callbacks still did their work
    run = RunDir(tmp_path / "run")
    assert [int(row["epoch"]) for row in run.read_history()] == [1, 2]
    assert load_checkpoint(run.last)["epoch"] == 2
    assert load_checkpoint(run.best)["epoch"] == summary["best_epoch"]


# lr so small that the head's decisions cannot change, backbone frozen (its BatchNorms in eval): the validation
# balanced accuracy of epoch 1 is never beaten, so patience 1 stops after epoch 2
STANDSTILL = {"optim.lr": 1e-12, "select_metric": "val_balanced_accuracy"}


@pytest.mark.parametrize("how", ["passed to train", "from the config"])
@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"strategy": "finetune", "freeze": "linear", "epochs": 4, "max_batches": 2}, id="finetune"),
        pytest.param({"strategy": "features", "feature_views": 1, "head_epochs": 4}, id="features"),
    ],
)
def test_early_stopping_stops_both_strategies(make_dataset, tmp_path, settings: dict, how: str) -> None:
    root = make_dataset(per_class=12)
    if how == "passed to train":
        config, callbacks = tiny_config(root, tmp_path / "cache", **STANDSTILL, **settings), [EarlyStoppingCallback(1)]
    else:
        config, callbacks = tiny_config(root, tmp_path / "cache", early_stopping=1, **STANDSTILL, **settings), []
    summary = train(config, tmp_path / "run", progress=False, callbacks=callbacks)
    history = RunDir(tmp_path / "run").read_history()
    assert [int(row["epoch"]) for row in history] == [1, 2]
    assert summary["epochs"] == 2 and summary["best_epoch"] == 1
    assert history[0]["val_balanced_accuracy"] == history[1]["val_balanced_accuracy"]


@pytest.mark.parametrize("patience", [0, -1, 1.5, True])
def test_early_stopping_needs_a_positive_patience(patience) -> None:
    with pytest.raises(SettingError, match="patience"):
        EarlyStoppingCallback(patience)


def test_a_last_checkpoint_of_the_earlier_layout_is_refused_by_name(make_dataset, tmp_path) -> None:
    root = make_dataset(per_class=12)
    config = tiny_config(root, tmp_path / "cache", epochs=2, max_batches=1)
    out = tmp_path / "run"
    train(config.model_copy(update={"epochs": 1}), out, progress=False)
    run = RunDir(out)
    state = load_checkpoint(run.last)
    del state["resume_format"]  # as pneumolab wrote last.pt before the optimiser groups and schedule changed
    save_checkpoint(state, run.last)
    run.env.unlink()  # not finished: resumable
    with pytest.raises(ArtefactError, match=r"written by an earlier pneumolab \(resume format 1"):
        train(config, out, resume=True, progress=False)
