"""Hostile DICOM: a compressed frame that declares another size than its header, and header values in messages."""

from __future__ import annotations

import struct
import subprocess
import sys
import time

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from pneumolab.data.io import _redacted, load_xray_with_meta, read_xray
from pneumolab.errors import ImageReadError
from tests.data.test_io import dicom_bytes, dicom_dataset, pixels12

pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg decodes JPEG 2000")


def _declaring(side: int, syntax: pydicom.uid.UID = JPEG2000Lossless) -> bytes:
    """A 64 x 48 DX compressed with `syntax`, its codestream patched to declare `side` x `side` pixels."""
    ds = dicom_dataset(pixels12(64, 48))
    ds.compress(syntax)
    data = bytearray(dicom_bytes(ds))
    if syntax == JPEG2000Lossless:
        at = data.index(b"\xff\x4f\xff\x51") + 8  # Xsiz, Ysiz after SOC, SIZ, Lsiz, Rsiz
        data[at : at + 8] = struct.pack(">II", side, side)
    else:
        at = data.index(b"\xff\xf7") + 5  # JPEG-LS SOF55: height, width after marker, length, precision
        data[at : at + 4] = struct.pack(">HH", side, side)
    return bytes(data)


def test_a_codestream_larger_than_its_header_is_refused_before_decoding() -> None:
    data = _declaring(50_000)
    assert len(data) < 10_000
    started = time.process_time()
    with pytest.raises(ImageReadError, match=r"50000 x 50000 = 2,500,000,000 pixels, over the limit"):
        read_xray(data, name="bomb.dcm")
    assert time.process_time() - started < 1.0


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless], ids=["j2k", "jpegls"])
def test_a_codestream_that_disagrees_with_its_header_is_corrupt(syntax: pydicom.uid.UID) -> None:
    with pytest.raises(ImageReadError, match=r"declares 300 x 300 pixels but the header 48 x 64"):
        read_xray(_declaring(300, syntax), name="odd.dcm")


def test_the_refusal_allocates_nothing_like_the_declared_image(tmp_path) -> None:
    """In a fresh process (so the peak is this read's): the 20000 x 20000 bomb used to cost 1.5 GB."""
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(_declaring(20_000))
    code = (
        "import resource, sys\n"
        "from pneumolab.data.io import read_xray\n"
        "from pneumolab.errors import ImageReadError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    read_xray(sys.argv[1])\nexcept ImageReadError as e:\n    print(e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, check=True)
    message, grown_kib = out.stdout.strip().splitlines()
    assert "declares 20000 x 20000" in message or "over the limit" in message
    assert int(grown_kib) < 100_000  # < 100 MB more than the imports


def test_a_valid_compressed_film_still_decodes() -> None:
    ds = dicom_dataset(pixels12(64, 48))
    ds.compress(JPEG2000Lossless)
    assert read_xray(dicom_bytes(ds), name="ok.dcm").shape == (64, 48)


def test_header_values_quoted_by_pydicom_are_redacted() -> None:
    """pydicom quotes an invalid value in its validation messages (a name or an id typed into the wrong field);
    the texts that become notes (`predict`'s line, the service's X-Notes header) or errors never repeat it."""
    with pytest.warns(UserWarning) as caught:  # pydicom's own message, as it warns when it validates a value
        pydicom.valuerep.validate_value("CS", "doe john 1234567890", pydicom.config.WARN)
    message = next(str(w.message) for w in caught if "doe john" in str(w.message))
    assert "Invalid value for VR CS: <value>." in _redacted(message)
    assert "1234567890" not in _redacted(message)


def test_tags_are_read_where_pydicom_warnings_become_notes(recwarn: pytest.WarningsRecorder) -> None:
    """The gate's tags are read inside the recording block: nothing pydicom says about them escapes to the log."""
    with pytest.warns(UserWarning):
        data = dicom_bytes(dicom_dataset(pixels12(), PatientName="A" * 70, BodyPartExamined="CHEST"))
    recwarn.clear()
    _, meta = load_xray_with_meta(data, name="phi.dcm", size=32)
    assert meta.body_part == "CHEST"
    assert not [w for w in recwarn if "pydicom" in w.filename]
