"""Inference throughput: eager PyTorch fp32 vs bf16 autocast vs ONNX Runtime, side by side in one process.

The same preprocessed batches (cache images -> the model's Preprocessing) go through each backend, interleaved batch
by batch; the report gives medians of per-batch times and the ratio to eager fp32, plus the largest probability
difference from fp32 (each backend must agree with the model it exports).

    python benchmarks/infer_speed.py --model runs/default/lite0-plan --data ../shared/data/chest_xray --batches 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pneumolab.inference.export import export_onnx
from pneumolab.inference.files import collect_image_paths
from pneumolab.inference.pytorch import load_trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained run folder or artefact")
    parser.add_argument("--data", required=True, help="a folder of images (e.g. the test split)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per backend (after one warm-up)")
    args = parser.parse_args()

    import onnxruntime as ort

    trained = load_trained(args.model, device=torch.device("cpu"))
    files, _ = collect_image_paths([args.data])
    needed = args.batch_size * (args.batches + 1)
    images = trained.load_images(files[:: max(1, len(files) // needed)][:needed])
    x_all = trained.preprocessing.transform(torch.as_tensor(images).unsqueeze(1))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(args.model, onnx_path, check_images=images[:8])
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

        model = trained.model.float().eval()

        def eager(x: torch.Tensor, dtype: torch.dtype | None) -> np.ndarray:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                return torch.softmax(model(x).float(), 1)[:, 1].numpy()

        backends = {
            "eager fp32": lambda x: eager(x, None),
            "eager bf16": lambda x: eager(x, torch.bfloat16),
            "onnxruntime fp32": lambda x: torch.softmax(
                torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0]), 1
            )[:, 1].numpy(),
        }
        times: dict[str, list[float]] = {name: [] for name in backends}
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in backends}
        for index, x in enumerate(x_all.split(args.batch_size)):
            for name, run in backends.items():
                started = time.perf_counter()
                probabilities = run(x)
                if index:  # batch 0 warms up every backend
                    times[name].append(time.perf_counter() - started)
                    outputs[name].append(probabilities)
    reference = np.concatenate(outputs["eager fp32"])
    base = statistics.median(times["eager fp32"])
    print(f"{trained.name}, batch {args.batch_size}, {trained.image_size} px, {torch.get_num_threads()} threads, "
          f"{len(times['eager fp32'])} timed batches")  # fmt: skip
    print(f"{'backend':18s} {'img/s':>8s} {'vs fp32':>8s} {'max |dp|':>10s}")
    for name in backends:
        median = statistics.median(times[name])
        difference = float(np.abs(np.concatenate(outputs[name]) - reference).max())
        print(f"{name:18s} {args.batch_size / median:8.1f} {base / median:7.2f}x {difference:10.2e}")


if __name__ == "__main__":
    main()
