"""The warm-up + cosine learning-rate schedule: torch's schedulers give the values of the formula the loop used."""

from __future__ import annotations

import io
import math

import pytest
import torch

from pneumolab.runs import RunDir
from pneumolab.train.api import train
from pneumolab.train.callbacks import Callback
from pneumolab.train.schedule import warmup_cosine
from tests.train._tiny import tiny_config

LR = 0.1


def previous_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The multiplier of the base lr at `step`, as the loop computed it before (a LambdaLR of this function)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def two_group_optimizer() -> torch.optim.Optimizer:
    """AdamW with a decayed and a not-decayed group, as the trainer builds it."""
    weight, bias = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [bias], "weight_decay": 0.0}, {"params": [weight], "weight_decay": 1e-4}]
    return torch.optim.AdamW(groups, lr=LR)


def lr_sequence(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[list[float]]:
    """Each group's lr before each of `steps` steps and after the last (what the last history row shows)."""
    seen = []
    for _ in range(steps):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    seen.append([group["lr"] for group in optimizer.param_groups])
    return seen


@pytest.mark.parametrize(
    ("total", "warmup", "min_ratio"),
    [
        (40, 6, 0.01),  # the usual shape
        (30, 0, 0.01),  # no warm-up
        (30, 0, 0.0),  # no warm-up, down to zero
        (12, 1, 0.3),  # a one-step warm-up
        (10, 4, 1.0),  # min_lr_ratio 1: constant after the warm-up
        (5, 8, 0.01),  # warm-up longer than the run
        (3000, 150, 0.05),  # long enough for step-by-step rounding to show, if it did
    ],
)
def test_the_lr_sequence_is_the_previous_formulas(total: int, warmup: int, min_ratio: float) -> None:
    optimizer = two_group_optimizer()
    scheduler = warmup_cosine(optimizer, total_steps=total, warmup_steps=warmup, min_lr_ratio=min_ratio)
    seen = lr_sequence(optimizer, scheduler, total)
    for step, lrs in enumerate(seen):
        want = LR * previous_factor(step, total, warmup, min_ratio)
        # torch updates the lr step by step, so the values agree to rounding, not bit for bit
        assert lrs == pytest.approx([want, want], rel=1e-12, abs=1e-14), step


def test_the_schedule_state_round_trips_through_a_checkpoint() -> None:
    settings = {"total_steps": 50, "warmup_steps": 7, "min_lr_ratio": 0.02}
    optimizer = two_group_optimizer()
    scheduler = warmup_cosine(optimizer, **settings)
    uninterrupted = lr_sequence(optimizer, scheduler, 50)

    optimizer = two_group_optimizer()
    scheduler = warmup_cosine(optimizer, **settings)
    first_part = lr_sequence(optimizer, scheduler, 20)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # as `load_checkpoint` reads last.pt
    optimizer = two_group_optimizer()
    scheduler = warmup_cosine(optimizer, **settings)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rest = lr_sequence(optimizer, scheduler, 30)
    assert first_part[:-1] + rest == uninterrupted  # exactly: a resumed run steps on the very same values


class KeepTrainer(Callback):
    """Keeps the trainer it is given, to look at it after `train` returns."""

    def on_fit_start(self, trainer) -> None:
        self.trainer = trainer


def test_the_loop_steps_the_schedule_once_per_batch(make_dataset, tmp_path) -> None:
    root = make_dataset(per_class=12)
    config = tiny_config(
        root, tmp_path / "cache", epochs=3, max_batches=2, **{"optim.lr": LR, "optim.warmup_epochs": 1.5}
    )
    keep = KeepTrainer()
    train(config, tmp_path / "run", progress=False, callbacks=[keep])
    steps = keep.trainer.steps_per_epoch
    assert steps == 2
    for row in RunDir(tmp_path / "run").read_history():
        step = int(row["epoch"]) * steps  # the lr after the epoch's last step
        want = LR * previous_factor(step, 3 * steps, 3, config.optim.min_lr_ratio)
        assert float(row["lr"]) == pytest.approx(want, rel=1e-9)
    # weight decay on weights only: biases and norm parameters (all 1-D) are not decayed
    for group in keep.trainer.optimizer.param_groups:
        assert {p.ndim > 1 for p in group["params"]} == {group["weight_decay"] > 0}
