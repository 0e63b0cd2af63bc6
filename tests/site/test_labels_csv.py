"""The labels-CSV layout (file, label[, patient_id][, split], paths relative to the CSV) for every data command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pneumolab.cli import app
from pneumolab.data.dataset import build_manifest, find_dataset_root
from pneumolab.data.splits import carve_validation
from pneumolab.errors import DatasetLayoutError
from tests.conftest import synthetic_xray


def _export(folder: Path, rows: list[str], header: str = "file,label,patient_id") -> Path:
    rng = np.random.default_rng(0)
    for row in rows:
        file, label = row.split(",")[:2]
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_xray(rng, (48, 48), int(label.upper() == "PNEUMONIA"))).save(folder / file)
    (folder / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return folder / "labels.csv"


ROWS = [
    "img/a.png,NORMAL,p1",
    "img/b.png,normal,p1",
    "img/sub/c.png,PNEUMONIA,p2",
    "img/d.png,Pneumonia,p3",
    "img/e.png,NORMAL,p4",
    "img/f.png,PNEUMONIA,p5",
]


def test_a_labels_csv_is_a_dataset_root_with_patients_from_its_column(tmp_path):
    csv = _export(tmp_path, ROWS)
    assert find_dataset_root(tmp_path) == csv  # a folder holding labels.csv and no split folders
    assert find_dataset_root(csv) == csv
    manifest = build_manifest(csv)
    assert manifest["path"].tolist() == sorted(r.split(",")[0] for r in ROWS)
    assert set(manifest["split"]) == {"test"}  # no split column: every film is evaluated
    by_path = manifest.set_index("path")
    assert by_path.loc["img/b.png", "label_name"] == "NORMAL" and by_path.loc["img/b.png", "patient_id"] == "p1"
    assert by_path.loc["img/sub/c.png", "label"] == 1 and by_path.loc["img/sub/c.png", "patient_id"] == "p2"


def test_a_split_column_lets_training_carve_validation_by_patient(tmp_path):
    rows = [f"img/n{i}.png,NORMAL,n{i // 2},train" for i in range(12)]
    rows += [f"img/p{i}.png,PNEUMONIA,q{i // 2},train" for i in range(12)]
    rows += ["img/t0.png,NORMAL,t0,test", "img/t1.png,PNEUMONIA,t1,test"]
    csv = _export(tmp_path, rows, "file,label,patient_id,split")
    manifest = build_manifest(csv)
    splits = carve_validation(manifest, fraction=0.25)
    assert set(splits) == {"train", "val", "test"}
    val_patients = set(manifest.loc[splits == "val", "patient_id"])
    assert not val_patients & set(manifest.loc[splits == "train", "patient_id"])


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        (["img/a.png,CAT"], "file,label", "line 2: unknown label 'CAT'"),
        (["img/a.png,NORMAL"], "path,label", "no 'file' column"),
        (["img/a.png,NORMAL,p1,holdout"], "file,label,patient_id,split", "split 'holdout'"),
    ],
)
def test_a_bad_csv_is_one_line_naming_the_file(tmp_path, rows, header, message):
    csv = _export(tmp_path, rows, header)
    with pytest.raises(DatasetLayoutError, match=message) as caught:
        build_manifest(csv)
    assert str(csv) in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_file_is_named_with_its_line(tmp_path):
    csv = _export(tmp_path, ["img/a.png,NORMAL"], "file,label")
    with open(csv, "a") as handle:
        handle.write("img/gone.png,PNEUMONIA\n")
    with pytest.raises(DatasetLayoutError, match=r"line 3: .*gone.png does not exist"):
        build_manifest(csv)


def test_data_check_and_evaluate_accept_the_csv(tmp_path):
    csv = _export(tmp_path, ROWS)
    result = CliRunner().invoke(app, ["data", "check", str(csv), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["counts"]["test"] == {"NORMAL": 3, "PNEUMONIA": 3, "total": 6}
    assert report["patients"]["test"] == 5
    result = CliRunner().invoke(
        app, ["evaluate", "default", "--data", str(csv), "--json", "--no-gate", "--resamples", "200"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 6 and metrics["confusion_matrix"][0][0] + metrics["confusion_matrix"][0][1] == 3
