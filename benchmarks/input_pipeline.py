"""Training input pipeline: torchvision ImageFolder + the plan's PIL transforms vs the decode-once cache + batched
augmentation, on full-resolution JPEGs, measured side by side in one run.

Full-resolution inputs are made here: N shared train images upscaled to 2000 x 1700 grayscale JPEGs (the size of the
original release) in a temporary folder. Both pipelines produce normalised float batches of 32 x C x 224 x 224 with
the research plan's augmentation; no model runs. The cache side is reported for one epoch (its one-time decode
included) and per later epoch (decode amortised away).

    python benchmarks/input_pipeline.py --data ../shared/data/chest_xray --images 512 --workers 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from pneumolab.data.augment import BatchAugment, get_preset
from pneumolab.data.cache import prepare_cache

PLAN_TRANSFORM = transforms.Compose(
    [
        transforms.Resize((256, 256)),
        transforms.CenterCrop(224),
        transforms.RandomResizedCrop(224, scale=(0.8, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomVerticalFlip(p=0.2),
        transforms.RandomRotation(20),
        transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.1),
        transforms.RandomAffine(degrees=0, translate=(0.1, 0.1)),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ]
)


def make_full_resolution(source: Path, target: Path, n: int, size: tuple[int, int]) -> None:
    """Upscale n train images (both classes) to `size` grayscale JPEGs in the Kaggle layout."""
    for label in ("NORMAL", "PNEUMONIA"):
        files = sorted((source / "train" / label).iterdir())[: n // 2]
        folder = target / "train" / label
        folder.mkdir(parents=True)
        for file in files:
            Image.open(file).convert("L").resize(size, Image.Resampling.BICUBIC).save(folder / file.name, quality=90)


def time_imagefolder(root: Path, batch_size: int, workers: int) -> float:
    dataset = datasets.ImageFolder(root / "train", transform=PLAN_TRANSFORM)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    started = time.perf_counter()
    seen = sum(len(images) for images, _ in loader)
    return seen / (time.perf_counter() - started)


def time_cache(root: Path, cache_root: Path, batch_size: int) -> tuple[float, float, float]:
    started = time.perf_counter()
    cache, _ = prepare_cache(root, size=256, cache_root=cache_root, progress=False)
    decode_seconds = time.perf_counter() - started
    augment = BatchAugment(get_preset("plan"), image_size=224, normalize=(0.449, 0.226), seed=0)
    order = np.random.default_rng(0).permutation(len(cache.manifest))
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        rows = np.sort(order[start : start + batch_size])
        augment(torch.from_numpy(np.ascontiguousarray(cache.images[rows])).unsqueeze(1))
    epoch_seconds = time.perf_counter() - started
    n = len(order)
    return n / (decode_seconds + epoch_seconds), n / epoch_seconds, decode_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the shared dataset (its train/ images are upscaled)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "full"
        make_full_resolution(Path(args.data), root, args.images, (2000, 1700))
        baseline = time_imagefolder(root, args.batch_size, args.workers)
        first_epoch, later_epoch, decode = time_cache(root, Path(tmp) / "cache", args.batch_size)
    print(f"{args.images} JPEGs of 2000 x 1700, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"ImageFolder + plan PIL transforms, {args.workers} workers: {baseline:8.1f} img/s   1.00x")
    print(f"cache + batched plan augmentation, 1st epoch (decode {decode:.1f} s included): "
          f"{first_epoch:8.1f} img/s   {first_epoch / baseline:.2f}x")  # fmt: skip
    print(f"cache + batched plan augmentation, later epochs: {later_epoch:8.1f} img/s   {later_epoch / baseline:.2f}x")


if __name__ == "__main__":
    main()
