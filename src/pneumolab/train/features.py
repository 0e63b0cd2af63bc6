"""The fast path, ``strategy: features``: a frozen backbone's pooled features, computed once, then the head alone.

The backbone runs once over `feature_views` augmented views of every training image and once over the validation
images (bf16 on CPUs that have it), and the pooled features are cached on disk, keyed by everything they depend
on, so a second run with other head settings skips the backbone. The head then trains in seconds on those vectors
(fed as 1 x 1 feature maps, so the very same head module ends up in the saved model), in the epoch skeleton and
with the callbacks of `BaseTrainer.fit`. The result is a normal run folder whose ``best.pt`` holds the whole model:
backbone unchanged, head trained.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumolab.config import TrainConfig
from pneumolab.data.augment import BatchAugment
from pneumolab.data.cache import default_cache_root
from pneumolab.errors import SettingError
from pneumolab.fsutil import atomic_path
from pneumolab.progress import progress_bar
from pneumolab.runs import RunDir
from pneumolab.train.callbacks import Callback
from pneumolab.train.data import batches
from pneumolab.train.loop import BaseTrainer, validation_metrics

__all__ = ["FeatureTrainer"]


class FeatureTrainer(BaseTrainer):
    """Trains only the head on cached features of a frozen backbone."""

    def __init__(
        self,
        config: TrainConfig,
        run: str | os.PathLike[str] | RunDir,
        *,
        resume: bool = False,
        progress: bool = True,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SettingError("strategy 'features' runs in one process; use strategy 'finetune' under torchrun")
        if config.model.head == "attention":
            raise SettingError("the attention head needs feature maps; use head linear or plan with strategy features")
        super().__init__(config, run, progress=progress, callbacks=callbacks)
        for param in self.model.backbone.parameters():
            param.requires_grad = False
        # resume: the head trains in seconds from cached features, so a resumed run simply trains it again

    @property
    def max_epochs(self) -> int:
        return self.config.head_epochs

    # --- features -------------------------------------------------------------------------------------------
    def _features_path(self) -> Path:
        config = self.config
        identity = "|".join(
            str(part)
            for part in (
                self.data.cache.path.name,
                config.model.name,
                self.model.weights_source,
                config.image_size,
                config.augment.preset,
                config.feature_views,
                config.seed,
                self.precision.name,
            )
        )
        key = hashlib.sha256(identity.encode()).hexdigest()[:20]
        root = Path(config.data.cache_dir) if config.data.cache_dir else default_cache_root()
        return root / "features" / f"{key}.pt"

    @torch.no_grad()
    def _pooled(self, rows: np.ndarray, augment: BatchAugment | None, advance) -> torch.Tensor:
        self.model.backbone.eval()
        out = []
        for chunk in batches(rows, self.config.batch_size * 2):
            images = self.data.images(chunk).to(self.device)
            x = self.preprocessing.transform(images) if augment is None else augment(images)
            if self.config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.precision.autocast():
                maps = self.model.forward_features(x)
            out.append(maps.float().mean((2, 3)).cpu())
            advance(len(chunk))
        return torch.cat(out)

    def _compute_features(self) -> dict[str, torch.Tensor]:
        path = self._features_path()
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        views = self.config.feature_views
        total = views * len(self.data.train) + len(self.data.val)
        augment = BatchAugment(
            self.preset,
            image_size=self.config.image_size,
            normalize=self.preprocessing.normalize,
            seed=self.config.seed,
        )
        with progress_bar(total, "features", enabled=self.progress) as advance:
            train = torch.stack([self._pooled(self.data.train, augment, advance) for _ in range(views)])
            val = self._pooled(self.data.val, None, advance)
        features = {"train": train.half(), "val": val}
        with atomic_path(path) as tmp:
            torch.save(features, tmp)
        return features

    # --- head training, one `BaseTrainer.fit` epoch at a time ----------------------------------------------------
    def _prepare_fit(self) -> None:
        config = self.config
        features = self._compute_features()
        views, n, dim = features["train"].shape
        self.train_x = features["train"].float().reshape(views * n, dim, 1, 1).to(self.device)
        self.train_y = torch.from_numpy(np.tile(self.data.labels[self.data.train], views)).to(self.device)
        self.val_x = features["val"].float().reshape(-1, dim, 1, 1).to(self.device)
        self.val_labels = self.data.labels[self.data.val]
        head = self.model.head
        self.optimizer = torch.optim.AdamW(
            head.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
        )
        steps = config.head_epochs * -(-len(self.train_x) // config.batch_size)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=steps)
        self.generator = torch.Generator().manual_seed(config.seed)

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        config = self.config
        head, train_x, train_y = self.model.head, self.train_x, self.train_y
        started = time.perf_counter()
        head.train()
        order = torch.randperm(len(train_x), generator=self.generator).to(self.device)
        total_loss, correct = 0.0, 0
        for chunk in order.split(config.batch_size):
            logits = head(train_x[chunk])
            loss = self.criterion(logits, train_y[chunk])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(head.parameters(), config.optim.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            total_loss += float(loss.detach()) * len(chunk)
            correct += int((logits.argmax(1) == train_y[chunk]).sum())
        head.eval()
        with torch.no_grad():
            val_logits = head(self.val_x).float().cpu()
        seconds = time.perf_counter() - started
        return {
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": total_loss / len(train_x),
            "train_accuracy": correct / len(train_x),
            "train_images_per_s": len(train_x) / seconds,
            "train_seconds": seconds,
            **validation_metrics(val_logits, self.val_labels),
            "trainable_params": sum(p.numel() for p in head.parameters()),
        }
