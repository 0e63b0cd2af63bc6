"""The training loop: one explicit loop, its named hooks in `pneumolab.train.callbacks`.

Per epoch: sample this rank's rows (a function of seed and epoch), augment whole batches on the device, forward
under autocast (bf16 on CPUs that have it, bf16 or fp16 + GradScaler on CUDA), clip gradients at 1.0, step the
per-batch warm-up + cosine schedule (`pneumolab.train.schedule`), update the EMA; then validate on the
patient-grouped validation split (never test), pick the best epoch by the validation metric, and run the callbacks
(history, checkpoints, early stopping, loggers). `BaseTrainer.fit` is the epoch skeleton both strategies share.

Resuming restarts the interrupted epoch from ``last.pt``. Every random draw of an epoch (order, augmentation,
dropout) is seeded from (seed, epoch), so on CPU a resumed run ends with the same weights as an uninterrupted one.
Under ``torchrun`` the same code trains with DDP; rank 0 writes the files.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pneumolab.config import TrainConfig, dump_config
from pneumolab.data.augment import BatchAugment, get_preset
from pneumolab.data.preprocess import Preprocessing
from pneumolab.errors import ArtefactError
from pneumolab.hardware import default_device, resolve_precision
from pneumolab.models import apply_freeze, count_parameters, create_model, set_frozen_batchnorm_eval
from pneumolab.progress import progress_bar
from pneumolab.runs import RunDir, load_checkpoint, write_environment
from pneumolab.train.callbacks import (
    Callback,
    CheckpointCallback,
    EarlyStoppingCallback,
    HistoryCallback,
    MLflowCallback,
    PrintCallback,
    TensorBoardCallback,
    in_order,
    run_hook,
)
from pneumolab.train.data import RunData, batches, epoch_order, load_run_data
from pneumolab.train.losses import class_weights, make_loss
from pneumolab.train.schedule import warmup_cosine

__all__ = ["RESUME_FORMAT", "BaseTrainer", "Trainer", "predict_logits", "validation_metrics"]

# last.pt's layout: 2 since the optimiser groups come from timm and the schedule is torch's SequentialLR
RESUME_FORMAT = 2


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    data: RunData,
    rows: np.ndarray,
    *,
    preprocessing: Preprocessing,
    precision,
    device: torch.device,
    batch_size: int = 64,
    channels_last: bool = False,
) -> torch.Tensor:
    """Float32 logits (N x K, on CPU) of the given cache rows through the eval preprocessing."""
    model.eval()
    outputs = []
    for chunk in batches(rows, batch_size):
        x = preprocessing.transform(data.images(chunk).to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            outputs.append(model(x).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, len(data.classes))


class BaseTrainer:
    """What both strategies share: processes, device and precision, data, model, preprocessing, run files."""

    def __init__(
        self,
        config: TrainConfig,
        run: str | os.PathLike[str] | RunDir,
        *,
        progress: bool = True,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.config = config
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.rank, self.world, _ = _distributed()
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.device = default_device()
        self.precision = resolve_precision(config.precision, self.device)

        # rank 0 builds the cache and writes split.csv first; the other ranks then find both
        if self.is_main:
            self.run.create()
            self.data = load_run_data(config, self.run, write=True, progress=self.progress)
        self._barrier()
        if not self.is_main:
            self.data = load_run_data(config, self.run, write=False, progress=False)

        torch.manual_seed(config.seed)  # the initial weights of anything not loaded from a file
        self.model = create_model(
            config.model.name,
            weights=config.model.weights,
            head=config.model.head,
            drop_rate=config.model.drop_rate,
            num_classes=len(self.data.classes),
        ).to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        spec = self.model.spec
        self.preset = get_preset(config.augment.preset)
        # how validation (and, from the checkpoint, every later use of the model) sees a film
        self.preprocessing = Preprocessing(
            image_size=config.image_size,
            crop_fraction=self.preset.crop_fraction,
            normalize=(spec.gray_mean, spec.gray_std),
            cache_size=config.data.cache_size,
        )
        labels = self.data.labels[self.data.train]
        weights = class_weights(
            labels, config.loss.class_weights, num_classes=len(self.data.classes), custom=config.loss.custom_weights
        )
        self.criterion = make_loss(weights.to(self.device), label_smoothing=config.loss.label_smoothing)
        self.class_weights = weights.tolist()
        self.history: list[dict[str, Any]] = []
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.epochs_since_best = 0
        self.start_epoch = 1
        self.should_stop = False  # set by a callback (early stopping) to end `fit` after this epoch
        self.callbacks = in_order([*self._default_callbacks(), *callbacks])

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _default_callbacks(self) -> list[Callback]:
        """History, checkpoints and printing always; early stopping and loggers as the config asks."""
        callbacks: list[Callback] = [HistoryCallback(), CheckpointCallback(), PrintCallback()]
        if self.config.early_stopping:
            callbacks.append(EarlyStoppingCallback(self.config.early_stopping))
        if self.config.tensorboard:
            callbacks.append(TensorBoardCallback())
        if self.config.mlflow:
            callbacks.append(MLflowCallback())
        return callbacks

    @property
    def max_epochs(self) -> int:
        """The epoch `fit` trains up to unless stopped early."""
        return self.config.epochs

    @property
    def eval_model(self) -> nn.Module:
        """The model that is validated and saved as best."""
        return self.model

    def model_checkpoint(self, row: dict[str, Any]) -> dict[str, Any]:
        """The best-model checkpoint of the epoch `row` describes: weights plus what is needed to use them."""
        return {
            "model": self.eval_model.state_dict(),
            "model_name": self.config.model.name,
            "head": self.config.model.head,
            **self.preprocessing.describe(),
            "classes": list(self.data.classes),
            "task": self.config.data.task,
            "weights_source": self.model.weights_source,
            "epoch": int(row["epoch"]),
            "metrics": row,
            "config": self.config.model_dump(mode="json"),
        }

    def resume_checkpoint(self) -> dict[str, Any]:
        """Everything needed to continue after the last finished epoch (subclasses add their state)."""
        return {
            "model": self.model.state_dict(),
            "epoch": int(self.history[-1]["epoch"]),
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "epochs_since_best": self.epochs_since_best,
            "config": self.config.model_dump(mode="json"),
        }

    def _write_start(self) -> None:
        dump_config(self.config, self.run.config)
        write_environment(
            self.run,
            data_fingerprint=self.data.cache.path.name,
            precision=self.precision.name,
            device=str(self.device),
            world_size=self.world,
            strategy=self.config.strategy,
            class_weights=self.class_weights,
            weights_source=self.model.weights_source,
            parameters=dict(zip(("total", "trainable"), count_parameters(self.model), strict=True)),
        )

    def _update_best(self, row: dict[str, Any]) -> None:
        metric = self.config.select_metric
        value = float(row[metric])
        lower_is_better = metric.endswith("loss")
        if not math.isnan(value) and (
            self.best_value is None or (value < self.best_value if lower_is_better else value > self.best_value)
        ):
            self.best_value, self.best_epoch, self.epochs_since_best = value, int(row["epoch"]), 0
        else:
            self.epochs_since_best += 1

    # --- the epoch skeleton both strategies share -----------------------------------------------------------
    def _prepare_fit(self) -> None:
        """Work done once after ``on_fit_start`` and before the first epoch (none by default)."""

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train and validate one epoch; the history row without its ``epoch``."""
        raise NotImplementedError

    def _stop_requested(self) -> bool:
        """Whether a callback asked to stop; under DDP only rank 0 runs callbacks, so its answer goes to all."""
        if self.world > 1:
            flag = [self.should_stop]
            dist.broadcast_object_list(flag, src=0)
            self.should_stop = bool(flag[0])
        return self.should_stop

    def fit(self) -> dict[str, Any]:
        """Train from `start_epoch` to `max_epochs` (or until a callback stops it) and return a summary."""
        started = time.perf_counter()
        if self.is_main:
            self._write_start()
            run_hook(self.callbacks, "on_fit_start", self)
        self._prepare_fit()
        for epoch in range(self.start_epoch, self.max_epochs + 1):
            row = {"epoch": epoch, **self._run_epoch(epoch)}
            self._update_best(row)
            if self.is_main:
                run_hook(self.callbacks, "on_epoch_end", self, row)
            self._barrier()
            if self._stop_requested():
                break
        summary = {
            "run": str(self.run.path),
            "best_epoch": self.best_epoch,
            self.config.select_metric: self.best_value,
            "epochs": len(self.history) if self.is_main else None,
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        if self.world > 1:
            summary["ranks_agree"] = self._ranks_agree()
        if self.is_main:
            run_hook(self.callbacks, "on_fit_end", self)
        return summary

    def _ranks_agree(self) -> bool:
        """True when every rank holds the same weights (DDP keeps them in step; this checks it did)."""
        checksum = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).sum().reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        dist.all_gather(gathered, checksum)
        return all(torch.equal(g, gathered[0]) for g in gathered)


def validation_metrics(logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """The per-epoch validation numbers (binary: threshold 0.5, K classes: argmax; the operating point is chosen
    later). ROC-AUC is one-vs-rest macro for K classes, NaN while a class is missing from validation."""
    probabilities = torch.softmax(logits.float(), 1).numpy()
    k = probabilities.shape[1]
    if k == 2:
        scores, decided = probabilities[:, 1], (probabilities[:, 1] >= 0.5).astype(int)
    else:
        scores, decided = probabilities, probabilities.argmax(1)
    every_class = len(set(labels.tolist())) == k
    onehot = np.eye(k)[labels]
    # Brier score as the evaluation reports it: binary on P(classes[1]), K classes summed over the classes
    brier = np.mean((probabilities[:, 1] - labels) ** 2) if k == 2 else np.mean(((probabilities - onehot) ** 2).sum(1))
    return {
        "val_loss": float(F.cross_entropy(logits.float(), torch.from_numpy(labels))),
        "val_brier": float(brier),
        "val_accuracy": float((decided == labels).mean()),
        "val_roc_auc": float(roc_auc_score(labels, scores, multi_class="ovr")) if every_class else float("nan"),
        "val_balanced_accuracy": float(balanced_accuracy_score(labels, decided)),
    }


class Trainer(BaseTrainer):
    """Fine-tunes one model (partly or fully, per the freezing policy) on one dataset into one run folder."""

    def __init__(
        self,
        config: TrainConfig,
        run: str | os.PathLike[str] | RunDir,
        *,
        resume: bool = False,
        progress: bool = True,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        super().__init__(config, run, progress=progress, callbacks=callbacks)
        self.augment = BatchAugment(
            self.preset, image_size=config.image_size, normalize=self.preprocessing.normalize, seed=config.seed
        )
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = self._steps_per_epoch()
        self.scheduler = warmup_cosine(
            self.optimizer,
            total_steps=config.epochs * self.steps_per_epoch,
            warmup_steps=round(config.optim.warmup_epochs * self.steps_per_epoch),
            min_lr_ratio=config.optim.min_lr_ratio,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.needs_scaler)
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
            if config.ema
            else None
        )
        if resume and self.run.last.is_file():
            self._load_resume_state()
        self._trainable: tuple[str, ...] | None = None
        self._wrapped: nn.Module = self.model

    # --- set-up helpers -------------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        optim = self.config.optim
        # no decay on biases and norm parameters; built before any freezing, since timm leaves out parameters that
        # do not require grad and the freezing policy may unfreeze more of them in later epochs
        groups = param_groups_weight_decay(self.model, optim.weight_decay)
        if optim.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=True)
        return torch.optim.AdamW(groups, lr=optim.lr)

    def _steps_per_epoch(self) -> int:
        rows = math.ceil(len(self.data.train) / self.world)
        steps = math.ceil(rows / self.config.batch_size)
        return min(steps, self.config.max_batches) if self.config.max_batches else steps

    def _load_resume_state(self) -> None:
        state = load_checkpoint(self.run.last, map_location=self.device)
        if state.get("resume_format") != RESUME_FORMAT:  # the optimiser groups and schedule were laid out otherwise
            raise ArtefactError(
                f"{self.run.last}: written by an earlier pneumolab (resume format {state.get('resume_format', 1)}, "
                f"this one resumes {RESUME_FORMAT}); train again into a new --out"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_value = state["best_value"]
        self.best_epoch = state["best_epoch"]
        self.epochs_since_best = int(state["epochs_since_best"])
        # history rows of epochs after the checkpoint belong to the interrupted attempt
        self.history = [row for row in self.run.read_history() if int(row["epoch"]) <= int(state["epoch"])]

    # --- checkpoints ----------------------------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        """The EMA when enabled, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def resume_checkpoint(self) -> dict[str, Any]:
        return {
            **super().resume_checkpoint(),
            "resume_format": RESUME_FORMAT,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    # --- the loop -------------------------------------------------------------------------------------------
    def _set_trainable(self, epoch: int) -> None:
        groups = tuple(
            apply_freeze(self.model, self.config.freeze, epoch=epoch - 1, gradual_every=self.config.gradual_every)
        )
        if groups == self._trainable:
            return
        self._trainable = groups
        if self.world > 1:  # DDP registers the trainable parameters when it wraps the model
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrapped = DistributedDataParallel(self.model, device_ids=device_ids)
        else:
            self._wrapped = self.model
        if self.config.compile:
            self._wrapped = torch.compile(self._wrapped)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        config = self.config
        self._set_trainable(epoch)
        self._wrapped.train()
        set_frozen_batchnorm_eval(self.model)
        torch.manual_seed(config.seed * 1_000_003 + epoch)  # dropout draws: a function of (seed, epoch)
        self.augment.reseed(config.seed * 1_000_003 + epoch)
        rows = epoch_order(self.data, config, epoch, rank=self.rank, world=self.world)
        chunks = list(batches(rows, config.batch_size, drop_single=True))[: self.steps_per_epoch]
        total_loss, correct, seen = 0.0, 0, 0
        started = time.perf_counter()
        with progress_bar(len(chunks), f"epoch {epoch}/{config.epochs}", enabled=self.progress) as advance:
            for chunk in chunks:
                x = self.augment(self.data.images(chunk).to(self.device, non_blocking=True))
                if config.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = torch.from_numpy(self.data.labels[chunk]).to(self.device)
                with self.precision.autocast():
                    logits = self._wrapped(x)
                loss = self.criterion(logits.float(), y)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if config.optim.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
                total_loss += float(loss.detach()) * len(chunk)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(chunk)
                advance(1)
        seconds = time.perf_counter() - started
        return {
            "train_loss": total_loss / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "train_images_per_s": seen * self.world / seconds,
            "train_seconds": seconds,
        }

    def _validate(self) -> dict[str, float]:
        logits = predict_logits(
            self.eval_model,
            self.data,
            self.data.val,
            preprocessing=self.preprocessing,
            precision=self.precision,
            device=self.device,
            batch_size=self.config.batch_size * 2,
            channels_last=self.config.channels_last,
        )
        return validation_metrics(logits, self.data.labels[self.data.val])

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        stats = self._train_epoch(epoch)
        return {
            "lr": self.optimizer.param_groups[0]["lr"],
            **stats,
            **self._validate(),
            "trainable_params": count_parameters(self.model)[1],
        }
