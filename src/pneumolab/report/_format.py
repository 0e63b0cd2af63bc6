"""What the report shows and how it writes numbers: its metric columns (binary, and for K-class runs the K-class,
derived-view and per-class ones), and rates, scores, counts, durations and the dash for what is missing."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from pneumolab.report._runfiles import Evaluation

METRIC_COLUMNS = (
    ("accuracy", "Accuracy", "%"),
    ("balanced_accuracy", "Balanced accuracy", "%"),
    ("recall", "Sensitivity (recall)", "%"),
    ("specificity", "Specificity", "%"),
    ("precision", "Precision", "%"),
    ("f1", "F1", "%"),
    ("roc_auc", "ROC-AUC", ""),
    ("average_precision", "Average precision", ""),
    ("log_loss", "Log loss", ""),  # the proper scoring rules: they keep ranking after ROC-AUC saturates
    ("brier", "Brier score", ""),
    ("accuracy_at_0.5", "Accuracy at 0.5", "%"),
    ("ece", "ECE", ""),
)


# a K-class evaluation's own metrics (the comparison's K-class table; the model card)
MULTICLASS_COLUMNS = (
    ("accuracy", "Accuracy", "%"),
    ("balanced_accuracy", "Balanced accuracy", "%"),
    ("macro_f1", "Macro-F1", "%"),
    ("macro_roc_auc", "Macro ROC-AUC", ""),
    ("log_loss", "Log loss", ""),
    ("brier", "Brier score", ""),
    ("ece", "ECE (top-label)", ""),
)

# a binary view's metrics (``views.<view>`` of a K-class metrics file)
VIEW_COLUMNS = (
    ("accuracy", "Accuracy", "%"),
    ("recall", "Sensitivity", "%"),
    ("specificity", "Specificity", "%"),
    ("roc_auc", "ROC-AUC", ""),
)

# per class of a K-class evaluation: the metrics file's ``<key>/<CLASS>``
PER_CLASS_COLUMNS = (
    ("precision", "Precision", "%"),
    ("recall", "Recall", "%"),
    ("f1", "F1", "%"),
    ("roc_auc", "ROC-AUC (one vs rest)", ""),
    ("average_precision", "Average precision", ""),
)

MULTICLASS_PLOTS = ("confusion", "roc_pr")  # of a K-class run: drawn in its K-class part, not under Plots


GATING_PLOTS = ("gate_scores", "risk_coverage")  # drawn in the run's "Input gate and referral" part, not under Plots


CARD_METRICS = ("accuracy", "recall", "specificity", "precision", "f1", "roc_auc", "average_precision")


OVERLAP_METRICS = ("accuracy", "recall", "specificity", "roc_auc")


MISSING = "\N{EN DASH}"


def pneumonia_sum(classes: tuple[str, ...]) -> str:
    """``P(BACTERIAL) + P(VIRAL)``: P(PNEUMONIA) of a K-class model, the sum over every class but the first."""
    return " + ".join(f"P({name})" for name in classes[1:])


def class_task_name(classes: tuple[str, ...]) -> str:
    """``Three-class`` for three classes, else ``K-class`` with K written."""
    return {3: "Three-class", 4: "Four-class"}.get(len(classes), f"{len(classes)}-class")


def as_percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}"


def as_score(value: float | None) -> str:
    return MISSING if value is None else f"{value:.3f}"


def metric_cell(evaluation: Evaluation, key: str, unit: str) -> dict[str, str]:
    fmt = as_percent if unit == "%" else as_score
    interval = evaluation.interval(key)
    return {
        "value": fmt(evaluation.metric(key)),
        "interval": f"{fmt(interval[0])}-{fmt(interval[1])}" if interval else "",
    }


def as_count(value: float | None) -> str:
    if value is None:
        return MISSING
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e4:
        return f"{value / 1e3:.1f} k"
    return f"{value:,.0f}"


def as_duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def as_speed(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def nested_get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def member_names(members: Any) -> list[str]:
    return [PurePath(str(m)).name or str(m) for m in members] if isinstance(members, list) else []
