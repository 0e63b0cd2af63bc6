"""The ONNX backend on real exported files and real onnxruntime sessions: against PyTorch fp32, CLI, service."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from pneumolab.data.io import load_xray
from pneumolab.data.tta import TTA_PRESETS
from pneumolab.errors import PneumolabError
from pneumolab.fsutil import file_sha256
from pneumolab.hardware import resolve_precision
from pneumolab.inference.export import build_card, export_onnx
from pneumolab.inference.files import predict_files
from pneumolab.inference.loader import load_backend
from pneumolab.inference.pytorch import load_trained
from pneumolab.serve.app import create_app
from tests.serve import tiny_trained
from tests.serve.test_service import png_bytes
from tests.test_cli import run_cli

CPU = torch.device("cpu")
# the card's views: the cxr preset plus strided ones (a flip, a rotation), which onnxruntime must get contiguous
VIEWS = (*TTA_PRESETS["cxr"], "hflip", "rot90")


@pytest.fixture(scope="module")
def artefact(tmp_path_factory):
    """A tiny random ResNet-18 as an artefact folder (safetensors + card) with its own operating point and TTA."""
    folder = tmp_path_factory.mktemp("artefact")
    trained = tiny_trained()
    trained.source = folder
    weights = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()}, str(weights))
    card = build_card(trained) | {"threshold": 0.45, "temperature": 1.5, "tta": list(VIEWS)}
    card["weights_sha256"] = file_sha256(weights)
    (folder / "card.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="module")
def onnx_file(artefact, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(artefact, out)
    return out


@pytest.fixture(scope="module")
def from_file(onnx_file):
    return load_backend(onnx_file, "onnx")


@pytest.fixture(scope="module")
def on_the_fly(artefact):
    return load_backend(artefact, "onnx")


@pytest.fixture(scope="module")
def fp32(artefact):
    """The PyTorch reference: fp32, not the bf16 autocast the CPU would choose."""
    trained = load_trained(artefact, device=CPU)
    trained.precision = resolve_precision("fp32", CPU)
    return trained


@pytest.mark.parametrize("views", [("identity",), VIEWS], ids=["plain", "tta"])
@pytest.mark.parametrize("source", ["from_file", "on_the_fly"])
def test_probabilities_equal_pytorch_fp32(request, fp32, source, views):
    onnx = request.getfixturevalue(source)
    images = np.random.default_rng(0).integers(0, 256, (6, fp32.cache_size, fp32.cache_size), np.uint8)
    logits = onnx.logits(images, views=views, batch_size=4)  # two batches, the second a short one
    assert logits.dtype == torch.float32 and logits.shape == (6, 2)
    expected = fp32.probabilities(fp32.logits(images, views=views))
    assert np.abs(onnx.probabilities(logits) - expected).max() <= 1e-4
    assert np.ptp(expected) > 1e-3  # the model tells the images apart: the comparison means something


def test_operating_point_and_card_come_from_the_card(from_file, on_the_fly, onnx_file):
    for onnx in (from_file, on_the_fly):
        assert (onnx.threshold, onnx.temperature, onnx.tta) == (0.45, 1.5, VIEWS)
        assert onnx.backend == "onnx" and onnx.card()["architecture"] == "resnet18"
    assert from_file.card()["onnx_sha256"] == file_sha256(onnx_file)
    assert from_file.pytorch is None  # an .onnx file alone: no PyTorch graph for Grad-CAM
    assert on_the_fly.pytorch is not None and on_the_fly.pytorch.precision.name == "fp32"


def _copy(onnx_file, folder):
    folder.mkdir()
    shutil.copy(onnx_file, folder / "model.onnx")
    shutil.copy(onnx_file.with_suffix(".json"), folder / "model.json")
    return folder / "model.onnx"


def test_a_tampered_or_cardless_onnx_file_is_refused_in_one_line(onnx_file, tmp_path):
    tampered = _copy(onnx_file, tmp_path / "tampered")
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte in the middle of the weights
    tampered.write_bytes(bytes(data))
    with pytest.raises(PneumolabError, match="does not match its card") as caught:
        load_backend(tampered, "onnx")
    assert str(tampered) in str(caught.value) and "\n" not in str(caught.value)

    cardless = _copy(onnx_file, tmp_path / "cardless")
    cardless.with_suffix(".json").unlink()
    with pytest.raises(PneumolabError, match=r"model\.json: missing"):
        load_backend(cardless, "onnx")
    with pytest.raises(PneumolabError, match="needs the onnx backend"):
        load_backend(onnx_file, "pytorch")
    with pytest.raises(PneumolabError, match="did you mean onnx"):
        load_backend(onnx_file, "onnxx")


def test_predict_cli_on_the_onnx_backend(from_file, onnx_file, tmp_path):
    files = []
    for seed in range(2):
        files.append(tmp_path / f"film{seed}.png")
        files[-1].write_bytes(png_bytes(seed))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = run_cli("predict", "--backend", "onnx", "--model", str(onnx_file), "--csv", *map(str, files), str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"{bad}: not a JPEG, PNG or DICOM image"]
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    expected, _ = predict_files(from_file, files)
    assert [row["file"] for row in rows] == [str(f) for f in files]
    for row, want in zip(rows, expected, strict=True):
        assert float(row["probability"]) == pytest.approx(want["probability"], abs=1e-6)
        assert row["label"] == want["label"] and float(row["threshold"]) == 0.45

    tampered = _copy(onnx_file, tmp_path / "tampered")
    tampered.write_bytes(tampered.read_bytes()[:-1] + b"\0")
    result = run_cli("predict", "--backend", "onnx", "--model", str(tampered), str(files[0]))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "does not match its card" in result.stderr and str(tampered) in result.stderr


def _upload(seed: int = 0) -> dict:
    return {"file": ("film.png", png_bytes(seed), "image/png")}


def test_service_on_an_onnx_file(from_file, onnx_file):
    with TestClient(create_app(from_file)) as client:
        card = client.get("/v1/model").json()
        assert card["backend"] == "onnx" and card["onnx_sha256"] == file_sha256(onnx_file)
        response = client.post("/v1/predict", files=_upload())
        assert response.status_code == 200, response.text
        image = load_xray(png_bytes(0), size=from_file.cache_size, name="film.png")
        expected = from_file.probabilities(from_file.logits(image[None], views=VIEWS))[0]
        assert response.json()["probability"] == pytest.approx(float(expected), abs=1e-6)
        # Grad-CAM needs the PyTorch graph, which an .onnx file alone does not have: a clear 501, never a 500
        explain = client.post("/v1/explain", files=_upload())
        assert explain.status_code == 501
        detail = explain.json()["detail"]
        assert "film.png" in detail and "Grad-CAM" in detail and "\n" not in detail
        assert client.get("/health").json()["status"] == "ok"


def test_service_exported_on_the_fly_also_explains(on_the_fly):
    with TestClient(create_app(on_the_fly)) as client:
        assert client.get("/v1/model").json()["backend"] == "onnx"
        predicted = client.post("/v1/predict", files=_upload(1))
        explained = client.post("/v1/explain", files=_upload(1))
        assert predicted.status_code == 200 and explained.status_code == 200, explained.text
        assert explained.headers["content-type"] == "image/png"
        assert float(explained.headers["X-Probability"]) == pytest.approx(predicted.json()["probability"], abs=1e-4)


def test_a_gated_model_exports_its_gate_and_refuses_the_same_files(tmp_path, shared_data):
    from pneumolab.data.ood import far_ood_pictures

    bundled = load_trained(None, device=CPU)
    bundled.precision = resolve_precision("fp32", CPU)
    out = tmp_path / "default.onnx"
    export_onnx(bundled, out)  # checks the gate scores of both backends agree (<= 1e-3)
    assert (tmp_path / "default.gate.safetensors").is_file()
    onnx = load_backend(out, "onnx")
    assert onnx.gate is not None and onnx.gate.precision == "fp32" and onnx.gate.limit_ == bundled.gate.limit_
    assert onnx.gate_status == "on"  # the fp32 graph scored by the gate fit in fp32
    pictures = [p for n, p in far_ood_pictures() if n in ("skimage-chelsea", "text-page0", "noise-gauss0")]
    files = []
    for i, pixels in enumerate(pictures):
        files.append(tmp_path / f"picture{i}.png")
        Image.fromarray(pixels).save(files[-1])
    films = sorted((shared_data / "test" / "PNEUMONIA").iterdir())[:3]
    onnx_rows, _ = predict_files(onnx, [*files, *films])
    torch_rows, _ = predict_files(bundled, [*files, *films])
    assert [r["status"] for r in onnx_rows[:3]] == ["refused"] * 3
    assert [r["status"] for r in onnx_rows] == [r["status"] for r in torch_rows]
    for mine, theirs in zip(onnx_rows, torch_rows, strict=True):
        if mine["gate_score"] is not None:
            assert mine["gate_score"] == pytest.approx(theirs["gate_score"], abs=1e-3)
