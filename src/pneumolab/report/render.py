"""The report: one self-contained HTML page and its Markdown twin, comparing runs and carrying a model card each.

Everything shown comes from the run folders' files (``metrics/``, ``predictions/``, ``history.csv``, ``env.json``,
``config.yaml``, ``operating_point.json``, ``split.csv``); what a file does not hold is said to be missing ("not
evaluated", "not recorded"), never recomputed or guessed. Three analyses are derived from the saved predictions
(`pneumolab.report._analyses`): calibration before and after temperature scaling, the test metrics without the
images that share a patient or the bytes with a train/validation image, and, for a run with an input gate
(``gate/scores.csv``, ``metrics/selective.json``), the risk-coverage curve beside what the gate and the referral band
did. The HTML page embeds its images as data URIs and its CSS inline, so it makes no request of any kind when
opened; the Markdown file links the same images, written under ``images/``.

This module loads the runs and renders the templates; the parts come from `sections` (comparison table, errors by
pneumonia kind, calibration, test results without overlapping images, plots), `multiclass` (for K-class runs: the
K-class comparison table, per-class metrics, K x K confusion matrices, per-class curves and errors), `cards` (the
model cards), `gating` (the input gate and referral) and `_format` (the metric columns and how numbers are written).
A K-class run stands in the binary comparison columns, calibration and overlap parts by its pneumonia-vs-normal view.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from pneumolab.constants import __version__
from pneumolab.errors import SettingError
from pneumolab.fsutil import atomic_dir, write_text_atomic
from pneumolab.report._analyses import (
    FileHashes,
    used_test_evaluation,
)
from pneumolab.report._format import (
    METRIC_COLUMNS,
    MULTICLASS_COLUMNS,
    OVERLAP_METRICS,
    PER_CLASS_COLUMNS,
    VIEW_COLUMNS,
)
from pneumolab.report._runfiles import RunFiles, read_run
from pneumolab.report.cards import (
    RANDOM_INIT_TEXT,
    REFERENCES,
    card_metrics,
    data_facts,
    describe_weights,
    intended_use,
    limitations_of,
    machine_facts,
    training_facts,
    weights_source_of,
)
from pneumolab.report.gating import gating_section
from pneumolab.report.multiclass import KIND_REFERENCE, class_errors, multiclass_rows, multiclass_section
from pneumolab.report.plots import plot_run_files
from pneumolab.report.robustness import robustness_section
from pneumolab.report.sections import (
    calibration_block,
    comparison_rows,
    error_analysis,
    overlap_block,
    plot_entries,
    unique_slug,
)

__all__ = ["RANDOM_INIT_TEXT", "build_report", "describe_weights"]


def _run_section(run: RunFiles, slug: str, images: Path, hashes: FileHashes) -> dict[str, Any]:
    weights = describe_weights(weights_source_of(run), ensemble=run.ensemble)
    errors = [e for tta in (False, True) if (ev := run.evaluation("test", tta)) and (e := error_analysis(ev))]
    by_class = [e for tta in (False, True) if (ev := run.evaluation("test", tta)) and (e := class_errors(ev))]
    used = used_test_evaluation(run)
    class_bias = used is not None and used.is_multiclass and bool((run.variant_point(used.tta) or {}).get("class_bias"))
    written = plot_run_files(run, images / slug, splits=("test",))
    return {
        "name": run.name,
        "anchor": slug,
        "path": str(run.path),
        "kind": "ensemble" if run.ensemble is not None else "trained model",
        "machine": machine_facts(run),
        "plots": plot_entries(run, slug, written),
        "errors": errors,
        "class_errors": by_class,
        "multiclass": multiclass_section(run, slug, written),
        "calibration": calibration_block(
            used, (run.operating_point or {}).get("temperature_if_scaled"), class_bias=class_bias
        )
        if used is not None
        else None,
        "overlap": overlap_block(run, used, hashes) if used is not None else None,
        "gating": gating_section(run, slug, written),
        "robustness": robustness_section(run, slug, images),
        "evaluated_test": run.evaluation("test") is not None or run.evaluation("test", True) is not None,
        "card": {
            "intended_use": intended_use(run),
            "data": data_facts(run),
            "training": training_facts(run, weights),
            "metrics": card_metrics(run),
            "limitations": limitations_of(run, weights),
        },
    }


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
        raise SettingError("no run folders to report on")
    out = Path(out)
    taken: set[str] = set()
    loaded = [(run, unique_slug(run.name, taken)) for run in (read_run(path) for path in runs)]
    hashes = FileHashes()  # runs of one dataset share their image files: each is hashed once
    with atomic_dir(out / "images") as images:
        sections = [_run_section(run, slug, images, hashes) for run, slug in loaded]
    context = {
        "title": title,
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
        "metric_columns": [{"key": k, "header": h, "unit": u} for k, h, u in METRIC_COLUMNS],
        "row_sets": comparison_rows(loaded),
        "multiclass_rows": multiclass_rows(loaded),
        "multiclass_columns": [{"key": k, "header": h, "unit": u} for k, h, u in MULTICLASS_COLUMNS],
        "view_columns": [{"key": k, "header": h, "unit": u} for k, h, u in VIEW_COLUMNS],
        "per_class_columns": [{"key": k, "header": h, "unit": u} for k, h, u in PER_CLASS_COLUMNS],
        "kind_reference": KIND_REFERENCE,
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
