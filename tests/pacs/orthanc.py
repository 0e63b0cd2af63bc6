"""A real Orthanc (Debian's package) for the tests: free loopback ports, temporary storage, stopped by pid."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """An Orthanc process with its REST client; `modality` is the listener it may send to."""

    def __init__(self, folder: Path, listener_port: int, listener_ae: str = "PNEUMOLAB") -> None:
        binary = shutil.which("Orthanc")
        if binary is None:
            pytest.skip("Orthanc is absent: apt-get install orthanc orthanc-dicomweb (make pacs-tools)")
        self.http_port, self.dicom_port, self.ae_title = free_port(), free_port(), "ORTHANC"
        config = {
            "Name": "pneumolab-test",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {"pneumolab": [listener_ae, "127.0.0.1", listener_port]},
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
            "StableAge": 1,
            "SaveJobs": False,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=self.log, stderr=self.log)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.client.get("/system").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"Orthanc did not start: see {folder / 'orthanc.log'}")
            time.sleep(0.2)

    def upload(self, path: Path) -> dict:
        answer = self.client.post("/instances", content=path.read_bytes())
        answer.raise_for_status()
        return answer.json()

    def send_study_to_listener(self, study_uid: str) -> None:
        study_id = self.study_id(study_uid)
        answer = self.client.post("/modalities/pneumolab/store", json={"Resources": [study_id], "Synchronous": True})
        answer.raise_for_status()

    def study_id(self, study_uid: str) -> str | None:
        found = self.client.post("/tools/lookup", content=study_uid).json()
        return next((f["ID"] for f in found if f["Type"] == "Study"), None)

    def instances(self, study_uid: str) -> list[dict]:
        """The study's instances with their main tags (Modality from the series)."""
        study_id = self.study_id(study_uid)
        if study_id is None:
            return []
        out = []
        for series in self.client.get(f"/studies/{study_id}/series").json():
            for instance in self.client.get(f"/series/{series['ID']}/instances").json():
                out.append({"ID": instance["ID"], "Modality": series["MainDicomTags"].get("Modality", ""),
                            "SOPInstanceUID": instance["MainDicomTags"]["SOPInstanceUID"]})  # fmt: skip
        return out

    def wait_for(self, study_uid: str, modalities: dict[str, int], timeout: float) -> list[dict]:
        """Wait until the study holds at least these counts per modality; return its instances."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.instances(study_uid)
            counts = {m: sum(i["Modality"] == m for i in found) for m in modalities}
            if all(counts[m] >= n for m, n in modalities.items()):
                return found
            if time.monotonic() > deadline:
                pytest.fail(f"after {timeout} s the study holds {counts}, expected {modalities}")
            time.sleep(0.3)

    def file(self, instance_id: str) -> bytes:
        return self.client.get(f"/instances/{instance_id}/file").content

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.client.close()
        self.log.close()


class Node:
    """`pneumolab listen` as a child process (so that a test can kill -9 it); `dest` (``AE@HOST:PORT``) is where it
    sends results (default: the Orthanc)."""

    def __init__(self, spool: Path, port: int, orthanc: Orthanc, *extra: str, dest: str | None = None) -> None:
        self.spool, self.port, self.orthanc, self.extra = spool, port, orthanc, extra
        self.dest = dest or f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}"
        self.start()

    def start(self) -> None:
        self.log = open(self.spool.parent / f"{self.spool.name}.log", "ab")  # noqa: SIM115 (closed in stop)
        command = [
            sys.executable, "-m", "pneumolab.cli", "listen", "--spool", str(self.spool), "--port", str(self.port),
            "--dest", self.dest, "--quiet-seconds", "1", "--retries", "1", *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 120
        while not echo(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"pneumolab listen did not start: {(self.spool.parent / f'{self.spool.name}.log')}")
            time.sleep(0.3)

    def journal(self) -> list[dict]:
        file = self.spool / "journal.jsonl"
        if not file.is_file():
            return []
        out = []
        for line in file.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def outcomes(self) -> dict[str, dict]:
        """Every processed instance's outcome in the journal, by SOP Instance UID."""
        out = {}
        for event in self.journal():
            if event["event"] == "processed":
                out.update(event["instances"])
        return out

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def stop(self, timeout: float = 10) -> bool:
        """SIGINT, as Ctrl-C would; True when the node ended by itself within `timeout` s (False: it was killed)."""
        ended = True
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)
            try:  # a busy worker is not waited for (its batch is redone on the next start)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                ended = False
                self.kill()
        self.log.close()
        return ended


def echo(port: int, ae_title: str = "PNEUMOLAB", calling: str = "ORTHANC") -> bool:
    """True when a C-ECHO to the node succeeds."""
    from pynetdicom import AE

    ae = AE(calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()
