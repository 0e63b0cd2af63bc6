"""The report: one self-contained HTML page and its Markdown twin, comparing runs and carrying a model card each.

Everything shown comes from the run folders' files (``metrics/``, ``predictions/``, ``history.csv``, ``env.json``,
``config.yaml``, ``operating_point.json``, ``split.csv``); what a file does not hold is said to be missing ("not
evaluated", "not recorded"), never recomputed or guessed. Three analyses are derived from the saved predictions
(`pneumolab.report._analyses`): calibration before and after temperature scaling, the test metrics without the
images that share a patient or the bytes with a train/validation image, and, for a run with an input gate
(``gate/scores.csv``, ``metrics/selective.json``), the risk-coverage curve beside what the gate and the referral band
did. The HTML page embeds its images as data URIs
and its CSS inline, so it makes no request of any kind when opened; the Markdown file links the same images, written
under ``images/``.
"""

from __future__ import annotations

import base64
import os
import re
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path, PurePath
from typing import Any

import jinja2
import numpy as np

from pneumolab import CLASSES, __version__
from pneumolab.data.dataset import parse_name
from pneumolab.errors import PneumolabError
from pneumolab.fsutil import atomic_dir, write_text_atomic
from pneumolab.report._analyses import (
    FileHashes,
    calibration_before_after,
    gating_analysis,
    overlap_removed,
    used_test_evaluation,
)
from pneumolab.report._runfiles import GATE_GROUPS, SPLIT_NAMES, Evaluation, RunFiles, finite, read_run
from pneumolab.report.plots import _plot_run_files

__all__ = ["RANDOM_INIT_TEXT", "build_report", "describe_weights"]

RANDOM_INIT_TEXT = "random initialisation (no ImageNet weights here)"
"""How a backbone that started from random weights is described; such a model is never called pretrained."""

# (metrics-file key, column header, "%" for rates shown in percent or "" for scores shown with 3 decimals)
METRIC_COLUMNS = (
    ("accuracy", "Accuracy", "%"),
    ("balanced_accuracy", "Balanced accuracy", "%"),
    ("recall", "Sensitivity (recall)", "%"),
    ("specificity", "Specificity", "%"),
    ("precision", "Precision", "%"),
    ("f1", "F1", "%"),
    ("roc_auc", "ROC-AUC", ""),
    ("average_precision", "Average precision", ""),
    ("accuracy_at_0.5", "Accuracy at 0.5", "%"),
    ("ece", "ECE", ""),
)
GATING_PLOTS = ("gate_scores", "risk_coverage")  # drawn in the run's "Input gate and referral" part, not under Plots
CARD_METRICS = ("accuracy", "recall", "specificity", "precision", "f1", "roc_auc", "average_precision")
OVERLAP_METRICS = ("accuracy", "recall", "specificity", "roc_auc")

# Published results on the same 624 official test images (docs/EVALUATION.md).
REFERENCES = (
    ("Kermany et al., Cell 2018 (InceptionV3, ImageNet weights)", "92.8", "93.2", "90.1", "0.968"),
    ("MedMNIST v2 ResNet-50 (28 px upsampled to 224)", "88.4", "", "", "0.962"),
    ("MedMNIST v2 Google AutoML Vision", "94.6", "", "", "0.991"),
)

INTENDED_USE = (
    "Research and teaching on pediatric chest X-ray classification (NORMAL vs PNEUMONIA): comparing training recipes, "
    "architectures and evaluation methods.",
    "Not a medical device. Not for diagnosis, triage, screening or any other clinical decision; it has not been "
    "validated clinically, prospectively or on any population other than its test set.",
    "Input: one frontal chest X-ray of a child. Adults, lateral views and findings other than pneumonia are out of "
    "scope.",
)
DATA_FACTS = (
    "Kermany D. S., Goldbaum M., Cai W. et al. (2018), Identifying Medical Diagnoses and Treatable Diseases by "
    "Image-Based Deep Learning, Cell 172(5):1122-1131.",
    "Dataset: Kermany D., Zhang K., Goldbaum M. (2018), Labeled Optical Coherence Tomography (OCT) and Chest X-Ray "
    "Images for Classification, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2; licence CC BY 4.0.",
    "Anterior-posterior chest X-rays of pediatric patients aged 1-5 years from a single centre, Guangzhou Women and "
    "Children's Medical Center (Guangzhou, China), graded by physicians; bacterial and viral pneumonia are both "
    "labelled PNEUMONIA.",
    "Official split: train/ 5,216 images (1,341 NORMAL, 3,875 PNEUMONIA), test/ 624 images (234 NORMAL, "
    "390 PNEUMONIA). Validation is carved from train/ by patient; test/ chose nothing.",
)

_KIND_NAMES = {"bacteria": "bacterial pneumonia", "virus": "viral pneumonia"}
_MISSING = "\N{EN DASH}"


# ----------------------------------------------------------------------------------------------------- formatting


def _rate(value: float | None) -> str:
    return _MISSING if value is None else f"{100 * value:.1f}"


def _score(value: float | None) -> str:
    return _MISSING if value is None else f"{value:.3f}"


def _metric_cell(evaluation: Evaluation, key: str, unit: str) -> dict[str, str]:
    fmt = _rate if unit == "%" else _score
    interval = evaluation.interval(key)
    return {
        "value": fmt(evaluation.metric(key)),
        "interval": f"{fmt(interval[0])}-{fmt(interval[1])}" if interval else "",
    }


def _count(value: float | None) -> str:
    if value is None:
        return _MISSING
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e4:
        return f"{value / 1e3:.1f} k"
    return f"{value:,.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return _MISSING
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _speed(value: float | None) -> str:
    if value is None:
        return _MISSING
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _member_names(members: Any) -> list[str]:
    return [PurePath(str(m)).name or str(m) for m in members] if isinstance(members, list) else []


def describe_weights(source: str | None, *, ensemble: dict[str, Any] | None = None) -> str:
    """Say in words what a backbone started from.

    Args:
        source: ``env.json``'s ``weights_source``: ``imagenet:<source>``, ``random``, ``file:<path>`` or None.
        ensemble: ``env.json``'s ``ensemble`` entry, for an ensemble folder.

    Returns:
        A phrase for tables and model cards; ``random`` becomes `RANDOM_INIT_TEXT`, never "pretrained".
    """
    if ensemble is not None or source == "ensemble":
        names = _member_names((ensemble or {}).get("members"))
        method = (ensemble or {}).get("method")
        how = f" ({method})" if method else ""
        return f"ensemble{how} of {', '.join(names)}" if names else f"ensemble{how} of evaluated runs"
    if not source:
        return "not recorded"
    if source in ("random", "none"):
        return RANDOM_INIT_TEXT
    if source == "imagenet":
        return "ImageNet weights (source not recorded)"
    if source.startswith("imagenet:"):
        return f"ImageNet weights ({source.removeprefix('imagenet:')})"
    if source.startswith("file:"):
        return f"weights file {source.removeprefix('file:')}"
    return source


def _weights_source(run: RunFiles) -> str | None:
    source = _get(run.env, "weights_source")
    if not source:
        for evaluation in run.evaluations.values():
            source = source or _get(evaluation.metrics, "weights_source")
    if not source:
        requested = _get(run.config, "model", "weights")
        source = {"none": "random", "imagenet": "imagenet"}.get(requested) if requested else None
        if requested and source is None:
            source = f"file:{requested}"
    return str(source) if source else None


# ------------------------------------------------------------------------------------------------------- context


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "run"
    slug, index = base, 2
    while slug in taken:
        slug, index = f"{base}-{index}", index + 1
    taken.add(slug)
    return slug


def _run_facts(run: RunFiles) -> dict[str, str]:
    """Per-run columns of the comparison table."""
    parameters = _get(run.env, "parameters") or {}
    total, trainable = finite(parameters.get("total")), finite(parameters.get("trainable"))
    train_speed = None
    if run.history is not None and "train_images_per_s" in run.history:
        speeds = run.history["train_images_per_s"].dropna()
        train_speed = float(np.median(speeds)) if len(speeds) else None
    return {
        "parameters": _count(total),
        "trainable": f"{_count(trainable)} trainable" if trainable is not None and trainable != total else "",
        "wall_time": _duration(finite(_get(run.env, "train_summary", "wall_seconds"))),
        "train_speed": _speed(train_speed),
        "trained_on": _trained_on(run),
        "weights": describe_weights(_weights_source(run), ensemble=run.ensemble),
    }


def _trained_on(run: RunFiles) -> str:
    """The machine in a few words: wall time and img/s mean little without it (a comparison may span machines)."""
    gpu, cores, processes = (_get(run.env, key) for key in ("cuda_device", "cpu_count", "world_size"))
    if gpu:
        return f"{gpu} x {processes}" if processes and processes > 1 else str(gpu)
    return f"CPU, {cores} cores" if cores else ""


def _gap(val: Evaluation | None, test: Evaluation, key: str, unit: str) -> str:
    if val is None or val.metric(key) is None or test.metric(key) is None:
        return _MISSING
    difference = val.metric(key) - test.metric(key)
    return f"{100 * difference:+.1f}" if unit == "%" else f"{difference:+.3f}"


def _row(run: RunFiles, anchor: str, split: str, tta: bool, facts: dict[str, str]) -> dict[str, Any]:
    evaluation = run.evaluation(split, tta)
    label = ("test" if split == "test" else "validation") + (" + TTA" if tta else "")
    row: dict[str, Any] = {
        "run": run.name,
        "anchor": anchor,
        "split": split,
        "tta": tta,
        "evaluation": label,
        "chosen": run.chosen_tta is not None and run.chosen_tta == tta and evaluation is not None,
        "evaluated": evaluation is not None and evaluation.metrics is not None,
        "missing": "not evaluated" if evaluation is None else "no metrics file (predictions only)",
        **facts,
    }
    if not row["evaluated"]:
        return row
    temperature = evaluation.metric("temperature")
    row.update(
        n=_count(evaluation.metric("n")),
        cells=[_metric_cell(evaluation, key, unit) for key, _, unit in METRIC_COLUMNS],
        gap_accuracy=_gap(run.evaluation("val", tta), evaluation, "accuracy", "%") if split == "test" else "",
        gap_auc=_gap(run.evaluation("val", tta), evaluation, "roc_auc", "") if split == "test" else "",
        threshold=_score(evaluation.metric("threshold")),
        threshold_method=str(evaluation.metrics.get("threshold_method") or "how chosen: not recorded"),
        temperature="none" if temperature is None else f"{temperature:.2f}",
        inference_speed=_speed(evaluation.metric("inference_images_per_s")),
    )
    return row


def _comparison(runs: list[tuple[RunFiles, str]]) -> list[dict[str, Any]]:
    """Row sets of the comparison table: test first, then validation; TTA rows where any run has TTA metrics."""
    facts = {anchor: _run_facts(run) for run, anchor in runs}
    row_sets = []
    for split, name, note in (
        ("test", "Test", "official test/ images: evaluated once per configuration, every configuration shown"),
        ("val", "Validation", "carved from train/ by patient and used for all selection: easier than test"),
    ):
        variants = [False] + ([True] if any(r.evaluation(split, True) for r, _ in runs) else [])
        rows = [_row(run, anchor, split, tta, facts[anchor]) for run, anchor in runs for tta in variants]
        row_sets.append({"split": split, "name": name, "note": note, "rows": rows})
    return row_sets


def _errors(evaluation: Evaluation, worst: int = 5) -> dict[str, Any] | None:
    """False positives / negatives on one evaluated variant, recall by pneumonia kind, the most confident errors."""
    table = evaluation.predictions
    if table is None:
        return None
    y, pred, p = table["label"].to_numpy(), table["prediction"].to_numpy(), table["probability"].to_numpy()
    names = [PurePath(path).name for path in table["path"]]

    def examples(mask: np.ndarray, descending: bool) -> list[dict[str, str]]:
        index = np.flatnonzero(mask)
        index = index[np.argsort(-p[index] if descending else p[index], kind="stable")][:worst]
        return [{"name": names[i], "path": str(table["path"].iloc[i]), "probability": f"{p[i]:.3f}"} for i in index]

    # the dataset's own file-name rules (patient, kind), as the split and the overlap analysis read them
    parsed = [parse_name(n, CLASSES[int(label)]).kind for n, label in zip(names, y, strict=True)]
    kinds = np.array([kind if kind in _KIND_NAMES else "" for kind in parsed])
    groups = []
    if (kinds[y == 1] != "").any():
        normal = y == 0
        if normal.any():
            groups.append(("NORMAL", "specificity", normal, pred == 0))
        for kind in ("bacteria", "virus", ""):
            mask = (y == 1) & (kinds == kind)
            if mask.any():
                groups.append((_KIND_NAMES.get(kind, "pneumonia, kind not in the name"), "recall", mask, pred == 1))
    by_kind = [
        {
            "group": group,
            "measure": measure,
            "n": f"{int(mask.sum()):,}",
            "correct": f"{int((mask & right).sum()):,}",
            "rate": _rate(float((mask & right).sum() / mask.sum())),
        }
        for group, measure, mask, right in groups
    ]
    return {
        "label": evaluation.label,
        "n": f"{len(y):,}",
        "n_normal": f"{int((y == 0).sum()):,}",
        "n_pneumonia": f"{int((y == 1).sum()):,}",
        "false_positives": f"{int(((y == 0) & (pred == 1)).sum()):,}",
        "false_negatives": f"{int(((y == 1) & (pred == 0)).sum()):,}",
        "by_kind": by_kind,
        "worst_false_positives": examples((y == 0) & (pred == 1), descending=True),
        "worst_false_negatives": examples((y == 1) & (pred == 0), descending=False),
    }


def _calibration(evaluation: Evaluation, validation: Evaluation | None) -> dict[str, Any]:
    """ECE and Brier score of the used test variant before and after temperature scaling, formatted."""
    found = calibration_before_after(evaluation, validation)
    rows = []
    if found["before"] is not None:
        if found["fitted_here"]:
            before, fitted = "as saved (not temperature-scaled)", "fitted here on validation; the model does not use it"
        else:
            before, fitted = "before temperature scaling (T = 1)", "fitted on validation"
        rows.append((before, found["before"]))
        rows.append((f"after temperature scaling (T = {found['temperature']:.2f}, {fitted})", found["after"]))
    else:
        rows.append(("as saved", found["after"]))
    return {
        "label": found["label"],
        "rows": [{"name": name, "ece": _score(v["ece"]), "brier": _score(v["brier"])} for name, v in rows],
        "note": found["note"],
    }


def _overlap(run: RunFiles, evaluation: Evaluation, hashes: FileHashes) -> dict[str, Any]:
    """The used test variant's metrics with and without shared patients and exact duplicates, formatted."""
    found = overlap_removed(run, evaluation, hashes)
    block: dict[str, Any] = {
        "label": found["label"],
        "threshold": _score(found["threshold"]),
        "note": found["note"],
        "facts": [],
        "rows": [],
    }
    if found["note"]:
        return block
    n = found["n"]
    source = "the members' split.csv" if found["members_split"] else "split.csv"
    if found["shared_images"]:
        block["facts"].append(
            f"Patient overlap: {found['shared_images']:,} of the {n:,} test images belong to "
            f"{found['shared_patients']:,} patient ids (from the file names) that also name train/validation images "
            f"of {source}."
        )
    else:
        block["facts"].append(
            f"Patient overlap: none of the {n:,} test images has a patient id (from its file name) that names a "
            f"train/validation image of {source}."
        )
    facts = found["duplicates_facts"]
    if found["duplicates"] is None:
        block["facts"].append(f"Exact duplicates not checked: {facts['note']}.")
    else:
        where = f"under {facts['root']}" if facts.get("root") else "as split.csv records them"
        hashed = (
            f"SHA-256 of {facts['n_test_hashed']:,} test and {facts['n_train_hashed']:,} train/validation files {where}"
        )
        if found["duplicates"]:
            block["facts"].append(
                f"Exact duplicates: {found['duplicates']:,} test images are byte-identical to a train/validation "
                f"image, {found['duplicates_only']:,} of them not already removed by patient ({hashed})."
            )
        else:
            block["facts"].append(
                f"Exact duplicates: no test image is byte-identical to a train/validation image ({hashed})."
            )
    for row in found["rows"]:
        metrics = row["metrics"]
        scored = Evaluation("test", evaluation.tta, metrics) if metrics is not None else None
        block["rows"].append(
            {
                "name": row["name"],
                "n": f"{row['n']:,}",
                "removed": f"{row['removed']:,}",
                "cells": [
                    _metric_cell(scored, key, next(u for k, _, u in METRIC_COLUMNS if k == key))
                    for key in OVERLAP_METRICS
                ]
                if scored is not None
                else [],
                "why": row["why"] or "",
            }
        )
    return block


def _training_facts(run: RunFiles, weights: str) -> list[tuple[str, str]]:
    if run.ensemble is not None:
        ensemble = run.ensemble
        weights_list = ensemble.get("weights")
        return [
            ("Kind", "ensemble of evaluated runs (no training of its own)"),
            ("Method", str(ensemble.get("method") or "not recorded")),
            ("Members", ", ".join(_member_names(ensemble.get("members"))) or "not recorded"),
            (
                "Member weights",
                ", ".join(f"{w:.3g}" if finite(w) is not None else str(w) for w in weights_list)
                if isinstance(weights_list, list)
                else "not recorded",
            ),
            ("Fitted on", "the members' validation predictions"),
        ]
    config = run.config
    if config is None:
        return [("Initial weights", weights), ("Training settings", "not recorded (no config.yaml)")]

    def setting(*keys: str) -> str:
        value = _get(config, *keys)
        return _MISSING if value is None else str(value)

    epochs_run = len(run.history) if run.history is not None else None
    epochs = f"{setting('epochs')} planned"
    if epochs_run is not None:
        epochs += f", {epochs_run} run"
    if run.best_epoch is not None:
        epochs += f", best epoch {run.best_epoch} (selected on {setting('select_metric')})"
    head = _get(config, "model", "head")
    facts = [
        ("Architecture", setting("model", "name") + (f" ({head} head)" if head else "")),
        ("Initial weights", weights),
        ("Strategy", f"{setting('strategy')} (freeze: {setting('freeze')})"),
        ("Epochs", epochs),
        ("Image size", f"{setting('image_size')} px"),
        ("Augmentation preset", setting("augment", "preset")),
        (
            "Optimiser",
            f"{setting('optim', 'optimizer')}, lr {setting('optim', 'lr')}, weight decay "
            f"{setting('optim', 'weight_decay')}, batch size {setting('batch_size')}",
        ),
        ("Loss", f"cross-entropy, class weights {setting('loss', 'class_weights')}"),
        ("Precision", str(_get(run.env, "precision") or setting("precision"))),
    ]
    fraction = finite(_get(config, "data", "val_fraction"))
    if fraction is not None:
        facts.append(
            (
                "Validation split",
                f"{100 * fraction:.0f} % of train/, grouped by patient (seed {setting('data', 'split_seed')})",
            )
        )
    return facts


def _card_metrics(run: RunFiles) -> list[dict[str, Any]]:
    blocks = []
    for tta in (False, True):
        evaluation = run.evaluation("test", tta)
        if evaluation is None or evaluation.metrics is None:
            continue
        items = []
        for key in CARD_METRICS:
            unit = next(u for k, _, u in METRIC_COLUMNS if k == key)
            header = next(h for k, h, _ in METRIC_COLUMNS if k == key)
            cell = _metric_cell(evaluation, key, unit)
            suffix = " %" if unit == "%" and cell["value"] != _MISSING else ""
            interval = f" (95 % CI {cell['interval']})" if cell["interval"] else ""
            items.append((header, f"{cell['value']}{suffix}{interval}"))
        temperature = evaluation.metric("temperature")
        method = evaluation.metrics.get("threshold_method") or "how chosen: not recorded"
        items.append(("Threshold", f"{_score(evaluation.metric('threshold'))}, {method}"))
        items.append(("Temperature", "none" if temperature is None else f"{temperature:.2f}"))
        items.append(
            ("Images", f"{_count(evaluation.metric('n'))} ({_count(evaluation.metric('n_positive'))} PNEUMONIA)")
        )
        blocks.append({"label": evaluation.label, "chosen": run.chosen_tta == tta, "facts": items})
    return blocks


def _limitations(run: RunFiles, weights: str) -> list[str]:
    gap = ""
    for tta in (False, True):
        val, test = run.evaluation("val", tta), run.evaluation("test", tta)
        if val and test and val.metric("roc_auc") is not None and test.metric("roc_auc") is not None:
            gap = (
                f" For this model{' with TTA' if tta else ''}: validation ROC-AUC {val.metric('roc_auc'):.3f} vs "
                f"test {test.metric('roc_auc'):.3f}"
            )
            if val.metric("accuracy") is not None and test.metric("accuracy") is not None:
                gap += f", accuracy {_rate(val.metric('accuracy'))} % vs {_rate(test.metric('accuracy'))} %"
            gap += "."
            break
    items = [
        "Single-centre pediatric data (one hospital, ages 1-5): performance on adults, other hospitals, scanners, "
        "image processing or populations is unknown.",
        "Label noise: labels are physicians' gradings of the images, not confirmed diagnoses; some are wrong or "
        "debatable, which also limits what any metric here can show.",
        "Frontal views only: no lateral views and no clinical context (symptoms, history, laboratory results); "
        "bacterial and viral pneumonia are not told apart.",
        "Distribution shift: a different device, exposure, resolution, compression or patient mix can change the "
        "predictions without any warning; the release also holds exact duplicate images.",
        "The validation set is easier than test: it is carved from train/, and scores near 1.0 there say little "
        "about test." + gap,
    ]
    if weights == RANDOM_INIT_TEXT:
        items.append(
            "Trained from random initialisation, not from ImageNet weights: on about 5,000 images such models usually "
            "generalise worse than ImageNet-initialised ones."
        )
    if run.gate_facts is None:
        items.append(
            "No input gate: this model labels anything that decodes (a photo, a CT slice); serve it only behind a "
            "check that the input is a frontal chest X-ray."
        )
    else:
        items.append(
            "The input gate refuses what is unlike the training films, measured on pictures, other modalities and "
            "altered test films; it was never measured on adult films, other hospitals' films or other X-ray body "
            "parts, and it is no proof that an answered image is a chest X-ray. The referral band was fit on "
            "validation, which is easier than test; see the section Input gate and referral for how it held."
        )
    temperature = None
    for evaluation in run.evaluations.values():
        temperature = temperature or evaluation.metric("temperature")
    if temperature is not None:
        items.append(
            f"Probabilities are temperature-scaled on validation (T = {temperature:.2f}); they are not calibrated "
            "for other populations."
        )
    return items


def _machine(run: RunFiles) -> list[tuple[str, str]]:
    env = run.env
    if env is None:
        return [("Machine", "not recorded (no env.json)")]
    facts = []
    for label, keys in (
        ("CPU", ("cpu",)),
        ("CPU cores", ("cpu_count",)),
        ("GPU", ("cuda_device",)),
        ("Precision", ("precision",)),
        ("Processes", ("world_size",)),
        ("Python", ("python",)),
        ("PyTorch", ("packages", "torch")),
        ("Git commit", ("git_sha",)),
    ):
        value = _get(env, *keys)
        if label == "GPU" and value is None and "cpu" in env:
            value = "none (CPU only)"
        if value is not None:
            facts.append((label, str(value)[:12] if label == "Git commit" else str(value)))
    return facts or [("Machine", "not recorded in env.json")]


_PLOT_TITLES = {
    "history": ("Training history", "Loss, accuracy and ROC-AUC per epoch; the dotted line marks the selected epoch."),
    "confusion": ("Confusion matrix", "Counts and shares of each true class at the chosen threshold."),
    "roc_pr": ("ROC and precision-recall", "The dot is the operating point at the chosen threshold."),
    "reliability": (
        "Calibration",
        "Observed PNEUMONIA share per probability bin, and how probabilities spread; where logits were saved, the "
        "dashed grey curve is before temperature scaling (T = 1).",
    ),
}


def _plot_entry(run: RunFiles, slug: str, key: str, path: Path, title: str, caption: str) -> dict[str, str]:
    """A written plot as the templates show it: its Markdown link and its HTML data URI."""
    return {
        "key": key,
        "title": title,
        "caption": caption,
        "alt": f"{run.name}: {title}",
        "file": f"images/{slug}/{path.name}",
        "data_uri": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii"),
    }


def _plots(run: RunFiles, slug: str, written: dict[str, Path]) -> list[dict[str, str]]:
    # plain and TTA side by side, kind by kind, so the two variants can be compared at a glance
    order = ["history"] + [
        f"{kind}_test{variant}" for kind in ("confusion", "roc_pr", "reliability") for variant in ("", "_tta")
    ]
    plots = []
    shown = [key for key in written if key not in GATING_PLOTS]
    for key in sorted(shown, key=lambda k: order.index(k) if k in order else len(order)):
        kind, _, variant = key.partition("_test")
        title, caption = _PLOT_TITLES.get(kind, (key, ""))
        if key != "history":
            title += " (test + TTA)" if variant == "_tta" else " (test)"
        plots.append(_plot_entry(run, slug, key, written[key], title, caption))
    return plots


# ---------------------------------------------------------------------------------------- input gate and referral

_GATING_CAPTIONS = {
    "gate_scores": (
        "Input gate scores",
        "Share of each group's images per bin of the gate's score (higher: less like the training films); the dashed "
        "line is the limit, set on validation: above it an image is refused. DICOM files refused by their metadata "
        "have no score and are not drawn.",
    ),
    "risk_coverage": (
        "Risk-coverage",
        "The films the gate let through, most confident first (largest |p - threshold|): accuracy of the answered "
        "films against the share of all films answered; each curve ends at the share the gate passes. Diamonds: the "
        "fitted referral band (from metrics/selective.json); its edges need not lie symmetrically about the "
        "threshold, so a diamond can sit off its curve.",
    ),
}


def _alpha(value: float) -> str:
    return f"{100 * value:g} %"


def _share_count(share: float | None, n: int | None) -> str:
    """``3.4 % (8 of 234)``: a share of a class's films, with the count it stands for."""
    if share is None:
        return _MISSING
    count = f" ({round(share * n):,} of {n:,})" if n else ""
    return f"{_rate(share)} %{count}"


def _gate_facts(gate: dict[str, Any]) -> list[tuple[str, str]]:
    facts = [("Score", str(gate.get("score") or "not recorded"))]
    layers = gate.get("layers")
    if isinstance(layers, list) and layers:
        facts.append(("Layers", ", ".join(str(layer) for layer in layers)))
    facts.append(("Fit on", str(gate.get("fit_on") or "not recorded")))
    limit = finite(gate.get("limit"))
    facts.append(("Limit", f"{limit:.3f} (refused above)" if limit is not None else "not recorded"))
    return facts  # where the limit was set is said in words beside the refusals


def _band_facts(referral: dict[str, Any]) -> list[tuple[str, str]]:
    """The band's facts, without its nominal level: that is shown only beside the realised shares (per class)."""
    facts = [("Method", str(referral.get("method") or "not recorded"))]
    facts.append(("Fit on", str(referral.get("fit_on") or "not recorded")))
    threshold = finite(referral.get("threshold"))
    if threshold is not None:
        facts.append(("Threshold", f"{threshold:.3f} (the model's)"))
    band = referral.get("band")
    if isinstance(band, list) and len(band) == 2 and all(finite(v) is not None for v in band):
        facts.append(("Referred", f"P(PNEUMONIA) from {float(band[0]):.3f} to {float(band[1]):.3f}"))
    return facts


def _refusal_groups(groups: list[dict[str, Any]]) -> list[dict[str, str]]:
    rows = []
    for group in groups:
        name = group["group"]
        description = GATE_GROUPS.get(name, (name, ""))[1]
        rows.append(
            {
                "group": name,
                "description": description,
                "n": _MISSING if group["n"] is None else f"{group['n']:,}",
                "refused": _MISSING if group["refused"] is None else f"{group['refused']:,}",
                "share": _rate(group["share"]),
            }
        )
    return rows


def _guarantee(alpha: float | None, test: dict[str, Any] | None) -> tuple[str | None, bool]:
    """The sentence on the band's per-class guarantee on test (None without test figures), and whether it fails."""
    if alpha is None or test is None:
        return None, False
    per_class = test.get("per_class") or {}
    realised = [
        (name, finite((per_class.get(name) or {}).get("wrong_answered")), (per_class.get(name) or {}).get("n"))
        for name in ("NORMAL", "PNEUMONIA")
    ]
    realised = [(name, share, n) for name, share, n in realised if share is not None]
    if not realised:
        return None, False
    above = [(name, share, n) for name, share, n in realised if share > alpha]
    if above:
        shares = " and ".join(f"{name} {_share_count(share, n)}" for name, share, n in above)
        return (
            f"On test the guarantee fails under the validation-test shift: {shares} of the films were answered "
            f"wrongly, more than the nominal {_alpha(alpha)} per class that the band was fit for on validation. The "
            "bound holds only for films exchangeable with validation, and the test films are not.",
            True,
        )
    shares = " and ".join(f"{name} {_share_count(share, n)}" for name, share, n in realised)
    return (
        f"On test the realised shares of films answered wrongly, {shares}, stay within the nominal {_alpha(alpha)} "
        "per class; the bound itself is promised only for films exchangeable with validation, which the test films "
        "are not.",
        False,
    )


def _selective_rows(summaries: dict[str, dict[str, Any]], alpha: float | None) -> tuple[list, list]:
    """(one row per split: films, refused, referred, answered, accuracies; one row per split and class)."""
    splits, classes = [], []
    for split, summary in summaries.items():
        name = SPLIT_NAMES.get(split, split)
        n = summary.get("n")
        splits.append(
            {
                "split": name,
                "n": _count(finite(n)),
                "refused": _count(finite(summary.get("refused"))),
                "referred": _count(finite(summary.get("referred"))),
                "answered": _count(finite(summary.get("answered"))),
                "coverage": _rate(finite(summary.get("coverage"))),
                "accuracy_answered": _rate(finite(summary.get("accuracy_answered"))),
                "accuracy_all": _rate(finite(summary.get("accuracy_all"))),
            }
        )
        for label, facts in (summary.get("per_class") or {}).items():
            facts = facts or {}
            wrong, total = finite(facts.get("wrong_answered")), facts.get("n")
            total = int(total) if finite(total) is not None else None
            above = alpha is not None and wrong is not None and wrong > alpha
            classes.append(
                {
                    "split": name,
                    "class": str(label),
                    "n": _count(total),
                    "answered": _share_count(finite(facts.get("answered")), total),
                    "wrong_answered": _share_count(wrong, total),
                    "alpha": _MISSING if alpha is None else _alpha(alpha),
                    "verdict": _MISSING if wrong is None or alpha is None else ("above" if above else "within"),
                    "above": above,
                }
            )
    return splits, classes


def _gating(run: RunFiles, slug: str, written: dict[str, Path]) -> dict[str, Any] | None:
    """The "Input gate and referral" part of a run, formatted; None for a run without a gate (an ensemble)."""
    found = gating_analysis(run)
    if found is None:
        return None
    gate, referral = found["gate"], found["referral"]
    alpha = finite((referral or {}).get("alpha"))
    groups = {g["group"]: g for g in found["groups"]}
    statement = None
    if gate is not None or "test" in groups:
        limit_set_on = (gate or {}).get("limit_set_on") or "validation (how: not recorded)"
        statement = f"The limit was set on {limit_set_on}; nothing of the gate was fit on test."
        test = groups.get("test")
        if test is not None:
            of = f" of the {test['n']:,}" if test["n"] is not None else " of the"
            statement += (
                f" The gate refused {_rate(test['share'])} %{of} test films: they are real chest X-rays, so this is a "
                "false-refusal rate, reported here, not fit."
            )
    splits, classes = _selective_rows(found["summaries"], alpha)
    guarantee, fails = _guarantee(alpha, found["summaries"].get("test"))
    plots = {
        key: _plot_entry(run, slug, key, written[key], *_GATING_CAPTIONS[key]) if key in written else None
        for key in GATING_PLOTS
    }
    return {
        "gate_facts": _gate_facts(gate) if gate is not None else [],
        "statement": statement,
        "groups": _refusal_groups(found["groups"]),
        "band_facts": _band_facts(referral) if referral is not None else [],
        "splits": splits,
        "classes": classes,
        "guarantee": guarantee,
        "guarantee_fails": fails,
        "gate_plot": plots["gate_scores"],
        "risk_plot": plots["risk_coverage"],
        "notes": found["notes"],
    }


def _run_section(run: RunFiles, slug: str, images: Path, hashes: FileHashes) -> dict[str, Any]:
    weights = describe_weights(_weights_source(run), ensemble=run.ensemble)
    errors = [e for tta in (False, True) if (ev := run.evaluation("test", tta)) and (e := _errors(ev))]
    used = used_test_evaluation(run)
    written = _plot_run_files(run, images / slug, splits=("test",))
    return {
        "name": run.name,
        "anchor": slug,
        "path": str(run.path),
        "kind": "ensemble" if run.ensemble is not None else "trained model",
        "machine": _machine(run),
        "plots": _plots(run, slug, written),
        "errors": errors,
        "calibration": _calibration(used, run.evaluation("val", used.tta)) if used is not None else None,
        "overlap": _overlap(run, used, hashes) if used is not None else None,
        "gating": _gating(run, slug, written),
        "evaluated_test": run.evaluation("test") is not None or run.evaluation("test", True) is not None,
        "card": {
            "intended_use": INTENDED_USE,
            "data": DATA_FACTS,
            "training": _training_facts(run, weights),
            "metrics": _card_metrics(run),
            "limitations": _limitations(run, weights),
        },
    }


# ------------------------------------------------------------------------------------------------------ rendering


def _template_source(name: str) -> str:
    return resources.files("pneumolab.report").joinpath("templates", name).read_text(encoding="utf-8")


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#])")


def _markdown_escape(value: Any) -> str:
    """Escape text for a Markdown table cell or paragraph: Markdown syntax, HTML and line breaks."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def _environment(html: bool) -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FunctionLoader(_template_source),
        autoescape=html,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["md"] = _markdown_escape
    return environment


def build_report(
    runs: list[str | os.PathLike[str]], out: str | os.PathLike[str], *, title: str = "pneumolab report"
) -> dict[str, Path]:
    """Write the comparison report of some run folders: ``report.html``, ``report.md`` and ``images/``.

    The HTML page is self-contained (images as base64 data URIs, inline CSS, no script, no external request);
    the Markdown twin shows the same content with the images as files under ``out/images/``. Both are written
    atomically; ``out/images/`` is replaced as a whole.

    Args:
        runs: training run and ensemble folders, in the order they should appear.
        out: output folder (created).
        title: the report's title.

    Returns:
        ``{"html": report.html, "markdown": report.md, "images": images folder}``.

    Raises:
        PneumolabError: no runs, a folder that is not a run folder, or an unreadable run file.
    """
    if not runs:
        raise PneumolabError("no run folders to report on")
    out = Path(out)
    taken: set[str] = set()
    loaded = [(run, _slug(run.name, taken)) for run in (read_run(path) for path in runs)]
    hashes = FileHashes()  # runs of one dataset share their image files: each is hashed once
    with atomic_dir(out / "images") as images:
        sections = [_run_section(run, slug, images, hashes) for run, slug in loaded]
    context = {
        "title": title,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
        "metric_columns": [{"key": k, "header": h, "unit": u} for k, h, u in METRIC_COLUMNS],
        "row_sets": _comparison(loaded),
        "references": REFERENCES,
        "overlap_columns": [
            {"header": h, "unit": u} for key in OVERLAP_METRICS for k, h, u in METRIC_COLUMNS if k == key
        ],
        "runs": sections,
        "random_init_text": RANDOM_INIT_TEXT,
    }
    html = _environment(html=True).get_template("report.html.j2").render(context)
    markdown = _environment(html=False).get_template("report.md.j2").render(context)
    return {
        "html": write_text_atomic(out / "report.html", html),
        "markdown": write_text_atomic(out / "report.md", markdown),
        "images": out / "images",
    }
