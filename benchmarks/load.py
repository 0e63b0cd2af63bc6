"""A bounded load on the real service: `pneumolab serve` (uvicorn on 127.0.0.1) and N requests, C at a time.

The server runs in its own process (as users run it); the client posts real X-ray files from a folder to
/v1/predict with a thread pool of C connections, then reports throughput, p50 / p95 / p99 latency and failures.
Both backends by default, one server after the other in the same run (``pneumolab serve --backend pytorch|onnx``);
with several ``--max-batch`` values, each backend is served once per value (1: micro-batching off); with
``--gate on off``, once with the input gate and once with ``--no-gate``. A film the gate refuses gets HTTP 422 by
design: it is counted as refused, not as a failure; failures are every other answer that is not 200.

    python benchmarks/load.py --model default --data ../shared/data/chest_xray/test \
        --requests 500 --concurrency 16 [--backend pytorch onnx] [--max-batch 1 16] [--gate on off]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from pneumolab.inference.files import collect_image_paths
from pneumolab.inference.loader import BACKENDS


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit(f"the server at {url} did not come up in {seconds} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="folder of images to send")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--backend", choices=BACKENDS, nargs="+", default=list(BACKENDS))
    parser.add_argument("--max-batch", type=int, nargs="+", default=[16], help="serve's --max-batch values")
    parser.add_argument("--gate", choices=("on", "off"), nargs="+", default=["on"], help="serve with or --no-gate")
    args = parser.parse_args()

    files, _ = collect_image_paths([args.data])
    payloads = [(f.name, f.read_bytes()) for f in files]
    by_gate: dict[str, dict[tuple[str, int], float]] = {}
    for gate in args.gate:
        for backend in args.backend:
            for max_batch in args.max_batch:
                by_gate.setdefault(gate, {})[backend, max_batch] = _load(args, backend, max_batch, payloads, gate)
    if len(by_gate) == 2:
        for key, rate in by_gate["on"].items():
            print(f"throughput {key[0]} max-batch {key[1]}: gate on / off = {rate / by_gate['off'][key]:.2f}x")
    throughput = by_gate[args.gate[-1]]
    first, last = args.max_batch[0], args.max_batch[-1]
    for backend in args.backend if first != last else []:
        ratio = throughput[backend, last] / throughput[backend, first]
        print(f"throughput {backend}: max-batch {last} / max-batch {first} = {ratio:.2f}x")
    if len(args.backend) == 2:
        ratio = throughput["onnx", last] / throughput["pytorch", last]
        print(f"throughput onnx / pytorch (max-batch {last}) = {ratio:.2f}x")


def _load(
    args: argparse.Namespace, backend: str, max_batch: int, payloads: list[tuple[str, bytes]], gate: str = "on"
) -> float:
    """Serve with `backend`, send the load, print the figures; return requests per second."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "pneumolab.cli", "serve", "--model", args.model, "--port", str(port)]
    command += ["--backend", backend, "--max-batch", str(max_batch), *(["--no-gate"] if gate == "off" else [])]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(url)
        limits = httpx.Limits(max_connections=args.concurrency)
        with httpx.Client(base_url=url, timeout=120, limits=limits) as client:

            def post(index: int) -> tuple[float, int | str]:
                name, body = payloads[index % len(payloads)]
                started = time.perf_counter()
                response = client.post("/v1/predict", files={"file": (name, body, "image/jpeg")})
                refused = response.status_code == 422 and response.json().get("status") == "refused"
                return time.perf_counter() - started, "refused" if refused else response.status_code

            post(0)  # warm-up, not counted
            started = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(post, range(args.requests)))
            wall = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies = np.array([seconds for seconds, _ in results]) * 1000
    failures = sum(status not in (200, "refused") for _, status in results)
    refused = sum(status == "refused" for _, status in results)
    print(f"{args.requests} requests, {args.concurrency} at a time, model {Path(args.model).name} ({backend}, "
          f"max-batch {max_batch}, gate {gate}): {wall:.1f} s")  # fmt: skip
    summary = f"throughput {args.requests / wall:.1f} req/s; latency p50 {statistics.median(latencies):.0f} ms"
    summary += f", p95 {np.percentile(latencies, 95):.0f} ms, p99 {np.percentile(latencies, 99):.0f} ms"
    print(f"{summary}; refused by the gate {refused}; failures {failures}")
    return args.requests / wall


if __name__ == "__main__":
    main()
