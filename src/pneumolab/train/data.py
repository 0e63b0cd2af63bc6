"""The data a run trains on: the decode-once cache plus the run's patient-grouped split.

Batches are drawn straight from the uint8 memmap (no DataLoader, no JPEG decoding) and augmented on the
training device as whole batches (`pneumolab.data.augment`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DistributedSampler, WeightedRandomSampler

from pneumolab.config import TrainConfig
from pneumolab.data.cache import DatasetCache, prepare_cache
from pneumolab.data.splits import carve_validation, read_split, write_split
from pneumolab.data.tasks import get_task
from pneumolab.errors import DatasetLayoutError, SettingError
from pneumolab.runs import RunDir
from pneumolab.train.losses import weighted_sampler_weights

__all__ = ["RunData", "batches", "epoch_order", "load_run_data"]


@dataclass(frozen=True)
class RunData:
    """The cache, the task's label of every cached row and its classes, and per split the row indices."""

    cache: DatasetCache
    labels: np.ndarray
    classes: tuple[str, ...]
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def images(self, indices: np.ndarray) -> torch.Tensor:
        """uint8 N x 1 x S x S batch of the given rows (read from the memmap)."""
        return torch.from_numpy(np.ascontiguousarray(self.cache.images[indices])).unsqueeze(1)


def load_run_data(config: TrainConfig, run: RunDir, *, write: bool = True, progress: bool = True) -> RunData:
    """Prepare (or find) the cache, and carve the split or reuse the run's ``split.csv`` (on resume).

    Args:
        write: write ``split.csv`` when the run has none (False on non-zero DDP ranks).
    """
    if config.data.root is None:
        raise SettingError("no dataset given: pass --data DIR (or set data.root in the config)")
    task = get_task(config.data.task)
    cache, _ = prepare_cache(
        config.data.root,
        size=config.data.cache_size,
        cache_root=config.data.cache_dir,
        progress=progress,
        classes=task.folder_classes,
    )
    manifest, classes = task.relabel(cache.manifest)
    if run.split.is_file():
        table = read_split(run.split)
        by_path = dict(zip(table["path"], table["split"], strict=True))
        missing = [p for p in manifest["path"] if p not in by_path]
        if missing:
            raise DatasetLayoutError(
                f"{run.split}: the dataset has images the run's split does not know ({missing[0]})"
            )
        splits = manifest["path"].map(by_path)
    else:
        splits = carve_validation(manifest, **config.data.carve_settings())
        if write:
            write_split(manifest, splits, run.split)
    split_array = splits.to_numpy()
    parts = {name: np.flatnonzero(split_array == name) for name in ("train", "val", "test")}
    if not len(parts["train"]) or not len(parts["val"]):
        raise DatasetLayoutError(f"{config.data.root}: the split has no training or no validation images")
    return RunData(cache, manifest["label"].to_numpy(), classes, parts["train"], parts["val"], parts["test"])


def epoch_order(data: RunData, config: TrainConfig, epoch: int, *, rank: int = 0, world: int = 1) -> np.ndarray:
    """This rank's training rows for `epoch`: a function of (seed, epoch) only, so a resumed run sees the same.

    Uniform sampling shuffles through `DistributedSampler` (one shard per rank); the weighted option draws
    with replacement so both classes appear equally often, then shards by stride.
    """
    if config.loss.sampler == "weighted":
        weights = weighted_sampler_weights(data.labels[data.train])
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        drawn = list(WeightedRandomSampler(weights, len(weights), replacement=True, generator=generator))
        return data.train[np.asarray(drawn)[rank::world]]
    sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    sampler.set_epoch(epoch)
    return data.train[np.fromiter(sampler, dtype=np.int64)]


def batches(rows: np.ndarray, batch_size: int, *, drop_single: bool = False) -> Iterator[np.ndarray]:
    """Consecutive chunks of `rows`; `drop_single` drops a last batch of one (BatchNorm cannot train on it)."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        if drop_single and len(chunk) == 1 and start:
            return
        yield chunk
