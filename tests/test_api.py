"""The public Python API (`pneumolab.api`, re-exported lazily by the root): the same decisions as the CLI, bundled
names from one table, recipes shipped with the package, and `train --config STUDY --only NAME`."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import data as pydicom_data
from typer.testing import CliRunner

import pneumolab
from pneumolab.cli import app
from pneumolab.errors import ArtefactError, ImageReadError, SettingError, UnknownNameError
from pneumolab.inference.card import BUNDLED, bundled_model_dir
from pneumolab.recipes import DEFAULT_RECIPE, recipe_path
from pneumolab.report.bundled_card import MODEL_CARD_FILE, model_card_markdown

CLI = [sys.executable, "-m", "pneumolab.cli"]
PACKAGE = Path(pneumolab.__file__).parent
REPO = PACKAGE.parents[1]


@pytest.fixture(scope="module")
def model() -> pneumolab.Model:
    return pneumolab.load_model("default")


@pytest.fixture(scope="module")
def ct_dicom() -> Path:
    return Path(pydicom_data.get_testdata_file("CT_small.dcm"))


def test_import_pneumolab_loads_no_deep_learning_library_and_exports_lazily():
    code = (
        "import sys, pneumolab; heavy = {'torch', 'numpy', 'pneumolab.api'} & set(sys.modules); "
        "assert not heavy, heavy; assert 'load_model' in dir(pneumolab); "
        "f = pneumolab.load_model; assert f.__module__ == 'pneumolab.api' and 'pneumolab.api' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pneumolab.nope  # noqa: B018


def test_no_module_below_imports_the_package_root():
    for file in PACKAGE.rglob("*.py"):
        if file.name == "__init__.py" and file.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pneumolab" and not node.level:
                raise AssertionError(f"{file}: imports the package root ({[a.name for a in node.names]})")
            if isinstance(node, ast.Import):
                assert "pneumolab" not in [a.name for a in node.names], file


def test_predict_gives_the_cli_decisions_and_refuses_a_ct_dicom_by_modality(model, shared_data, ct_dicom, tmp_path):
    films = [next((shared_data / "test" / c).glob("*.jpeg")) for c in ("NORMAL", "PNEUMONIA")]
    inputs = [*map(str, films), str(ct_dicom)]
    predictions = model.predict(inputs)
    assert [p.file for p in predictions] == inputs
    ct = predictions[2]
    assert ct.status == "refused" and "modality CT" in ct.reason and ct.label == "" and ct.probability is None
    for p in predictions[:2]:
        assert p.status in ("answered", "refer") and p.label in ("NORMAL", "PNEUMONIA")
        assert p.threshold == model.threshold and sum(p.probabilities.values()) == pytest.approx(1, abs=1e-6)
    # the command line, a thin wrapper over the same function, prints the same rows
    result = subprocess.run([*CLI, "predict", *inputs, "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["predictions"] == [p.as_dict() for p in predictions]
    assert printed["gate"] == model.gate_status == "on"


def test_arrays_are_decided_like_the_files_they_came_from(model, shared_data, tmp_path):
    film = next((shared_data / "test" / "PNEUMONIA").glob("*.jpeg"))
    pixels = np.asarray(Image.open(film).convert("L"))
    png = tmp_path / "film.png"
    Image.fromarray(pixels).save(png)
    from_file = model.predict(png)[0]
    from_array, from_float = model.predict([pixels, pixels.astype(np.float32) / 255])
    assert from_array.file == "<array 0>" and from_array.label == from_file.label
    assert from_array.probability == pytest.approx(from_file.probability, abs=1e-6)
    assert from_float.probability == pytest.approx(from_file.probability, abs=1e-6)
    with pytest.raises(SettingError, match=r"in \[0, 1\]"):
        model.predict(pixels.astype(np.float32))
    with pytest.raises(SettingError, match="either arrays or paths"):
        model.predict([pixels, str(png)])


def test_unreadable_inputs_raise_by_default_or_are_collected(model, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=r"broken\.png"):
        model.predict([bad])
    collected = model.predict([bad, tmp_path / "missing.png"], errors="collect")
    assert list(collected) == [] and [Path(f).name for f, _ in collected.errors] == ["missing.png", "broken.png"]
    with pytest.raises(SettingError, match="errors"):
        model.predict([bad], errors="ignore")


def test_explain_writes_the_heatmap(model, shared_data, tmp_path, ct_dicom):
    film = next((shared_data / "test" / "NORMAL").glob("*.jpeg"))
    explanation = model.explain(film, out=tmp_path / "cam.png")
    assert (tmp_path / "cam.png").read_bytes() == explanation.png and explanation.target == "PNEUMONIA"
    with pytest.raises(Exception, match="modality CT"):
        model.explain(ct_dicom)


def test_bundled_models_by_descriptive_name_alias_and_artefact_path(model, tmp_path, monkeypatch):
    listed = pneumolab.list_bundled()
    assert [m["name"] for m in listed] == [m.name for m in BUNDLED]
    three = pneumolab.load_model("mobilenetv2-224-kermany-3class-v1", gate=False)
    assert three.classes == ("NORMAL", "BACTERIAL", "VIRAL") and not three.gate_enabled
    assert Path(three.source) == bundled_model_dir("mobilenetv2-224-kermany-3class-v1")
    assert bundled_model_dir("three-class").name == "mobilenetv2-224-kermany-3class-v2"
    assert Path(pneumolab.load_model("mobilenetv2-128-kermany-binary-v2").source) == Path(model.source)
    artefact = shutil.copytree(bundled_model_dir("default"), tmp_path / "artefact")
    assert bundled_model_dir("default").name == "mobilenetv2-128-kermany-binary-v2"
    assert bundled_model_dir("mobilenetv2-224-kermany-binary-v1").name == "default"  # the 0.1 default, by name
    assert pneumolab.load_model(artefact).card()["threshold"] == model.threshold
    # a bare name that is also a folder here is refused, naming both
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    with pytest.raises(ArtefactError, match=r"both the bundled model mobilenetv2-128-kermany-binary-v2 and the folder"):
        pneumolab.load_model("default")
    result = CliRunner().invoke(app, ["predict", "x.png", "--model", "default"])  # main() prints it, exit 2
    assert isinstance(result.exception, ArtefactError) and str(tmp_path / "default") in str(result.exception)


def test_an_onnx_file_needs_the_onnx_backend(tmp_path):
    with pytest.raises(SettingError, match="--backend onnx"):
        pneumolab.load_model(tmp_path / "model.onnx")
    with pytest.raises(UnknownNameError, match="backend"):
        pneumolab.load_model("default", backend="tensorrt")


def test_each_bundled_folder_holds_its_recipe_and_an_up_to_date_model_card():
    for entry in BUNDLED:
        folder = bundled_model_dir(entry.name)
        recipe = pneumolab.training_config(folder / "recipe.yaml")  # a one-model pipeline config: no --only
        card = json.loads((folder / "card.json").read_text())
        assert recipe.model.name == card["architecture"] and recipe.model.weights == "imagenet"
        assert (folder / MODEL_CARD_FILE).read_text() == model_card_markdown(entry), (
            f"{folder / MODEL_CARD_FILE} is stale: python -m pneumolab.report.bundled_card"
        )


def test_train_reads_one_model_of_a_study_and_refuses_mixed_schemas():
    lite0 = pneumolab.training_config("configs/candidates.yaml", only="lite0-full", overrides={"epochs": 1})
    assert lite0.model.name == "tf_efficientnet_lite0" and lite0.epochs == 1 and lite0.data.cache_size == 256
    assert pneumolab.training_config("three-class").data.task == "kind"  # a shipped recipe, by name
    with pytest.raises(SettingError, match="--only NAME"):
        pneumolab.training_config("configs/candidates.yaml")
    with pytest.raises(UnknownNameError, match="did you mean lite0-full"):
        pneumolab.training_config("configs/candidates.yaml", only="lite0-ful")
    with pytest.raises(SettingError, match="pipeline config"):
        pneumolab.training_config(None, only="lite0-full")


def test_recipes_ship_with_the_package_and_the_old_default_name_says_where_it_went(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as a pip user: no configs/ folder here
    assert recipe_path(None).name == f"{DEFAULT_RECIPE}.yaml" and recipe_path(None).is_file()
    assert recipe_path("configs/three-class.yaml") == recipe_path("three-class")
    assert {DEFAULT_RECIPE, "three-class", "candidates"} <= set(pneumolab.list_recipes())
    with pytest.raises(SettingError, match=DEFAULT_RECIPE):
        recipe_path("configs/default.yaml")
    result = CliRunner().invoke(app, ["train", "--config", "configs/default.yaml"])
    assert isinstance(result.exception, SettingError) and DEFAULT_RECIPE in str(result.exception)


def test_evaluate_checks_its_arguments_before_any_work(model):
    with pytest.raises(SettingError, match="val or test"):
        pneumolab.evaluate_model("default", "data", split="train")
    with pytest.raises(SettingError, match="names no dataset"):
        pneumolab.evaluate_model(model)


def test_the_architectures_are_listed():
    rows = pneumolab.list_models("mobilenet*")
    assert [r["name"] for r in rows] == ["mobilenet_v2"] and rows[0]["imagenet_here"] in (True, False)
