"""The three-class task end to end on a small generated dataset and a tiny model: train, evaluate (K-class metrics,
binary views, decision rule fit on validation), export, evaluate the artefact, predict, explain and serve."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from pneumolab.config import TrainConfig, apply_overrides
from pneumolab.data.tasks import KIND_CLASSES
from pneumolab.errors import SettingError
from pneumolab.evaluate.multiclass import multiclass_metrics
from pneumolab.evaluate.runner import ensemble_runs, evaluate_artefact, evaluate_run
from pneumolab.inference.export import export_artefact
from pneumolab.inference.files import predict_files
from pneumolab.inference.loader import load_backend
from pneumolab.inference.pytorch import load_trained
from pneumolab.serve.app import create_app
from pneumolab.train.api import train
from tests.serve import running_server


@pytest.fixture(scope="module")
def kind_run(tmp_path_factory):
    """A trained and evaluated three-class run (and its dataset): trained once for the module."""
    from PIL import Image

    from tests.conftest import KERMANY_NAMES, synthetic_xray  # noqa: F401  (the generator the other tests use)

    tmp = tmp_path_factory.mktemp("kind")
    root, rng = tmp / "chest_xray", np.random.default_rng(0)
    for split in ("train", "test"):
        for label, folder in enumerate(("NORMAL", "PNEUMONIA")):
            (root / split / folder).mkdir(parents=True)
            for i in range(18):
                name = f"IM-{i // 2:04d}-{i % 2 + 1:04d}.jpeg"
                if folder == "PNEUMONIA":
                    name = f"person{i // 2}_{('bacteria', 'virus')[i % 2]}_{i}.jpeg"
                Image.fromarray(synthetic_xray(rng, (64, 64), label)).save(root / split / folder / name, quality=90)
    settings = {"data.root": str(root), "data.cache_dir": str(tmp / "cache"), "data.val_fraction": 0.3}
    settings |= {"data.task": "kind", "model.name": "resnet18", "model.weights": "none", "model.head": "plan"}
    settings |= {"image_size": 64, "batch_size": 8, "epochs": 1}
    run = tmp / "run"
    train(apply_overrides(TrainConfig(), settings), run, progress=False)
    results = evaluate_run(run, tta="cxr", n_resamples=200, progress=False)
    return root, run, results


def test_training_has_three_outputs_and_the_plans_weights(kind_run):
    _, run, _ = kind_run
    trained = load_trained(run)
    assert trained.classes == KIND_CLASSES and trained.model.num_classes == 3
    assert trained.logits(np.zeros((2, 64, 64), np.uint8)).shape == (2, 3)
    split = pd.read_csv(run / "split.csv")
    assert sorted(split["label"].unique()) == [0, 1, 2]
    env = json.loads((run / "env.json").read_text())
    weights = np.asarray(env["class_weights"])
    counts = np.bincount(split.loc[split["split"] == "train", "label"], minlength=3)
    expected = counts.sum() / (3 * counts)  # inverse frequency, the rarest class x 1.3, normalised to sum 1
    expected[np.argmin(counts)] *= 1.3
    np.testing.assert_allclose(weights, expected / expected.sum(), rtol=1e-5)


def test_evaluation_writes_k_class_metrics_views_and_the_decision_rule(kind_run):
    _, run, results = kind_run
    point = json.loads((run / "operating_point.json").read_text())
    assert point["method"].startswith("argmax after temperature scaling")
    check = point["class_bias_check"]
    assert check["helps"] == (point["class_bias"] is not None)
    if check["balanced_accuracy_with_bias"] is not None:
        assert check["helps"] == (check["balanced_accuracy_with_bias"] > check["balanced_accuracy_argmax"])
    assert set(point["derived_thresholds"]) == {"pneumonia_vs_normal", "bacterial_vs_viral"}
    used = "_tta" if point["tta"] else ""
    test = results[f"test{used}"]
    assert test["classes"] == list(KIND_CLASSES) and test["n"] == 36
    assert test["n_per_class"] == {"NORMAL": 18, "BACTERIAL": 9, "VIRAL": 9}
    saved = pd.read_csv(run / "predictions" / f"test{used}.csv")
    probabilities = saved[[f"p_{c}" for c in KIND_CLASSES]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    assert (saved["prediction"] == probabilities.argmax(1)).all()
    np.testing.assert_allclose(saved["probability"], 1 - saved["p_NORMAL"], atol=1e-6)
    # the saved metrics are the metrics of the saved predictions
    again = multiclass_metrics(saved["label"], probabilities / probabilities.sum(1, keepdims=True), KIND_CLASSES)
    assert again["accuracy"] == pytest.approx(test["accuracy"]) and again["macro_f1"] == pytest.approx(test["macro_f1"])
    assert sum(map(sum, test["confusion"]["counts"])) == 36
    low, high = test["ci95"]["accuracy"]
    assert low <= test["accuracy"] <= high
    views = test["views"]
    assert views["pneumonia_vs_normal"]["n"] == 36 and views["pneumonia_vs_normal"]["n_positive"] == 18
    assert views["bacterial_vs_viral"]["n"] == 18 and views["bacterial_vs_viral"]["positive"] == "VIRAL"
    assert views["pneumonia_vs_normal"]["threshold"] == point["derived_thresholds"]["pneumonia_vs_normal"]


def test_an_ensemble_of_k_class_runs_combines_class_probabilities_and_is_servable(kind_run, tmp_path):
    root, run, results = kind_run
    used = "_tta" if json.loads((run / "operating_point.json").read_text())["tta"] else ""
    member = pd.read_csv(run / "predictions" / f"test{used}.csv")
    mean = ensemble_runs([run, run], tmp_path / "mean", method="mean", n_resamples=200)
    assert mean["test"]["classes"] == list(KIND_CLASSES)
    assert mean["test"]["confusion"]["counts"] == results[f"test{used}"]["confusion"]["counts"]  # a mean of one
    stacked = ensemble_runs([run, run], tmp_path / "stack", method="stacking", n_resamples=200)
    saved = pd.read_csv(tmp_path / "stack" / "predictions" / "test.csv")
    columns = [f"p_{c}" for c in KIND_CLASSES]
    np.testing.assert_allclose(saved[columns].sum(axis=1), 1.0, atol=1e-5)
    assert stacked["test"]["n"] == len(member) and "bacterial_vs_viral" in stacked["test"]["views"]
    ensemble = load_backend(tmp_path / "stack", "pytorch")
    assert ensemble.classes == KIND_CLASSES
    ensemble.gate_enabled = False
    films = [root / p for p in saved["path"][:5]]
    rows, failures = predict_files(ensemble, films)
    assert not failures
    np.testing.assert_allclose([[r["probabilities"][c] for c in KIND_CLASSES] for r in rows],
                               saved[columns][:5], atol=2e-4)  # fmt: skip
    with pytest.raises(SettingError, match="different classes"):
        ensemble_runs([run, _binary_twin(run, tmp_path)], tmp_path / "mixed", n_resamples=200)


def _binary_twin(run: Path, tmp_path: Path) -> Path:
    """A copy of the run's prediction files written as a binary run's (path,label,probability,prediction,logit)."""
    twin = tmp_path / "binary"
    shutil.copytree(run, twin, ignore=shutil.ignore_patterns("checkpoints"))
    for file in (twin / "predictions").glob("*.csv"):
        table = pd.read_csv(file)
        table["label"] = (table["label"] != 0).astype(int)
        table["prediction"] = (table["probability"] >= 0.5).astype(int)
        table[["path", "label", "probability", "prediction"]].assign(logit=np.nan).to_csv(file, index=False)
    return twin


def test_the_artefact_evaluates_like_its_run_and_predicts_every_class(kind_run, tmp_path):
    root, run, results = kind_run
    point = json.loads((run / "operating_point.json").read_text())
    artefact = export_artefact(run, tmp_path / "artefact")
    card = json.loads((artefact / "card.json").read_text())
    assert card["classes"] == list(KIND_CLASSES) and card["view_thresholds"] == point["derived_thresholds"]
    expected = results["test_tta" if point["tta"] else "test"]
    got = evaluate_artefact(artefact, data=root, split="test", n_resamples=200, progress=False)
    assert got["confusion"]["counts"] == expected["confusion"]["counts"]
    assert got["macro_roc_auc"] == pytest.approx(expected["macro_roc_auc"], abs=1e-6)
    films = sorted((root / "test").rglob("*.jpeg"))[:4]
    cli = [sys.executable, "-m", "pneumolab.cli"]
    shown = subprocess.run([*cli, "predict", *map(str, films), "--model", str(artefact), "--csv"],
                           capture_output=True, text=True)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    rows = list(csv.DictReader(io.StringIO(shown.stdout)))
    saved = pd.read_csv(run / "predictions" / f"test{'_tta' if point['tta'] else ''}.csv").set_index("path")
    for row in rows:
        relative = Path(row["file"]).relative_to(root).as_posix()
        every = np.array([float(row[f"p_{c}"]) for c in KIND_CLASSES])
        np.testing.assert_allclose(every, saved.loc[relative, [f"p_{c}" for c in KIND_CLASSES]], atol=2e-4)
        if row["status"] != "refused":
            assert row["label"] == KIND_CLASSES[int(np.argmax(every))]
    explained = subprocess.run([*cli, "explain", str(films[0]), "--model", str(artefact), "--target", "VIRAL",
                                "--no-gate", "--out", str(tmp_path / "cam.png"), "--json"],
                               capture_output=True, text=True)  # fmt: skip
    assert explained.returncode == 0, explained.stderr
    summary = json.loads(explained.stdout)
    assert summary["target"] == "VIRAL" and set(summary["probabilities"]) == set(KIND_CLASSES)
    assert (tmp_path / "cam.png").read_bytes()[:4] == b"\x89PNG"
    wrong = subprocess.run([*cli, "explain", str(films[0]), "--model", str(artefact), "--target", "VIRUS"],
                           capture_output=True, text=True)  # fmt: skip
    assert wrong.returncode == 2 and "did you mean VIRAL" in wrong.stderr


def test_the_service_returns_every_class(kind_run):
    root, run, _ = kind_run
    trained = load_trained(run)
    film = sorted((root / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    with running_server(create_app(trained, gate=False)) as url:  # a tiny model's gate refuses at random
        files = {"file": (film.name, film.read_bytes(), "image/jpeg")}
        body = httpx.post(f"{url}/v1/predict", files=files, timeout=60).json()
        assert list(body["probabilities"]) == list(KIND_CLASSES)
        assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
        assert body["probability"] == pytest.approx(1 - body["probabilities"]["NORMAL"], abs=1e-6)
        model = httpx.get(f"{url}/v1/model", timeout=10).json()
        assert model["classes"] == list(KIND_CLASSES)
        bad = httpx.post(f"{url}/v1/explain", params={"target": "VIRUS"}, files=files, timeout=60)
        assert bad.status_code == 422 and "VIRUS" in bad.json()["detail"]
