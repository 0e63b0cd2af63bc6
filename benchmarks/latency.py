"""Single-image latency of the predict path on a full-resolution input: read + preprocess + model (+ TTA views).

The input is a real test image upscaled to 2000 x 2000 and saved as a grayscale JPEG in a temporary folder (the
original release has films of that size; the shared copy is 224 px). Reports p50 / p95 over repeated calls.
``--backend onnx`` runs the network in onnxruntime (a run or artefact is exported first; an .onnx file also works).

    python benchmarks/latency.py --model runs/default/lite0-plan \
        --image ../shared/data/chest_xray/test/NORMAL/IM-0001-0001.jpeg --repeats 30 [--backend onnx]
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

from pneumolab.data.io import load_xray
from pneumolab.onnx_backend import BACKENDS, load_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True, help="an X-ray to upscale")
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--backend", choices=BACKENDS, default="pytorch")
    args = parser.parse_args()

    trained = load_backend(args.model, args.backend, device=torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.jpeg"
        Image.open(args.image).convert("L").resize((args.size, args.size), Image.Resampling.BICUBIC).save(
            big, quality=95
        )
        setups = (
            {"plain": ("identity",), f"TTA x{len(trained.tta)}": trained.tta}
            if trained.tta
            else {"plain": ("identity",)}
        )
        times: dict[str, list[float]] = {name: [] for name in setups}
        read_times: list[float] = []
        for index in range(args.repeats + 1):
            for name, views in setups.items():
                started = time.perf_counter()
                image = load_xray(big, size=trained.cache_size)
                read = time.perf_counter()
                trained.probabilities(trained.logits(image[None], views=views))
                if index:  # the first call warms up
                    times[name].append(time.perf_counter() - started)
                    read_times.append(read - started)
    threads = torch.get_num_threads()  # onnxruntime's intra-op threads too
    print(f"{trained.name} ({args.backend}), {args.size} x {args.size} JPEG, {threads} threads, {args.repeats} calls")
    print(f"read + preprocess alone: p50 {1000 * statistics.median(read_times):.1f} ms")
    for name, values in times.items():
        p95 = float(np.percentile(values, 95))
        print(f"{name:10s} p50 {1000 * statistics.median(values):7.1f} ms   p95 {1000 * p95:7.1f} ms")


if __name__ == "__main__":
    main()
