"""Plots (matplotlib) and the HTML/Markdown report with a model card per model (jinja2).

Everything is drawn and written from a run folder's files; nothing recomputes what a file holds. Binary and K-class
runs (e.g. NORMAL / BACTERIAL / VIRAL) share one report: a K-class run stands in the binary comparison by its
pneumonia-vs-normal view and has its own K-class table, confusion matrices, per-class curves and errors.
"""

from pneumolab.report.plots import (
    DPI,
    figure_png,
    plot_class_roc_pr,
    plot_confusion,
    plot_gate_scores,
    plot_history,
    plot_reliability,
    plot_risk_coverage,
    plot_roc_pr,
    plot_run,
    save_figure,
)
from pneumolab.report.render import RANDOM_INIT_TEXT, build_report, describe_weights

__all__ = [
    "DPI",
    "RANDOM_INIT_TEXT",
    "build_report",
    "describe_weights",
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
