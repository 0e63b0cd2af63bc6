"""Tests for pneumolab.data.download against a real HTTP server on 127.0.0.1 (no other network)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import socket
import stat
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from pneumolab.data import download
from pneumolab.data.download import (
    MANUAL_HINT,
    download_kaggle,
    download_medmnist,
    download_url,
    fetch,
    npz_to_folders,
    safe_extract_zip,
)
from pneumolab.errors import DownloadError, UnknownNameError

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


# ------------------------------------------------------------------------------------------------ test server


@dataclass
class ServerState:
    """What the test server serves and what it saw; tests change it between calls."""

    base_url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    cut_after: int | None = None  # send the full Content-Length, then only this many bytes
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location of a 302
    honor_ranges: bool = True

    def add(self, name: str, body: bytes, query: str = "") -> str:
        self.files[f"/{name}"] = body
        return f"{self.base_url}/{name}{query}"


class RangeHandler(BaseHTTPRequestHandler):
    """GET with `Range: bytes=N-` support (206 / 416), redirects and an optional early cut-off.

    Also answers as a forward proxy: the absolute URL a proxy is sent is served by its path.
    """

    def do_GET(self) -> None:
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        path, range_header = urlsplit(self.path).path, self.headers.get("Range")
        state.requests.append((path, range_header))
        if path in state.redirects:
            self._send_head(302, 0, {"Location": state.redirects[path]})
            return
        body = state.files.get(path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and state.honor_ranges:
            start = int(match.group(1))
            if start >= len(body):
                self._send_head(416, 0, {"Content-Range": f"bytes */{len(body)}"})
                return
            self._send_head(206, len(body) - start, {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
        else:
            self._send_head(200, len(body), {})
        payload = body[start:]
        if state.cut_after is not None:
            payload = payload[: state.cut_after]  # HTTP/1.0: the connection closes after this, short
        self.wfile.write(payload)

    def _send_head(self, code: int, length: int, headers: dict[str, str]) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy from the environment must not see (or carry) the test's requests."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


@contextlib.contextmanager
def serving(port: int = 0, files: dict[str, bytes] | None = None) -> Iterator[ServerState]:
    """Run the test server on 127.0.0.1 (``port`` 0: any free one), serving ``files`` from the start."""
    httpd = ThreadingHTTPServer(("127.0.0.1", port), RangeHandler)
    state = ServerState(base_url=f"http://127.0.0.1:{httpd.server_address[1]}", files=dict(files or {}))
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def server() -> Iterator[ServerState]:
    with serving() as state:
        yield state


def dead_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------ test data


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


KAGGLE_LIKE = {
    "chest_xray/train/NORMAL/n0.png": png_bytes(10),
    "chest_xray/train/PNEUMONIA/p0.png": png_bytes(200),
    "chest_xray/test/NORMAL/n1.png": png_bytes(20),
    "chest_xray/test/PNEUMONIA/p1.png": png_bytes(210),
}


def make_zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def kaggle_like_zip() -> bytes:
    """The Kaggle layout plus macOS junk that must be skipped, and incompressible filler to cut off."""
    filler = np.random.default_rng(0).integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes()
    junk = {"__MACOSX/chest_xray/._n0.png": b"junk", "chest_xray/.DS_Store": b"junk"}
    return make_zip({**KAGGLE_LIKE, **junk, "chest_xray/filler.bin": filler})


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(root: Path) -> list[str]:
    """Hidden staging folders or .part files that a failure must not leave behind."""
    return [p.name for p in root.rglob("*") if ".partial-" in p.name or p.name.endswith(".part")]


def make_medmnist_npz(path: Path, counts: dict[str, tuple[int, int]]) -> Path:
    """A small MedMNIST-shaped .npz: per split, (normal, pneumonia) counts of 6 x 6 images, labels N x 1."""
    rng = np.random.default_rng(1)
    arrays = {}
    for split, (normal, pneumonia) in counts.items():
        labels = rng.permutation(np.array([0] * normal + [1] * pneumonia, dtype=np.uint8))
        arrays[f"{split}_images"] = rng.integers(0, 256, (len(labels), 6, 6), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def class_counts(root: Path) -> dict[tuple[str, str], int]:
    return {
        (split, cls): len(list((root / split / cls).glob(f"{split}_*.png")))
        for split in ("train", "val", "test")
        for cls in ("NORMAL", "PNEUMONIA")
    }


# --------------------------------------------------------------------------------------------- download_url


def test_download_url_extracts_and_second_call_is_a_no_op(server: ServerState, tmp_path: Path) -> None:
    body = kaggle_like_zip()
    url = server.add("chest.zip", body)

    out = download_url(url, tmp_path, sha256=sha256_of(body), progress=False)

    assert out == tmp_path / "chest"
    for name, data in KAGGLE_LIKE.items():
        assert (out / name).read_bytes() == data
    assert not (out / "__MACOSX").exists()
    assert not (out / "chest_xray" / ".DS_Store").exists()
    assert (tmp_path / "downloads" / "chest.zip").read_bytes() == body
    assert leftovers(tmp_path) == []
    assert len(server.requests) == 1

    assert download_url(url, tmp_path, sha256=sha256_of(body), progress=False) == out
    assert len(server.requests) == 1


@pytest.mark.parametrize("kind", ["parent", "absolute"])
def test_download_url_refuses_a_malicious_zip(server: ServerState, tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "outside" / "evil.txt"
    evil = "../evil.txt" if kind == "parent" else str(outside)
    url = server.add("bad.zip", make_zip({"chest_xray/train/NORMAL/ok.png": png_bytes(1), evil: b"pwned"}))
    work = tmp_path / "work"

    with pytest.raises(DownloadError, match="refusing to extract"):
        download_url(url, work, progress=False)

    assert list(tmp_path.rglob("evil.txt")) == []
    assert not (work / "bad").exists()  # the good member was not extracted either
    assert sorted(p.name for p in work.iterdir()) == ["downloads"]


def test_download_url_wrong_checksum(server: ServerState, tmp_path: Path) -> None:
    body = kaggle_like_zip()
    url = server.add("chest.zip", body)
    wrong = "0" * 64

    with pytest.raises(DownloadError) as info:
        download_url(url, tmp_path, sha256=wrong, progress=False)

    message = str(info.value)
    assert wrong in message and sha256_of(body) in message and "chest.zip" in message
    assert "\n" not in message
    assert not (tmp_path / "downloads" / "chest.zip").exists()
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "chest").exists()


def test_download_url_resumes_a_cut_off_transfer(server: ServerState, tmp_path: Path) -> None:
    body = kaggle_like_zip()
    url = server.add("chest.zip", body)
    part = tmp_path / "downloads" / "chest.zip.part"
    server.cut_after = 1000

    with pytest.raises(DownloadError, match=f"after 1000 of {len(body)} bytes"):
        download_url(url, tmp_path, sha256=sha256_of(body), progress=False)
    assert part.stat().st_size == 1000
    assert not (tmp_path / "chest").exists()

    server.cut_after = None
    out = download_url(url, tmp_path, sha256=sha256_of(body), progress=False)

    assert server.requests[-1] == ("/chest.zip", "bytes=1000-")
    assert (tmp_path / "downloads" / "chest.zip").read_bytes() == body
    assert not part.exists()
    assert (out / "chest_xray/test/PNEUMONIA/p1.png").read_bytes() == KAGGLE_LIKE["chest_xray/test/PNEUMONIA/p1.png"]


# -------------------------------------------------------------------------------------------------- fetch


def test_fetch_restarts_when_the_server_ignores_range(server: ServerState, tmp_path: Path) -> None:
    body = bytes(range(256)) * 40
    url = server.add("blob.bin", body)
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(b"stale bytes from another file")
    server.honor_ranges = False

    assert fetch(url, dest, md5=hashlib.md5(body).hexdigest(), progress=False) == dest

    assert dest.read_bytes() == body
    assert server.requests[-1][1] is not None  # it asked for a range and got a 200 with everything


def test_fetch_accepts_a_complete_part_on_416(server: ServerState, tmp_path: Path) -> None:
    body = b"x" * 5000
    url = server.add("blob.bin", body)
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(body)

    fetch(url, dest, sha256=sha256_of(body), progress=False)

    assert dest.read_bytes() == body
    assert server.requests == [("/blob.bin", "bytes=5000-")]


def test_fetch_redownloads_a_dest_with_the_wrong_checksum(server: ServerState, tmp_path: Path) -> None:
    body = b"fresh" * 100
    url = server.add("blob.bin", body)
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"old")

    fetch(url, dest, sha256=sha256_of(body), progress=False)
    assert dest.read_bytes() == body
    fetch(url, dest, sha256=sha256_of(body), progress=False)
    assert len(server.requests) == 1


def test_fetch_follows_a_redirect_and_resumes_through_it(server: ServerState, tmp_path: Path) -> None:
    body = bytes(range(256)) * 40
    server.add("files/blob.bin", body)
    server.redirects["/records/1/blob.bin"] = f"{server.base_url}/files/blob.bin"
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(body[:1000])

    fetch(f"{server.base_url}/records/1/blob.bin?download=1", dest, sha256=sha256_of(body), progress=False)

    assert dest.read_bytes() == body
    assert server.requests == [("/records/1/blob.bin", "bytes=1000-"), ("/files/blob.bin", "bytes=1000-")]


def test_fetch_retries_a_refused_connect(tmp_path: Path) -> None:
    body = b"late" * 1000
    port = dead_port()
    stop = threading.Event()

    def start_late() -> None:  # the first connect is refused; a retry (0 s, then 0.5 s later) gets through
        time.sleep(0.1)
        with serving(port, files={"/blob.bin": body}):
            stop.wait(10)

    thread = threading.Thread(target=start_late, daemon=True)
    thread.start()
    try:
        fetch(f"http://127.0.0.1:{port}/blob.bin", tmp_path / "blob.bin", progress=False)
    finally:
        stop.set()
        thread.join()
    assert (tmp_path / "blob.bin").read_bytes() == body


def test_fetch_uses_the_proxy_from_the_environment(
    server: ServerState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.add("blob.bin", b"via proxy")
    monkeypatch.setenv("http_proxy", server.base_url)
    monkeypatch.delenv("no_proxy")
    monkeypatch.delenv("NO_PROXY")

    # The name does not resolve: only the proxy can answer.
    fetch("http://pneumolab.invalid/blob.bin", tmp_path / "blob.bin", progress=False)

    assert (tmp_path / "blob.bin").read_bytes() == b"via proxy"
    assert server.requests == [("/blob.bin", None)]


def test_fetch_http_error(server: ServerState, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server.base_url}/missing.zip", tmp_path / "missing.zip", progress=False)


def test_fetch_shows_progress_on_stderr_only(
    server: ServerState, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.add("blob.bin", b"y" * 3000)
    fetch(url, tmp_path / "blob.bin", progress=True)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("where", ["refused", "unresolvable"])
def test_unreachable_host_says_how_to_get_the_data_by_hand(tmp_path: Path, where: str) -> None:
    url = f"http://127.0.0.1:{dead_port()}/x.zip" if where == "refused" else "http://nonexistent.invalid/x.zip"
    started = time.monotonic()

    with pytest.raises(DownloadError) as info:
        download_url(url, tmp_path, progress=False)

    message = str(info.value)
    assert message.startswith(f"cannot reach {urlsplit(url).hostname}: ")
    assert message.endswith(MANUAL_HINT)
    assert "\n" not in message
    assert time.monotonic() - started < 10
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ safe_extract_zip


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../evil.txt", "escapes"),
        ("a/../../evil.txt", "escapes"),
        ("/tmp/evil.txt", "absolute"),
        ("C:/evil.txt", "drive letter"),
        ("..\\evil.txt", "escapes"),
    ],
)
def test_safe_extract_zip_refuses_unsafe_names(tmp_path: Path, name: str, problem: str) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({"ok.txt": b"fine", name: b"pwned"}))

    with pytest.raises(DownloadError, match=problem):
        safe_extract_zip(archive, tmp_path / "out")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]


def test_safe_extract_zip_refuses_symlinks(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    archive = tmp_path / "a.zip"
    archive.write_bytes(buffer.getvalue())

    with pytest.raises(DownloadError, match="symbolic link"):
        safe_extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_safe_extract_zip_keeps_harmless_dotdot(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({"a/../b/ok.txt": b"fine"}))
    out = safe_extract_zip(archive, tmp_path / "out")
    assert (out / "b" / "ok.txt").read_bytes() == b"fine"
    assert not (out / "a").exists()


def test_safe_extract_zip_corrupt_archive(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({"big.bin": b"\0" * 10_000})[:200])
    with pytest.raises(DownloadError, match="not a readable zip"):
        safe_extract_zip(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]


def test_safe_extract_zip_bad_crc_leaves_nothing(tmp_path: Path) -> None:
    data = bytearray(make_zip({"first.txt": b"A" * 100, "second.txt": b"B" * 100}))
    data[data.index(b"B" * 100)] = ord("C")  # stored, so the CRC check fails while extracting
    archive = tmp_path / "a.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="not a readable zip"):
        safe_extract_zip(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]


def test_safe_extract_zip_will_not_overwrite(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({"x.txt": b"x"}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(DownloadError, match="already exists"):
        safe_extract_zip(archive, tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------------------- MedMNIST


def test_npz_to_folders_counts_per_split_and_class(tmp_path: Path) -> None:
    counts = {"train": (3, 5), "val": (1, 2), "test": (2, 2)}
    npz = make_medmnist_npz(tmp_path / "p.npz", counts)

    out = npz_to_folders(npz, tmp_path / "out")

    assert class_counts(out) == {
        (s, c): n for s, pair in counts.items() for c, n in zip(("NORMAL", "PNEUMONIA"), pair, strict=True)
    }
    with np.load(npz) as arrays:
        first_label = int(arrays["train_labels"][0, 0])
        first = arrays["train_images"][0]
    cls = ("NORMAL", "PNEUMONIA")[first_label]
    assert np.array_equal(np.asarray(Image.open(out / "train" / cls / "train_00000.png")), first)
    assert leftovers(tmp_path) == []


def test_npz_to_folders_rejects_a_non_npz(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(DownloadError, match=r"bad\.npz"):
        npz_to_folders(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_download_medmnist_from_the_local_server(
    server: ServerState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = {"train": (2, 3), "val": (1, 1), "test": (1, 2)}
    body = make_medmnist_npz(tmp_path / "src.npz", counts).read_bytes()
    url = server.add("pneumoniamnist_28.npz", body, query="?download=1")
    monkeypatch.setattr(download, "_medmnist_source", lambda size: (url, hashlib.md5(body).hexdigest()))
    work = tmp_path / "work"

    out = download_medmnist(work, size=28, progress=False)

    assert out == work / "pneumoniamnist_28"
    assert sum(class_counts(out).values()) == 10
    assert class_counts(out)[("train", "PNEUMONIA")] == 3
    assert (work / "downloads" / "pneumoniamnist_28.npz").read_bytes() == body
    assert download_medmnist(work, size=28, progress=False) == out
    assert len(server.requests) == 1


def test_download_medmnist_unknown_size(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="224"):
        download_medmnist(tmp_path, size=100)


def test_builtin_medmnist_table_matches_installed_medmnist() -> None:
    medmnist = pytest.importorskip("medmnist")
    info = medmnist.INFO["pneumoniamnist"]
    expected = {
        size: (info["url" if size == 28 else f"url_{size}"], info["MD5" if size == 28 else f"MD5_{size}"])
        for size in (28, 64, 128, 224)
    }
    table = download._MEDMNIST_SOURCES
    assert table == expected
    assert {size: download._medmnist_source(size) for size in expected} == expected


# --------------------------------------------------------------------------------------------------- Kaggle


def test_download_kaggle_offline_says_how_to_get_the_data_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("kagglehub")
    # Route kagglehub's requests through a proxy port nobody listens on: it fails at once, here and on
    # machines with internet alike, and never reaches Kaggle.
    proxy = f"http://127.0.0.1:{dead_port()}"
    for name in PROXY_VARS:
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "cache"))
    started = time.monotonic()

    with pytest.raises(DownloadError) as info:
        download_kaggle(tmp_path / "data", progress=False)

    message = str(info.value)
    assert message.startswith("cannot reach ")
    assert message.endswith(MANUAL_HINT)
    assert "\n" not in message
    assert time.monotonic() - started < 10
    assert not (tmp_path / "data" / "chest-xray-pneumonia" / ".pneumolab-complete").exists()


def test_download_kaggle_reuses_a_finished_download_without_network(tmp_path: Path) -> None:
    out = tmp_path / "chest-xray-pneumonia"
    out.mkdir()
    (out / ".pneumolab-complete").touch()
    assert download_kaggle(tmp_path, progress=False) == out


# ------------------------------------------------------------------------------------ hardening (issue 23)


class EndlessHandler(BaseHTTPRequestHandler):
    """200 with no Content-Length and a body that never ends (HTTP/1.0: it would end when the connection closes)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.server.sent = 0  # type: ignore[attr-defined]
        with contextlib.suppress(OSError):  # the client hangs up at its cap
            while self.server.sent < 1 << 30:  # type: ignore[attr-defined]
                self.wfile.write(b"x" * 65536)
                self.server.sent += 65536  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_fetch_stops_an_endless_stream_at_the_size_cap(tmp_path: Path) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), EndlessHandler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/endless.bin"
        with pytest.raises(DownloadError, match=r"endless\.bin: larger than the download limit of 2,097,152 bytes"):
            fetch(url, tmp_path / "endless.bin", max_bytes=2 << 20, progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
    assert httpd.sent < 64 << 20  # the client hung up near the cap, not at the server's end
    assert list(tmp_path.iterdir()) == []  # nothing kept: a capped part cannot be resumed into a smaller file


def test_fetch_refuses_a_declared_length_over_the_cap_before_reading(server: ServerState, tmp_path: Path) -> None:
    url = server.add("big.bin", b"y" * 5000)
    with pytest.raises(DownloadError, match=r"big\.bin: larger than the download limit of 4,096 bytes"):
        fetch(url, tmp_path / "big.bin", max_bytes=4096, progress=False)
    assert list(tmp_path.iterdir()) == [] and server.requests == [("/big.bin", None)]
    assert fetch(url, tmp_path / "big.bin", max_bytes=5000, progress=False).read_bytes() == b"y" * 5000
    assert download.DEFAULT_MAX_BYTES >= 8 << 30  # the Kaggle zip (2.3 GB) and PneumoniaMNIST+ fit the default


def test_a_redirect_from_https_to_http_is_refused() -> None:
    refusal = download.redirect_refusal
    assert refusal("https://zenodo.org/a", "http://evil.example/a.zip") is not None
    assert refusal("https://zenodo.org/a", "https://cdn.zenodo.org/a") is None
    assert refusal("http://mirror.example/a", "http://other.example/a") is None  # the user chose plain http
    assert refusal("http://mirror.example/a", "https://other.example/a") is None
    # the client that fetch uses applies it to every request it sends, redirects included
    with download._client("https://zenodo.org/records/1/files/x.npz") as client:
        hooks = client.event_hooks["request"]
        downgrade = client.build_request("GET", "http://evil.example/x.npz")
        with pytest.raises(DownloadError, match=r"from https to http://evil\.example"):
            for hook in hooks:
                hook(downgrade)
        for hook in hooks:
            hook(client.build_request("GET", "https://cdn.zenodo.org/x.npz"))
