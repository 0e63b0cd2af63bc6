"""Training throughput (images/s) per model and precision, measured side by side in one process.

Each step is the real training step of `pneumolab train`: uint8 batch from the decode-once cache -> batched
augmentation on the device -> forward under autocast -> class-weighted loss -> backward -> clip at 1.0 -> AdamW.
Configurations are interleaved round by round, so machine noise hits them alike; the report gives medians of
per-step times and the ratio of each precision to fp32.

    python benchmarks/train_speed.py --data ../shared/data/chest_xray --models tf_efficientnet_lite0 mobilenet_v2 \
        resnet50 --precisions fp32 bf16 --steps 6
    python benchmarks/train_speed.py --synthetic 5216 --device cuda --epoch      # one full epoch per model (GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch import nn

from pneumolab.data.augment import BatchAugment, get_preset
from pneumolab.hardware import resolve_precision
from pneumolab.models import create_model
from pneumolab.train.losses import class_weights, make_loss


def load_images(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x S x S images and labels: the real cache, or random pixels of the same shape (speed only)."""
    if args.synthetic:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.synthetic, args.cache_size, args.cache_size), dtype=np.uint8)
        return images, (rng.random(args.synthetic) < 0.74).astype(np.int64)
    from pneumolab.data.cache import prepare_cache

    cache, _ = prepare_cache(args.data, size=args.cache_size, progress=False)
    train = cache.manifest["split"].to_numpy() == "train"
    return np.asarray(cache.images[train]), cache.manifest["label"].to_numpy()[train]


class Setup:
    """One (model, precision) configuration with its own model, optimiser and augmentation."""

    def __init__(self, name: str, precision: str, args: argparse.Namespace, labels: np.ndarray) -> None:
        self.name, self.device = name, torch.device(args.device)
        self.precision = resolve_precision(precision, self.device)
        torch.manual_seed(0)
        self.model = create_model(name, weights="none", head="linear").to(self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        spec = self.model.spec
        self.augment = BatchAugment(
            get_preset(args.augment), image_size=args.image_size, normalize=(spec.gray_mean, spec.gray_std)
        )
        self.criterion = make_loss(class_weights(labels).to(self.device))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.needs_scaler)
        self.model_step = torch.compile(self.model) if args.compile else self.model
        self.times: list[float] = []

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        started = time.perf_counter()
        x = self.augment(images.to(self.device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        y = labels.to(self.device, non_blocking=True)
        with self.precision.autocast():
            logits = self.model_step(x)
        loss = self.criterion(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="dataset folder (the train split is used)")
    parser.add_argument("--synthetic", type=int, default=0, help="random images instead of --data (speed only)")
    parser.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0", "mobilenet_v2", "resnet50"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--cache-size", type=int, default=256)
    parser.add_argument("--augment", default="plan")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--epoch", action="store_true", help="time one full epoch over all images instead")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not args.data and not args.synthetic:
        parser.error("give --data DIR or --synthetic N")

    images, labels = load_images(args)
    setups = [Setup(m, p, args, labels) for m in args.models for p in args.precisions]
    rng = np.random.default_rng(0)
    n_batches = len(images) // args.batch_size if args.epoch else args.steps
    order = rng.permutation(len(images))
    for round_ in range(n_batches + 1):  # round 0 is the warm-up, not timed
        rows = order[(round_ * args.batch_size) % len(images) :][: args.batch_size]
        if len(rows) < args.batch_size:
            rows = order[: args.batch_size]
        batch = torch.from_numpy(images[np.sort(rows)]).unsqueeze(1)
        target = torch.from_numpy(labels[np.sort(rows)])
        if args.device == "cuda":
            batch, target = batch.pin_memory(), target.pin_memory()
        for setup in setups:
            setup.step(batch, target)
            if round_ == 0:
                setup.times.clear()

    results = []
    fp32 = {}
    for setup in setups:
        median = statistics.median(setup.times)
        row = {
            "model": setup.name,
            "precision": setup.precision.name,
            "images_per_s": round(args.batch_size / median, 1),
            "epoch_seconds": round(sum(setup.times), 2) if args.epoch else None,
            "steps": len(setup.times),
        }
        if setup.precision.name == "fp32":
            fp32[setup.name] = row["images_per_s"]
        results.append(row)
    for row in results:
        base = fp32.get(row["model"])
        row["speedup_vs_fp32"] = round(row["images_per_s"] / base, 2) if base else None
    info = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu x{torch.get_num_threads()}",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "results": results,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"device {info['device']}, batch {args.batch_size}, {args.image_size} px, augment {args.augment}")
    print(f"{'model':24s} {'precision':9s} {'img/s':>8s} {'vs fp32':>8s} {'epoch s':>8s}")
    for row in results:
        ratio = f"{row['speedup_vs_fp32']:.2f}x" if row["speedup_vs_fp32"] else "-"
        epoch = f"{row['epoch_seconds']:.1f}" if row["epoch_seconds"] else "-"
        print(f"{row['model']:24s} {row['precision']:9s} {row['images_per_s']:8.1f} {ratio:>8s} {epoch:>8s}")


if __name__ == "__main__":
    main()
