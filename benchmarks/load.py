"""A bounded load on the real service: `pneumolab serve` (uvicorn on 127.0.0.1) and N requests, C at a time.

The server runs in its own process (as users run it); the client posts real X-ray files from a folder to
/v1/predict with a thread pool of C connections, then reports throughput, p50 / p95 / p99 latency and failures.
Both backends by default, one server after the other in the same run (``pneumolab serve --backend pytorch|onnx``);
with several ``--max-batch`` values, each backend is served once per value (1: micro-batching off); with
``--gate on off``, once with the input gate and once with ``--no-gate``. A film the gate refuses gets HTTP 422 by
design: it is counted as refused, not as a failure; failures are every other answer that is not 200.

With ``--metrics on off``, the same load is sent to a server with ``/metrics`` (counts, latency histograms, the
drift watch) and to one started with ``--no-metrics``, alternately, ``--repeats`` times: the medians of throughput
and of p50 / p99 latency, and their ratios (the cost of the metrics; issue 26's goal: at most 5 %).

With ``--explains K``, each server is measured twice per repeat (``--repeats``), without and then with K
/v1/explain requests always in flight (K client threads, each posting the next film as soon as its answer comes):
the medians over the repeats of predict's p50 and p99, and the timeouts (HTTP 504 or no answer within
``--timeout``), with and without them; explains are served in their own lane, so predict's p99 should stay within 2x.

    python benchmarks/load.py --model default --data ../shared/data/chest_xray/test \
        --requests 500 --concurrency 16 [--backend pytorch onnx] [--max-batch 1 16] [--gate on off]
    python benchmarks/load.py --model default --data ../shared/data/chest_xray/test \
        --requests 100 --concurrency 4 --backend pytorch --explains 2 --repeats 3
    python benchmarks/load.py --model default --data ../shared/data/chest_xray/test \
        --requests 300 --concurrency 8 --backend onnx --metrics on off --repeats 5
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
    parser.add_argument("--metrics", choices=("on", "off"), nargs="+", default=["on"], help="or --no-metrics")
    parser.add_argument("--explains", type=int, default=0, help="K explain requests kept in flight (0: none)")
    parser.add_argument("--repeats", type=int, default=1, help="with --explains: measurements without and with")
    parser.add_argument("--timeout", type=float, default=120, help="client time limit per request (s)")
    args = parser.parse_args()

    files, _ = collect_image_paths([args.data])
    payloads = [(f.name, f.read_bytes()) for f in files]
    if len(args.metrics) == 2:
        _metrics_cost(args, payloads)
        return
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


def _metrics_cost(args: argparse.Namespace, payloads: list[tuple[str, bytes]]) -> None:
    """Servers with and without /metrics, alternately, `args.repeats` times each: medians and their ratios."""
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for _ in range(args.repeats):
        for metrics in ("on", "off"):
            runs[metrics].append(
                _load(args, args.backend[0], args.max_batch[0], payloads, args.gate[0], metrics=metrics, figures=True)
            )
    medians = {m: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for m, rows in runs.items()}
    for metrics, figures in medians.items():
        print(f"metrics {metrics} (medians of {args.repeats}): throughput {figures['rate']:.2f} req/s, "
              f"p50 {figures['p50']:.0f} ms, p99 {figures['p99']:.0f} ms")  # fmt: skip
    on, off = medians["on"], medians["off"]
    print(f"metrics on / off: throughput {on['rate'] / off['rate']:.3f}x, p50 {on['p50'] / off['p50']:.3f}x, "
          f"p99 {on['p99'] / off['p99']:.3f}x")  # fmt: skip


def _load(
    args: argparse.Namespace,
    backend: str,
    max_batch: int,
    payloads: list[tuple[str, bytes]],
    gate: str = "on",
    *,
    metrics: str = "on",
    figures: bool = False,
) -> Any:
    """Serve with `backend`, send the load, print the figures; return requests per second (with `figures`: a dict of
    ``rate``, ``p50`` and ``p99``)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "pneumolab.cli", "serve", "--model", args.model, "--port", str(port)]
    command += ["--backend", backend, "--max-batch", str(max_batch), *(["--no-gate"] if gate == "off" else [])]
    command += ["--no-metrics"] if metrics == "off" else []
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(url, 600)  # a busy shared machine can take minutes to load torch
        limits = httpx.Limits(max_connections=args.concurrency)
        with httpx.Client(base_url=url, timeout=args.timeout, limits=limits) as client:
            _post(client, payloads, 0)  # warm-up, not counted
            if args.explains:
                return _with_and_without_explains(args, url, client, payloads)
            results, wall = _measure(args, client, payloads)
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies = np.array([seconds for seconds, _ in results]) * 1000
    failures = sum(status not in (200, "refused") for _, status in results)
    refused = sum(status == "refused" for _, status in results)
    print(f"{args.requests} requests, {args.concurrency} at a time, model {Path(args.model).name} ({backend}, "
          f"max-batch {max_batch}, gate {gate}, metrics {metrics}): {wall:.1f} s")  # fmt: skip
    p50, p99 = statistics.median(latencies), float(np.percentile(latencies, 99))
    summary = f"throughput {args.requests / wall:.1f} req/s; latency p50 {p50:.0f} ms"
    summary += f", p95 {np.percentile(latencies, 95):.0f} ms, p99 {p99:.0f} ms"
    print(f"{summary}; refused by the gate {refused}; failures {failures}")
    if figures:
        return {"rate": args.requests / wall, "p50": p50, "p99": p99}
    return args.requests / wall


def _post(
    client: httpx.Client, payloads: list[tuple[str, bytes]], index: int, path: str = "/v1/predict"
) -> tuple[float, int | str]:
    """One upload; (seconds, status) with status "refused" for the gate's 422 and "timeout" for no answer in time."""
    name, body = payloads[index % len(payloads)]
    started = time.perf_counter()
    try:
        response = client.post(path, files={"file": (name, body, "image/jpeg")})
    except httpx.TimeoutException:
        return time.perf_counter() - started, "timeout"
    refused = response.status_code == 422 and response.json().get("status") == "refused"
    return time.perf_counter() - started, "refused" if refused else response.status_code


def _measure(
    args: argparse.Namespace, client: httpx.Client, payloads: list[tuple[str, bytes]]
) -> tuple[list[tuple[float, int | str]], float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda i: _post(client, payloads, i), range(args.requests)))
    return results, time.perf_counter() - started


def _with_and_without_explains(
    args: argparse.Namespace, url: str, client: httpx.Client, payloads: list[tuple[str, bytes]]
) -> float:
    """Predict's latency without, then with, `args.explains` explain requests always in flight; medians over
    `args.repeats`. Returns predict's throughput with them."""
    figures: dict[str, list[tuple[float, float, int, float]]] = {"without": [], "with": []}
    explained: list[int | str] = []
    for _ in range(args.repeats):
        for mode in ("without", "with"):
            stop = threading.Event()

            def explain_loop(seed: int, stop: threading.Event) -> None:
                with httpx.Client(base_url=url, timeout=args.timeout) as own:
                    index = seed
                    while not stop.is_set():
                        explained.append(_post(own, payloads, index, "/v1/explain?panel=overlay")[1])
                        index += args.explains

            loops = [
                threading.Thread(target=explain_loop, args=(k, stop))
                for k in range(args.explains if mode == "with" else 0)
            ]
            for loop in loops:
                loop.start()
            time.sleep(1.0 if loops else 0)  # the explains reach the server before predict's load starts
            results, wall = _measure(args, client, payloads)
            stop.set()
            for loop in loops:
                loop.join()
            latencies = np.array([seconds for seconds, _ in results]) * 1000
            timeouts = sum(status in (504, "timeout") for _, status in results)
            p50, p99 = statistics.median(latencies), float(np.percentile(latencies, 99))
            figures[mode].append((p50, p99, timeouts, args.requests / wall))
            print(f"  {mode} {args.explains} explains: predict p50 {p50:.0f} ms, p99 {p99:.0f} ms, timeouts "
                  f"{timeouts}, failures {sum(s not in (200, 'refused') for _, s in results)}")  # fmt: skip
    medians = {
        mode: [statistics.median(values) for values in zip(*rows, strict=True)] for mode, rows in figures.items()
    }
    answered = sum(status == 200 for status in explained)
    print(f"{args.requests} predict requests, {args.concurrency} at a time, {args.repeats} repeats (medians):")
    for mode, (p50, p99, timeouts, rate) in medians.items():
        print(f"predict {mode} {args.explains} explains in flight: p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
              f"timeouts {timeouts:.0f}, throughput {rate:.1f} req/s")  # fmt: skip
    print(f"p99 with / without = {medians['with'][1] / medians['without'][1]:.2f}x; explains answered {answered}, "
          f"other explain answers {sorted({str(s) for s in explained if s != 200})}")  # fmt: skip
    return medians["with"][3]


if __name__ == "__main__":
    main()
