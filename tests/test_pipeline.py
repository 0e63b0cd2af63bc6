"""Evaluation, ensembles and the main job end to end, on small generated datasets and tiny models."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pneumolab.config import TrainConfig, apply_overrides
from pneumolab.constants import CLASSES
from pneumolab.errors import PneumolabError, SettingError
from pneumolab.evaluate.runner import ensemble_runs, evaluate_artefact, evaluate_run, stress_model
from pneumolab.inference.export import export_artefact
from pneumolab.inference.files import predict_files
from pneumolab.inference.loader import load_backend
from pneumolab.inference.pytorch import load_trained
from pneumolab.pipeline import load_pipeline_config, run_pipeline
from pneumolab.report._analyses import FileHashes, overlap_removed, used_test_evaluation
from pneumolab.report._runfiles import read_run
from pneumolab.report.sections import overlap_block
from pneumolab.train.api import train

METRIC_KEYS = {
    "accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "average_precision", "roc_auc",
    "threshold", "confusion_matrix", "n", "ci95",
}  # fmt: skip

TINY_TRAIN = {
    "model": {"name": "resnet18", "weights": "none"},
    "image_size": 64,
    "batch_size": 8,
    "epochs": 1,
    "threads": 2,
}


@pytest.fixture
def dataset(make_dataset):
    return make_dataset(per_class=16)


def _train(root: Path, out: Path, cache: Path, **overrides) -> Path:
    settings = {"data.root": str(root), "data.cache_dir": str(cache), "data.val_fraction": 0.25}
    settings |= {"model.name": "resnet18", "model.weights": "none", "image_size": 64, "batch_size": 8, "epochs": 1}
    train(apply_overrides(TrainConfig(), settings | overrides), out, progress=False)
    return out


def test_evaluate_writes_predictions_metrics_and_operating_point(dataset, tmp_path):
    run = _train(dataset, tmp_path / "run", tmp_path / "cache")
    results = evaluate_run(run, tta="plan", n_resamples=200, progress=False)
    assert set(results) == {"val", "test", "val_tta", "test_tta"}
    test = results["test"]
    assert set(test) >= METRIC_KEYS and set(test["ci95"]) >= {"accuracy", "roc_auc"}
    assert test["n"] == 32 and sum(map(sum, test["confusion_matrix"])) == 32
    assert test["tta"] == [] and results["test_tta"]["tta"] == ["identity", "hflip", "vflip", "rot90"]
    for name in ("val.csv", "test.csv", "val_tta.csv", "test_tta.csv"):
        header = (run / "predictions" / name).read_text().splitlines()[0]
        assert header == "path,label,probability,prediction,logit"
    point = json.loads((run / "operating_point.json").read_text())
    assert point["chosen_on"] == "validation" and point["threshold"] == pytest.approx(
        results["val_tta" if point["tta"] else "val"]["threshold"]
    )
    # the variant in use is the one with the lower validation log loss (a tie keeps plain)
    losses = {name: results[f"val{suffix}"]["log_loss"] for name, suffix in (("plain", ""), ("tta", "_tta"))}
    assert point["chosen_by"] == "log_loss" and bool(point["tta"]) == (losses["tta"] < losses["plain"])
    assert point["variants"]["tta"]["val_log_loss"] == pytest.approx(losses["tta"])
    trained = load_trained(run)
    assert trained.threshold == pytest.approx(point["threshold"]) and list(trained.tta) == point["tta"]
    # the overlap analysis is written by evaluation, for the variant in use, and the report only reads it
    overlap = json.loads((run / "metrics" / "overlap.json").read_text())
    used = f"test{'_tta' if point['tta'] else ''}"
    assert overlap["variant"] == used and overlap["rows"][0]["name"] == "all test images"
    assert overlap["rows"][0]["metrics"]["accuracy"] == pytest.approx(results[used]["accuracy"])
    files = read_run(run)
    found = overlap_removed(files, used_test_evaluation(files))
    assert found["from_file"] and found["rows"] == overlap["rows"] and found["threshold"] == point["threshold"]
    assert overlap_block(files, used_test_evaluation(files), FileHashes())["facts"]  # the report words it

    # a second evaluation reuses the files; the CLI prints the metric object
    mtime = (run / "metrics" / "test.json").stat().st_mtime
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pneumolab.cli",
            "evaluate",
            str(run),
            "--split",
            "test",
            "--tta-views",
            "plan",
            "--resamples",
            "200",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(test["accuracy"])
    assert (run / "metrics" / "test.json").stat().st_mtime == mtime

    # a changed setting is not answered from the old files: another threshold rule, another operating point
    evaluate_run(run, tta="plan", threshold_method="youden", n_resamples=200, progress=False)
    again = json.loads((run / "operating_point.json").read_text())
    assert again["evaluated_with"]["threshold_method"] == "youden" and again["method"] != point["method"]
    assert (run / "metrics" / "test.json").stat().st_mtime > mtime
    assert point["evaluated_with"]["checkpoint_sha256"] == again["evaluated_with"]["checkpoint_sha256"]

    # choosing the variant by another validation metric is another evaluation, and follows that metric
    by_auc = evaluate_run(run, tta="plan", choose_by="roc_auc", n_resamples=200, progress=False)
    third = json.loads((run / "operating_point.json").read_text())
    aucs = {name: by_auc[f"val{suffix}"]["roc_auc"] for name, suffix in (("plain", ""), ("tta", "_tta"))}
    assert third["chosen_by"] == third["evaluated_with"]["choose_by"] == "roc_auc"
    assert bool(third["tta"]) == (aucs["tta"] > aucs["plain"])
    # the framing rule's objective: log loss over the clean and the perturbed validation films, per variant
    evaluate_run(run, tta="plan", choose_by="stress_log_loss", n_resamples=200, progress=False)
    fourth = json.loads((run / "operating_point.json").read_text())
    stressed = {name: fourth["variants"][name]["val_stress_log_loss"] for name in ("plain", "tta")}
    assert fourth["chosen_by"] == "stress_log_loss"
    assert bool(fourth["tta"]) == (stressed["tta"] < stressed["plain"])
    assert all(v > 0 for v in stressed.values())
    with pytest.raises(SettingError, match="choose_by"):
        evaluate_run(run, tta="plan", choose_by="accuracy", progress=False)


def test_ensemble_of_two_runs(dataset, tmp_path):
    runs = [
        _train(dataset, tmp_path / "a", tmp_path / "cache"),
        _train(dataset, tmp_path / "b", tmp_path / "cache", **{"model.name": "mobilenet_v2", "image_size": 72}),
    ]
    for run in runs:
        evaluate_run(run, tta=None, n_resamples=200, progress=False)
    results = ensemble_runs(runs, tmp_path / "ens", method="stacking", n_resamples=200)
    assert results["test"]["n"] == 32
    env = json.loads((tmp_path / "ens" / "env.json").read_text())
    assert env["ensemble"]["method"] == "stacking" and len(env["ensemble"]["members"]) == 2
    assert results["test"]["model"] == "ens" and not list(tmp_path.glob(".pneumolab-*"))  # no temporary left
    with pytest.raises(Exception, match="at least two"):
        ensemble_runs(runs[:1], tmp_path / "ens1")
    _check_ensemble_is_servable(tmp_path / "ens", dataset, tmp_path)
    _check_stress_of_a_run_and_its_ensemble(runs[0], tmp_path / "ens", dataset)

    # the folder is replaced whole, so a member (or any trained run) is never the destination
    member_files = sorted(p.relative_to(runs[0]) for p in runs[0].rglob("*"))
    with pytest.raises(PneumolabError, match="a trained run folder"):
        ensemble_runs(runs, runs[0])
    assert sorted(p.relative_to(runs[0]) for p in runs[0].rglob("*")) == member_files

    # a failure (members over other images) leaves the earlier ensemble as it was, and no new folder
    before = (tmp_path / "ens" / "metrics" / "test.json").read_text()
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    table = pd.read_csv(other / "predictions" / "test.csv")
    table.iloc[::-1].to_csv(other / "predictions" / "test.csv", index=False)  # the same images in another order
    for out in (tmp_path / "ens", tmp_path / "ens2"):
        with pytest.raises(PneumolabError, match="test images differ"):
            ensemble_runs([runs[0], other], out)
    assert (tmp_path / "ens" / "metrics" / "test.json").read_text() == before and not (tmp_path / "ens2").exists()

    # a folder of the user's is refused, with --force it is replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(PneumolabError, match=r"keep\.txt.*--force"):
        ensemble_runs(runs, mine)
    assert (mine / "keep.txt").read_text() == "mine"
    ensemble_runs(runs, mine, force=True, n_resamples=100)
    assert (mine / "metrics" / "test.json").is_file() and not (mine / "keep.txt").exists()


def _check_stress_of_a_run_and_its_ensemble(run: Path, ensemble: Path, root: Path) -> None:
    """The stress evaluation of a run draws its most-moved films' Grad-CAM (clean beside the case that moved them);
    an ensemble is stressed through the same loader, on its first member's validation films."""
    cases = "crop:0.7,frame_black:1.3"
    block = stress_model(run, data=root, splits=("val",), cases=cases, backend="pytorch", progress=False)["val"]
    drawn = [f for f in block["flippers"] if f.get("gradcam")]
    assert len(drawn) == min(4, len(block["flippers"])) and drawn[0]["largest_change_by"] in cases.split(",")
    with Image.open(run / drawn[0]["gradcam"]) as panel:
        assert panel.width > 2 * 64 and panel.mode == "RGB"  # two overlays side by side
    assert json.loads((run / "metrics" / "stress.json").read_text())["val"]["flippers"] == block["flippers"]
    together = stress_model(ensemble, data=root, splits=("val",), cases=cases, backend="pytorch", progress=False)
    assert together["val"]["n"] == block["n"] and set(together["val"]["cases"]) == set(cases.split(","))
    assert not any(f.get("gradcam") for f in together["val"]["flippers"])  # no run of its own to draw into


def _check_ensemble_is_servable(ensemble: Path, root: Path, tmp_path: Path) -> None:
    """predict, export and serve take the ensemble folder as a model; all give its own saved test predictions."""
    saved = pd.read_csv(ensemble / "predictions" / "test.csv")
    saved["path"] = [str(root / p) for p in saved["path"]]  # saved relative to the dataset
    point = json.loads((ensemble / "operating_point.json").read_text())
    loaded = load_backend(ensemble)
    assert loaded.backend == "ensemble" and loaded.threshold == point["threshold"] and loaded.band is not None
    loaded.gate_enabled = False  # tiny, barely trained members: compare probabilities on every film
    rows, failures = predict_files(loaded, [Path(p) for p in saved["path"]])
    assert not failures
    np.testing.assert_allclose([r["probability"] for r in rows], saved["probability"], atol=2e-4)
    assert [r["label"] for r in rows] == [CLASSES[int(v)] for v in saved["prediction"]]

    cli = [sys.executable, "-m", "pneumolab.cli"]
    predicted = subprocess.run(
        [*cli, "predict", *saved["path"][:6], "--model", str(ensemble), "--csv", "--no-gate"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    table = pd.read_csv(io.StringIO(predicted.stdout))
    np.testing.assert_allclose(table["probability"], saved["probability"][:6], atol=2e-4)

    artefact = tmp_path / "ens-artefact"
    exported = subprocess.run([*cli, "export", str(ensemble), "--out", str(artefact)], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert (artefact / "ensemble.json").is_file() and len(list((artefact / "members").iterdir())) == 2
    again = load_backend(artefact)
    again.gate_enabled = False
    np.testing.assert_allclose(again.score(loaded.load_images(saved["path"][:6]))[0][:, 1], saved["probability"][:6],
                               atol=2e-4)  # fmt: skip

    with socket.socket() as probe:  # a free port for the service
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([*cli, "serve", "--model", str(ensemble), "--port", str(port), "--no-gate"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        first = Path(saved["path"][0])
        with first.open("rb") as handle:
            answer = httpx.post(url + "/v1/predict", files={"file": (first.name, handle, "image/jpeg")}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["probability"] == pytest.approx(saved["probability"][0], abs=2e-4)
        assert httpx.get(url + "/v1/model", timeout=30).json()["backend"] == "ensemble"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _write_tiny_config(tmp_path: Path) -> Path:
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "title": "tiny",
                "data": {"cache_dir": str(tmp_path / "cache"), "val_fraction": 0.25},
                "evaluate": {"tta": "cxr", "resamples": 200},
                "ensemble": {"method": "mean"},
                "models": [
                    {"name": "r18", "train": TINY_TRAIN},
                    {"name": "r18-plan", "train": {**TINY_TRAIN, "model": {**TINY_TRAIN["model"], "head": "plan"}}},
                ],
            }
        )
    )
    return config_file


def test_run_only_trains_the_named_models_ensembles_once_all_are_done_and_a_rerun_is_idempotent(dataset, tmp_path):
    config = load_pipeline_config(_write_tiny_config(tmp_path))
    out = tmp_path / "out"
    first = run_pipeline(config, out, data=dataset, only=["r18"], progress=False)
    assert (out / "r18" / "operating_point.json").is_file() and not (out / "r18-plan").exists()
    assert not (out / "ensemble").exists() and [Path(r).name for r in first["runs"]] == ["r18"]
    trained = {name: (out / name / "checkpoints" / "best.pt") for name in ("r18", "r18-plan")}
    r18 = trained["r18"].stat().st_mtime
    # the whole config: only what is missing is trained, then the ensemble and the report
    whole = run_pipeline(config, out, data=dataset, progress=False)
    assert trained["r18"].stat().st_mtime == r18 and [Path(r).name for r in whole["runs"]][-1] == "ensemble"
    report = Path(whole["report"])
    assert report.is_file() and "r18-plan" in report.read_text()
    assert (out / "ensemble" / "metrics" / "test.json").is_file()
    # again: nothing is trained or evaluated again
    plan = trained["r18-plan"].stat().st_mtime
    again = run_pipeline(config, out, data=dataset, progress=False)
    assert trained["r18-plan"].stat().st_mtime == plan and again["wall_seconds"] < whole["wall_seconds"]
    # r18 comes back from another machine with its predictions but without its checkpoints
    shutil.rmtree(out / "r18" / "checkpoints")
    second = run_pipeline(config, out, data=dataset, only=["r18-plan"], progress=False)
    assert not (out / "r18" / "checkpoints").exists()  # joined as it is, not trained again
    assert [Path(r).name for r in second["runs"]] == ["r18", "r18-plan", "ensemble"]
    with pytest.raises(SettingError, match="nope"):
        run_pipeline(config, out, data=dataset, only=["nope"], progress=False)


def test_exported_model_evaluates_like_its_run(dataset, tmp_path):
    run = _train(dataset, tmp_path / "run", tmp_path / "cache")
    results = evaluate_run(run, tta="cxr", n_resamples=200, progress=False)
    point = json.loads((run / "operating_point.json").read_text())
    artefact = export_artefact(run, tmp_path / "artefact")
    for split in ("test", "val"):
        expected = results[f"{split}_tta" if point["tta"] else split]
        got = evaluate_artefact(artefact, data=dataset, split=split, n_resamples=200, progress=False)
        assert got["n"] == expected["n"] and got["threshold"] == pytest.approx(expected["threshold"])
        assert got["confusion_matrix"] == expected["confusion_matrix"]
        assert got["roc_auc"] == pytest.approx(expected["roc_auc"], abs=1e-6)


def test_missing_dataset_offers_the_download_command(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump({"models": [{"name": "x", "train": TINY_TRAIN}]}))
    result = subprocess.run(
        [sys.executable, "-m", "pneumolab.cli", "run", "--config", str(config_file), "--data", str(tmp_path / "no")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "pneumolab data download" in result.stderr


def test_predict_matches_evaluate_and_reports_bad_files(dataset, tmp_path):
    run = _train(dataset, tmp_path / "run", tmp_path / "cache")
    evaluate_run(run, tta="cxr", n_resamples=200, progress=False)
    point = json.loads((run / "operating_point.json").read_text())
    evaluated = pd.read_csv(run / "predictions" / ("test_tta.csv" if point["tta"] else "test.csv"))
    # the gate was fit on the run's training split, its limit and the band on validation, and measured
    assert point["gate"]["n_train"] == (pd.read_csv(run / "split.csv")["split"] == "train").sum()
    assert point["referral"]["threshold"] == point["threshold"]
    scores = pd.read_csv(run / "gate" / "scores.csv")
    assert {"val", "test", "far-ood", "near-rot90"} <= set(scores["group"])
    val_refused = scores.loc[scores["group"] == "val", "refused"].mean()
    assert val_refused <= 1 - point["gate"]["keep"] + 1 / point["gate"]["n_val"]
    selective = json.loads((run / "metrics" / "selective.json").read_text())
    assert selective["test"]["n"] == len(evaluated)
    assert selective["test"]["refused"] == scores.loc[scores["group"] == "test", "refused"].sum()
    assert load_trained(run).gate.limit_ == pytest.approx(point["gate"]["limit"])
    (tmp_path / "bad.jpeg").write_text("not an image")
    result = subprocess.run(
        [sys.executable, "-m", "pneumolab.cli", "predict", str(dataset / "test"), str(tmp_path / "bad.jpeg"),
         str(tmp_path / "missing*.png"), "--model", str(run), "--csv", "--no-gate"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2
    assert any("bad.jpeg: not a JPEG, PNG or DICOM image" in line for line in errors)
    assert any("missing*.png: no file matches this pattern" in line for line in errors)
    predicted = pd.read_csv(io.StringIO(result.stdout))
    assert len(predicted) == 32
    assert (predicted["status"] == "answered").all() and predicted["gate"].str.startswith("off").all()
    predicted["path"] = [str(Path(f).relative_to(dataset)) for f in predicted["file"]]
    merged = evaluated.merge(predicted, on="path")
    assert len(merged) == 32
    assert np.abs(merged["probability_x"] - merged["probability_y"]).max() < 1e-4
    assert ((merged["label_y"] == "PNEUMONIA").astype(int) == merged["prediction"]).all()
