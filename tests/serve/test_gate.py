"""The input gate in the service, over a real uvicorn server with the bundled model: real films are answered (or
referred), a photo and a CT are refused with 422 and the gate's reason, `gate=False` answers everything and says so;
and `check_exposure`, which keeps an unauthenticated service on this machine."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings

import httpx
import numpy as np
import pytest
from PIL import Image

from pneumolab.constants import CLASSES
from pneumolab.errors import PneumolabError
from pneumolab.inference.files import predict_files
from pneumolab.serve.app import check_exposure, create_app
from tests.serve import running_server, tiny_trained

PREDICTION_KEYS = {
    "file",
    "status",
    "label",
    "probability",
    "probabilities",
    "threshold",
    "reason",
    "gate_score",
    "notes",
    "model",
    "gate",
}
REFUSAL_KEYS = {"detail", "file", "status", "reason", "gate_score", "notes", "gate"}
TIMEOUT = 180  # the bundled model runs five TTA views on a shared 2-core CPU


def _post(url: str, path: str, name: str, data: bytes, content_type: str = "application/octet-stream"):
    return httpx.post(url + path, files={"file": (name, data, content_type)}, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def gated(bundled):
    with running_server(create_app(bundled)) as url:
        yield url


@pytest.fixture(scope="module")
def film(shared_data):
    return sorted((shared_data / "test" / "PNEUMONIA").glob("*.jpeg"))[0]


def _assert_refused(response, name: str) -> dict:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == REFUSAL_KEYS and body["status"] == "refused" and body["file"] == name
    assert body["detail"].startswith(f"{name}: not a frontal chest X-ray: ") and "\n" not in body["detail"]
    assert body["reason"] and body["reason"] in body["detail"]
    return body


def test_a_photo_is_refused_with_422_by_predict_and_explain(gated, bundled, photo_png):
    body = _assert_refused(_post(gated, "/v1/predict", "chelsea.png", photo_png, "image/png"), "chelsea.png")
    assert body["gate"] == "on" and body["gate_score"] > bundled.gate.limit_
    assert "unlike the training films" in body["reason"]
    assert body["detail"].count("not a frontal chest X-ray") == 1
    # no heatmap either: the same body instead of a PNG, for both panels
    for query in ("", "?panel=overlay"):
        explained = _post(gated, f"/v1/explain{query}", "chelsea.png", photo_png, "image/png")
        assert _assert_refused(explained, "chelsea.png") == body


def test_a_ct_dicom_is_refused_naming_its_modality(gated):
    pydicom_data = pytest.importorskip("pydicom.data")
    with open(pydicom_data.get_testdata_file("CT_small.dcm"), "rb") as handle:
        ct = handle.read()
    body = _assert_refused(_post(gated, "/v1/predict", "CT_small.dcm", ct, "application/dicom"), "CT_small.dcm")
    assert "modality CT" in body["detail"] and "projection radiograph" in body["reason"]


def test_a_real_film_is_answered_as_predict_answers_it(gated, bundled, film):
    response = _post(gated, "/v1/predict", film.name, film.read_bytes(), "image/jpeg")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == PREDICTION_KEYS
    assert body["status"] in ("answered", "refer") and body["label"] in CLASSES and body["gate"] == "on"
    assert body["model"] == bundled.name and body["threshold"] == bundled.threshold
    # the service and `pneumolab predict` take the same steps (gate, TTA, band) to the same answer
    [row], failures = predict_files(bundled, [film])
    assert not failures
    for key in ("status", "label", "reason", "notes"):
        assert body[key] == row[key], key
    assert body["probability"] == pytest.approx(row["probability"], abs=1e-4)
    assert list(body["probabilities"]) == list(CLASSES)  # every class, in the model's order
    assert body["probabilities"]["PNEUMONIA"] == pytest.approx(body["probability"], abs=1e-6)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["gate_score"] == pytest.approx(row["gate_score"], abs=1e-3)


def test_the_overlay_panel_is_the_enlarged_overlay_alone(gated, bundled, film):
    data = film.read_bytes()
    overlay = _post(gated, "/v1/explain?panel=overlay", film.name, data, "image/jpeg")
    assert overlay.status_code == 200, overlay.text
    assert overlay.headers["X-Status"] in ("answered", "refer") and overlay.headers["X-Label"] in CLASSES
    assert overlay.headers["X-Gate"] == "on"
    picture = Image.open(io.BytesIO(overlay.content))
    enlarged = bundled.image_size * max(1, 512 // bundled.image_size)  # by a whole factor towards 512 px
    assert picture.width == enlarged and picture.height > picture.width  # caption above the square
    both = Image.open(io.BytesIO(_post(gated, "/v1/explain", film.name, data, "image/jpeg").content))
    assert both.width == 2 * bundled.image_size and both.height < both.width  # film and overlay side by side
    bad = _post(gated, "/v1/explain?panel=left", film.name, data, "image/jpeg")
    assert bad.status_code == 422 and "panel" in bad.json()["detail"]


def test_model_and_health_say_the_gate_is_on(gated, bundled):
    card = httpx.get(gated + "/v1/model", timeout=30).json()
    assert card["gate"] == "on" and card["gate_facts"] == bundled.card()["gate"]
    assert card["gate_facts"]["limit"] == pytest.approx(bundled.gate.limit_)
    assert httpx.get(gated + "/health", timeout=30).json() == {"status": "ok", "model": bundled.name, "gate": "on"}
    schema = httpx.get(gated + "/openapi.json", timeout=30).json()
    refused = schema["paths"]["/v1/predict"]["post"]["responses"]["422"]
    assert refused["content"]["application/json"]["schema"]["$ref"].endswith("/Refusal")
    assert "422" in schema["paths"]["/v1/explain"]["post"]["responses"]


def test_without_the_gate_the_photo_gets_a_label_and_every_response_says_the_gate_is_off(bundled, photo_png):
    with running_server(create_app(bundled, gate=False)) as url:
        response = _post(url, "/v1/predict", "chelsea.png", photo_png, "image/png")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "answered" and body["label"] in CLASSES and body["gate"].startswith("off")
        assert httpx.get(url + "/health", timeout=30).json()["gate"] == body["gate"]
        assert httpx.get(url + "/v1/model", timeout=30).json()["gate"] == body["gate"]
        explained = _post(url, "/v1/explain?panel=overlay", "chelsea.png", photo_png, "image/png")
        assert explained.status_code == 200 and explained.headers["X-Gate"] == body["gate"]
    assert bundled.gate_enabled  # the service switched off its own copy, not the caller's model


def test_notes_go_in_the_response_not_into_warnings():
    rng = np.random.default_rng(0)
    faint = (100 + rng.random((80, 90)) * 20).astype(np.uint8)  # spans 20 of 255 grey levels: worth a note
    buffer = io.BytesIO()
    Image.fromarray(faint).save(buffer, "PNG")
    with running_server(create_app(tiny_trained())) as url, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predicted = _post(url, "/v1/predict", "faint.png", buffer.getvalue(), "image/png")
        explained = _post(url, "/v1/explain", "faint.png", buffer.getvalue(), "image/png")
    assert predicted.status_code == 200 and explained.status_code == 200, predicted.text
    assert "range" in predicted.json()["notes"] and explained.headers["X-Notes"] == predicted.json()["notes"]
    assert not [str(w.message) for w in caught if "faint.png" in str(w.message)]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LocalHost"])
def test_loopback_hosts_need_no_api_key(host):
    check_exposure(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "example.org", ""])
def test_other_hosts_need_an_api_key_or_the_risk_accepted(host):
    with pytest.raises(PneumolabError, match="--allow-unauthenticated-remote") as refused:
        check_exposure(host, None)
    assert "\n" not in str(refused.value) and f"--host {host}:" in str(refused.value)
    with pytest.raises(PneumolabError):
        check_exposure(host, "")  # an empty key is no key
    check_exposure(host, "s3cret")
    check_exposure(host, None, allow_unauthenticated_remote=True)


def test_serve_on_all_interfaces_without_a_key_exits_2_before_loading_a_model():
    env = {k: v for k, v in os.environ.items() if k != "PNEUMOLAB_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "pneumolab.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--allow-unauthenticated-remote" in result.stderr
