"""Hostile uploads against the real service: N at a time, in parallel with normal predictions, against
`pneumolab serve` (uvicorn in its own process, as users run it).

The corpus: random bytes, a truncated JPEG, a PNG whose header declares 60000 x 60000 pixels, an empty file, a text
file, a 25-megapixel black PNG (valid, slow to decode), an over-limit chunked upload, and a 5 KB DICOM whose header
says 512 x 512 while its JPEG 2000 data declares `--dicom-side` squared pixels. Reports the server's peak resident
memory (VmHWM in /proc/PID/status) before and after, its CPU time per hostile request (utime + stime in
/proc/PID/stat over the hostile phase, normal requests included), the answers by status, and the normal
predictions' outcome. As a safety net for a shared machine, the server is killed if its RSS passes `--kill-above-gb`.

    python benchmarks/hostile_uploads.py [--model default] --in-flight 8 --rounds 3 [--dicom-side 50000] \
        [--film ../shared/data/chest_xray/test/NORMAL/IM-0001-0001.jpeg]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import free_port, wait_until_up


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _huge_png_header(side: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def hostile_dicom(side: int) -> bytes:
    """A JPEG 2000 DICOM whose header says 512 x 512 and whose codestream (SIZ segment) declares side x side."""
    import struct

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "OT", 512, 512
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((512, 512), np.uint16).tobytes()
    ds.compress(JPEG2000Lossless)
    data = bytearray(ds.PixelData)
    siz = data.find(b"\xff\x4f\xff\x51")
    data[siz + 8 : siz + 24] = struct.pack(">4I", side, side, 0, 0)  # Xsiz, Ysiz, XOsiz, YOsiz
    ds.PixelData = bytes(data)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def chunked_upload(port: int, total: int) -> int:
    """An upload of `total` bytes with chunked transfer encoding (no Content-Length); the status answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    boundary = "hostileboundary"
    sock.sendall(
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
    )
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'.encode()
    block = b"\0" * 65536
    sock.settimeout(2)
    try:
        sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
        for _ in range(total // len(block)):
            sock.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n")
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading at its limit
    sock.settimeout(30)
    answer = b""
    try:
        while b"\r\n" not in answer and (part := sock.recv(4096)):
            answer += part
    except (TimeoutError, ConnectionResetError):
        pass
    sock.close()
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def _status_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


def _cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="run folder or artefact (default: the bundled model)")
    parser.add_argument("--in-flight", type=int, default=8, help="hostile uploads in flight at once")
    parser.add_argument("--rounds", type=int, default=3, help="times the corpus is sent")
    parser.add_argument("--dicom-side", type=int, default=50000, help="side the hostile DICOM's codestream declares")
    parser.add_argument("--kill-above-gb", type=float, default=6.0, help="kill the server past this RSS")
    parser.add_argument(
        "--film", type=Path, help="a real X-ray for the normal traffic (default: noise, which the gate refuses)"
    )
    args = parser.parse_args()

    noise = Image.fromarray((np.random.default_rng(0).random((512, 512)) * 255).astype(np.uint8))
    film = args.film.read_bytes() if args.film else _png(noise)
    film_name = args.film.name if args.film else "noise.png"
    corpus = {
        "random bytes": ("r.jpeg", os.urandom(200_000), "image/jpeg"),
        "truncated jpeg": ("t.jpeg", _jpeg_prefix(), "image/jpeg"),
        "60000^2 png header": ("h.png", _huge_png_header(60000), "image/png"),
        "empty": ("e.png", b"", "image/png"),
        "text": ("n.txt", b"not an image\n" * 100, "text/plain"),
        "25 Mpx black png": ("b.png", _png(Image.new("L", (5000, 5000), 0)), "image/png"),
        f"dicom declaring {args.dicom_side}^2": ("d.dcm", hostile_dicom(args.dicom_side), "application/dicom"),
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "pneumolab.cli", "serve", "--port", str(port)]
    command += ["--model", args.model] if args.model else []
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = threading.Event()
    done = threading.Event()

    def watchdog() -> None:
        while not done.is_set() and server.poll() is None:
            if _status_kb(server.pid).get("VmRSS", 0) > args.kill_above_gb * 2**20:
                killed.set()
                server.kill()
            time.sleep(0.05)

    try:
        wait_until_up(url, 600)  # a busy shared machine can take minutes to load torch
        with httpx.Client(base_url=url, timeout=120) as client:
            client.post("/v1/predict", files={"file": (film_name, film, "application/octet-stream")})  # warm-up
            before = _status_kb(server.pid)
            threading.Thread(target=watchdog, daemon=True).start()
            cpu_before = _cpu_seconds(server.pid)
            cases = [name for name in corpus] * args.rounds + ["chunked 64 MiB"] * args.rounds

            def hostile(name: str) -> tuple[str, int | str, float]:
                started = time.perf_counter()
                try:
                    if name.startswith("chunked"):
                        status: int | str = chunked_upload(port, 64 << 20)
                    else:
                        status = client.post("/v1/predict", files={"file": corpus[name]}).status_code
                except httpx.HTTPError as error:
                    status = type(error).__name__
                return name, status, time.perf_counter() - started

            def normal(_: int) -> int | str:
                try:
                    return client.post(
                        "/v1/predict", files={"file": (film_name, film, "application/octet-stream")}
                    ).status_code
                except httpx.HTTPError as error:
                    return type(error).__name__

            started = time.perf_counter()
            with ThreadPoolExecutor(args.in_flight) as hostile_pool, ThreadPoolExecutor(2) as normal_pool:
                normals = normal_pool.map(normal, range(4 * args.rounds))
                answers = list(hostile_pool.map(hostile, cases))
                normal_answers = list(normals)
            wall = time.perf_counter() - started
            if killed.is_set():
                raise SystemExit(f"the server passed {args.kill_above_gb} GB of RSS and was killed")
            cpu = _cpu_seconds(server.pid) - cpu_before
            after = _status_kb(server.pid)
    finally:
        done.set()
        server.terminate()
        server.wait(timeout=30)
    print(f"{len(answers)} hostile uploads, {args.in_flight} in flight, with {len(normal_answers)} normal predictions "
          f"({args.rounds} rounds, model {args.model or 'bundled'}): {wall:.1f} s")  # fmt: skip
    for name in dict.fromkeys(name for name, _, _ in answers):
        statuses = Counter(str(status) for n, status, _ in answers if n == name)
        slowest = max(seconds for n, _, seconds in answers if n == name)
        print(f"  {name}: {dict(statuses)}, slowest {slowest:.2f} s")
    print(f"normal predictions: {dict(Counter(str(s) for s in normal_answers))}")
    print(f"server peak RSS (VmHWM): {before['VmHWM'] / 2**20:.2f} GB after warm-up, {after['VmHWM'] / 2**20:.2f} GB "
          f"after the hostile phase; CPU {cpu:.1f} s, {cpu / len(answers):.2f} s per hostile request "
          "(normal ones included)")  # fmt: skip


def _jpeg_prefix() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((300, 300)) * 255).astype(np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[:400]


if __name__ == "__main__":
    main()
