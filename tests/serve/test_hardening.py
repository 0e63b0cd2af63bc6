"""The service under hostile or heavy use, over real uvicorn servers: chunked uploads stopped at the limit, explains
that cannot starve predict, full lanes answered 503 at once, the API key and limits whatever the path prefix, docs
without outside assets, security headers, the Host check, and a hostile corpus in parallel with normal traffic."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from pneumolab.serve.app import create_app, loopback_hosts
from pneumolab.serve.security import allowed_host_names, header_value
from tests.data.test_check import _huge_png_header
from tests.data.test_io import dicom_bytes, dicom_dataset, pixels12
from tests.serve import running_server, tiny_trained
from tests.serve.test_service import jpeg_bytes, png_bytes

KEY = {"X-API-Key": "s3cret"}


@pytest.fixture(scope="module")
def trained():
    return tiny_trained()


@pytest.fixture(scope="module")
def slow_png() -> bytes:
    """A valid 25-megapixel black PNG (24 KB): a quarter of a second to decode on a 2-core CPU, whatever the model
    (an explain decodes it twice)."""
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000), 0).save(buffer, "PNG")
    return buffer.getvalue()


def _one_line_json(response: httpx.Response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "\r" not in detail, detail
    return detail


def _chunked_upload(url: str, path: str, total: int, chunk: int = 64 * 1024) -> tuple[int, bytes, int]:
    """POST a multipart upload of `total` bytes with chunked transfer encoding (no Content-Length) over a raw socket,
    stopping as soon as the server answers or stops reading; return (status, body, bytes sent)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    boundary = "pneumolabboundary"
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
    )
    preamble = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    frame = lambda data: f"{len(data):x}\r\n".encode() + data + b"\r\n"  # noqa: E731
    sent = 0
    sock.settimeout(2)
    try:
        sock.sendall(frame(preamble))
        block = frame(b"\0" * chunk)
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(block)
            sent += chunk
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading: its answer is waiting
    sock.settimeout(10)
    answer = b""
    try:
        while chunk_in := sock.recv(65536):
            answer += chunk_in
            if b"\r\n\r\n" in answer and b'"}' in answer:
                break
    except (TimeoutError, ConnectionResetError):
        pass
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, body, sent


def test_chunked_upload_is_stopped_at_the_limit(trained):
    limit = 1 << 20
    with running_server(create_app(trained, max_upload_bytes=limit)) as url:
        status, body, sent = _chunked_upload(url, "/v1/predict", total=64 << 20)
        assert status == 413 and b"limit" in body, (status, body)
        assert sent < 16 << 20, f"the server read {sent} bytes of a chunked upload limited to {limit}"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_predict_stays_prompt_while_explains_fill_their_lane(trained, slow_png):
    # a generous time limit: explains run at a lower CPU priority, and a shared CI machine may starve them
    app = create_app(trained, workers=2, explain_workers=1, explain_queue=1, request_timeout_s=600)
    lanes = app.state.lanes
    with running_server(app) as url, ThreadPoolExecutor(2) as pool:
        upload = {"file": ("slow.png", slow_png, "image/png")}
        explains = [pool.submit(httpx.post, f"{url}/v1/explain", files=upload, timeout=120) for _ in range(2)]
        deadline = time.monotonic() + 20
        while lanes["explain"].in_use < 2:
            assert time.monotonic() < deadline, "the two explains never reached their lane"
            time.sleep(0.01)
        third = httpx.post(f"{url}/v1/explain", files=upload, timeout=120)
        assert third.status_code == 503 and int(third.headers["Retry-After"]) >= 1, third.text
        assert "explain" in _one_line_json(third)
        assert not any(f.done() for f in explains), "the full lane's answer came only after its work"
        for seed in range(2):
            files = {"file": (f"film{seed}.png", png_bytes(seed), "image/png")}
            assert httpx.post(f"{url}/v1/predict", files=files, timeout=60).status_code == 200
        assert not any(f.done() for f in explains), "predict waited for the explains"
        assert [f.result().status_code for f in explains] == [200, 200]
    assert lanes["explain"].in_use == 0 and lanes["predict"].in_use == 0


def test_timeouts_answer_504_and_free_the_lane(trained, slow_png):
    app = create_app(trained, explain_workers=1, explain_queue=1, request_timeout_s=0.2)
    lane = app.state.lanes["explain"]
    with running_server(app) as url, ThreadPoolExecutor(2) as pool:
        upload = {"file": ("slow.png", slow_png, "image/png")}
        first = pool.submit(httpx.post, f"{url}/v1/explain", files=upload, timeout=60)
        while lane.in_use < 1:
            time.sleep(0.01)
        second = pool.submit(httpx.post, f"{url}/v1/explain", files=upload, timeout=60)
        assert [first.result().status_code, second.result().status_code] == [504, 504]
        # the running one holds its slot until its thread is done, then the lane is free again; that the queued one
        # never runs depends on when the first finishes here, so tests/serve/test_lanes.py checks it with events
        deadline = time.monotonic() + 30
        while lane.in_use:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert 1 <= lane.started <= 2


def _prefixed(app: FastAPI, how: str):
    if how == "mount":
        parent = FastAPI()
        parent.mount("/pneumo", app)
        return running_server(parent), "/pneumo"
    return running_server(app, root_path="/pneumo"), ""  # the proxy stripped the prefix


@pytest.mark.parametrize("how", ["mount", "root_path"])
def test_key_and_size_limit_hold_under_a_path_prefix(trained, how):
    server, prefix = _prefixed(create_app(trained, api_key="s3cret", max_upload_bytes=10_000), how)
    with server as base:
        url = base + prefix
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{url}/v1/model", timeout=10).status_code == 401
        assert httpx.get(f"{url}/v1/model", headers=KEY, timeout=10).status_code == 200
        upload = {"file": ("film.png", png_bytes(), "image/png")}
        refused = httpx.post(f"{url}/v1/predict", files=upload, timeout=10)
        assert refused.status_code == 401 and "X-API-Key" in _one_line_json(refused)
        big = {"file": ("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 200_000, "image/png")}
        too_big = httpx.post(f"{url}/v1/predict", files=big, headers=KEY, timeout=10)
        assert too_big.status_code == 413 and "limit" in _one_line_json(too_big)
        assert httpx.post(f"{url}/v1/predict", files=upload, headers=KEY, timeout=30).status_code == 200
        # the schema is the key holder's, and declares the key as a security scheme on every /v1 operation
        assert httpx.get(f"{url}/openapi.json", timeout=10).status_code == 401
        schema = httpx.get(f"{url}/openapi.json", headers=KEY, timeout=10).json()
        ((scheme_name, scheme),) = schema["components"]["securitySchemes"].items()
        assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-API-Key")
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                wanted = [{scheme_name: []}] if path.startswith("/v1/") else None  # /health is public
                assert operation.get("security") == wanted, path
        assert httpx.get(f"{url}/docs", timeout=10).status_code == 404  # no public docs beside a key


def test_docs_have_no_outside_assets_and_answers_carry_security_headers(trained):
    with TestClient(create_app(trained)) as client:
        docs = client.get("/docs")
        assert docs.status_code == 200 and "/v1/predict" in docs.text and "/v1/explain" in docs.text
        assert "http://" not in docs.text and "https://" not in docs.text and "<script" not in docs.text
        assert client.get("/redoc").status_code == 404
        for response in (client.get("/"), docs, client.get("/health"), client.get("/v1/model"), client.get("/nope")):
            headers = response.headers
            assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
            assert (
                headers["Referrer-Policy"] == "no-referrer"
                and "frame-ancestors 'none'" in headers["Content-Security-Policy"]
            )
        for api in (client.get("/health"), client.get("/v1/model"), client.get("/nope")):
            assert api.headers["Cache-Control"] == "no-store"
            assert api.headers["Content-Security-Policy"].startswith("default-src 'none'")
        page = client.get("/")
        csp = page.headers["Content-Security-Policy"]
        assert "'unsafe-inline'" not in csp and "connect-src 'self'" in csp
        for tag in ("script", "style"):  # each inline block allowed by its own hash, nothing else
            (inline,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page.text, re.S)
            digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
            assert f"{tag}-src 'sha256-{digest}'" in csp


def test_host_check_refuses_rebound_names(trained):
    app = create_app(trained, allowed_hosts=loopback_hosts())
    with running_server(app) as url:
        port = urlsplit(url).port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            assert httpx.get(f"{url}/health", headers={"Host": host}, timeout=10).status_code == 200, host
        rebound = httpx.get(f"{url}/v1/model", headers={"Host": f"attacker.example:{port}"}, timeout=10)
        assert rebound.status_code == 400
    # what `serve` answers: this machine's names on loopback (plus any given), beyond it the given names or any
    assert allowed_host_names("127.0.0.1") == loopback_hosts() == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_host_names("::1", ["xray.lan"]) == [*loopback_hosts(), "xray.lan"]
    assert allowed_host_names("0.0.0.0", ["xray.example.org"]) == ["xray.example.org"]
    assert allowed_host_names("0.0.0.0") is None


def test_header_values_are_ascii_one_line_and_bounded():
    text = "Patient\u00e9 \u2603\r\nSet-Cookie: x=1 " + "a" * 5000
    value = header_value(text)
    assert value.isascii() and "\r" not in value and "\n" not in value and len(value) <= 300
    assert value.startswith("Patient\\xe9 \\u2603 Set-Cookie") and value.endswith("...")
    assert header_value("plain") == "plain"


def _hostile_corpus() -> list[tuple[str, str, dict, int]]:
    """(name, endpoint, httpx keyword arguments, expected status) of uploads no service may answer with a 500."""
    truncated_dicom = dicom_bytes(dicom_dataset(pixels12(256, 256)))[:2000]
    newline_name = "evil\r\nname.png"
    return [
        ("garbage", "/v1/predict", {"files": {"file": ("garbage.jpeg", bytes(range(256)) * 400, "image/jpeg")}}, 400),
        ("truncated jpeg", "/v1/predict", {"files": {"file": ("cut.jpeg", jpeg_bytes()[:300], "image/jpeg")}}, 400),
        (
            "huge png",
            "/v1/predict",
            {"files": {"file": ("huge.png", _huge_png_header(60000, 60000), "image/png")}},
            400,
        ),
        ("huge png explain", "/v1/explain", {"files": {"file": ("h.png", _huge_png_header(60000, 60000), "")}}, 400),
        ("zero bytes", "/v1/predict", {"files": {"file": ("empty.png", b"", "image/png")}}, 400),
        ("wrong type", "/v1/predict", {"files": {"file": ("notes.txt", b"hello", "text/plain")}}, 415),
        ("truncated dicom", "/v1/predict", {"files": {"file": ("cut.dcm", truncated_dicom, "application/dicom")}}, 400),
        ("newline name", "/v1/predict", {"files": {"file": (newline_name, b"junk", "image/png")}}, 400),
        ("long name", "/v1/predict", {"files": {"file": ("n" * 5000 + ".png", b"junk", "image/png")}}, 400),
        ("two files", "/v1/predict", {"files": [("file", ("a.png", png_bytes(), "image/png"))] * 2}, 400),
        ("no file", "/v1/predict", {"files": {"other": ("a.png", png_bytes(), "image/png")}}, 400),
        ("json body", "/v1/predict", {"json": {"file": "x"}}, 400),
        (
            "bad multipart",
            "/v1/predict",
            {"content": b"--x\r\n\r\n", "headers": {"Content-Type": "multipart/form-data"}},
            400,
        ),
        ("bad panel", "/v1/explain?panel=all", {"files": {"file": ("a.png", png_bytes(), "image/png")}}, 422),
        ("bad target", "/v1/explain?target=CAT", {"files": {"file": ("a.png", png_bytes(), "image/png")}}, 422),
    ]


def test_hostile_uploads_in_parallel_with_normal_traffic_get_one_line_4xx(trained):
    corpus = _hostile_corpus()
    with running_server(create_app(trained, max_upload_bytes=1 << 20)) as url:

        def hostile(case) -> tuple[str, int, str]:
            name, endpoint, kwargs, _ = case
            response = httpx.post(f"{url}{endpoint}", timeout=60, **kwargs)
            return name, response.status_code, _one_line_json(response)

        def normal(seed: int) -> int:
            files = {"file": (f"film{seed}.png", png_bytes(seed), "image/png")}
            return httpx.post(f"{url}/v1/predict", files=files, timeout=60).status_code

        with ThreadPoolExecutor(8) as pool:
            chunked = pool.submit(_chunked_upload, url, "/v1/explain", 8 << 20)
            normals = [pool.submit(normal, seed) for seed in range(8)]
            answers = list(pool.map(hostile, corpus * 2))
        assert [f.result() for f in normals] == [200] * 8
        expected = {name: status for name, _, _, status in corpus}
        for name, status, detail in answers:
            assert status == expected[name], (name, status, detail)
            assert len(detail) <= 600, (name, detail)
        assert chunked.result()[0] == 413
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
