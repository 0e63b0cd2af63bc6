"""Evaluate a trained run: predictions on disk, operating point fit on validation, metrics with intervals.

For each variant (plain, and with TTA views when asked) the model runs once over the validation and test images
of the run's own ``split.csv``; the temperature and the threshold are fit on validation only, then applied
unchanged to test (EVALUATION.md rules 2-4). A K-class model decides by argmax after temperature scaling (and a
per-class bias when cross-fitting on validation shows it helps); its binary views get their thresholds on validation
(`pneumolab.evaluate.views`). The variant used by the model afterwards (``operating_point.json``) is the one best on
validation by ``choose_by``: log loss by default (or Brier score, or ROC-AUC, macro for K classes), because
validation ROC-AUC saturates near 1 and stops telling variants apart. Files written (`pneumolab.runs.RunDir` names
them and their columns): per split and variant the predictions and the metric object with 95 % bootstrap intervals;
what the input gate (and a binary model's referral band) did (``selective_metrics``); the used test variant without
the films that overlap train/val (``overlap_metrics``); and the ``operating_point``: threshold, method, temperature,
tta views, and ``evaluated_with``, the settings and checkpoint that made all of the above.

A finished evaluation is reused only when ``evaluated_with`` equals what a new one would be made with (the
checkpoint's SHA-256, the dataset, TTA views, threshold rule, variant rule, bootstrap resamples, gate and band
settings), so a changed setting recomputes and an unchanged re-run costs one hash of ``best.pt``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.special import softmax
from sklearn.metrics import brier_score_loss, log_loss

from pneumolab.config import load_config
from pneumolab.data.cache import prepare_cache
from pneumolab.data.splits import carve_validation, read_split
from pneumolab.data.tasks import task_for_classes, task_labels
from pneumolab.data.tta import resolve_views
from pneumolab.errors import ArtefactError, DatasetLayoutError, SettingError
from pneumolab.evaluate.calibration import (
    TemperatureScaler,
    ThresholdSelector,
    expected_calibration_error,
    log_odds,
)
from pneumolab.evaluate.gating import (
    DEFAULT_ALPHA,
    DEFAULT_KEEP,
    collect_gate_features,
    fit_band,
    fit_gate,
    ood_corpus,
    score_groups,
    selective_summary,
    write_gate_scores,
)
from pneumolab.evaluate.metrics import evaluate_predictions
from pneumolab.evaluate.multiclass import (
    MulticlassTemperature,
    class_bias_check,
    confusion,
    fit_class_bias,
    multiclass_bootstrap_ci,
    multiclass_metrics,
    top_label_reliability,
)
from pneumolab.evaluate.overlap import overlap_masks, overlap_rows
from pneumolab.evaluate.stress import SELECTION, StressCase, parse_cases, stress_evaluate
from pneumolab.evaluate.views import derived_thresholds, view_metrics
from pneumolab.fsutil import FolderKind, atomic_dir, atomic_path, check_destination, file_sha256, write_json_atomic
from pneumolab.inference.card import ARTEFACT_KIND, GATE_FILE, read_card
from pneumolab.inference.export import write_gate_arrays
from pneumolab.inference.pytorch import TrainedModel, load_trained
from pneumolab.progress import progress_bar
from pneumolab.runs import (
    BINARY_PREDICTION_COLUMNS,
    EVALUATED_SPLITS,
    TTA_SUFFIX,
    RunDir,
    class_prediction_columns,
    class_probability_columns,
    predicted_classes,
)

__all__ = [
    "aligned_member_predictions",
    "ensemble_runs",
    "evaluate_artefact",
    "evaluate_run",
    "gate_artefact",
    "member_classes",
    "member_predictions",
    "metrics_for",
    "saved_metrics",
    "stack_probabilities",
    "used_suffix",
    "write_ensemble",
    "write_predictions",
]

SPLITS = EVALUATED_SPLITS


# An ensemble run folder (`ensemble --out`, a pipeline's OUT/ensemble): replaced by a new ensemble, never a user's
# folder of other files. Evaluation and reports add files to it, so only its marker is checked.
ENSEMBLE_FOLDER = FolderKind("ensemble folder", marker=RunDir(".").env.name)


def write_predictions(dest: Path, paths, labels, probabilities, threshold: float, logits=None) -> Path:
    """``path,label,probability,prediction,logit`` CSV (`BINARY_PREDICTION_COLUMNS`), written atomically."""
    values = (
        list(paths),
        np.asarray(labels, dtype=int),
        np.asarray(probabilities, dtype=float),
        (np.asarray(probabilities) >= threshold).astype(int),
        np.asarray(logits, dtype=float) if logits is not None else np.nan,
    )
    table = pd.DataFrame(dict(zip(BINARY_PREDICTION_COLUMNS, values, strict=True)))
    with atomic_path(dest) as tmp:
        table.to_csv(tmp, index=False, float_format="%.7g")
    return dest


def metrics_for(
    labels: np.ndarray,
    probabilities: np.ndarray,
    *,
    threshold: float,
    threshold_method: str,
    temperature: float | None,
    n_resamples: int,
    **extra: Any,
) -> dict[str, Any]:
    """The metric object plus the proper scoring rules (log loss, Brier score of P(PNEUMONIA): they keep ranking
    models after ROC-AUC saturates near 1), calibration error and the facts a report needs."""
    metrics = evaluate_predictions(labels, probabilities, threshold, n_resamples=n_resamples)
    metrics.update(
        log_loss=float(log_loss(labels, probabilities, labels=[0, 1])),
        brier=float(brier_score_loss(labels, probabilities, pos_label=1)),
        threshold_method=threshold_method,
        temperature=temperature,
        ece=expected_calibration_error(labels, probabilities),
        **extra,
    )
    return metrics


def write_class_predictions(dest: Path, paths, labels, probabilities, classes, logits) -> Path:
    """K classes: ``path,label,prediction,probability,p_<CLASS>...,logit_<CLASS>...`` CSV
    (`pneumolab.runs.class_prediction_columns`), written atomically.

    ``prediction`` is the argmax; ``probability`` is P(not the first class), P(PNEUMONIA) for NORMAL-first tasks.
    """
    probabilities = np.asarray(probabilities, dtype=float)
    values = (
        list(paths),
        np.asarray(labels, dtype=int),
        probabilities.argmax(1),
        1.0 - probabilities[:, 0],
        *(probabilities[:, k] for k in range(len(classes))),
        *(np.asarray(logits)[:, k] for k in range(len(classes))),
    )
    table = pd.DataFrame(dict(zip(class_prediction_columns(classes), values, strict=True)))
    with atomic_path(dest) as tmp:
        table.to_csv(tmp, index=False, float_format="%.7g")
    return dest


def multiclass_metrics_for(
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes,
    *,
    thresholds: dict[str, float],
    threshold_method: str,
    temperature: float | None,
    n_resamples: int,
    **extra: Any,
) -> dict[str, Any]:
    """The K-class metric object: point estimates, 95 % intervals, confusion matrix, top-label reliability, and the
    binary views (`pneumolab.evaluate.views`) with their own intervals."""
    metrics: dict[str, Any] = multiclass_metrics(labels, probabilities, classes)
    intervals = multiclass_bootstrap_ci(labels, probabilities, classes, n_resamples=n_resamples)
    metrics.update(
        classes=list(classes),
        n=len(labels),
        n_per_class={c: int((np.asarray(labels) == k).sum()) for k, c in enumerate(classes)},
        ci95={key: list(bounds) for key, bounds in intervals.items()},
        bootstrap={"resamples": n_resamples, "stratified": "by true class", "seed": 0},
        confusion=confusion(labels, probabilities, classes),
        reliability=top_label_reliability(labels, probabilities),
        threshold_method=threshold_method,
        temperature=temperature,
        views=view_metrics(labels, probabilities, classes, thresholds, n_resamples=n_resamples),
        **extra,
    )
    return metrics


def _write_split(
    run: RunDir,
    name: str,
    paths,
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    *,
    margins: np.ndarray | None = None,
    **facts: Any,
) -> dict[str, Any]:
    """Write ``predictions/<name>.csv`` and ``metrics/<name>.json`` of one split (and variant); return the metrics.

    The metrics name the model after the run folder unless `facts` gives ``model`` (a folder still being built).
    """
    write_predictions(run.predictions(name), paths, labels, probabilities, threshold, margins)
    metrics = metrics_for(labels, probabilities, threshold=threshold, **{"model": run.path.name, **facts})
    write_json_atomic(run.metrics(name), metrics)
    return metrics


def _rows(run: RunDir, manifest: pd.DataFrame) -> dict[str, np.ndarray]:
    split = read_split(run.split)
    by_path = dict(zip(split["path"], split["split"], strict=True))
    assigned = manifest["path"].map(by_path).to_numpy()
    rows = {name: np.flatnonzero(assigned == name) for name in ("train", *SPLITS)}
    if not len(rows["val"]):
        raise DatasetLayoutError(f"{run.split}: no validation images of this dataset; is --data the run's dataset?")
    return rows


# bump when evaluate_run writes different files or figures from the same settings, so older results are redone
EVALUATION_FORMAT = 2  # 2: binary metrics carry log loss and Brier score

# How `choose_by` ranks the variants on validation: the metric file's key (binary, K classes) and whether higher wins.
VARIANT_RULES = {
    "log_loss": ("log_loss", "log_loss", False),
    "brier": ("brier", "brier", False),
    "roc_auc": ("roc_auc", "macro_roc_auc", True),
    # the mean validation log loss over the clean films and the stress SELECTION set (evaluate.stress)
    "stress_log_loss": (None, None, False),
}


def _evaluation_key(run: RunDir, root: Path | None, variants: dict[str, tuple[str, ...]], **settings: Any) -> dict:
    """What an evaluation of `run` is made from: the key its saved results are reused on."""
    return {
        "format": EVALUATION_FORMAT,
        "checkpoint_sha256": file_sha256(run.best),
        "data": str(Path(root).resolve()) if root is not None else None,
        "tta": list(variants.get(TTA_SUFFIX, ())),
        **settings,
        "gate": {"keep": DEFAULT_KEEP, "alpha": DEFAULT_ALPHA},
    }


def _saved_evaluation(run: RunDir, wanted: list[Path], key: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The saved metrics when every file is there and they were made with `key`; else None."""
    if not run.operating_point.is_file() or not all(p.is_file() for p in wanted):
        return None
    try:
        saved_key = json.loads(run.operating_point.read_text()).get("evaluated_with")
    except json.JSONDecodeError:
        return None
    if saved_key != json.loads(json.dumps(key)):  # compared as JSON, as saved
        return None
    return {p.stem: json.loads(p.read_text()) for p in wanted}


def _timed_logits(trained: TrainedModel, images: np.ndarray, views, progress: bool, label: str):
    started = time.perf_counter()
    logits = []
    batch = 64
    with progress_bar(len(images), label, enabled=progress) as advance:
        for start in range(0, len(images), batch):
            logits.append(trained.logits(images[start : start + batch], views=views, batch_size=batch))
            advance(min(batch, len(images) - start))
    seconds = time.perf_counter() - started
    return torch.cat(logits), seconds


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    tta: str | None = "cxr",
    threshold_method: str = "balanced_accuracy",
    target_sensitivity: float | None = None,
    choose_by: str = "log_loss",
    n_resamples: int = 2000,
    force: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluate a run on its validation and test images; return ``{"val": m, "test": m, "val_tta": ...}``.

    `choose_by` (``log_loss``, ``brier``, ``roc_auc`` or ``stress_log_loss``: log loss over the clean and the
    stress selection set's perturbed films) picks the variant the model uses, on validation.
    A finished evaluation made with the same checkpoint, data and settings is reused unless `force` (module doc).
    """
    if choose_by not in VARIANT_RULES:
        raise SettingError(f"choose_by must be one of {', '.join(VARIANT_RULES)}, not {choose_by!r}")
    run = RunDir(run_dir)
    variants = {"": ("identity",)}
    if tta:
        variants[TTA_SUFFIX] = resolve_views(tta)
    ThresholdSelector(threshold_method, target_sensitivity=target_sensitivity)  # a bad setting fails before any work
    config = load_config(run.config)
    root = data or config.data.root
    if root is None:
        raise SettingError(f"{run.path}: the run names no dataset; pass --data DIR")
    wanted = [run.metrics(f"{s}{v}") for v in variants for s in SPLITS]
    wanted.extend([run.selective_metrics, run.overlap_metrics])
    key = None
    if run.best.is_file():
        key = _evaluation_key(
            run,
            Path(root),
            variants,
            threshold_method=threshold_method,
            target_sensitivity=target_sensitivity,
            choose_by=choose_by,
            n_resamples=n_resamples,
        )
        saved = None if force else _saved_evaluation(run, wanted, key)
        if saved is not None:
            saved.pop(run.selective_metrics.stem)
            saved.pop(run.overlap_metrics.stem)
            return saved

    trained = load_trained(run.path)
    cache, all_labels = _task_cache(
        root, trained.classes, size=trained.cache_size, cache_root=config.data.cache_dir, progress=progress
    )
    rows = _rows(run, cache.manifest)
    labels = {s: all_labels[rows[s]] for s in SPLITS}
    paths = {s: cache.manifest["path"].to_numpy()[rows[s]] for s in SPLITS}
    patients = cache.manifest["patient_id"].to_numpy()[rows["val"]]
    variant = _multiclass_variant if len(trained.classes) > 2 else _binary_variant

    results: dict[str, dict[str, Any]] = {}
    points: dict[str, dict[str, Any]] = {}
    calibrated: dict[str, dict[str, np.ndarray]] = {}
    for suffix, views in variants.items():
        logits, seconds = {}, {}
        for split in SPLITS:
            images = np.asarray(cache.images[rows[split]])
            logits[split], seconds[split] = _timed_logits(trained, images, views, progress, f"{split}{suffix}")
        facts = {
            "n_resamples": n_resamples,
            "tta": list(views) if suffix else [],
            "weights_source": trained.weights_source,
        }
        selector = ThresholdSelector(threshold_method, target_sensitivity=target_sensitivity)
        name = "tta" if suffix else "plain"
        points[name], calibrated[name], per_split = variant(
            run, trained, logits, labels, paths, selector, facts, suffix=suffix, val_patients=patients
        )
        for split in SPLITS:
            per_split[split].update(
                inference_images_per_s=len(rows[split]) * len(views) / seconds[split], eval_seconds=seconds[split]
            )
            write_json_atomic(run.metrics(f"{split}{suffix}"), per_split[split])
            results[f"{split}{suffix}"] = per_split[split]
        for rule, (binary_key, multiclass_key, _) in VARIANT_RULES.items():
            if binary_key is not None:
                points[name][f"val_{rule}"] = per_split["val"][
                    binary_key if variant is _binary_variant else multiclass_key
                ]
        if choose_by == "stress_log_loss":  # the framing rule's objective, on perturbed validation films
            images = np.asarray(cache.images[rows["val"]])
            block = stress_evaluate(
                _variant_scorer(trained, views, points[name]),
                images,
                labels["val"],
                classes=trained.classes,
                threshold=points[name].get("threshold", 0.5),
                cases=SELECTION,
            )
            points[name]["val_stress_log_loss"] = block["stress_log_loss"]
    chosen = _chosen_variant(points, choose_by)
    gating = _fit_gating(
        run,
        trained,
        cache,
        rows,
        labels,
        calibrated[chosen],
        points[chosen]["threshold"],
        train_labels=all_labels[rows["train"]],
        progress=progress,
    )
    used = calibrated[chosen]["test"]
    overlap = _overlap(run, trained.classes, paths["test"], labels["test"], used, points[chosen], n_resamples)
    overlap["variant"] = f"test{TTA_SUFFIX if chosen == 'tta' else ''}"
    write_json_atomic(run.overlap_metrics, overlap)
    point = {
        **points[chosen],
        "chosen_on": "validation",
        "chosen_by": choose_by,
        "variants": points,
        **gating,
        "evaluated_with": key,
    }
    write_json_atomic(run.operating_point, point)
    return results


def _variant_scorer(trained: TrainedModel, views: tuple[str, ...], point: dict[str, Any]):
    """uint8 films -> one variant's calibrated class probabilities (its views, temperature and class bias)."""

    def score(films: np.ndarray) -> np.ndarray:
        z = trained.logits(films, views=views).numpy() / point["temperature"]
        return softmax(z + np.asarray(point.get("class_bias") or 0.0), axis=1)

    return score


def _chosen_variant(points: dict[str, dict[str, Any]], choose_by: str) -> str:
    """The variant the model uses from now on: the best on validation by `choose_by`; a tie keeps the cheaper
    plain one."""
    _, _, higher_wins = VARIANT_RULES[choose_by]
    sign = -1.0 if higher_wins else 1.0
    return min(points, key=lambda k: (sign * points[k][f"val_{choose_by}"], k != "plain"))


def _overlap(run: RunDir, classes, paths, labels, probabilities, point, n_resamples: int) -> dict[str, Any]:
    """The used test variant's metrics without the films that overlap train/val (`pneumolab.evaluate.overlap`);
    a K-class model's on its pneumonia-vs-normal view."""
    view = None
    if len(classes) > 2:
        threshold = (point.get("derived_thresholds") or {}).get("pneumonia_vs_normal")
        if classes[0] != "NORMAL" or threshold is None:
            return {"note": "no pneumonia-vs-normal view for these classes", "rows": []}
        view, labels, probabilities = "pneumonia_vs_normal", (labels != 0).astype(int), 1.0 - probabilities[:, 0]
    else:
        threshold = point["threshold"]
    shared, duplicates, facts = overlap_masks(list(paths), read_split(run.split))
    return {
        "view": view,
        "threshold": threshold,
        "n": len(labels),
        "shared_images": int(shared.sum()),
        "shared_patients": facts.get("shared_patients", 0),
        "duplicates": None if duplicates is None else int(duplicates.sum()),
        "duplicates_only": None if duplicates is None else int((duplicates & ~shared).sum()),
        "duplicates_facts": facts,
        "rows": overlap_rows(labels, probabilities, threshold, shared, duplicates, n_resamples=n_resamples),
    }


def _task_cache(root, classes, *, size: int, cache_root=None, progress: bool = True):
    """The dataset's cache at the model's size and every cached film's label as the model numbers its classes."""
    task = task_for_classes(classes)
    cache, _ = prepare_cache(root, size=size, cache_root=cache_root, progress=progress, classes=task.folder_classes)
    return cache, task_labels(cache.manifest, classes)


def _binary_variant(run, trained, logits, labels, paths, selector, facts, *, suffix, val_patients):
    """Temperature and threshold fit on validation, applied to test; predictions written. Returns the variant's
    operating point, its calibrated P(PNEUMONIA) per split and its metric objects (not yet written)."""
    scaler = TemperatureScaler().fit(logits["val"].numpy(), labels["val"])
    temperature = float(scaler.temperature_)
    probabilities = {s: torch.softmax(logits[s] / temperature, 1)[:, 1].numpy() for s in SPLITS}
    selector.fit(labels["val"], probabilities["val"])
    threshold = float(selector.threshold_)
    metrics = {}
    for split in SPLITS:
        margins = (logits[split][:, 1] - logits[split][:, 0]).numpy()
        dest = run.predictions(split, suffix)
        write_predictions(dest, paths[split], labels[split], probabilities[split], threshold, margins)
        metrics[split] = metrics_for(
            labels[split],
            probabilities[split],
            threshold=threshold,
            threshold_method=selector.describe(),
            temperature=temperature,
            model=run.path.name,
            split=split,
            **facts,
        )
    point = {"threshold": threshold, "method": selector.describe(), "temperature": temperature, "tta": facts["tta"]}
    return point, probabilities, metrics


def _multiclass_variant(run, trained, logits, labels, paths, selector, facts, *, suffix, val_patients):
    """K classes: temperature (and, when cross-fitting on validation shows it helps, per-class bias) fit on
    validation, the decision the argmax; the derived binary views' thresholds fit on validation by the run's rule.
    Returns what `_binary_variant` does, with class probabilities (N x K) per split."""
    classes = trained.classes
    z = {s: logits[s].numpy().astype(np.float64) for s in SPLITS}
    temperature = float(MulticlassTemperature().fit(z["val"], labels["val"]).temperature_)
    bias_check = class_bias_check(z["val"], labels["val"], temperature, groups=val_patients)
    bias = fit_class_bias(z["val"], labels["val"], temperature) if bias_check["helps"] else np.zeros(len(classes))
    probabilities = {s: softmax(z[s] / temperature + bias, axis=1) for s in SPLITS}
    method = "argmax after temperature scaling" + (" and class bias" if bias_check["helps"] else "")
    thresholds = derived_thresholds(labels["val"], probabilities["val"], classes, selector)
    metrics = {}
    for split in SPLITS:
        dest = run.predictions(split, suffix)
        write_class_predictions(dest, paths[split], labels[split], probabilities[split], classes, z[split])
        metrics[split] = multiclass_metrics_for(
            labels[split],
            probabilities[split],
            classes,
            thresholds=thresholds,
            threshold_method=method,
            temperature=temperature,
            model=run.path.name,
            split=split,
            **facts,
        )
    point = {
        # the derived P(pneumonia) view's threshold (a K-class model decides by argmax; the card needs a number)
        "threshold": thresholds.get("pneumonia_vs_normal", 0.5),
        "method": method,
        "temperature": temperature,
        "class_bias": bias.tolist() if bias_check["helps"] else None,
        "class_bias_check": bias_check,
        "derived_thresholds": thresholds,
        "tta": facts["tta"],
    }
    return point, probabilities, metrics


def _fit_gating(
    run: RunDir,
    trained: TrainedModel,
    cache,
    rows: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    probabilities: dict[str, np.ndarray],
    threshold: float,
    *,
    train_labels: np.ndarray,
    progress: bool,
) -> dict[str, Any]:
    """Fit the gate (train split, one class statistic per class) and, for a binary model, the referral band
    (validation) of the used variant; measure both on val, test and the out-of-distribution corpus; write
    ``gate.safetensors``, ``gate/scores.csv`` and ``metrics/selective.json``. Returns the facts for the operating
    point. `probabilities` are P(PNEUMONIA) per split (binary) or N x K class probabilities (decided by argmax;
    no band: the band's guarantee is written for one threshold on one probability)."""
    binary = np.ndim(probabilities["val"]) == 1
    trained.band = fit_band(labels["val"], probabilities["val"], threshold) if binary else None
    trained.gates = fit_gate(
        trained,
        np.asarray(cache.images[rows["train"]]),
        train_labels,
        np.asarray(cache.images[rows["val"]]),
        progress=progress,
    )
    paths = cache.manifest["path"].to_numpy()
    test_images = np.asarray(cache.images[rows["test"]])
    groups = {s: (list(paths[rows[s]]), np.asarray(cache.images[rows[s]])) for s in SPLITS}
    table = score_groups(trained, {**groups, **ood_corpus(trained.cache_size, test_images)}, progress=progress)
    with atomic_path(run.gate) as tmp:
        write_gate_arrays(trained, tmp)
    write_gate_scores(run.gate_scores, table)
    band = trained.band.describe() if trained.band is not None else None
    summary: dict[str, Any] = {
        "gate": trained.gates.describe(),
        "referral": band,
        "refused_share": table.groupby("group", sort=False)["refused"].mean().to_dict(),
    }
    for split in SPLITS:
        refused = table.loc[table["group"] == split, "refused"].to_numpy()
        p = probabilities[split]
        summary[split] = selective_summary(
            labels[split],
            (p >= threshold).astype(int) if binary else p.argmax(1),
            classes=trained.classes,
            refused=refused,
            referred=trained.band.refers(p) if binary else None,
        )
    write_json_atomic(run.selective_metrics, summary)
    return {"gate": trained.gates.describe(), "referral": band}


def evaluate_artefact(
    model: str | os.PathLike[str] | None,
    *,
    data: str | os.PathLike[str],
    split: str = "test",
    n_resamples: int = 2000,
    gate: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of an exported artefact (or the bundled ``default``) on one split, with its own operating point.

    Nothing is fit here: the threshold, temperature and TTA views are the card's (chosen on validation when the
    model was evaluated). ``test`` is the dataset's official test folder; ``val`` is carved again from the card's
    split settings, which the patient-grouped carve reproduces on any machine.
    """
    if split not in SPLITS:
        raise SettingError(f"--split must be val or test, not {split!r}")
    trained = load_trained(model)
    trained.gate_enabled = gate
    if split == "val" and trained.validation_split is None:
        raise ArtefactError(f"{trained.source}: the card records no validation split; only --split test works")
    cache, assigned, all_labels = _artefact_splits(trained, data, progress)
    rows = np.flatnonzero(assigned == split)
    if not len(rows):
        raise DatasetLayoutError(f"{data}: no {split} images in this dataset")
    views = trained.tta or ("identity",)
    images = np.asarray(cache.images[rows])
    logits, seconds = _timed_logits(trained, images, views, progress, split)
    labels = all_labels[rows]
    facts = {
        "n_resamples": n_resamples,
        "model": str(trained.source),
        "split": split,
        "tta": list(trained.tta),
        "weights_source": trained.weights_source,
        "inference_images_per_s": len(rows) * len(views) / seconds,
        "eval_seconds": seconds,
    }
    if len(trained.classes) > 2:
        return _artefact_multiclass(trained, images, labels, logits, gate=gate, progress=progress, **facts)
    probabilities = trained.probabilities(logits)
    selective: dict[str, Any] = {"gate": trained.gate_status}
    if gate:  # what the card's gate and band do to this split, beside the metrics of all its films
        refused = None
        if trained.gate is not None:
            features = collect_gate_features(trained, images, trained.gate.layers, progress=progress)
            refused = trained.gate.refuses(trained.gate.score(features))
        referred = trained.band.refers(probabilities) if trained.band is not None else None
        selective.update(
            selective_summary(
                labels, (probabilities >= trained.threshold).astype(int), refused=refused, referred=referred
            )
        )
    return metrics_for(
        labels,
        probabilities,
        selective=selective,
        threshold=trained.threshold,
        threshold_method=trained.threshold_method,
        temperature=trained.temperature,
        **facts,
    )


def stress_model(
    model: str | os.PathLike[str] | None,
    *,
    data: str | os.PathLike[str] | None,
    splits: tuple[str, ...] = SPLITS,
    cases: str | tuple[StressCase, ...] = "standard",
    seed: int = 0,
    backend: str = "onnx",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """The stress evaluation (`pneumolab.evaluate.stress`) of a run folder, an artefact, an ensemble or a bundled
    model on its validation and / or test films, exactly as the model is used (its variant, temperature and
    threshold; the gate off so that every film counts). Validation is the run's split.csv (an ensemble's: its first
    member's) or the card's carve; a run folder also gets ``metrics/stress.json``.

    `backend` ``onnx`` (the default: onnxruntime ran MobileNetV2 twice as fast as PyTorch fp32 on a 2-core CPU
    without bf16; the export is checked against PyTorch to 1e-4 in probability) or ``pytorch``.

    Returns:
        ``{split: stress block}``.
    """
    from pneumolab.inference.loader import load_backend  # the loader sits on top of pneumolab.inference

    wanted = parse_cases(cases)
    source = Path(model) if model is not None else None
    if data is None and source is not None and RunDir(source).config.is_file():
        data = load_config(RunDir(source).config).data.root
    if data is None:
        raise SettingError(f"{model}: the stress evaluation needs the dataset; pass --data DIR")
    for split in splits:
        if split not in SPLITS:
            raise SettingError(f"stress splits must be val or test, not {split!r}")
    run = RunDir(source) if source is not None and source.is_dir() and RunDir(source).split.is_file() else None
    saved: dict[str, dict[str, Any]] = {}
    if run is not None and run.stress_metrics.is_file():
        saved = json.loads(run.stress_metrics.read_text())
    key = {
        "cases": [c.key for c in wanted],
        "seed": seed,
        "backend": backend,
        "operating_point": _file_sha(run) if run else None,
    }
    if run is not None and all(saved.get(s, {}).get("evaluated_with") == key for s in splits):
        return {s: saved[s] for s in splits}  # made from this operating point with these cases: reused
    loaded = load_backend(model, backend)
    cache, labels = _task_cache(data, loaded.classes, size=loaded.cache_size, progress=progress)
    assigned = _stress_assignment(loaded, source, cache, labels)
    paths = cache.manifest["path"].to_numpy()
    results: dict[str, dict[str, Any]] = {}
    for split in splits:
        rows = np.flatnonzero(assigned == split)
        if not len(rows):
            raise DatasetLayoutError(f"{data}: no {split} films for this model (no split.csv or card split)")
        with progress_bar(len(wanted), f"stress {split}", enabled=progress) as advance:
            results[split] = stress_evaluate(
                lambda films: loaded.score(films, gated=False)[0],
                np.asarray(cache.images[rows]),
                labels[rows],
                classes=loaded.classes,
                threshold=loaded.threshold,
                cases=wanted,
                seed=seed,
                paths=paths[rows],
                progress=lambda _key: advance(1),
            )
        results[split].update(split=split, model=str(getattr(loaded, "source", model)), evaluated_with=key)
        if run is not None and loaded.explainer is not None:
            _draw_flippers(run, loaded.explainer, np.asarray(cache.images[rows]), results[split], seed=seed)
    if run is not None:  # the other split's block stays
        write_json_atomic(run.stress_metrics, {**saved, **results})
    return results


def _draw_flippers(
    run: RunDir, trained: TrainedModel, films: np.ndarray, block: dict[str, Any], *, seed: int, drawn: int = 4
) -> None:
    """Grad-CAM (on `trained`, the PyTorch twin of the stressed model) of the run's first `drawn` flippers of one
    split, clean beside the case that moved each most, written to ``plots/stress/`` and named in the block
    (``gradcam``, relative to the run); none without the explain extra."""
    from pneumolab.data.perturb import perturb_film
    from pneumolab.errors import MissingExtraError
    from pneumolab.inference.explain import explain_pair

    split = block["split"]
    for k, flipper in enumerate(block["flippers"][:drawn]):
        case = flipper.get("largest_change_by")
        if case is None:
            continue
        parsed = StressCase.parse(case)
        clean = films[flipper["index"]]
        perturbed = perturb_film(clean, parsed.name, parsed.strength, seed=seed, index=flipper["index"])
        target = flipper["label"] if len(trained.classes) > 2 else trained.classes[1]
        captions = (f"clean  P = {flipper['clean_probability']:.2f}", f"{case}  |dP| = {flipper['largest_change']:.2f}")
        try:
            png = explain_pair(trained, clean, perturbed, captions, target)
        except MissingExtraError:
            return
        dest = run.stress_plot(split, k)
        with atomic_path(dest) as tmp:
            tmp.write_bytes(png)
        relative = dest.relative_to(run.path)
        flipper.update(gradcam=relative.as_posix(), gradcam_target=target)


def _file_sha(run: RunDir) -> str | None:
    """What a run's stress blocks are made from: its operating point (threshold, temperature, variant)."""
    return file_sha256(run.operating_point) if run.operating_point.is_file() else None


def _stress_assignment(loaded, source: Path | None, cache, labels: np.ndarray) -> np.ndarray:
    """Each cached film's split for `stress_model`: a run's split.csv (an ensemble's first member's), else the
    card's validation carve, else the official folders (test only)."""
    sources = [source] if source is not None else []
    sources += [Path(p) for p in getattr(loaded, "member_sources", [])]
    for source in sources:
        if source.is_dir() and RunDir(source).split.is_file():
            rows = _rows(RunDir(source), cache.manifest)
            assigned = np.full(len(cache.manifest), "", dtype=object)
            for name, index in rows.items():
                assigned[index] = name
            return assigned
    assigned = cache.manifest["split"].to_numpy().astype(object)
    # an ONNX model keeps the PyTorch one it was exported from (its explainer), which knows the card's carve
    settings = getattr(loaded, "validation_split", None) or getattr(loaded.explainer, "validation_split", None)
    if settings is not None:
        carved = carve_validation(cache.manifest.assign(label=labels), **settings).to_numpy()
        assigned = np.where(assigned == "test", "test", carved)
    return assigned


def _artefact_multiclass(trained, images, labels, logits, *, gate: bool, progress: bool, **facts) -> dict[str, Any]:
    """`evaluate_artefact` for a K-class model: its card's temperature, bias and view thresholds, nothing fit."""
    probabilities = trained.class_probabilities(logits)
    selective: dict[str, Any] = {"gate": trained.gate_status}
    if gate:
        refused = None
        if trained.gate is not None:
            features = collect_gate_features(trained, images, trained.gate.layers, progress=progress)
            refused = trained.gate.refuses(trained.gate.score(features))
        selective.update(selective_summary(labels, probabilities.argmax(1), classes=trained.classes, refused=refused))
    return multiclass_metrics_for(
        labels,
        probabilities,
        trained.classes,
        thresholds=trained.view_thresholds or {},
        threshold_method=trained.threshold_method,
        temperature=trained.temperature,
        selective=selective,
        **facts,
    )


def _artefact_splits(trained: TrainedModel, data, progress: bool):
    """The dataset's cache at the model's size, each image's split (train / val carved again from the card's
    split settings: the patient-grouped carve reproduces on any machine; test from the official folder) and each
    image's label in the model's classes."""
    cache, labels = _task_cache(data, trained.classes, size=trained.cache_size, progress=progress)
    manifest = cache.manifest.assign(label=labels)  # the carve is stratified by the task's labels
    settings = trained.validation_split
    assigned = manifest["split"].to_numpy().astype(object)
    if settings is not None and (assigned == "train").any():  # a labels CSV of test films alone has none to carve
        carved = carve_validation(manifest, **settings).to_numpy()
        assigned = np.where(assigned == "test", "test", carved)
    return cache, assigned, labels


def gate_artefact(
    model: str | os.PathLike[str] | None,
    *,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    keep: float = DEFAULT_KEEP,
    alpha: float = DEFAULT_ALPHA,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Fit an exported artefact's (or the bundled model's) input gate and referral band, and write the artefact
    again with them: the gate from the card's own training split, the limit and the band from its validation split
    (carved again from the card's split settings). Test is not read. The weights are copied byte for byte. An
    existing `out` is replaced only when it is an artefact (or empty), or with `force`.

    Returns the new card.
    """
    check_destination(out, ARTEFACT_KIND, force=force)  # before the fit: a refusal comes at once
    trained = load_trained(model)
    source = Path(trained.source)
    if not (source / "card.json").is_file():
        raise ArtefactError(f"{source}: not an exported artefact; evaluate a run folder to fit its gate")
    if trained.validation_split is None:
        raise ArtefactError(f"{source}: the card records no validation split, so its gate cannot be fit")
    cache, assigned, labels = _artefact_splits(trained, data, progress)
    rows = {name: np.flatnonzero(assigned == name) for name in ("train", "val")}
    if not len(rows["val"]) or not len(rows["train"]):
        raise DatasetLayoutError(f"{data}: no training or validation films for this card's split")
    val_images = np.asarray(cache.images[rows["val"]])
    logits, _ = _timed_logits(trained, val_images, trained.tta or ("identity",), progress, "val")
    if len(trained.classes) == 2:  # the band is written for one threshold on one probability
        trained.band = fit_band(labels[rows["val"]], trained.probabilities(logits), trained.threshold, alpha=alpha)
    trained.gates = fit_gate(
        trained,
        np.asarray(cache.images[rows["train"]]),
        labels[rows["train"]],
        val_images,
        keep=keep,
        progress=progress,
    )
    card = dict(read_card(source / "card.json").facts)
    card.update(gate=trained.gates.describe(), referral=trained.band.describe() if trained.band else None)
    out = Path(out)
    with atomic_dir(out, kind=ARTEFACT_KIND, force=force) as tmp:
        (tmp / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
        card["gate_sha256"] = write_gate_arrays(trained, tmp / GATE_FILE)
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def used_suffix(run: RunDir) -> str:
    """`RunDir.used_suffix`, with a clear error for a run not evaluated yet."""
    suffix = run.used_suffix()
    if suffix is None:
        raise ArtefactError(f"{run.path}: not evaluated yet (no operating_point.json); run pneumolab evaluate first")
    return suffix


def member_predictions(run: RunDir, split: str) -> pd.DataFrame:
    """A run's predictions for `split`, in the variant its operating point chose (plain or TTA)."""
    return pd.read_csv(run.predictions(split, used_suffix(run)))


def saved_metrics(run: RunDir, split: str) -> dict[str, Any]:
    """A run's metric object for `split`, in the variant its operating point chose."""
    return json.loads(run.metrics(f"{split}{used_suffix(run)}").read_text())


def ensemble_runs(
    runs: list[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    method: str = "mean",
    threshold_method: str = "balanced_accuracy",
    target_sensitivity: float | None = None,
    n_resamples: int = 2000,
    force: bool = False,
) -> dict[str, dict[str, Any]]:
    """Combine evaluated runs from their saved predictions (no model runs again); fit on validation only.

    The members may differ in architecture and input size: only their per-image probabilities meet, aligned by
    image path. The ensemble folder gets predictions, metrics and an operating point like any run; it is built
    beside `out` and replaces it only when complete. An existing `out` that is not an ensemble folder is refused
    unless `force` (a trained run never is replaced).
    """
    from pneumolab.evaluate.ensemble import EnsembleCombiner

    if len(runs) < 2:
        raise SettingError("an ensemble needs at least two runs")
    members = [RunDir(r) for r in runs]
    tables = {s: aligned_member_predictions(members, s) for s in SPLITS}
    classes = member_classes(members, tables["val"])
    labels = {s: tables[s][0]["label"].to_numpy() for s in SPLITS}
    stacked = {s: stack_probabilities(tables[s], classes) for s in SPLITS}
    combiner = EnsembleCombiner(method).fit(stacked["val"], labels["val"])
    probabilities = {s: combiner.predict_proba(stacked[s]) for s in SPLITS}
    paths = {s: tables[s][0]["path"] for s in SPLITS}
    return write_ensemble(
        members,
        out,
        paths,
        labels,
        probabilities,
        classes,
        combiner.describe(),
        ThresholdSelector(threshold_method, target_sensitivity=target_sensitivity),
        n_resamples,
        force=force,
    )


def aligned_member_predictions(members: list[RunDir], split: str) -> list[pd.DataFrame]:
    """Each member's predictions of `split` (its used variant), checked to cover the same images in one order."""
    frames = [member_predictions(m, split) for m in members]
    reference = frames[0]["path"].tolist()
    for member, frame in zip(members[1:], frames[1:], strict=True):
        if frame["path"].tolist() != reference:
            raise ArtefactError(f"{member.path}: its {split} images differ from {members[0].path}'s (other split?)")
    return frames


def member_classes(members: list[RunDir], frames: list[pd.DataFrame]) -> tuple[str, ...] | None:
    """The members' classes from their ``p_<CLASS>`` columns (None: binary), refused when they differ."""
    classes = [predicted_classes(f.columns) for f in frames]
    if any(classes[0] != other for other in classes[1:]):  # binary with K-class, or other classes
        raise SettingError(f"{members[0].path.name} and the other members predict different classes")
    return classes[0] or None


def stack_probabilities(frames: list[pd.DataFrame], classes: tuple[str, ...] | None) -> np.ndarray:
    """members x N (binary: P(PNEUMONIA)) or members x N x K (K classes) from prediction tables."""
    if classes is None:
        return np.stack([f["probability"].to_numpy() for f in frames])
    return np.stack([f[class_probability_columns(classes)].to_numpy(dtype=np.float64) for f in frames])


def write_ensemble(
    members: list[RunDir],
    out: str | os.PathLike[str],
    paths: dict[str, Any],
    labels: dict[str, np.ndarray],
    probabilities: dict[str, np.ndarray],
    classes: tuple[str, ...] | None,
    combiner: dict[str, Any],
    selector: ThresholdSelector,
    n_resamples: int,
    *,
    force: bool = False,
    **facts: Any,
) -> dict[str, dict[str, Any]]:
    """Write an ensemble's folder from its combined probabilities per split (binary: P(PNEUMONIA); K classes: N x K):
    predictions, metrics, the operating point fit on its ``val`` probabilities, and ``env.json`` naming the members
    and the `combiner` (its `describe()`), plus `facts`. Built beside `out`, which it replaces when complete."""
    target = RunDir(out)
    # `out` is replaced whole: never a member's folder, nor any trained run, nor a folder of the user's
    if target.path.resolve() in {m.path.resolve() for m in members} or target.config.is_file():
        raise SettingError(f"{target.path}: a trained run folder; write the ensemble to a new folder (--out)")
    check_destination(target.path, ENSEMBLE_FOLDER, force=force)
    if classes is not None:
        return _ensemble_classes(members, target, paths, labels, probabilities, classes, combiner, selector,
                                 n_resamples, facts, force)  # fmt: skip
    threshold = float(selector.fit(labels["val"], probabilities["val"]).threshold_)
    results = {}
    with atomic_dir(target.path, kind=ENSEMBLE_FOLDER, force=force) as building:
        run = RunDir(building)
        for split in SPLITS:
            results[split] = _write_split(
                run,
                split,
                paths[split],
                labels[split],
                probabilities[split],
                threshold,
                threshold_method=selector.describe(),
                temperature=None,
                n_resamples=n_resamples,
                split=split,
                tta=[],
                weights_source="ensemble",
                model=target.path.name,
            )
        band = fit_band(labels["val"], probabilities["val"], threshold)  # the ensemble's own, as a model's
        # not applied (the combined probabilities are used as they are); recorded so the report can show what
        # temperature scaling would change without fitting anything itself
        scaler = TemperatureScaler().fit(log_odds(probabilities["val"]), labels["val"])
        temperature_if_scaled = float(scaler.temperature_)
        point = {
            "threshold": threshold,
            "method": selector.describe(),
            "temperature": None,
            "tta": [],
            "temperature_if_scaled": temperature_if_scaled,
        }
        write_json_atomic(run.operating_point, {**point, "chosen_on": "validation", "referral": band.describe()})
        _write_ensemble_env(run, members, combiner, facts)
    return results


def _write_ensemble_env(run: RunDir, members: list[RunDir], combiner: dict[str, Any], facts: dict[str, Any]) -> None:
    members_text = [str(m.path) for m in members]
    env = {"ensemble": {**combiner, "members": members_text}, "weights_source": "ensemble", **facts}
    write_json_atomic(run.env, env)


def _ensemble_classes(members, target, paths, labels, probabilities, classes, combiner, selector, n_resamples, facts,
                      force=False):  # fmt: skip
    """`write_ensemble` of K-class runs: the decision the argmax of the combination, the binary views' thresholds
    fit on validation; no band (as for a K-class model)."""
    thresholds = derived_thresholds(labels["val"], probabilities["val"], classes, selector)
    decision = f"argmax of the {combiner['method']} combination"
    results = {}
    with atomic_dir(target.path, kind=ENSEMBLE_FOLDER, force=force) as building:
        run = RunDir(building)
        for split in SPLITS:
            no_logits = np.full((len(paths[split]), len(classes)), np.nan)
            dest = run.predictions(split)
            write_class_predictions(dest, paths[split], labels[split], probabilities[split], classes, no_logits)
            results[split] = multiclass_metrics_for(
                labels[split],
                probabilities[split],
                classes,
                thresholds=thresholds,
                threshold_method=decision,
                temperature=None,
                n_resamples=n_resamples,
                split=split,
                tta=[],
                weights_source="ensemble",
                model=target.path.name,
            )
            write_json_atomic(run.metrics(split), results[split])
        point = {
            "threshold": thresholds.get("pneumonia_vs_normal", 0.5),
            "method": decision,
            "temperature": None,
            "tta": [],
            "derived_thresholds": thresholds,
            "chosen_on": "validation",
            "referral": None,
        }
        write_json_atomic(run.operating_point, point)
        _write_ensemble_env(run, members, combiner, facts)
    return results
