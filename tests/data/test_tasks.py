"""Tasks: binary, kind (NORMAL / BACTERIAL / VIRAL from the file names) and folders (any K class folders)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pneumolab.data.check import check_dataset
from pneumolab.data.dataset import build_manifest, folder_classes, scan_dataset
from pneumolab.data.splits import carve_validation
from pneumolab.data.tasks import KIND_CLASSES, get_task, task_for_classes, task_labels
from pneumolab.errors import DatasetLayoutError, UnknownNameError
from tests.conftest import synthetic_xray


def _folders_dataset(root, classes=("cat", "dog", "fish"), splits=("train", "test"), per_class=3):
    rng = np.random.default_rng(0)
    for split in splits:
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(synthetic_xray(rng, (32, 32), label % 2)).save(folder / f"{name}{i}.png")
    return root


def test_an_unknown_task_fails_with_a_suggestion():
    with pytest.raises(UnknownNameError, match="did you mean kind"):
        get_task("kinds")  # a config's data.task gets the same line at load (tests/test_config.py)


def test_kind_labels_pneumonia_films_by_their_names(make_dataset):
    manifest = build_manifest(make_dataset(per_class=8))
    relabelled, classes = get_task("kind").relabel(manifest, folder_classes(manifest))
    assert classes == KIND_CLASSES == ("NORMAL", "BACTERIAL", "VIRAL")
    by_name = dict(zip(relabelled["path"], relabelled["label_name"], strict=True))
    assert by_name["train/PNEUMONIA/person0_bacteria_0.jpeg"] == "BACTERIAL"
    assert by_name["train/PNEUMONIA/person0_virus_1.jpeg"] == "VIRAL"
    assert by_name["train/NORMAL/IM-0000-0001.jpeg"] == "NORMAL"
    assert (relabelled["label"] == [classes.index(n) for n in relabelled["label_name"]]).all()
    # the binary task keeps the folder labels untouched
    same, binary = get_task("binary").relabel(manifest, folder_classes(manifest))
    assert binary == ("NORMAL", "PNEUMONIA") and same["label"].equals(manifest["label"])


def test_a_pneumonia_film_of_unknown_kind_is_named_never_dropped(make_dataset):
    root = make_dataset(per_class=4)
    odd = root / "train" / "PNEUMONIA" / "scan_0001.jpeg"
    Image.fromarray(synthetic_xray(np.random.default_rng(1), (64, 64), 1)).save(odd)
    manifest = build_manifest(root)
    with pytest.raises(DatasetLayoutError, match=r"train/PNEUMONIA/scan_0001\.jpeg.*bacteria.*virus"):
        get_task("kind").relabel(manifest, folder_classes(manifest))
    report = check_dataset(root, task="kind", progress=False)
    assert [entry["path"] for entry in report["unlabelled"]] == ["train/PNEUMONIA/scan_0001.jpeg"]
    assert sum(report["counts"]["train"][c] for c in KIND_CLASSES) == report["counts"]["train"]["total"] - 1
    cli = subprocess.run(
        [sys.executable, "-m", "pneumolab.cli", "data", "check", str(root), "--task", "kind", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "scan_0001.jpeg" in cli.stderr and "BACTERIAL" in cli.stdout


def test_folders_reads_any_class_folders_and_checks_they_agree(tmp_path):
    root = _folders_dataset(tmp_path / "pets")
    with pytest.raises(DatasetLayoutError, match="unknown class folder"):
        scan_dataset(root)  # the binary layout is still checked by default
    manifest = build_manifest(root, classes=None)
    assert folder_classes(manifest) == ("cat", "dog", "fish")
    assert task_for_classes(("cat", "dog", "fish")).name == "folders"
    np.testing.assert_array_equal(task_labels(manifest, ("cat", "dog", "fish")), manifest["label"])
    with pytest.raises(DatasetLayoutError, match="not the model's"):
        task_labels(manifest, ("cat", "dog"))
    (root / "test" / "fish").rename(root / "test" / "bird")
    with pytest.raises(DatasetLayoutError, match=r"test: class folders bird, cat, dog differ from .*train"):
        scan_dataset(root, classes=None)


def test_kind_counts_and_carve_on_the_real_release(shared_data):
    report = check_dataset(shared_data, task="kind", progress=False)
    counts = {split: [report["counts"][split][c] for c in KIND_CLASSES] for split in ("train", "test")}
    assert counts == {"train": [1341, 2530, 1345], "test": [234, 242, 148]}
    assert not report["unlabelled"]
    manifest, _ = get_task("kind").relabel(build_manifest(shared_data), ("NORMAL", "PNEUMONIA"))
    splits = carve_validation(manifest, fraction=0.1, seed=0)
    train = manifest["split"] == "train"
    # stratified by the task's label, grouped by patient whatever its kinds: a patient with bacterial and viral films
    # goes where its majority label does, so a class's share can miss 10 % by a few films (VIRAL: 120 of 1,345)
    for label in range(3):
        of_class = train & (manifest["label"] == label)
        assert 0.085 <= ((splits == "val") & of_class).sum() / of_class.sum() <= 0.115
    patients = {s: set(manifest.loc[splits == s, "patient_id"]) for s in ("train", "val")}
    assert not patients["train"] & patients["val"]
