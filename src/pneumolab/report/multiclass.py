"""The K-class parts of the report, for runs of a task with more than two classes (``data.task: kind``: NORMAL /
BACTERIAL / VIRAL, or ``folders``).

* `multiclass_rows`: the comparison's "Three-class (K-class) results" table: accuracy, balanced accuracy,
  macro-F1, macro ROC-AUC, log loss, Brier score and top-label ECE with their 95 % intervals, and the
  bacterial-vs-viral view (VIRAL positive) beside them; empty when no run is K-class.
* `multiclass_section`: per K-class run and test variant, its decision rule (`cards.decision_rule`), per-class
  metrics, derived binary views, and its K x K confusion matrices and one-vs-rest ROC / precision-recall curves
  (the plots `pneumolab.report.plots` wrote).
* `class_errors`: per true class, how many films were called each other class, and the most confident mistakes
  with their paths and calibrated probabilities.

Everything is read from the run's files: ``metrics/*.json`` (their ``classes``, ``ci95``, ``confusion`` and
``views``), ``predictions/*.csv`` (``p_<CLASS>`` columns) and ``operating_point.json``.
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any

import numpy as np

from pneumolab.report._format import (
    MISSING,
    MULTICLASS_COLUMNS,
    MULTICLASS_PLOTS,
    PER_CLASS_COLUMNS,
    VIEW_COLUMNS,
    as_count,
    as_percent,
    as_score,
    class_task_name,
    metric_cell,
    nested_get,
    pneumonia_sum,
)
from pneumolab.report._runfiles import KIND_VIEW, PNEUMONIA_VIEW, Evaluation, RunFiles, finite
from pneumolab.report.cards import decision_rule, threshold_rule
from pneumolab.report.sections import plot_entry

__all__ = [
    "KIND_REFERENCE",
    "class_errors",
    "multiclass_rows",
    "multiclass_section",
]

KIND_REFERENCE = ("Kermany et al., Cell 2018, bacterial vs viral", "90.7", "88.6", "90.9", "0.940")
"""Published bacterial-vs-viral figures: accuracy, sensitivity, specificity (%), ROC-AUC (docs/EVALUATION.md)."""

MULTICLASS_PLOT_CAPTIONS = {
    "confusion": (
        "Confusion matrix",
        "Rows: the true class; columns: the class called (the argmax of the calibrated probabilities); counts, and "
        "each true class's shares (row-normalised).",
    ),
    "roc_pr": (
        "Per-class ROC and precision-recall",
        "One vs the rest: each class's own calibrated probability against all other classes; AUC and average "
        "precision in the legends.",
    ),
}


def _count_text(evaluation: Evaluation) -> str:
    """``24 NORMAL, 12 BACTERIAL, 12 VIRAL``: the metrics file's ``n_per_class``, else counted from predictions."""
    per_class = nested_get(evaluation.metrics, "n_per_class") or {}
    counts = [finite(per_class.get(name)) for name in evaluation.classes]
    if any(c is None for c in counts) and evaluation.predictions is not None:
        labels = evaluation.predictions["label"].to_numpy()
        counts = [float((labels == k).sum()) for k in range(len(evaluation.classes))]
    return ", ".join(f"{as_count(c)} {name}" for c, name in zip(counts, evaluation.classes, strict=True))


def multiclass_row(run: RunFiles, anchor: str, split: str, tta: bool) -> dict[str, Any]:
    """One row of the K-class table: the K-class metrics and the bacterial-vs-viral view of one variant."""
    evaluation = run.evaluation(split, tta)
    row: dict[str, Any] = {
        "run": run.name,
        "anchor": anchor,
        "split": split,
        "tta": tta,
        "evaluation": ("test" if split == "test" else "validation") + (" + TTA" if tta else ""),
        "chosen": run.chosen_tta is not None and run.chosen_tta == tta and evaluation is not None,
        "evaluated": evaluation is not None and evaluation.metrics is not None,
        "missing": "not evaluated" if evaluation is None else "no metrics file (predictions only)",
    }
    if not row["evaluated"]:
        return row
    kind = Evaluation(split, tta, evaluation.view_metrics(KIND_VIEW) or {})
    row.update(
        n=as_count(evaluation.metric("n")),
        cells=[metric_cell(evaluation, key, unit) for key, _, unit in MULTICLASS_COLUMNS],
        kind_n=as_count(kind.metric("n")),
        kind_cells=[metric_cell(kind, key, unit) for key, _, unit in VIEW_COLUMNS],
    )
    return row


def multiclass_rows(runs: list[tuple[RunFiles, str]]) -> list[dict[str, Any]]:
    """Row sets (test, then validation) of the K-class table, for the K-class runs; empty when there is none."""
    chosen = [(run, anchor) for run, anchor in runs if run.is_multiclass]
    if not chosen:
        return []
    row_sets = []
    for split, name in (("test", "Test"), ("val", "Validation")):
        variants = [False] + ([True] if any(r.evaluation(split, True) for r, _ in chosen) else [])
        rows = [multiclass_row(run, anchor, split, tta) for run, anchor in chosen for tta in variants]
        row_sets.append({"split": split, "name": name, "rows": rows})
    return row_sets


def per_class_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Per class: its test images, precision, recall, F1, one-vs-rest ROC-AUC and average precision, intervals."""
    per_class = nested_get(evaluation.metrics, "n_per_class") or {}
    return [
        {
            "class": name,
            "n": as_count(finite(per_class.get(name))),
            "cells": [metric_cell(evaluation, f"{key}/{name}", unit) for key, _, unit in PER_CLASS_COLUMNS],
        }
        for name in evaluation.classes
    ]


def view_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """The derived binary views: what each compares, its images, metrics with intervals and validation threshold."""
    described = {
        PNEUMONIA_VIEW: f"pneumonia vs normal: {pneumonia_sum(evaluation.classes)}, PNEUMONIA positive",
        KIND_VIEW: "bacterial vs viral, the pneumonia films only: P(VIRAL) / (P(BACTERIAL) + P(VIRAL)), VIRAL positive",
    }
    rows = []
    for view, what in described.items():
        metrics = evaluation.view_metrics(view)
        if metrics is None:
            continue
        shown = Evaluation(evaluation.split, evaluation.tta, metrics)
        rows.append(
            {
                "view": what,
                "n": as_count(shown.metric("n")),
                "cells": [metric_cell(shown, key, unit) for key, _, unit in VIEW_COLUMNS],
                "threshold": as_score(shown.metric("threshold")),
            }
        )
    return rows


def class_errors(evaluation: Evaluation, worst: int = 5) -> dict[str, Any] | None:
    """Per true class of a K-class variant: the films called each other class and the most confident mistakes.

    Args:
        evaluation: a K-class evaluated variant.
        worst: how many mistakes to show per true class: those whose called class had the largest probability.

    Returns:
        ``label``, ``n``, ``counts`` (images per class), ``classes``, ``summary`` (sentences on the pneumonia-vs-normal
        mistakes), ``rows``: per true class ``{"class", "n", "correct", "recall", "called" (per class: the count
        called it, the dash on the diagonal), "examples": [{"path", "name", "called", "probabilities"}]}``; None
        without predictions or for a binary variant.
    """
    table = evaluation.predictions
    if table is None or not evaluation.is_multiclass:
        return None
    classes = evaluation.classes
    y, called = table["label"].to_numpy(), table["prediction"].to_numpy()
    probabilities = evaluation.class_probabilities()
    paths = table["path"].astype(str).tolist()
    rows = []
    for index, name in enumerate(classes):
        of_class = y == index
        wrong = np.flatnonzero(of_class & (called != index))
        confidence = probabilities[wrong, called[wrong]]
        shown = wrong[np.argsort(-confidence, kind="stable")][:worst]
        total = int(of_class.sum())
        rows.append(
            {
                "class": name,
                "n": f"{total:,}",
                "correct": f"{total - wrong.size:,}",
                "recall": as_percent((total - wrong.size) / total) if total else MISSING,
                "called": [
                    MISSING if other == index else f"{int((of_class & (called == other)).sum()):,}"
                    for other in range(len(classes))
                ],
                "examples": [
                    {
                        "path": paths[i],
                        "name": PurePath(paths[i]).name,
                        "called": classes[called[i]],
                        "probabilities": ", ".join(
                            f"{other} {probabilities[i, k]:.3f}" for k, other in enumerate(classes)
                        ),
                    }
                    for i in shown
                ],
            }
        )
    summary = []
    if classes[0] == "NORMAL":
        normal, pneumonia = y == 0, y != 0
        summary = [
            f"{int((normal & (called != 0)).sum()):,} of {int(normal.sum()):,} NORMAL films called a pneumonia class",
            f"{int((pneumonia & (called == 0)).sum()):,} of {int(pneumonia.sum()):,} pneumonia films called NORMAL",
            f"{int((pneumonia & (called != 0) & (called != y)).sum()):,} pneumonia films called the other kind"
            if len(classes) == 3
            else f"{int((pneumonia & (called != 0) & (called != y)).sum()):,} pneumonia films called another "
            "pneumonia class",
        ]
    return {
        "label": evaluation.label,
        "n": f"{len(y):,}",
        "counts": _count_text(evaluation),
        "classes": list(classes),
        "summary": summary,
        "rows": rows,
    }


def derived_thresholds_text(run: RunFiles, tta: bool) -> str | None:
    """``pneumonia vs normal 0.666, bacterial vs viral 0.486 (max balanced accuracy on validation)``, or None."""
    thresholds = (run.variant_point(tta) or {}).get("derived_thresholds")
    if not isinstance(thresholds, dict) or not thresholds:
        return None
    values = ", ".join(f"{view.replace('_', ' ')} {as_score(finite(value))}" for view, value in thresholds.items())
    return f"{values} ({threshold_rule(run)})"


def multiclass_section(run: RunFiles, slug: str, written: dict[str, Path]) -> dict[str, Any] | None:
    """The K-class part of a run's section, one block per test variant; None for a binary run."""
    if not run.is_multiclass:
        return None
    blocks = []
    for tta in (False, True):
        evaluation = run.evaluation("test", tta)
        if evaluation is None:
            continue
        images = None if evaluation.predictions is None else len(evaluation.predictions)
        plots = []
        for kind in MULTICLASS_PLOTS:
            key = f"{kind}_{evaluation.key}"
            if key in written:
                title, caption = MULTICLASS_PLOT_CAPTIONS[kind]
                plots.append(plot_entry(run, slug, key, written[key], f"{title} ({evaluation.label})", caption))
        blocks.append(
            {
                "label": evaluation.label,
                "chosen": run.chosen_tta == tta,
                "n": as_count(evaluation.metric("n") or images),
                "counts": _count_text(evaluation),
                "decision": decision_rule(run, tta),
                "thresholds": derived_thresholds_text(run, tta),
                "per_class": per_class_rows(evaluation) if evaluation.metrics is not None else [],
                "views": view_rows(evaluation),
                "plots": plots,
            }
        )
    return {
        "title": f"{class_task_name(run.classes)} results (test)",
        "classes": ", ".join(run.classes),
        "blocks": blocks,
    }
