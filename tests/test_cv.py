"""Cross-validation end to end (`pneumolab cv`): real tiny models on generated images, real fold runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pneumolab.cv import run_cv
from pneumolab.data.dataset import build_manifest
from pneumolab.data.splits import assign_folds
from pneumolab.errors import SettingError
from pneumolab.evaluate.calibration import ThresholdSelector
from pneumolab.inference.files import predict_files
from pneumolab.inference.loader import load_backend
from pneumolab.pipeline import load_pipeline_config

TINY_TRAIN = {"model": {"name": "resnet18", "weights": "none"}, "image_size": 64, "batch_size": 8, "epochs": 1,
              "threads": 2}  # fmt: skip


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "cv.yaml"
    settings = {
        "data": {"cache_dir": str(tmp_path / "cache")},
        "evaluate": {"tta": None, "resamples": 200},
        "models": [{"name": "r18", "train": TINY_TRAIN}],
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def test_cv_writes_folds_out_of_fold_predictions_summary_and_a_servable_cv_ensemble(make_dataset, tmp_path):
    root = make_dataset(per_class=24)
    config = load_pipeline_config(_config(tmp_path))
    out = tmp_path / "cv"
    # fold 0 alone (as one worker of a sweep would): no summary until every fold is there
    assert run_cv(config, out, folds=3, data=root, folds_to_run=[0], progress=False) == {"r18": None}
    assert (out / "r18" / "fold-0" / "operating_point.json").is_file() and not (out / "r18" / "cv.json").exists()
    summary = run_cv(config, out, folds=3, data=root, progress=False)["r18"]

    # out-of-fold: every training film exactly once, from the fold that held it out
    manifest = build_manifest(root)
    folds = assign_folds(manifest, folds=3)
    train = manifest[manifest["split"] == "train"].assign(fold=folds[manifest["split"] == "train"])
    oof = pd.read_csv(out / "r18" / "oof.csv")
    assert sorted(oof["path"]) == sorted(train["path"]) and not oof["path"].duplicated().any()
    assert dict(zip(oof["path"], oof["fold"], strict=True)) == dict(zip(train["path"], train["fold"], strict=True))
    for k in range(3):
        split = pd.read_csv(out / "r18" / f"fold-{k}" / "split.csv")
        assert set(split.loc[split["split"] == "val", "path"]) == set(oof.loc[oof["fold"] == k, "path"])

    # per metric: the three fold values, their mean and spread; the proper scoring rules first
    saved = json.loads((out / "r18" / "cv.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    log_loss = saved["per_fold"]["val"]["log_loss"]
    assert list(saved["per_fold"]["val"])[:3] == ["log_loss", "brier", "roc_auc"] and len(log_loss["values"]) == 3
    assert log_loss["mean"] == pytest.approx(np.mean(log_loss["values"]))
    assert log_loss["std"] == pytest.approx(np.std(log_loss["values"], ddof=1))
    folds_test = [json.loads((out / "r18" / f"fold-{k}" / "metrics" / "test.json").read_text()) for k in range(3)]
    assert saved["per_fold"]["test"]["accuracy"]["values"] == [m["accuracy"] for m in folds_test]

    # the CV ensemble: its operating point fit on the out-of-fold predictions, test the mean of the fold models
    ensemble = out / "r18" / "cv-ensemble"
    point = json.loads((ensemble / "operating_point.json").read_text())
    fitted = ThresholdSelector("balanced_accuracy").fit(oof["label"].to_numpy(), oof["probability"].to_numpy())
    assert point["threshold"] == pytest.approx(fitted.threshold_) and saved["out_of_fold"]["n"] == len(oof)
    tests = [pd.read_csv(out / "r18" / f"fold-{k}" / "predictions" / "test.csv") for k in range(3)]
    combined = pd.read_csv(ensemble / "predictions" / "test.csv")
    np.testing.assert_allclose(combined["probability"], np.mean([t["probability"] for t in tests], 0), atol=1e-6)
    loaded = load_backend(ensemble)  # servable like any ensemble
    loaded.gate_enabled = False
    rows, failures = predict_files(loaded, [root / p for p in combined["path"][:4]])
    assert not failures
    np.testing.assert_allclose([r["probability"] for r in rows], combined["probability"][:4], atol=2e-4)

    # an unchanged re-run trains nothing and writes the same summary
    fold_checkpoint = out / "r18" / "fold-1" / "checkpoints" / "best.pt"
    before = fold_checkpoint.stat().st_mtime
    assert run_cv(config, out, folds=3, data=root, progress=False)["r18"] == summary
    assert fold_checkpoint.stat().st_mtime == before


def test_cv_refuses_bad_settings_with_one_line(make_dataset, tmp_path):
    root = make_dataset(per_class=16)
    config = load_pipeline_config(_config(tmp_path))
    with pytest.raises(SettingError, match="at least 2 folds"):
        run_cv(config, tmp_path / "out", folds=1, data=root, progress=False)
    with pytest.raises(SettingError, match=r"--fold: \[4\] not in 0 \.\. 2"):
        run_cv(config, tmp_path / "out", folds=3, data=root, folds_to_run=[4], progress=False)
    cli = subprocess.run(
        [sys.executable, "-m", "pneumolab.cli", "cv", "--config", str(_config(tmp_path)), "--data", str(root),
         "--design", "newest", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 2 and "unknown split design 'newest'" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
