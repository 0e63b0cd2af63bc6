"""The run folder: its paths, history.csv, checkpoints written atomically and read without executing code; what
evaluation writes is what `RunDir` names, and the reference page lists it."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumolab.config import TrainConfig, apply_overrides
from pneumolab.errors import ArtefactError
from pneumolab.evaluate.runner import evaluate_run, write_class_predictions
from pneumolab.report._runfiles import read_run
from pneumolab.runs import (
    BINARY_PREDICTION_COLUMNS,
    EVALUATED_SPLITS,
    GATE_SCORE_COLUMNS,
    VARIANT_SUFFIXES,
    RunDir,
    class_prediction_columns,
    environment_info,
    load_checkpoint,
    predicted_classes,
    save_checkpoint,
)
from pneumolab.train.api import train

REPO = Path(__file__).resolve().parents[1]


def _named(run: RunDir) -> set[Path]:
    """Every path `RunDir` names: its path properties, and its per-split, per-variant files."""
    properties = [getattr(run, name) for name, member in vars(RunDir).items() if isinstance(member, property)]
    per_variant = [
        path
        for split in EVALUATED_SPLITS
        for suffix in VARIANT_SUFFIXES
        for path in (run.predictions(split, suffix), run.metrics(f"{split}{suffix}"))
    ]
    return {p for p in [*properties, *per_variant] if isinstance(p, Path)}


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


def test_evaluation_writes_exactly_the_files_run_dir_names(make_dataset, tmp_path):
    settings = {"data.root": str(make_dataset(per_class=16)), "data.cache_dir": str(tmp_path / "cache")}
    settings |= {"data.val_fraction": 0.25, "model.name": "mobilenet_v2", "model.weights": "none", "image_size": 64}
    train(apply_overrides(TrainConfig(), settings | {"batch_size": 8, "epochs": 1}), tmp_path / "run", progress=False)
    evaluate_run(tmp_path / "run", tta="plan", n_resamples=50, progress=False)
    run = RunDir(tmp_path / "run")
    written = {p for p in run.path.rglob("*") if p.is_file()}
    # folders, and the files of TensorBoard, the stress evaluation and the plots, which this run did not ask for
    not_written = {run.checkpoints, run.tensorboard, run.plots, run.stress_plots, run.stress_metrics}
    assert written == _named(run) - not_written
    assert run.predictions("test", "_tta").read_text().splitlines()[0] == ",".join(BINARY_PREDICTION_COLUMNS)
    assert run.gate_scores.read_text().splitlines()[0] == ",".join(GATE_SCORE_COLUMNS)
    files = read_run(run.path)  # the report's reader finds every variant and the gate's files
    assert set(files.evaluations) == {"val", "test", "val_tta", "test_tta"}
    assert files.gate_scores is not None and files.selective and files.overlap


def test_class_predictions_columns_round_trip(tmp_path):
    classes = ("NORMAL", "BACTERIA", "VIRUS")
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    dest = write_class_predictions(tmp_path / "test.csv", ["a", "b"], [0, 2], probabilities, classes, np.zeros((2, 3)))
    header = tuple(dest.read_text().splitlines()[0].split(","))
    assert header == class_prediction_columns(classes) and predicted_classes(header) == classes
    assert predicted_classes(BINARY_PREDICTION_COLUMNS) == ()


def test_the_reference_page_lists_every_run_dir_path_and_column():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = hooks.run_folder_reference()
    run = RunDir("RUN")
    for name, member in vars(RunDir).items():
        if isinstance(member, property) and isinstance(getattr(run, name), Path):
            assert f"| `{name}` | `{getattr(run, name).as_posix()}` |" in page, name
        elif callable(member) and member.__annotations__.get("return") == "Path":
            assert f"| `{name}(" in page, name
    assert "`RUN/predictions/{split}{suffix}.csv`" in page and "`RUN/metrics/{name}.json`" in page
    for column in (*BINARY_PREDICTION_COLUMNS, *class_prediction_columns(["<CLASS>"]), *GATE_SCORE_COLUMNS):
        assert f"`{column}`" in page, column
