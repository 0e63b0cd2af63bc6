"""Single-image latency of the predict path on a full-resolution input: read + preprocess + model (+ TTA views).

With a model whose card has an input gate, a third setup runs the gated path that `predict` and the service use
(`load_xray_with_meta` + `assess`: metadata check, the gate's features from the plain view's pass, the referral
band) beside the same TTA views without it, and prints their ratio.

The input is a real test image upscaled to 2000 x 2000 and saved as a grayscale JPEG in a temporary folder (the
original release has films of that size; the shared copy is 224 px). Reports p50 / p95 over repeated calls.
Both backends by default, interleaved call by call so that they share the machine's state: PyTorch (bf16 autocast
where the CPU has it) and ONNX Runtime (fp32; a run or artefact is exported first; an .onnx file needs
``--backend onnx`` alone).

    python benchmarks/latency.py --model default \
        --image ../shared/data/chest_xray/test/NORMAL/IM-0001-0001.jpeg --repeats 30 [--backend pytorch onnx]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pneumolab.data.io import load_xray, load_xray_with_meta
from pneumolab.inference.loader import BACKENDS, load_backend

GATED = "gated"  # the same views through the input gate and referral band


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True, help="an X-ray to upscale")
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--backend", choices=BACKENDS, nargs="+", default=list(BACKENDS))
    args = parser.parse_args()

    backends = {name: load_backend(args.model, name, device=torch.device("cpu")) for name in args.backend}
    first = next(iter(backends.values()))
    setups = {"plain": ("identity",), f"TTA x{len(first.tta)}": first.tta} if first.tta else {"plain": ("identity",)}
    if first.gate is not None:
        setups[GATED] = first.tta or ("identity",)
    times: dict[tuple[str, str], list[float]] = {(b, s): [] for b in backends for s in setups}
    read_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.jpeg"
        Image.open(args.image).convert("L").resize((args.size, args.size), Image.Resampling.BICUBIC).save(
            big, quality=95
        )
        for index in range(args.repeats + 1):
            for backend, trained in backends.items():
                for name, views in setups.items():
                    started = time.perf_counter()
                    if name == GATED:
                        image, meta = load_xray_with_meta(big, size=trained.cache_size)
                        trained.assess(image[None], [meta])
                    else:
                        image = load_xray(big, size=trained.cache_size)
                        read = time.perf_counter()
                        trained.probabilities(trained.logits(image[None], views=views))
                    if index:  # the first call warms up
                        times[backend, name].append(time.perf_counter() - started)
                        if name != GATED:
                            read_times.append(read - started)
    threads = torch.get_num_threads()  # onnxruntime's intra-op threads too
    print(f"{first.name}, {args.size} x {args.size} JPEG, {threads} threads, {args.repeats} calls per setup")
    print(f"read + preprocess alone: p50 {1000 * statistics.median(read_times):.1f} ms")
    for (backend, name), values in times.items():
        p95 = float(np.percentile(values, 95))
        print(f"{backend:8s} {name:10s} p50 {1000 * statistics.median(values):7.1f} ms   p95 {1000 * p95:7.1f} ms")
    if GATED in setups:
        ungated = list(setups)[-2]
        for backend in backends:
            ratio = statistics.median(times[backend, GATED]) / statistics.median(times[backend, ungated])
            print(f"{backend}: {GATED} / {ungated} p50 = {ratio:.3f}x")
    if len(backends) == 2:
        for name in setups:
            ratio = statistics.median(times["pytorch", name]) / statistics.median(times["onnx", name])
            print(f"{name}: pytorch / onnx p50 = {ratio:.2f}x")


if __name__ == "__main__":
    main()
