"""The web service end to end: a real app, a real (untrained) model, real image bytes, and the bad-input corpus."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.uid import JPEGLSLossless, RLELossless

from pneumolab.data.io import load_xray
from pneumolab.serve.app import create_app
from tests.data.test_check import _huge_png_header
from tests.data.test_io import dicom_bytes, dicom_dataset, pixels12
from tests.serve import running_server, tiny_trained


def _film(width: int = 90, height: int = 80, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((height, width)) * 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_bytes(seed: int = 0) -> bytes:
    return _encode(Image.fromarray(_film(seed=seed)), "PNG")


def jpeg_bytes(seed: int = 1) -> bytes:
    return _encode(Image.fromarray(_film(seed=seed)), "JPEG", quality=90)


@pytest.fixture(scope="module")
def trained():
    return tiny_trained()


@pytest.fixture(scope="module")
def client(trained):
    with TestClient(create_app(trained, workers=2)) as test_client:
        yield test_client


def _expected(trained, data: bytes, name: str) -> float:
    image = load_xray(data, size=trained.cache_size, name=name)
    views = trained.tta or ("identity",)
    return float(trained.probabilities(trained.logits(image[None], views=views))[0])


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return _encode(Image.fromarray(_film()), "JPEG", exif=exif, quality=95)


def _compressed_dicom(syntax) -> bytes:
    ds = dicom_dataset(pixels12(64, 48, seed=1), "MONOCHROME1")
    ds.compress(syntax)
    return dicom_bytes(ds)


@pytest.mark.parametrize(
    ("name", "content_type", "make"),
    [
        ("film.png", "image/png", png_bytes),
        ("film.jpeg", "image/jpeg", jpeg_bytes),
        ("exif-rotated.jpeg", "image/jpeg", _exif_rotated_jpeg),
        ("film.dcm", "application/dicom", lambda: dicom_bytes(dicom_dataset(pixels12()))),
        ("inverted.dcm", "application/dicom", lambda: dicom_bytes(dicom_dataset(pixels12(), "MONOCHROME1"))),
        ("jpegls.dcm", "application/dicom", lambda: _compressed_dicom(JPEGLSLossless)),
        ("rle.dcm", "application/octet-stream", lambda: _compressed_dicom(RLELossless)),
    ],
)
def test_predict_matches_the_library(client, trained, name, content_type, make):
    data = make()
    response = client.post("/v1/predict", files={"file": (name, data, content_type)})
    assert response.status_code == 200, response.text
    body = response.json()
    probability = _expected(trained, data, name)
    assert body["probability"] == pytest.approx(probability, abs=1e-4)
    assert body["label"] == ("PNEUMONIA" if probability >= trained.threshold else "NORMAL")
    assert body["threshold"] == trained.threshold and body["model"] == "resnet18"
    # an untrained model has no content gate and no referral band: these pass the metadata check and are answered
    assert body["status"] == "answered" and body["gate"] == trained.gate_status


def test_explain_returns_a_png_with_label_headers(client, trained):
    data = png_bytes()
    response = client.post("/v1/explain", files={"file": ("film.png", data, "image/png")})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.format == "PNG" and picture.width > 0
    assert response.headers["X-Label"] in ("NORMAL", "PNEUMONIA")
    assert float(response.headers["X-Probability"]) == pytest.approx(_expected(trained, data, "film.png"), abs=1e-4)


def test_health_model_card_page_and_docs(client, trained):
    gate = trained.gate_status
    assert gate.startswith("metadata only")  # no fitted content gate
    assert client.get("/health").json() == {"status": "ok", "model": "resnet18", "gate": gate}
    card = {**trained.card(), "gate": gate, "gate_facts": None, "backend": "pytorch", "max_batch": 16}
    served = client.get("/v1/model").json()
    served.pop("drift", None)  # the drift watch's facts (pneumolab.serve.metrics), tested with the metrics
    assert served == card
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    # relative paths: the page works under a proxy's prefix too
    assert '"v1/predict"' in page.text and '"v1/explain' in page.text and 'fetch("health")' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external resources
    assert client.get("/docs").status_code == 200  # a local page (tests/serve/test_hardening.py)
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


def _rgba_png() -> bytes:
    rgba = np.dstack([_film(), _film(seed=2), _film(seed=3), np.full((80, 90), 200, np.uint8)])
    return _encode(Image.fromarray(rgba), "PNG")


def _png16() -> bytes:
    return _encode(Image.fromarray(_film().astype(np.uint16) * 257), "PNG")


def _cmyk_jpeg() -> bytes:
    return _encode(Image.fromarray(np.dstack([_film(seed=s) for s in range(3)])).convert("CMYK"), "JPEG")


def _zip() -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("film.png", png_bytes())
    return buffer.getvalue()


CORPUS = [
    # (file name, bytes factory, content type, expected status)
    ("empty.jpeg", lambda: b"", "image/jpeg", 400),
    ("truncated.jpeg", lambda: jpeg_bytes()[:300], "image/jpeg", 400),
    ("text.jpeg", lambda: b"this is not an image\n" * 20, "image/jpeg", 400),
    ("huge.png", lambda: _huge_png_header(30000, 30000), "image/png", 400),
    ("deep.png", _png16, "image/png", 200),
    ("cmyk.jpeg", _cmyk_jpeg, "image/jpeg", 200),
    ("rgba.png", _rgba_png, "image/png", 200),
    ("films.zip", _zip, "application/octet-stream", 400),
    ("films.zip", _zip, "application/zip", 415),
    ("notes.txt", lambda: b"hello", "text/plain", 415),
]


@pytest.mark.parametrize("endpoint", ["/v1/predict", "/v1/explain"])
def test_bad_input_corpus_gets_one_line_4xx_and_the_server_keeps_serving(client, endpoint):
    for name, make, content_type, status in CORPUS:
        response = client.post(endpoint, files={"file": (name, make(), content_type)})
        assert response.status_code == status, (name, response.text)
        if status != 200:
            detail = response.json()["detail"]
            assert isinstance(detail, str) and "\n" not in detail and name in detail, (name, detail)
    assert client.get("/health").json()["status"] == "ok"


def test_requests_without_a_file_get_a_clear_4xx(client):
    no_file = client.post("/v1/predict", files={"other": ("x.png", png_bytes(), "image/png")})
    assert no_file.status_code == 400 and "'file'" in no_file.json()["detail"]
    no_body = client.post("/v1/predict")
    assert no_body.status_code in (400, 422) and isinstance(no_body.json()["detail"], str)
    json_body = client.post("/v1/explain", json={"file": "x"})
    assert 400 <= json_body.status_code < 500 and isinstance(json_body.json()["detail"], str)
    assert client.get("/health").status_code == 200


def test_oversized_uploads_get_413(trained):
    limit = 10_000
    with TestClient(create_app(trained, max_upload_bytes=limit)) as small:
        big = np.random.default_rng(0).integers(0, 255, (400, 400), dtype=np.uint8)
        data = _encode(Image.fromarray(big), "PNG")
        assert len(data) > limit + 64 * 1024  # over even the multipart slack: refused from Content-Length
        response = small.post("/v1/predict", files={"file": ("big.png", data, "image/png")})
        assert response.status_code == 413 and "limit" in response.json()["detail"]
        # just over the limit: passes the Content-Length gate, refused on the bytes actually read
        medium = b"\x89PNG\r\n\x1a\n" + b"\0" * (limit + 10)
        response = small.post("/v1/predict", files={"file": ("medium.png", medium, "image/png")})
        assert response.status_code == 413 and "medium.png" in response.json()["detail"]
        assert small.post("/v1/predict", files={"file": ("ok.png", png_bytes(), "image/png")}).status_code == 200
        assert small.get("/health").status_code == 200


def test_api_key_guards_v1_but_not_health_or_page(trained):
    with TestClient(create_app(trained, api_key="s3cret")) as keyed:
        upload = {"file": ("film.png", png_bytes(), "image/png")}
        assert keyed.post("/v1/predict", files=upload).status_code == 401
        assert keyed.post("/v1/predict", files=upload, headers={"X-API-Key": "wrong"}).status_code == 401
        assert keyed.get("/v1/model").status_code == 401
        assert keyed.post("/v1/predict", files=upload, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert keyed.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert keyed.get("/health").status_code == 200 and keyed.get("/").status_code == 200


def test_inference_timeout_gets_504(trained):
    with TestClient(create_app(trained, request_timeout_s=1e-6)) as hurried:
        response = hurried.post("/v1/predict", files={"file": ("film.png", png_bytes(), "image/png")})
        assert response.status_code == 504 and "film.png" in response.json()["detail"]


def test_real_server_answers_16_concurrent_requests_in_shared_model_calls(trained):
    uploads = [png_bytes(seed) for seed in range(4)]
    expected = [_expected(trained, data, "film.png") for data in uploads]
    app = create_app(trained, workers=2, batch_wait_s=0.05)  # a short wait makes batching certain in a test
    with running_server(app) as url:

        def call(i: int) -> tuple[int, float]:
            files = {"file": (f"film{i}.png", uploads[i % 4], "image/png")}
            response = httpx.post(f"{url}/v1/predict", files=files, timeout=60)
            return response.status_code, response.json().get("probability", -1.0)

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, range(16)))
        assert [status for status, _ in results] == [200] * 16
        for i, (_, probability) in enumerate(results):
            assert probability == pytest.approx(expected[i % 4], abs=1e-4)
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    sizes = app.state.batcher.batch_sizes
    assert sum(sizes) == 16 and max(sizes) > 1 and max(sizes) <= 16
