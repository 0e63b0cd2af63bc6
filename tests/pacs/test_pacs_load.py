"""benchmarks/pacs_load.py in its smallest form: three single-film studies through a real Orthanc and the node."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pacs.conftest import shared_jpegs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_throughput_mode_with_three_studies(tmp_path):
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc is absent: apt-get install orthanc orthanc-dicomweb (make pacs-tools)")
    shared_jpegs("NORMAL", 1)  # skips without the shared dataset
    out = tmp_path / "figures.json"
    command = [
        sys.executable, "-m", "benchmarks.pacs_load", "throughput", "--studies", "3", "--films", "2",
        "--film-size", "0", "0", "--quiet-seconds", "1", "--json", str(out),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["studies"] == 3 and figures["complete_in_orthanc"] == 3 and figures["failed"] == 0
    assert figures["ack"]["n"] == 3 and figures["studies_per_minute"] > 0
    assert figures["memory"]["peak_rss_mb"] > 0
