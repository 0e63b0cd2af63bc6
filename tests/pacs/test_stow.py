"""Results by STOW-RS (DICOMweb): stored at a real Orthanc and checked by a QIDO-RS query, a server that answers 200
without keeping the instances, failures with their reason after bounded retries, and what ``--dest`` accepts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pneumolab.errors import SettingError
from pneumolab.pacs.convert import film_to_dicom
from pneumolab.pacs.sender import Destination, SendError, StowDestination, parse_destination, send_files
from tests.pacs.conftest import shared_jpegs
from tests.pacs.orthanc import Orthanc, echo, free_port


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """An Orthanc with its DICOMweb plugin; ``listener_port`` is a node that a test may start."""
    folder = tmp_path_factory.mktemp("orthanc")
    listener_port = free_port()
    server = Orthanc(folder, listener_port)
    if server.client.get("/dicom-web/studies").status_code == 404:
        server.stop()
        pytest.skip("Orthanc's DICOMweb plugin is absent: apt-get install orthanc-dicomweb (make pacs-tools)")
    server.listener_port = listener_port
    yield server
    server.stop()


def _films(folder: Path, study: str, count: int) -> list[Path]:
    """`count` small DX files of one study, each in its own series."""
    out = []
    for index in range(count):
        path = folder / f"film-{index}.dcm"
        film = film_to_dicom(np.full((64, 64), 0.25 * (index + 1)), patient_id="P", study_uid=study)
        film.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_stow_stores_at_orthanc_which_then_lists_the_instances(orthanc, tmp_path):
    study = generate_uid()
    files = _films(tmp_path, study, 2)  # two series: one POST, one query per series
    dest = parse_destination(f"http://127.0.0.1:{orthanc.http_port}/dicom-web/", environ={})
    assert isinstance(dest, StowDestination) and dest.url.endswith("/dicom-web")
    assert send_files(files, dest, retries=0) == 1
    stored = {i["SOPInstanceUID"]: i for i in orthanc.instances(study)}
    assert set(stored) == {_sop(f) for f in files}
    for file in files:  # the same bytes, as Orthanc's REST gives them back
        assert orthanc.file(stored[_sop(file)]["ID"]) == file.read_bytes()
    assert send_files(files, dest, retries=0) == 1  # a resend stores the same objects, which Orthanc keeps once
    assert len(orthanc.instances(study)) == 2


class _FakeDicomWeb(BaseHTTPRequestHandler):
    """POST answers ``server.post_status`` with ``server.post_body``; GET (the QIDO-RS query) answers ``[]``."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts.append({"path": self.path, "headers": dict(self.headers), "body": body})
        self._answer(self.server.post_status, self.server.post_body)

    def do_GET(self) -> None:
        self.server.gets.append(self.path)
        self._answer(200, [])

    def _answer(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_server():
    """A real HTTP server on loopback that keeps nothing it is sent."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeDicomWeb)
    server.posts, server.gets, server.post_status, server.post_body = [], [], 200, {}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_200_whose_instances_the_query_does_not_find_is_a_failure(fake_server, tmp_path):
    study = generate_uid()
    (film,) = _films(tmp_path, study, 1)
    port = fake_server.server_address[1]
    dest = parse_destination(f"http://127.0.0.1:{port}/dicom-web", environ={"PNEUMOLAB_DEST_TOKEN": "s3cret"})
    assert "s3cret" not in repr(dest)
    with pytest.raises(SendError) as error:
        send_files([film], dest, retries=0)
    assert "answered 200 but the query did not find 1 of 1 instances" in str(error.value)
    assert _sop(film) in str(error.value)
    (post,) = fake_server.posts
    assert post["path"] == f"/dicom-web/studies/{study}"
    assert post["headers"]["Content-Type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert post["headers"]["Authorization"] == "Bearer s3cret"  # from the environment, not the command line
    assert film.read_bytes() in post["body"]
    series = pydicom.dcmread(film, stop_before_pixels=True).SeriesInstanceUID
    assert [g.split("?")[0] for g in fake_server.gets] == [f"/dicom-web/studies/{study}/series/{series}/instances"]


def test_a_refusal_gives_its_failure_reason_after_one_plus_retries_attempts(fake_server, tmp_path):
    (film,) = _films(tmp_path, generate_uid(), 1)
    fake_server.post_status = 409  # as Orthanc answers a conflict: the failed SOP sequence with FailureReason 0x0110
    failed = {"00081155": {"vr": "UI", "Value": [_sop(film)]}, "00081197": {"vr": "US", "Value": [272]}}
    fake_server.post_body = {"00081198": {"vr": "SQ", "Value": [failed]}}
    dest = StowDestination(f"http://127.0.0.1:{fake_server.server_address[1]}/dicom-web")
    with pytest.raises(SendError) as error:
        send_files([film], dest, retries=2, delay=0.01)
    assert len(fake_server.posts) == 3 and fake_server.gets == []
    assert str(error.value) == (
        f"1 result files not stored after 3 attempts: STOW-RS to {dest.url} answered 409: 1 failed, "
        "FailureReason 0x0110"
    )


def test_an_unreachable_destination_fails_after_one_plus_retries_attempts(tmp_path, caplog):
    (film,) = _films(tmp_path, generate_uid(), 1)
    dest = parse_destination(f"http://127.0.0.1:{free_port()}/dicom-web", environ={})  # nothing listens there
    with pytest.raises(SendError, match=r"not stored after 3 attempts: STOW-RS to .*: ConnectError"):
        send_files([film], dest, retries=2, delay=0.01, timeout=5)
    warnings = [r.getMessage().split(":")[0] for r in caplog.records if r.name == "pneumolab.pacs"]
    assert warnings == [f"send attempt {n} of 3 failed" for n in (1, 2, 3)]


def test_parse_destination_takes_either_form_and_refuses_the_rest_in_one_line(tmp_path):
    assert parse_destination("ORTHANC@127.0.0.1:4242", environ={}) == Destination("ORTHANC", "127.0.0.1", 4242)
    stow = parse_destination("https://pacs.example.org/dicomweb/", environ={})
    assert stow == StowDestination("https://pacs.example.org/dicomweb")
    basic = {"PNEUMOLAB_DEST_USERNAME": "ai", "PNEUMOLAB_DEST_PASSWORD": "pw"}
    stow = parse_destination("https://pacs.example.org/dicomweb", environ=basic)
    assert (stow.username, stow.password, stow.token) == ("ai", "pw", None) and "pw" not in repr(stow)
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a send")
    assert parse_destination("https://pacs.example.org/dicomweb", ca_bundle=ca, environ={}).ca_bundle == ca
    token = {"PNEUMOLAB_DEST_TOKEN": "t"}
    refused = [
        ("ORTHANC:4242", {}, None),
        ("ftp://pacs.example.org/dicomweb", {}, None),
        ("http://user:pw@127.0.0.1:8042/dicom-web", {}, None),
        ("http://user:pw@127.0.0.1:99999/dicom-web", {}, None),
        ("http://[::1/dicom-web", {}, None),
        ("http://127.0.0.1:8042/dicom-web?x=1", {}, None),
        ("http://:8042/dicom-web", {}, None),
        ("http://127.0.0.1:99999/dicom-web", {}, None),
        ("https://pacs.example.org/dicomweb", {"PNEUMOLAB_DEST_USERNAME": "ai"}, None),
        ("https://pacs.example.org/dicomweb", {**token, **basic}, None),
        ("http://pacs.example.org/dicomweb", token, None),  # a token in clear beyond this machine
        ("ORTHANC@127.0.0.1:4242", {}, ca),
        ("http://127.0.0.1:8042/dicom-web", {}, ca),
        ("https://pacs.example.org/dicomweb", {}, tmp_path / "absent.pem"),
    ]
    for text, environ, ca_bundle in refused:
        with pytest.raises(SettingError) as error:
            parse_destination(text, ca_bundle=ca_bundle, environ=environ)
        assert "\n" not in str(error.value) and "pw" not in str(error.value), text
    assert parse_destination("http://localhost:8042/dicom-web", environ=token).token == "t"  # loopback: allowed


def test_listen_refuses_a_bad_dest_in_one_line(tmp_path):
    command = [sys.executable, "-m", "pneumolab.cli", "listen", "--spool", str(tmp_path / "spool"),
               "--dest", "http://user:secret@127.0.0.1:8042/dicom-web"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --dest: put credentials in PNEUMOLAB_DEST_TOKEN or PNEUMOLAB_DEST_USERNAME/PNEUMOLAB_DEST_PASSWORD, "
        "not the URL"
    ]


def test_the_node_stores_its_sr_and_sc_by_stow_rs(orthanc, make_film, tmp_path):
    """End to end: a film sent to `pneumolab listen --dest http://...` gets its results in Orthanc by STOW-RS."""
    study = generate_uid()
    orthanc.upload(make_film(shared_jpegs("PNEUMONIA", 1)[0], "p", study_uid=study))
    log = tmp_path / "node.log"
    command = [
        sys.executable, "-m", "pneumolab.cli", "listen", "--spool", str(tmp_path / "spool"),
        "--port", str(orthanc.listener_port), "--dest", f"http://127.0.0.1:{orthanc.http_port}/dicom-web",
        "--quiet-seconds", "1", "--retries", "1", "--allow-ae", "ORTHANC",
    ]  # fmt: skip
    with log.open("wb") as out:
        node = subprocess.Popen(command, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 120
        while not echo(orthanc.listener_port):
            assert node.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        orthanc.send_study_to_listener(study)
        orthanc.wait_for(study, {"SR": 1, "OT": 1}, timeout=90)
        deadline = time.monotonic() + 30  # the node journals "sent" once its query found them
        while not (sent := [e for e in _journal(tmp_path / "spool") if e["event"] in ("sent", "failed")]):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert [(e["event"], e["results"], e["attempts"]) for e in sent] == [("sent", 2, 1)]
    finally:
        if node.poll() is None:
            os.kill(node.pid, signal.SIGINT)
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(node.pid, signal.SIGKILL)
                node.wait()


def _journal(spool: Path) -> list[dict]:
    file = spool / "journal.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines() if line.endswith("}")] if file.exists() else []
