"""The report's two derived analyses: calibration before and after temperature scaling, and the test metrics without
the images that overlap train/val (shared patient ids, byte-identical files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit, logit
from sklearn.metrics import brier_score_loss

from pneumolab.evaluate.calibration import expected_calibration_error
from pneumolab.evaluate.metrics import evaluate_predictions
from pneumolab.report import build_report
from pneumolab.report._analyses import (
    FileHashes,
    calibration_before_after,
    overlap_removed,
    shared_patient_mask,
    used_test_evaluation,
)
from pneumolab.report._runfiles import read_run
from pneumolab.report.render import _markdown_escape
from tests.report.conftest import SHARED_TEST_IMAGES, write_ensemble, write_run

OVERLAP_KEYS = ("accuracy", "recall", "specificity", "roc_auc")


def _section(markdown: str, run: str, heading: str) -> str:
    """One `###` section of a run's part of the Markdown report."""
    part = markdown.split(f"## {run} (", 1)[1]
    return part.split(f"### {heading}", 1)[1].split("\n### ", 1)[0]


def _predictions(run: Path, stem: str) -> pd.DataFrame:
    return pd.read_csv(run / "predictions" / f"{stem}.csv")


def _expected_metrics(table: pd.DataFrame, drop: set[int], threshold: float) -> dict:
    kept = table.drop(index=sorted(drop))
    return evaluate_predictions(kept["label"].to_numpy(), kept["probability"].to_numpy(), threshold)


def _assert_same_metrics(found: dict, expected: dict) -> None:
    assert found["n"] == expected["n"]
    for key in OVERLAP_KEYS:
        assert found[key] == pytest.approx(expected[key], abs=1e-12), key
        assert found["ci95"][key] == pytest.approx(expected["ci95"][key], abs=1e-12), key


def test_calibration_before_and_after_equals_a_direct_computation(make_run, tmp_path: Path) -> None:
    run = make_run("lite0", tta=True)  # the operating point chose TTA: the analysis must use test_tta.csv
    table = _predictions(run, "test_tta")
    y, logits, scaled = table["label"].to_numpy(), table["logit"].to_numpy(), table["probability"].to_numpy()
    expected = {
        "before": {"ece": expected_calibration_error(y, expit(logits)), "brier": brier_score_loss(y, expit(logits))},
        "after": {"ece": expected_calibration_error(y, scaled), "brier": brier_score_loss(y, scaled)},
    }
    assert expected["before"]["ece"] != pytest.approx(expected["after"]["ece"])  # T = 1.3 changes something

    files = read_run(run)
    found = calibration_before_after(used_test_evaluation(files))
    assert found["label"] == "test + TTA"
    assert found["temperature"] == pytest.approx(1.3)
    assert found["note"] is None
    for when in ("before", "after"):
        for key in ("ece", "brier"):
            assert found[when][key] == pytest.approx(expected[when][key], abs=1e-12), (when, key)

    section = _section(build_report([run], tmp_path / "report")["markdown"].read_text(), "lite0", "Calibration")
    before, after = expected["before"], expected["after"]
    assert f"| before temperature scaling (T = 1) | {before['ece']:.3f} | {before['brier']:.3f} |" in section
    assert f"| after temperature scaling (T = 1.30, fitted on validation) | {after['ece']:.3f} |" in section


def test_calibration_of_an_ensemble_shows_the_temperature_its_evaluation_fit(make_run, tmp_path: Path) -> None:
    member = make_run("member", tta=False)
    ensemble = write_ensemble(tmp_path / "runs", "ensemble", [member])
    val, test = _predictions(ensemble, "val"), _predictions(ensemble, "test")

    # temperature scaling by hand: the T that minimises the validation NLL of sigmoid(log-odds / T)
    def log_odds(frame: pd.DataFrame) -> np.ndarray:
        return logit(np.clip(frame["probability"].to_numpy(), 1e-12, 1 - 1e-12))

    z, y = log_odds(val), val["label"].to_numpy()

    def nll(log_t: float) -> float:
        return -np.mean(y * log_expit(z / np.exp(log_t)) + (1 - y) * log_expit(-z / np.exp(log_t)))

    expected_t = float(np.exp(minimize_scalar(nll, bounds=(np.log(0.01), np.log(100)), method="bounded").x))
    labels, saved = test["label"].to_numpy(), test["probability"].to_numpy()
    scaled = expit(log_odds(test) / expected_t)

    recorded = json.loads((ensemble / "operating_point.json").read_text())["temperature_if_scaled"]
    found = calibration_before_after(used_test_evaluation(read_run(ensemble)), recorded)
    assert found["fitted_apart"] and found["note"] is None and found["temperature"] == recorded
    assert found["temperature"] == pytest.approx(expected_t, rel=1e-3) and found["temperature"] != pytest.approx(1.0)
    assert found["before"]["ece"] == pytest.approx(expected_calibration_error(labels, saved), abs=1e-12)
    assert found["after"]["brier"] == pytest.approx(brier_score_loss(labels, scaled), abs=1e-6)

    def calibration_section(out: Path) -> str:
        return _section(build_report([ensemble], out)["markdown"].read_text(), "ensemble", "Calibration")

    section = calibration_section(tmp_path / "report")
    t, after = found["temperature"], found["after"]
    assert f"| as saved (not temperature-scaled) | {expected_calibration_error(labels, saved):.3f} |" in section
    assert f"(T = {t:.2f}, fitted on validation; the model does not use it) | {after['ece']:.3f} |" in section

    # an ensemble folder from before the temperature was recorded: nothing is fit here, the saved probabilities alone
    point = json.loads((ensemble / "operating_point.json").read_text())
    del point["temperature_if_scaled"]
    (ensemble / "operating_point.json").write_text(json.dumps(point))
    section = calibration_section(tmp_path / "report2")
    assert f"| as saved | {expected_calibration_error(labels, saved):.3f} |" in section
    assert "Before temperature scaling: not shown (the predictions hold no logits)." in section


@pytest.mark.parametrize(
    ("name", "label", "shared"),
    [
        ("test/PNEUMONIA/person3_virus_3.jpeg", 1, True),  # person3 has a train image
        ("test/PNEUMONIA/person33_virus_70.jpeg", 1, False),
        ("test/NORMAL/IM-0007-0001.jpeg", 0, True),
        ("test/NORMAL/NORMAL2-IM-0007-0001.jpeg", 0, False),  # NORMAL2-IM-0007 is not IM-0007
        ("test/NORMAL/NORMAL2-IM-0012-0003.jpeg", 0, True),
        ("test/NORMAL/scan-without-id.png", 0, False),  # no id in the name: its own patient, never shared
    ],
)
def test_shared_patient_mask_reads_ids_from_file_names(name: str, label: int, shared: bool) -> None:
    train = {"person3", "IM-0007", "NORMAL2-IM-0012", "file:scan-without-id"}
    assert shared_patient_mask([name], [label], train).tolist() == [shared]


def test_overlap_removal_drops_exactly_the_test_images_of_train_patients(make_run, tmp_path: Path) -> None:
    run = make_run("lite0", tta=False)  # split.csv puts the patients of test images 0, 1, 3 and 4 in train/
    table = _predictions(run, "test")
    files = read_run(run)
    found = overlap_removed(files, used_test_evaluation(files))
    assert (found["shared_images"], found["shared_patients"]) == (4, 3)  # IM-0000 (two images), person3, person4
    assert [(r["name"], r["n"], r["removed"]) for r in found["rows"]] == [
        ("all test images", 100, 0),
        ("without shared patients", 96, 4),
    ]
    threshold = files.threshold("test")
    _assert_same_metrics(found["rows"][0]["metrics"], _expected_metrics(table, set(), threshold))
    _assert_same_metrics(found["rows"][1]["metrics"], _expected_metrics(table, set(SHARED_TEST_IMAGES), threshold))

    section = _section(
        build_report([run], tmp_path / "report")["markdown"].read_text(), "lite0", "Test results without"
    )
    assert "4 of the 100 test images belong to 3 patient ids" in section
    kept = _expected_metrics(table, set(SHARED_TEST_IMAGES), threshold)
    low, high = kept["ci95"]["accuracy"]
    assert (
        f"| without shared patients | 96 | 4 | {100 * kept['accuracy']:.1f} ({100 * low:.1f}-{100 * high:.1f}) |"
        in (section)
    )


def test_exact_duplicates_are_found_by_hashing_the_dataset(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run = write_run(tmp_path / "runs", "lite0", tta=False, data_root=data)
    split = pd.read_csv(run / "split.csv")
    for index, path in enumerate(split["path"]):
        (data / path).parent.mkdir(parents=True, exist_ok=True)
        (data / path).write_bytes(f"image {index}".encode())
    test = split[split["split"] == "test"]["path"].tolist()
    train_image = (data / "train/NORMAL/IM-2000-0001.jpeg").read_bytes()
    (data / test[2]).write_bytes(train_image)  # a copy of a train image under a new patient id
    (data / test[3]).write_bytes(train_image)  # a copy, and its patient (person3) is in train/ too

    files = read_run(run)
    found = overlap_removed(files, used_test_evaluation(files), FileHashes())
    assert (found["duplicates"], found["duplicates_only"]) == (2, 1)
    assert found["duplicates_facts"]["root"] == str(data.resolve())
    assert [(r["name"], r["n"]) for r in found["rows"]] == [
        ("all test images", 100),
        ("without shared patients", 96),
        ("without exact duplicates", 98),
        ("without shared patients or exact duplicates", 95),
    ]
    table, threshold = _predictions(run, "test"), files.threshold("test")
    _assert_same_metrics(found["rows"][2]["metrics"], _expected_metrics(table, {2, 3}, threshold))
    _assert_same_metrics(found["rows"][3]["metrics"], _expected_metrics(table, {*SHARED_TEST_IMAGES, 2}, threshold))
    markdown = build_report([run], tmp_path / "report")["markdown"].read_text()
    assert "Exact duplicates: 2 test images are byte-identical to a train/validation image, 1 of them" in markdown


def test_exact_duplicates_are_read_from_the_split_file_without_the_dataset(tmp_path: Path) -> None:
    run = write_run(tmp_path / "runs", "lite0", tta=False, data_root=tmp_path / "nowhere")
    split = pd.read_csv(run / "split.csv")
    split["sha256"] = [f"{index:064x}" for index in range(len(split))]  # every file distinct ...
    test_rows = split.index[split["split"] == "test"]
    train_hash = split.loc[split["path"] == "train/NORMAL/IM-2000-0001.jpeg", "sha256"].item()
    split.loc[test_rows[[2, 3]], "sha256"] = train_hash  # ... but two test files are copies of a train file
    split.to_csv(run / "split.csv", index=False)

    files = read_run(run)
    found = overlap_removed(files, used_test_evaluation(files))
    assert (found["duplicates"], found["duplicates_only"]) == (2, 1) and found["duplicates_facts"]["root"] is None
    assert [r["n"] for r in found["rows"]] == [100, 96, 98, 95]
    markdown = build_report([run], tmp_path / "report")["markdown"].read_text()
    assert "1 of them not already removed by patient (SHA-256 of 100 test and" in markdown
    assert "files as split.csv records them)" in markdown


def test_a_missing_dataset_root_is_said_not_fatal(tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    run = write_run(tmp_path / "runs", "lite0", tta=False, data_root=nowhere)
    no_split = write_run(tmp_path / "runs", "no-split", tta=False)
    (no_split / "split.csv").unlink()
    markdown = build_report([run, no_split], tmp_path / "report")["markdown"].read_text()
    section = _section(markdown, "lite0", "Test results without")
    line = f"Exact duplicates not checked: the dataset root {nowhere} (config.yaml data.root) does not exist here."
    assert _markdown_escape(line) in section
    assert "| without shared patients | 96 | 4 |" in section  # the patient overlap is still removed
    assert "Not computed: no split.csv" in _section(markdown, "no-split", "Test results without")


def test_ensemble_without_a_split_uses_its_members_split(make_run, tmp_path: Path) -> None:
    member = make_run("member", tta=False)
    ensemble = write_ensemble(tmp_path / "runs", "ensemble", [member])
    files = read_run(ensemble)
    found = overlap_removed(files, used_test_evaluation(files))
    assert found["split_files"] == [str(member / "split.csv")]
    assert [(r["name"], r["n"]) for r in found["rows"]] == [("all test images", 100), ("without shared patients", 96)]
    _assert_same_metrics(
        found["rows"][1]["metrics"],
        _expected_metrics(_predictions(ensemble, "test"), set(SHARED_TEST_IMAGES), files.threshold("test")),
    )
    assert np.isnan(_predictions(ensemble, "test")["logit"]).all()  # the ensemble's missing logits change nothing
