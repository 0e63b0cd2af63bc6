"""The comparison table and each run's analyses as the templates show them: errors by kind, calibration, test
results without overlapping images, plots.

A K-class run's row of the comparison table shows its pneumonia-vs-normal view in the binary columns
(P(PNEUMONIA) = P(BACTERIAL) + P(VIRAL), at that view's validation threshold), and so do its calibration and overlap
blocks; its own K-class parts are `pneumolab.report.multiclass`'s.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from pneumolab.constants import CLASSES
from pneumolab.data.dataset import parse_name
from pneumolab.report._analyses import (
    FileHashes,
    calibration_before_after,
    overlap_removed,
)
from pneumolab.report._format import (
    GATING_PLOTS,
    METRIC_COLUMNS,
    MISSING,
    MULTICLASS_PLOTS,
    OVERLAP_METRICS,
    as_count,
    as_duration,
    as_percent,
    as_score,
    as_speed,
    metric_cell,
    nested_get,
    pneumonia_sum,
)
from pneumolab.report._runfiles import Evaluation, RunFiles, finite
from pneumolab.report.cards import describe_weights, threshold_rule, weights_source_of

KIND_NAMES = {"bacteria": "bacterial pneumonia", "virus": "viral pneumonia"}


def unique_slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "run"
    slug, index = base, 2
    while slug in taken:
        slug, index = f"{base}-{index}", index + 1
    taken.add(slug)
    return slug


def run_facts(run: RunFiles) -> dict[str, str]:
    """Per-run columns of the comparison table."""
    parameters = nested_get(run.env, "parameters") or {}
    total, trainable = finite(parameters.get("total")), finite(parameters.get("trainable"))
    train_speed = None
    if run.history is not None and "train_images_per_s" in run.history:
        speeds = run.history["train_images_per_s"].dropna()
        train_speed = float(np.median(speeds)) if len(speeds) else None
    return {
        "parameters": as_count(total),
        "trainable": f"{as_count(trainable)} trainable" if trainable is not None and trainable != total else "",
        "wall_time": as_duration(finite(nested_get(run.env, "train_summary", "wall_seconds"))),
        "train_speed": as_speed(train_speed),
        "trained_on": trained_on(run),
        "weights": describe_weights(weights_source_of(run), ensemble=run.ensemble),
    }


def trained_on(run: RunFiles) -> str:
    """The machine in a few words: wall time and img/s mean little without it (a comparison may span machines)."""
    gpu, cores, processes = (nested_get(run.env, key) for key in ("cuda_device", "cpu_count", "world_size"))
    if gpu:
        return f"{gpu} x {processes}" if processes and processes > 1 else str(gpu)
    return f"CPU, {cores} cores" if cores else ""


def val_test_gap(val: Evaluation | None, test: Evaluation, key: str, unit: str) -> str:
    if val is None or val.metric(key) is None or test.metric(key) is None:
        return MISSING
    difference = val.metric(key) - test.metric(key)
    return f"{100 * difference:+.1f}" if unit == "%" else f"{difference:+.3f}"


def pneumonia_view_text(classes: tuple[str, ...]) -> str:
    """What the binary columns of a K-class row are: ``pneumonia vs normal: P(BACTERIAL) + P(VIRAL)``."""
    return f"pneumonia vs normal: {pneumonia_sum(classes)}"


def comparison_row(run: RunFiles, anchor: str, split: str, tta: bool, facts: dict[str, str]) -> dict[str, Any]:
    """One row of the comparison table; a K-class variant's binary columns are its pneumonia-vs-normal view's."""
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
        "view": "",
        **facts,
    }
    if not row["evaluated"]:
        return row
    val = run.evaluation("val", tta)
    method = str(evaluation.metrics.get("threshold_method") or "how chosen: not recorded")
    if evaluation.is_multiclass:
        row["view"] = pneumonia_view_text(evaluation.classes)
        method = f"{threshold_rule(run)}, for this view; the model itself decides by {method}"
        evaluation = evaluation.pneumonia_view or Evaluation(split, tta, {})
        val = val.pneumonia_view if val is not None and val.is_multiclass else None
    temperature = evaluation.metric("temperature")
    row.update(
        n=as_count(evaluation.metric("n")),
        cells=[metric_cell(evaluation, key, unit) for key, _, unit in METRIC_COLUMNS],
        gap_accuracy=val_test_gap(val, evaluation, "accuracy", "%") if split == "test" else "",
        gap_auc=val_test_gap(val, evaluation, "roc_auc", "") if split == "test" else "",
        threshold=as_score(evaluation.metric("threshold")),
        threshold_method=method,
        temperature="none" if temperature is None else f"{temperature:.2f}",
        inference_speed=as_speed(evaluation.metric("inference_images_per_s")),
    )
    return row


def comparison_rows(runs: list[tuple[RunFiles, str]]) -> list[dict[str, Any]]:
    """Row sets of the comparison table: test first, then validation; TTA rows where any run has TTA metrics."""
    facts = {anchor: run_facts(run) for run, anchor in runs}
    row_sets = []
    for split, name, note in (
        ("test", "Test", "official test/ images: evaluated once per configuration, every configuration shown"),
        ("val", "Validation", "carved from train/ by patient and used for all selection: easier than test"),
    ):
        variants = [False] + ([True] if any(r.evaluation(split, True) for r, _ in runs) else [])
        rows = [comparison_row(run, anchor, split, tta, facts[anchor]) for run, anchor in runs for tta in variants]
        row_sets.append({"split": split, "name": name, "note": note, "rows": rows})
    return row_sets


def error_analysis(evaluation: Evaluation, worst: int = 5) -> dict[str, Any] | None:
    """False positives / negatives on one evaluated variant, recall by pneumonia kind, the most confident errors.

    None without predictions, and for a K-class evaluation: its per-class errors are
    `pneumolab.report.multiclass.class_errors`.
    """
    table = evaluation.predictions
    if table is None or evaluation.is_multiclass:
        return None
    y, pred, p = table["label"].to_numpy(), table["prediction"].to_numpy(), table["probability"].to_numpy()
    names = [PurePath(path).name for path in table["path"]]

    def examples(mask: np.ndarray, descending: bool) -> list[dict[str, str]]:
        index = np.flatnonzero(mask)
        index = index[np.argsort(-p[index] if descending else p[index], kind="stable")][:worst]
        return [{"name": names[i], "path": str(table["path"].iloc[i]), "probability": f"{p[i]:.3f}"} for i in index]

    # the dataset's own file-name rules (patient, kind), as the split and the overlap analysis read them
    parsed = [parse_name(n, CLASSES[int(label)]).kind for n, label in zip(names, y, strict=True)]
    kinds = np.array([kind if kind in KIND_NAMES else "" for kind in parsed])
    groups = []
    if (kinds[y == 1] != "").any():
        normal = y == 0
        if normal.any():
            groups.append(("NORMAL", "specificity", normal, pred == 0))
        for kind in ("bacteria", "virus", ""):
            mask = (y == 1) & (kinds == kind)
            if mask.any():
                groups.append((KIND_NAMES.get(kind, "pneumonia, kind not in the name"), "recall", mask, pred == 1))
    by_kind = [
        {
            "group": group,
            "measure": measure,
            "n": f"{int(mask.sum()):,}",
            "correct": f"{int((mask & right).sum()):,}",
            "rate": as_percent(float((mask & right).sum() / mask.sum())),
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


def calibration_block(
    evaluation: Evaluation, temperature_if_scaled: float | None, *, class_bias: bool = False
) -> dict[str, Any]:
    """ECE and Brier score of the used test variant before and after temperature scaling, formatted.

    A K-class variant is measured on its pneumonia-vs-normal view (``view`` says so), `class_bias` saying whether
    its probabilities also carry a class bias; ``skipped`` says why nothing is shown (no such view).
    """
    found = calibration_before_after(evaluation, temperature_if_scaled)
    view = f"on the pneumonia-vs-normal view, {pneumonia_sum(evaluation.classes)}" if found["view"] else None
    if found["skipped"]:
        return {"label": found["label"], "rows": [], "note": None, "view": view, "skipped": found["skipped"]}
    scaling = "temperature scaling and class bias" if class_bias else "temperature scaling"
    rows = []
    if found["before"] is not None:
        if found["fitted_apart"]:
            before, fitted = "as saved (not temperature-scaled)", "fitted on validation; the model does not use it"
        else:
            before = f"before {scaling} (T = 1{', no bias' if class_bias else ''})"
            fitted = "fitted on validation"
        rows.append((before, found["before"]))
        rows.append((f"after {scaling} (T = {found['temperature']:.2f}, {fitted})", found["after"]))
    else:
        rows.append(("as saved", found["after"]))
    return {
        "label": found["label"],
        "rows": [{"name": name, "ece": as_score(v["ece"]), "brier": as_score(v["brier"])} for name, v in rows],
        "note": found["note"],
        "view": view,
        "skipped": None,
    }


def overlap_block(run: RunFiles, evaluation: Evaluation, hashes: FileHashes) -> dict[str, Any]:
    """The used test variant's metrics with and without shared patients and exact duplicates, formatted."""
    found = overlap_removed(run, evaluation, hashes)
    block: dict[str, Any] = {
        "label": found["label"],
        "threshold": as_score(found["threshold"]),
        "note": found["note"],
        "facts": [],
        "rows": [],
        "view": (
            f"the pneumonia-vs-normal view, {pneumonia_sum(evaluation.classes)}, at that view's threshold fit on "
            "validation"
        )
        if found["view"]
        else None,
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
                    metric_cell(scored, key, next(u for k, _, u in METRIC_COLUMNS if k == key))
                    for key in OVERLAP_METRICS
                ]
                if scored is not None
                else [],
                "why": row["why"] or "",
            }
        )
    return block


PLOT_TITLES = {
    "history": ("Training history", "Loss, accuracy and ROC-AUC per epoch; the dotted line marks the selected epoch."),
    "confusion": ("Confusion matrix", "Counts and shares of each true class at the chosen threshold."),
    "roc_pr": ("ROC and precision-recall", "The dot is the operating point at the chosen threshold."),
    "reliability": (
        "Calibration",
        "Observed PNEUMONIA share per probability bin, and how probabilities spread; where logits were saved, the "
        "dashed grey curve is before temperature scaling (T = 1).",
    ),
}


# a K-class run's reliability diagram is its pneumonia-vs-normal view's
MULTICLASS_PLOT_TITLES = {
    "reliability": (
        "Calibration, pneumonia vs normal",
        "The pneumonia-vs-normal view, P(PNEUMONIA) = 1 - P(NORMAL): observed pneumonia share per probability bin, "
        "and how probabilities spread, at the view's threshold; where logits were saved, the dashed grey curve is "
        "before temperature scaling and class bias (T = 1).",
    ),
}


def plot_kind(key: str) -> str:
    """The kind of a written plot: ``confusion`` for ``confusion_test_tta``."""
    return key.partition("_test")[0]


def plot_entry(run: RunFiles, slug: str, key: str, path: Path, title: str, caption: str) -> dict[str, str]:
    """A written plot as the templates show it: its Markdown link and its HTML data URI."""
    return {
        "key": key,
        "title": title,
        "caption": caption,
        "alt": f"{run.name}: {title}",
        "file": f"images/{slug}/{path.name}",
        "data_uri": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii"),
    }


def plot_entries(run: RunFiles, slug: str, written: dict[str, Path]) -> list[dict[str, str]]:
    # plain and TTA side by side, kind by kind, so the two variants can be compared at a glance
    order = ["history"] + [
        f"{kind}_test{variant}" for kind in ("confusion", "roc_pr", "reliability") for variant in ("", "_tta")
    ]
    plots = []
    shown = [key for key in written if key not in GATING_PLOTS]
    if run.is_multiclass:  # its confusion matrices and per-class curves are drawn in its K-class part
        shown = [key for key in shown if plot_kind(key) not in MULTICLASS_PLOTS]
    titles = {**PLOT_TITLES, **MULTICLASS_PLOT_TITLES} if run.is_multiclass else PLOT_TITLES
    for key in sorted(shown, key=lambda k: order.index(k) if k in order else len(order)):
        kind, _, variant = key.partition("_test")
        title, caption = titles.get(kind, (key, ""))
        if key != "history":
            title += " (test + TTA)" if variant == "_tta" else " (test)"
        plots.append(plot_entry(run, slug, key, written[key], title, caption))
    return plots
