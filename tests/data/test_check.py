from __future__ import annotations

import io
import shutil
import struct
import zlib

import numpy as np
from PIL import Image

from pneumolab.data.check import check_dataset, near_duplicate_pairs


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the guard must refuse it before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_near_duplicate_pairs_by_hamming_distance():
    hashes = ["0" * 64, "0" * 63 + "1", "f" * 64, "0" * 62 + "ff"]
    assert near_duplicate_pairs(hashes, max_bits=1) == [(0, 1)]
    assert near_duplicate_pairs(hashes, max_bits=8) == [(0, 1), (0, 3), (1, 3)]


def test_check_finds_duplicates_leakage_and_bad_files(make_dataset):
    root = make_dataset(per_class=6, size=(96, 96))
    normal = root / "train" / "NORMAL"
    # an exact duplicate crossing train -> test, under another patient's name
    shutil.copy(normal / "IM-0000-0001.jpeg", root / "test" / "NORMAL" / "IM-0900-0001.jpeg")
    # a near duplicate: the same picture a little brighter, re-encoded
    pixels = np.asarray(Image.open(normal / "IM-0001-0001.jpeg"), dtype=np.int16)
    Image.fromarray(np.clip(pixels + 6, 0, 255).astype(np.uint8)).save(normal / "IM-0950-0001.jpeg", quality=80)
    # broken files
    bad = root / "train" / "PNEUMONIA"
    (bad / "empty.jpeg").write_bytes(b"")
    good = io.BytesIO()
    Image.fromarray(np.full((200, 200), 90, np.uint8)).save(good, "JPEG")
    (bad / "truncated.jpeg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (bad / "text.jpeg").write_text("this is not a picture")
    (bad / "huge.png").write_bytes(_huge_png_header(30000, 30000))

    report = check_dataset(root, workers=2, progress=False)

    assert report["counts"]["train"] == {"NORMAL": 7, "PNEUMONIA": 6, "total": 13}
    assert report["counts"]["test"] == {"NORMAL": 7, "PNEUMONIA": 6, "total": 13}
    reasons = {item["path"].rsplit("/", 1)[1]: item["reason"] for item in report["unreadable"]}
    assert set(reasons) == {"empty.jpeg", "truncated.jpeg", "text.jpeg", "huge.png"}
    assert "empty" in reasons["empty.jpeg"]
    assert "truncated" in reasons["truncated.jpeg"]
    assert "pixels" in reasons["huge.png"]
    exact = report["exact_duplicates"]
    assert exact["n_groups"] == 1 and exact["cross_split_groups"] == 1 and exact["cross_patient_groups"] == 1
    assert exact["groups"][0]["splits"] == ["test", "train"]
    near = report["near_duplicates"]["groups"]
    assert any(set(g["paths"]) >= {"train/NORMAL/IM-0001-0001.jpeg", "train/NORMAL/IM-0950-0001.jpeg"} for g in near)
    # file names 'empty', 'text' ... match no pattern, but unreadable files are not counted as patients
    assert report["patient_ids_one_per_file"] == 0
    crossing = report["patients_across_splits"]["train&test"]
    assert crossing["n"] == 6  # the generated names reuse patient ids across splits, like the Kermany release
