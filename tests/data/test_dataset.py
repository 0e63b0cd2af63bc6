from __future__ import annotations

import shutil

import pytest

from pneumolab.data.dataset import build_manifest, find_dataset_root, parse_name, scan_dataset
from pneumolab.errors import DatasetLayoutError


@pytest.mark.parametrize(
    ("name", "label", "patient", "kind", "from_name"),
    [
        ("person1_bacteria_1.jpeg", "PNEUMONIA", "person1", "bacteria", True),
        ("person1000_virus_1681.jpeg", "PNEUMONIA", "person1000", "virus", True),
        ("IM-0115-0001.jpeg", "NORMAL", "IM-0115", "none", True),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL", "NORMAL2-IM-1427", "none", True),
        ("im-0115-0002.JPG", "NORMAL", "im-0115", "none", True),
        ("scan_42.png", "NORMAL", "file:scan_42", "none", False),
        ("case7_virus.dcm", "PNEUMONIA", "file:case7_virus", "virus", False),
        ("case8.dcm", "PNEUMONIA", "file:case8", "unknown", False),
    ],
)
def test_parse_name(name, label, patient, kind, from_name):
    info = parse_name(name, label)
    assert (info.patient_id, info.kind, info.from_name) == (patient, kind, from_name)


def test_finds_nested_kaggle_root_and_ignores_macosx(make_dataset, tmp_path):
    root = make_dataset(root=tmp_path / "download" / "chest_xray" / "chest_xray")
    (tmp_path / "download" / "__MACOSX" / "chest_xray" / "train").mkdir(parents=True)
    (root / "train" / "NORMAL" / ".DS_Store").write_text("junk")
    (root / "train" / "__MACOSX").mkdir()
    assert find_dataset_root(tmp_path / "download") == root
    images, skipped = scan_dataset(root)
    assert len(images) == 16 and skipped == []


def test_class_folders_are_case_insensitive_and_val_optional(make_dataset, tmp_path):
    root = make_dataset(splits=("train", "val", "test"))
    (root / "train" / "NORMAL").rename(root / "train" / "normal")
    (root / "test").rename(root / "Test")
    manifest = build_manifest(root)
    assert sorted(set(manifest["split"])) == ["test", "train", "val"]
    assert set(manifest["label_name"]) == {"NORMAL", "PNEUMONIA"}
    assert len(manifest) == 24


def test_manifest_rows(make_dataset):
    root = make_dataset()
    (root / "train" / "PNEUMONIA" / "notes.txt").write_text("not an image")
    manifest = build_manifest(root)
    assert list(manifest.columns) == [
        "path",
        "split",
        "label",
        "label_name",
        "patient_id",
        "patient_from_name",
        "kind",
        "sha256",
    ]
    row = manifest.set_index("path").loc["train/PNEUMONIA/person2_virus_3.jpeg"]
    assert (row.split, row.label, row.patient_id, row.kind) == ("train", 1, "person2", "virus")
    assert len(row.sha256) == 64
    assert "train/PNEUMONIA/notes.txt" not in set(manifest["path"])
    assert scan_dataset(root)[1] == ["train/PNEUMONIA/notes.txt"]


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("unknown_class", "unknown class folder 'COVID'"),
        ("no_class_folder", "no class folder"),
        ("empty_split", "split has no images"),
        ("stray_file", "file outside a class folder"),
        ("no_split", "no train/, val/ or test/ folder"),
    ],
)
def test_wrong_layouts_show_the_expected_layout(make_dataset, tmp_path, breakage, message):
    root = make_dataset()
    if breakage == "unknown_class":
        (root / "train" / "COVID").mkdir()
    elif breakage == "no_class_folder":
        shutil.rmtree(root / "test")
        (root / "test").mkdir()
        (root / "test" / "x.jpeg").write_bytes(b"")
    elif breakage == "empty_split":
        for cls in ("NORMAL", "PNEUMONIA"):
            shutil.rmtree(root / "test" / cls)
            (root / "test" / cls).mkdir()
    elif breakage == "stray_file":
        (root / "train" / "x.jpeg").write_bytes(b"")
    elif breakage == "no_split":
        root = tmp_path / "elsewhere"
        (root / "images").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError) as caught:
        build_manifest(find_dataset_root(root))
    assert message in str(caught.value)
    assert "expected ROOT/{train,test}/{NORMAL,PNEUMONIA}" in str(caught.value)


def test_shared_dataset_manifest(shared_data):
    manifest = build_manifest(shared_data)
    counts = manifest.groupby(["split", "label_name"]).size().to_dict()
    assert counts == {
        ("test", "NORMAL"): 234,
        ("test", "PNEUMONIA"): 390,
        ("train", "NORMAL"): 1341,
        ("train", "PNEUMONIA"): 3875,
    }
    assert manifest["patient_from_name"].all()
    kinds = manifest.loc[manifest["label_name"] == "PNEUMONIA", "kind"].value_counts()
    assert set(kinds.index) == {"bacteria", "virus"}
