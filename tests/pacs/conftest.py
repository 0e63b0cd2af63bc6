"""PACS fixtures: the bundled model once per module, and DX films made from the shared JPEGs at run time."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

pytest.importorskip("pynetdicom", reason="the pacs extra is not installed (pip install 'pneumolab[pacs]')")
pytest.importorskip("highdicom", reason="the pacs extra is not installed (pip install 'pneumolab[pacs]')")


def shared_jpegs(kind: str, count: int) -> list[Path]:
    """The first `count` test JPEGs of a class folder of the shared dataset (skips when it is absent)."""
    folder = SHARED_DATA / "test" / kind
    if not folder.is_dir():
        pytest.skip(f"the shared dataset is not at {SHARED_DATA}")
    return sorted(folder.glob("*.jpeg"))[:count]


@pytest.fixture(scope="module")
def model():
    """The bundled model on the PyTorch backend, as `pneumolab predict` loads it by default."""
    from pneumolab.inference.loader import load_backend

    return load_backend(None, "pytorch")


@pytest.fixture
def make_film(tmp_path: Path) -> Callable[..., Path]:
    """``make_film(jpeg, name, **film_to_dicom kwargs)``: a DX file from a shared JPEG, written under tmp_path."""
    from pydicom.uid import generate_uid

    from pneumolab.pacs.convert import film_to_dicom

    def make(jpeg: Path, name: str, **kwargs) -> Path:
        kwargs.setdefault("patient_id", "PAT-SECRET-1")
        kwargs.setdefault("patient_name", "Secretname^Patient")
        kwargs.setdefault("study_uid", generate_uid())
        out = tmp_path / "films" / f"{name}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        film_to_dicom(jpeg, **kwargs).save_as(out, enforce_file_format=True)
        return out

    return make


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for a file (skips when dicom3tools is absent)."""
    import subprocess

    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy is absent: apt-get install dicom3tools (make pacs-tools)")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
