"""Hostile DICOM: what reading a small file whose compressed frame declares a huge image costs (peak RSS, CPU).

Each read runs in a fresh process, so the peak is that read's. The files are made here (a 64 x 48 film compressed as
JPEG 2000 or JPEG-LS, its codestream patched to declare SIDE x SIDE pixels); nothing is read from outside.

    python benchmarks/dicom_bomb.py --sides 20000 50000
"""

from __future__ import annotations

import argparse
import io
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, SecondaryCaptureImageStorage, generate_uid

_READ = """
import resource, sys, time
from pneumolab.data.io import read_xray
from pneumolab.errors import ImageReadError
base = resource.getrusage(resource.RUSAGE_SELF)
t = time.process_time()
try:
    read_xray(sys.argv[1]); outcome = "decoded"
except ImageReadError as e:
    outcome = "refused: " + str(e).split(": ", 1)[-1][:70]
used = resource.getrusage(resource.RUSAGE_SELF)
print(f"{(used.ru_maxrss - base.ru_maxrss) / 1024:.0f}\\t{time.process_time() - t:.3f}\\t{outcome}")
"""


def bomb(side: int, syntax) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 64, 48, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 4096, (64, 48), dtype=np.uint16).tobytes()
    ds.compress(syntax)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = bytearray(buffer.getvalue())
    if syntax == JPEG2000Lossless:
        at = data.index(b"\xff\x4f\xff\x51") + 8
        data[at : at + 8] = struct.pack(">II", side, side)
    else:
        at = data.index(b"\xff\xf7") + 5
        data[at : at + 4] = struct.pack(">HH", min(side, 65535), min(side, 65535))
    return bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[20000, 50000])
    args = parser.parse_args()
    print("syntax\tdeclared\tbytes\tpeak RSS above imports (MB)\tCPU (s)\toutcome")
    with tempfile.TemporaryDirectory() as tmp:
        for name, syntax in (("JPEG 2000", JPEG2000Lossless), ("JPEG-LS", JPEGLSLossless)):
            for side in args.sides:
                path = Path(tmp) / f"bomb-{side}.dcm"
                path.write_bytes(bomb(side, syntax))
                out = subprocess.run([sys.executable, "-c", _READ, str(path)], capture_output=True, text=True)
                print(f"{name}\t{side} x {side}\t{path.stat().st_size}\t{out.stdout.strip() or out.stderr[-200:]}")


if __name__ == "__main__":
    main()
