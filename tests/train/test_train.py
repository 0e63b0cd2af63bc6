"""Training end to end on small generated datasets: run folder, resume after a kill, DDP, the features path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pneumolab.runs import RunDir, load_checkpoint
from pneumolab.train.api import train
from tests.train._tiny import tiny_config


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pneumolab.cli", *args]


def test_a_run_folder_is_complete(make_dataset, tmp_path):
    root = make_dataset(per_class=16)
    config = tiny_config(
        root, tmp_path / "cache", epochs=2, tensorboard=True, **{"model.head": "plan", "freeze": "plan"}
    )
    summary = train(config, tmp_path / "run", progress=False)
    run = RunDir(tmp_path / "run")
    for path in (run.config, run.split, run.history, run.env, run.best, run.last):
        assert path.is_file(), path
    assert list((run.path / "tensorboard").glob("events.out.tfevents.*"))
    history = run.read_history()
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert {"train_loss", "val_loss", "val_roc_auc", "val_balanced_accuracy", "lr", "train_images_per_s"} <= set(
        history[0]
    )
    assert 0.0 <= float(history[-1]["val_roc_auc"]) <= 1.0
    env = json.loads(run.env.read_text())
    assert env["weights_source"] == "random" and env["train_summary"]["best_epoch"] == summary["best_epoch"]
    best = load_checkpoint(run.best)
    assert best["model_name"] == "resnet18" and best["image_size"] == 64
    # the plan's freezing: only layer4 and the head trained
    trainable = int(history[0]["trainable_params"])
    assert 0 < trainable < env["parameters"]["total"]
    with pytest.raises(Exception, match="already holds a run"):
        train(config, tmp_path / "run", progress=False)


def _train_command(root: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return cli(
        "train", "--data", str(root), "--model", "mobilenet_v2", "--weights", "none", "--image-size", "64",
        "--batch-size", "8", "--epochs", "3", "--threads", "2", "--out", str(out), "--quiet", *extra,
    )  # fmt: skip


def test_a_killed_run_resumes_to_the_same_weights(make_dataset, tmp_path):
    root = make_dataset(per_class=40)
    cache = tmp_path / "cache"
    env = {**os.environ, "PNEUMOLAB_CACHE": str(cache)}
    reference = tmp_path / "reference"
    subprocess.run(_train_command(root, cache, reference), check=True, env=env, timeout=600)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(_train_command(root, cache, interrupted), env=env)
    last = RunDir(interrupted).last
    deadline = time.monotonic() + 300
    while not last.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 2
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert len(RunDir(interrupted).read_history()) < 3

    subprocess.run(_train_command(root, cache, interrupted, "--resume"), check=True, env=env, timeout=600)
    want = load_checkpoint(RunDir(reference).last)["model"]
    got = load_checkpoint(last)["model"]
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert [r["epoch"] for r in RunDir(interrupted).read_history()] == ["1", "2", "3"]


def test_ddp_two_processes_on_cpu_agree(make_dataset, tmp_path):
    root = make_dataset(per_class=12)
    out = tmp_path / "ddp"
    train_args = _train_command(root, tmp_path / "cache", out, "--epochs", "1", "--threads", "1")[3:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "pneumolab.cli", *train_args]
    env = {**os.environ, "PNEUMOLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    # a session of its own, so that a hang can be killed with all the workers torchrun started
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, stderr[-3000:]
    env_json = json.loads(RunDir(out).env.read_text())
    assert env_json["world_size"] == 2
    assert env_json["train_summary"]["ranks_agree"] is True
    assert len(RunDir(out).read_history()) == 1  # rank 0 alone wrote the history


def test_features_strategy_trains_the_head_only(make_dataset, tmp_path):
    root = make_dataset(per_class=16)
    config = tiny_config(root, tmp_path / "cache", strategy="features", feature_views=2, head_epochs=5)
    train(config, tmp_path / "run", progress=False)
    run = RunDir(tmp_path / "run")
    assert len(run.read_history()) == 5
    best = load_checkpoint(run.best)
    assert best["model_name"] == "resnet18"
    assert any(key.startswith("head.") for key in best["model"])
