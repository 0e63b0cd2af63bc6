"""Plots of a run: training history, confusion matrices, ROC and precision-recall curves, reliability diagrams, and
the input gate's score distribution and the risk-coverage curve of the referral band.

A K-class run gets K x K confusion matrices (`plot_confusion` with its ``classes``), one-vs-rest ROC and
precision-recall curves per class (`plot_class_roc_pr`), and the reliability diagram of its pneumonia-vs-normal view
(P(PNEUMONIA) = 1 - P(NORMAL)); it has no risk-coverage curve (no referral band for K classes).

Every function builds a `matplotlib.figure.Figure` directly (no ``pyplot``, so no global figure registry and no
GUI backend: safe in threads and servers); `figure_png` turns it into PNG bytes and `save_figure` writes it
atomically. `plot_run` draws all plots of one run folder from its files.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.scale import SymmetricalLogTransform
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter
from numpy.typing import ArrayLike
from scipy.special import expit
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from pneumolab.constants import CLASSES
from pneumolab.evaluate.calibration import expected_calibration_error, reliability_curve
from pneumolab.fsutil import atomic_path
from pneumolab.report._analyses import RiskCoverage, gating_analysis
from pneumolab.report._runfiles import GATE_GROUPS, SPLITS, Evaluation, RunFiles, read_run

__all__ = [
    "DPI",
    "figure_png",
    "plot_class_roc_pr",
    "plot_confusion",
    "plot_gate_scores",
    "plot_history",
    "plot_reliability",
    "plot_risk_coverage",
    "plot_roc_pr",
    "plot_run",
    "save_figure",
]

DPI = 110
"""Resolution of saved figures, in dots per inch."""

_TRAIN, _VAL, _EXTRA, _MARK = "#1f77b4", "#d62728", "#9467bd", "#2ca02c"
_CLASS_COLOURS = ("#4c72b0", "#dd8452")  # NORMAL, PNEUMONIA
_GROUP_COLOURS = {"val": "0.45", "test": _TRAIN, "far-ood": _EXTRA}
_NEAR_COLOURS = ("#dd8452", "#55a868", "#c44e52", "#8c564b", "#17becf")
_SYMLOG_SPAN = 12  # a symmetric-log x axis once the scores span more than this many validation spreads

# (panel title, y axis is a rate, ((column, legend label, colour, line style), ...))
_HISTORY_PANELS = (
    ("Loss", False, (("train_loss", "train", _TRAIN, "-"), ("val_loss", "validation", _VAL, "-"))),
    (
        "Accuracy",
        True,
        (
            ("train_accuracy", "train", _TRAIN, "-"),
            ("val_accuracy", "validation", _VAL, "-"),
            ("val_balanced_accuracy", "validation, balanced", _EXTRA, "--"),
        ),
    ),
    ("ROC-AUC", False, (("train_roc_auc", "train", _TRAIN, "-"), ("val_roc_auc", "validation", _VAL, "-"))),
)


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _binary_inputs(labels: ArrayLike, probabilities: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length: {y.size} and {p.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (NORMAL) or 1 (PNEUMONIA)")
    if p.size and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
        raise ValueError("probabilities must be finite and within [0, 1]")
    return y, p


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)


def figure_png(fig: Figure, *, dpi: int = DPI) -> bytes:
    """Render a figure as PNG bytes.

    Args:
        fig: the figure.
        dpi: resolution in dots per inch.

    Returns:
        The PNG file's bytes.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = DPI) -> Path:
    """Write a figure as PNG atomically (a temporary name, then a rename); parent folders are created.

    Args:
        fig: the figure.
        path: destination file.
        dpi: resolution in dots per inch.

    Returns:
        The destination path.
    """
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    return Path(path)


def plot_history(history: pd.DataFrame, *, best_epoch: int | None = None, title: str | None = None) -> Figure:
    """Loss, accuracy and ROC-AUC over epochs, for training and validation where the columns exist.

    Args:
        history: ``history.csv`` as a table with an ``epoch`` column and any of ``train_loss``, ``val_loss``,
            ``train_accuracy``, ``val_accuracy``, ``val_balanced_accuracy``, ``train_roc_auc``, ``val_roc_auc``.
        best_epoch: the selected epoch, marked on every panel; by default the epoch of the lowest validation loss.
        title: figure title.

    Returns:
        A figure with one panel per quantity that has data.
    """
    history = history.copy()
    epochs = pd.to_numeric(history["epoch"], errors="coerce") if "epoch" in history else history.index + 1
    if best_epoch is None and "val_loss" in history and history["val_loss"].notna().any():
        best_epoch = int(epochs[history["val_loss"].astype(float).idxmin()])

    def present(column: str) -> bool:
        return column in history and pd.to_numeric(history[column], errors="coerce").notna().any()

    panels = [(name, rate, [s for s in series if present(s[0])]) for name, rate, series in _HISTORY_PANELS]
    panels = [p for p in panels if p[2]]
    fig = _figure(4.2 * max(len(panels), 1), 3.4)
    if title:
        fig.suptitle(title, fontsize=11)
    if not panels:
        _note(fig.add_subplot(), "no training history")
        return fig
    for index, (ax, (name, rate, series)) in enumerate(
        zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True)
    ):
        for column, label, colour, style in series:
            values = pd.to_numeric(history[column], errors="coerce")
            ax.plot(epochs, values, style, color=colour, marker="o", markersize=3.5, linewidth=1.5, label=label)
        if best_epoch is not None:
            ax.axvline(best_epoch, color=_MARK, linestyle=":", linewidth=1.5, label=f"best epoch ({best_epoch})")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if rate:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best", frameon=not index)
    return fig


def plot_confusion(cm: ArrayLike, *, classes: Sequence[str] = CLASSES, title: str | None = None) -> Figure:
    """Confusion matrix as counts and as row-normalised rates (rows: true class, columns: predicted class).

    Args:
        cm: ``[[tn, fp], [fn, tp]]``; for K `classes`, the K x K counts (rows: true class).
        classes: the class names in label order.
        title: figure title.

    Returns:
        A figure with two panels.
    """
    counts = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    if counts.shape != (k, k):
        if k == 2:
            raise ValueError(f"a confusion matrix must be 2 x 2 ([[tn, fp], [fn, tp]]), got shape {counts.shape}")
        raise ValueError(f"a confusion matrix of {k} classes must be {k} x {k} (rows: true class), got {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)
    fig = _figure(8.4 + 1.4 * (k - 2), 3.7 + 0.7 * (k - 2))
    if title:
        fig.suptitle(title, fontsize=11)
    axes = fig.subplots(1, 2)
    panels = (
        (axes[0], counts, counts.max() or 1, "counts", lambda i, j: f"{counts[i, j]:,}"),
        (
            axes[1],
            rates,
            1.0,
            "share of the true class",
            lambda i, j: "\N{EN DASH}" if np.isnan(rates[i, j]) else f"{rates[i, j]:.1%}",
        ),
    )
    ticks = tuple(range(k))
    for ax, values, vmax, name, text in panels:
        ax.imshow(np.nan_to_num(values.astype(float)), cmap="Blues", vmin=0, vmax=vmax)
        for i in ticks:
            for j in ticks:
                shade = np.nan_to_num(float(values[i, j])) / vmax
                ax.text(
                    j, i, text(i, j), ha="center", va="center", fontsize=11 if k <= 3 else 9,
                    color="white" if shade > 0.55 else "black",
                )  # fmt: skip
        ax.set_xticks(ticks, classes)
        ax.set_yticks(ticks, classes, rotation=90, va="center")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name, fontsize=10)
    return fig


def _operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float, float | None]:
    """(false positive rate, recall, precision or None) of the decisions ``p >= threshold``."""
    called = p >= threshold
    positives, negatives = max(int(y.sum()), 1), max(int((1 - y).sum()), 1)
    tp, fp = int(np.sum(called & (y == 1))), int(np.sum(called & (y == 0)))
    precision = tp / (tp + fp) if tp + fp else None
    return fp / negatives, tp / positives, precision


def _roc_pr_axes(fig: Figure, *panels: tuple[str, str, str]) -> list:
    """Side-by-side square panels on [0, 1] with a grid, one per (title, x label, y label)."""
    axes = fig.subplots(1, len(panels))
    for ax, (name, xlabel, ylabel) in zip(axes, panels, strict=True):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    return list(axes)


def plot_roc_pr(
    labels: ArrayLike, probabilities: ArrayLike, threshold: float | None, *, title: str | None = None
) -> Figure:
    """ROC and precision-recall curves, with AUC and average precision in the legends and the operating point.

    Args:
        labels: 0 (NORMAL) / 1 (PNEUMONIA) per image.
        probabilities: PNEUMONIA probability per image.
        threshold: the decision threshold (an image is PNEUMONIA when its probability is ``>=`` it); None marks
            no operating point.
        title: figure title.

    Returns:
        A figure with two panels; with a single class present the panels say the curves are undefined.
    """
    y, p = _binary_inputs(labels, probabilities)
    fig = _figure(8.4, 3.7)
    if title:
        fig.suptitle(title, fontsize=11)
    roc_ax, pr_ax = _roc_pr_axes(
        fig,
        ("ROC", "false positive rate (1 - specificity)", "true positive rate (sensitivity)"),
        ("Precision-recall", "recall (sensitivity)", "precision"),
    )
    if len(np.unique(y)) < 2:
        for ax in (roc_ax, pr_ax):
            _note(ax, "undefined: needs both classes")
        return fig

    fpr, tpr, _ = roc_curve(y, p)
    roc_ax.plot(fpr, tpr, color=_TRAIN, linewidth=1.8, label=f"AUC {roc_auc_score(y, p):.3f}")
    roc_ax.plot((0, 1), (0, 1), color="0.6", linestyle="--", linewidth=1, label="chance")
    precision, recall, _ = precision_recall_curve(y, p)
    pr_ax.plot(recall, precision, color=_TRAIN, linewidth=1.8, drawstyle="steps-post")
    pr_ax.lines[-1].set_label(f"AP {average_precision_score(y, p):.3f}")
    prevalence = float(y.mean())
    pr_ax.axhline(prevalence, color="0.6", linestyle="--", linewidth=1, label=f"prevalence {prevalence:.2f}")
    if threshold is not None:
        op_fpr, op_recall, op_precision = _operating_point(y, p, threshold)
        marker = {"marker": "o", "markersize": 8, "color": _VAL, "linestyle": "none"}
        roc_ax.plot(op_fpr, op_recall, **marker, label=f"threshold {threshold:.3g}")
        if op_precision is not None:
            pr_ax.plot(op_recall, op_precision, **marker, label=f"threshold {threshold:.3g}")
    roc_ax.legend(loc="lower right", fontsize=8)
    pr_ax.legend(loc="lower left", fontsize=8)
    return fig


def _class_inputs(labels: ArrayLike, probabilities: ArrayLike, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    k = len(classes)
    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape != (y.size, k):
        raise ValueError(f"probabilities must be {y.size} x {k} (one column per class), got shape {p.shape}")
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must be class indices 0 to {k - 1}")
    if p.size and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
        raise ValueError("probabilities must be finite and within [0, 1]")
    return y, p


def plot_class_roc_pr(
    labels: ArrayLike, probabilities: ArrayLike, classes: Sequence[str], *, title: str | None = None
) -> Figure:
    """One-vs-rest ROC and precision-recall curves of every class of a K-class model, on one figure each.

    Args:
        labels: the true class index per image, in ``[0, K)``.
        probabilities: N x K class probabilities (the ``p_<CLASS>`` columns), in label order.
        classes: the K class names.
        title: figure title.

    Returns:
        A figure with two panels (ROC, precision-recall), one curve per class (the class against all others, from its
        own probability), AUC and average precision in the legends; a class without true images, or with only true
        images, is named in the legend as undefined.
    """
    y, p = _class_inputs(labels, probabilities, classes)
    fig = _figure(8.4, 3.9)
    if title:
        fig.suptitle(title, fontsize=11)
    roc_ax, pr_ax = _roc_pr_axes(
        fig,
        ("ROC, one class vs the rest", "false positive rate", "true positive rate (recall of the class)"),
        ("Precision-recall, one class vs the rest", "recall of the class", "precision"),
    )
    roc_ax.plot((0, 1), (0, 1), color="0.6", linestyle="--", linewidth=1, label="chance")
    colours = [f"C{index % 10}" for index in range(len(classes))]
    for index, (name, colour) in enumerate(zip(classes, colours, strict=True)):
        positive = (y == index).astype(np.int64)
        if positive.min(initial=1) == positive.max(initial=0):  # one-class or empty: undefined
            roc_ax.plot([], [], color=colour, label=f"{name}: undefined (needs both)")
            continue
        fpr, tpr, _ = roc_curve(positive, p[:, index])
        roc_ax.plot(
            fpr, tpr, color=colour, linewidth=1.6, label=f"{name}: AUC {roc_auc_score(positive, p[:, index]):.3f}"
        )
        precision, recall, _ = precision_recall_curve(positive, p[:, index])
        ap = average_precision_score(positive, p[:, index])
        pr_ax.plot(
            recall, precision, color=colour, linewidth=1.6, drawstyle="steps-post",
            label=f"{name}: AP {ap:.3f} (prevalence {positive.mean():.2f})",
        )  # fmt: skip
    roc_ax.legend(loc="lower right", fontsize=8)
    if pr_ax.lines:
        pr_ax.legend(loc="lower left", fontsize=8)
    return fig


def _curve(y: np.ndarray, p: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin: centre, mean probability, observed PNEUMONIA share (the bins of `reliability_curve`)."""
    if not y.size:  # nothing to bin: an empty diagram
        return np.empty(0), np.empty(0), np.empty(0)
    curve = reliability_curve(y, p, n_bins)
    return np.asarray(curve["bin_centers"]), np.asarray(curve["confidence"]), np.asarray(curve["accuracy"])


def plot_reliability(
    labels: ArrayLike,
    probabilities: ArrayLike,
    n_bins: int = 10,
    *,
    ece: float | None = None,
    threshold: float | None = None,
    title: str | None = None,
    uncalibrated: ArrayLike | None = None,
) -> Figure:
    """Reliability diagram (observed PNEUMONIA share against predicted probability) beside a probability histogram.

    Args:
        labels: 0 (NORMAL) / 1 (PNEUMONIA) per image.
        probabilities: calibrated PNEUMONIA probability per image.
        n_bins: equal-width bins over [0, 1], as `pneumolab.evaluate.calibration.reliability_curve` makes them.
        ece: the expected calibration error to show (e.g. from the metrics file); computed from the bins when None.
        threshold: the decision threshold, drawn on the histogram when given.
        title: figure title.
        uncalibrated: the same images' probabilities before temperature scaling (T = 1), drawn on the diagram as a
            dashed curve of bin means when given.

    Returns:
        A figure with the diagram (left) and the histogram of probabilities per true class (right).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    y, p = _binary_inputs(labels, probabilities)
    fig = _figure(8.4, 3.7)
    if title:
        fig.suptitle(title, fontsize=11)
    diagram, histogram = fig.subplots(1, 2)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centres, confidence, observed = _curve(y, p, n_bins)
    if ece is None and y.size:
        ece = expected_calibration_error(y, p, n_bins)
    diagram.plot((0, 1), (0, 1), color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    diagram.bar(
        centres, observed, width=1 / n_bins, color=_TRAIN, alpha=0.2, edgecolor=_TRAIN,
        linewidth=0.8, label="observed share per bin",
    )  # fmt: skip
    diagram.plot(
        confidence,
        observed,
        "o-",
        color=_TRAIN,
        markersize=4,
        label="bin mean probability" + (", temperature-scaled" if uncalibrated is not None else ""),
    )
    if uncalibrated is not None:
        _, before = _binary_inputs(y, uncalibrated)
        _, confidence_before, observed_before = _curve(y, before, n_bins)
        diagram.plot(
            confidence_before,
            observed_before,
            "s--",
            color="0.45",
            markersize=3.5,
            linewidth=1.2,
            label="before temperature scaling (T = 1)",
        )
    diagram.set_xlim(0, 1)
    diagram.set_ylim(0, 1.02)
    diagram.set_aspect("equal")
    diagram.set_xlabel("predicted PNEUMONIA probability")
    diagram.set_ylabel("observed PNEUMONIA share")
    diagram.set_title("Reliability" + (f" (ECE {ece:.3f})" if ece is not None else ""), fontsize=10)
    diagram.grid(alpha=0.3)
    diagram.legend(fontsize=8, loc="upper left")
    for label, (name, colour) in enumerate(zip(CLASSES, _CLASS_COLOURS, strict=True)):
        values = p[y == label]
        if values.size:
            histogram.hist(values, bins=edges, color=colour, alpha=0.45, edgecolor=colour, label=f"true {name}")
    if threshold is not None:
        histogram.axvline(threshold, color=_VAL, linestyle=":", linewidth=1.8, label=f"threshold {threshold:.3g}")
    histogram.set_xlim(0, 1)
    histogram.set_xlabel("predicted PNEUMONIA probability")
    histogram.set_ylabel("images")
    histogram.set_title("Probabilities by true class", fontsize=10)
    histogram.yaxis.set_major_locator(MaxNLocator(integer=True))
    histogram.grid(alpha=0.3)
    histogram.legend(fontsize=8, loc="best")
    return fig


def _score_axis(values: np.ndarray, reference: np.ndarray, bins: int) -> tuple[np.ndarray, float | None]:
    """Bin edges over `values`, and the linear threshold of a symmetric-log axis (None: a linear axis will do).

    The axis turns symmetric-log when the scores span more than `_SYMLOG_SPAN` times the `reference` (validation)
    films' 1-99 % spread: far out-of-distribution scores can lie a hundred spreads out, and a linear axis would squash
    the real films into one bin. Validation stays on the linear part; the edges are even on the drawn scale.
    """
    lo, hi = float(values.min()), float(values.max())
    if reference.size >= 2:
        low_ref, high_ref = np.quantile(reference, (0.01, 0.99))
    else:
        low_ref, high_ref = lo, hi
    spread = max(float(high_ref - low_ref), 1e-6)
    linthresh = None
    if hi - lo > _SYMLOG_SPAN * spread:
        linthresh = max(abs(float(low_ref)), abs(float(high_ref)), spread)
        transform = SymmetricalLogTransform(10, linthresh, 1.0)
        t_lo, t_hi = transform.transform(np.array([lo, hi], dtype=np.float64))
        pad = 0.02 * (t_hi - t_lo)
        edges = transform.inverted().transform(np.linspace(t_lo - pad, t_hi + pad, bins + 1))
    else:
        pad = 0.02 * max(hi - lo, 1e-6)
        edges = np.linspace(lo - pad, hi + pad, bins + 1)
    return np.asarray(edges, dtype=np.float64), linthresh


def plot_gate_scores(
    groups: Mapping[str, ArrayLike],
    limit: float | None,
    *,
    labels: Mapping[str, str] | None = None,
    bins: int = 40,
    title: str | None = None,
) -> Figure:
    """Histogram of the input gate's scores per group of images, with the refusal limit as a vertical line.

    Args:
        groups: the scores of each group (``val``, ``test``, ``far-ood``, ``near-<kind>``, ...), in legend order; NaN
            (files refused by their metadata, never scored) and empty groups are left out.
        limit: the gate's limit (an image scoring above it is refused); None draws no line.
        labels: legend name of each group; the group's own name by default.
        bins: number of bins, even on the drawn scale.
        title: figure title.

    Returns:
        A figure with validation, test and the far out-of-distribution groups on the left and, when there are any,
        the ``near-`` groups on the right with validation again for reference. The y axis is the share of each
        group's images per bin, so groups of different sizes compare; the x axis is symmetric-log (linear near zero,
        said on the axis) when the scores reach far beyond the validation films' spread.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    names = labels or {}
    scores = {}
    for group, values in groups.items():
        array = np.asarray(values, dtype=np.float64).ravel()
        array = array[np.isfinite(array)]
        if array.size:
            scores[group] = array
    near = [g for g in scores if g.startswith("near-")]
    far = [g for g in scores if not g.startswith("near-")]
    fig = _figure(8.4 if near else 5.6, 3.7)
    if title:
        fig.suptitle(title, fontsize=11)
    if not scores:
        _note(fig.add_subplot(), "no gate scores")
        return fig
    every = np.concatenate([*scores.values(), [] if limit is None else [float(limit)]])
    reference = scores.get("val", scores[far[0]] if far else every)
    edges, linthresh = _score_axis(every, reference, bins)
    panels = [("Validation, test and far out-of-distribution", far)] if far else []
    if near:
        panels.append(("Near out-of-distribution (made from test films)", (["val"] if "val" in scores else []) + near))
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=True, sharey=True)[0]
    near_colours = iter(_NEAR_COLOURS * len(near))
    for ax, (name, members) in zip(axes, panels, strict=True):
        for group in members:
            values = scores[group]
            label = f"{names.get(group, group)} ({values.size:,})"
            weights = np.full(values.size, 1 / values.size)
            if group == "val":  # the real films, filled, under the outlines of the rest
                ax.hist(values, bins=edges, weights=weights, color="0.6", alpha=0.45, label=label)
                continue
            colour = _GROUP_COLOURS.get(group) or next(near_colours)
            ax.hist(values, bins=edges, weights=weights, histtype="step", linewidth=1.6, color=colour, label=label)
        if limit is not None:
            ax.axvline(limit, color=_VAL, linestyle="--", linewidth=1.6, label=f"limit {limit:.3f} (refused above)")
        if linthresh is not None:
            ax.set_xscale("symlog", linthresh=linthresh, linscale=1.0)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 100, not 10^2
            ax.set_xlabel(f"gate score (symmetric log scale, linear within \N{PLUS-MINUS SIGN}{linthresh:.3g})")
        else:
            ax.set_xlabel("gate score")
        ax.set_title(name, fontsize=10)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="best", framealpha=0.85)
    axes[0].set_ylabel("share of the group's images")
    return fig


def plot_risk_coverage(curves: Sequence[RiskCoverage], *, title: str | None = None) -> Figure:
    """Risk-coverage curves: accuracy of the answered films against the share answered, with the band's point.

    Args:
        curves: one `RiskCoverage` per split (validation, test), from `gating_analysis`.
        title: figure title.

    Returns:
        A figure with one curve per split, ending at the share of films the gate let through, and a diamond at the
        coverage and accuracy of the fitted referral band.
    """
    fig = _figure(6.0, 3.9)
    if title:
        fig.suptitle(title, fontsize=11)
    ax = fig.add_subplot()
    ax.set_xlim(0, 1.01)
    ax.set_xlabel("share of films answered (coverage)")
    ax.set_ylabel("accuracy of the answered films")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_title("Risk-coverage: most confident films (|p \N{MINUS SIGN} threshold|) answered first", fontsize=10)
    ax.grid(alpha=0.3)
    drawn = [c for c in curves if c.coverage.size]
    if not drawn:
        _note(ax, "no film passed the gate" if curves else "no predictions with gate refusals")
        return fig
    lowest = 1.0
    for curve in drawn:
        colour = _VAL if curve.label.startswith("validation") else _TRAIN
        ax.plot(
            curve.coverage,
            curve.accuracy,
            color=colour,
            linewidth=1.6,
            drawstyle="steps-post",
            label=f"{curve.label} (the gate passes {curve.passed:.1%})",
        )
        # the first few films say little: the axis starts where a tenth of the curve's films are answered
        settled = curve.accuracy[curve.coverage >= 0.1 * curve.coverage[-1]]
        lowest = min(lowest, float(settled.min()) if settled.size else float(curve.accuracy.min()))
        if curve.band is None:
            continue
        coverage, accuracy = curve.band
        if accuracy is None:
            ax.plot([], [], "D", color=colour, label=f"{curve.label}: the referral band answers no film")
            continue
        ax.plot(
            coverage,
            accuracy,
            "D",
            color=colour,
            markersize=8,
            markeredgecolor="black",
            label=f"{curve.label}: referral band ({coverage:.1%} answered, {accuracy:.1%} right)",
        )
        lowest = min(lowest, accuracy)
    ax.set_ylim(max(0.0, lowest - 0.05), 1.005)
    ax.legend(fontsize=7.5, loc="lower left")
    return fig


def _plot_gating_files(run: RunFiles, out: Path, dpi: int) -> dict[str, Path]:
    """The gate's score histogram and the risk-coverage curves, when the run has the gate's files."""
    found = gating_analysis(run)
    if found is None:
        return {}
    written = {}
    scored = {g["group"]: g["scores"] for g in found["groups"] if len(g["scores"])}
    if scored:
        limit = (found["gate"] or {}).get("limit")
        labels = {group: GATE_GROUPS.get(group, (group, ""))[0] for group in scored}
        fig = plot_gate_scores(
            scored,
            float(limit) if isinstance(limit, int | float) else None,
            labels=labels,
            title=f"{run.name}: input gate scores",
        )
        written["gate_scores"] = save_figure(fig, out / "gate_scores.png", dpi=dpi)
    if found["curves"]:
        fig = plot_risk_coverage(found["curves"], title=f"{run.name}: referral band")
        written["risk_coverage"] = save_figure(fig, out / "risk_coverage.png", dpi=dpi)
    return written


def _file_name(kind: str, evaluation: Evaluation) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{kind}_{evaluation.key}") + ".png"


def plot_run_files(
    run: RunFiles, out_dir: str | os.PathLike[str], *, splits: Iterable[str] = SPLITS, dpi: int = DPI
) -> dict[str, Path]:
    """Draw and save the plots of an already read run (see `plot_run`)."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    if run.history is not None and len(run.history):
        fig = plot_history(run.history, best_epoch=run.best_epoch, title=f"{run.name}: training history")
        written["history"] = save_figure(fig, out / "history.png", dpi=dpi)
    for split in splits:
        for tta in (False, True):
            evaluation = run.evaluation(split, tta)
            if evaluation is None:
                continue
            heading = f"{run.name}: {evaluation.label}"
            threshold = run.threshold(split, tta)
            cm = evaluation.confusion()
            if cm is not None:
                fig = plot_confusion(cm, classes=evaluation.classes, title=heading)
                written[f"confusion_{evaluation.key}"] = save_figure(
                    fig, out / _file_name("confusion", evaluation), dpi=dpi
                )
            predictions = evaluation.predictions
            if predictions is None:
                continue
            binary = evaluation
            if evaluation.is_multiclass:
                y = predictions["label"].to_numpy()
                fig = plot_class_roc_pr(y, evaluation.class_probabilities(), evaluation.classes, title=heading)
                # the reliability diagram reads P(PNEUMONIA): the pneumonia-vs-normal view, when there is one
                binary = evaluation.pneumonia_view
            else:
                y, p = predictions["label"].to_numpy(), predictions["probability"].to_numpy()
                fig = plot_roc_pr(y, p, threshold, title=heading)
            written[f"roc_pr_{evaluation.key}"] = save_figure(fig, out / _file_name("roc_pr", evaluation), dpi=dpi)
            if binary is None or binary.predictions is None:
                continue
            y, p = binary.predictions["label"].to_numpy(), binary.predictions["probability"].to_numpy()
            logits = binary.logits() if binary.metric("temperature") is not None else None
            fig = plot_reliability(
                y,
                p,
                ece=binary.metric("ece"),
                threshold=threshold,
                title=heading + (", pneumonia vs normal" if binary is not evaluation else ""),
                uncalibrated=None if logits is None else expit(logits),
            )
            written[f"reliability_{evaluation.key}"] = save_figure(
                fig, out / _file_name("reliability", evaluation), dpi=dpi
            )
    written.update(_plot_gating_files(run, out, dpi))
    return written


def plot_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    splits: Sequence[str] = SPLITS,
    dpi: int = DPI,
) -> dict[str, Path]:
    """Draw every plot one run folder's files allow and save them as PNG files.

    The training history comes from ``history.csv`` (best epoch from ``env.json``); per evaluated split and variant
    (``test``, ``test_tta``, ...) the confusion matrix comes from ``metrics/`` (else the saved decisions), the ROC,
    precision-recall and reliability plots from ``predictions/``; for a K-class run the confusion matrix is K x K,
    the ROC and precision-recall curves are one-vs-rest per class, and the reliability diagram is that of the
    pneumonia-vs-normal view. A run with an input gate also gets the histogram of
    its gate scores (``gate/scores.csv``) and the risk-coverage curves of the variant it uses on validation and test
    (``predictions/``, the refusals of ``gate/scores.csv``, the band's point from ``metrics/selective.json``),
    whatever `splits` says. Missing files mean missing plots, not errors.

    Args:
        run_dir: a training run or an ensemble folder.
        out_dir: where the PNG files go; ``RUN/plots/`` by default.
        splits: which splits to plot (``val``, ``test``).
        dpi: resolution of the PNG files.

    Returns:
        ``{plot name: path}``, e.g. ``history``, ``confusion_test``, ``roc_pr_test_tta``, ``reliability_val``,
        ``gate_scores``, ``risk_coverage``.

    Raises:
        PneumolabError: the folder is not a run folder or one of its files is unreadable.
    """
    run = read_run(run_dir)
    return plot_run_files(run, run.run_dir.plots if out_dir is None else out_dir, splits=splits, dpi=dpi)
