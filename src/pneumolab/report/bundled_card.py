"""The human-readable card of a shipped model: ``MODEL_CARD.md`` in its folder, generated from ``card.json``.

The card says what the model is (its descriptive name and aliases), what it is for and not for, how it decides
(threshold, temperature, TTA, input gate, referral band), the recipe that trained it (``recipe.yaml`` beside it)
and its validation and test figures with 95 % intervals. The docs site includes these files; a test checks they
are up to date. After a bundled model changes, write them again::

    python -m pneumolab.report.bundled_card
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pneumolab.fsutil import write_text_atomic
from pneumolab.inference.card import BUNDLED, BundledModel, bundled_model_dir, bundled_names
from pneumolab.report.cards import DATA_FACTS

__all__ = ["MODEL_CARD_FILE", "model_card_markdown", "write_model_cards"]

MODEL_CARD_FILE = "MODEL_CARD.md"

_BINARY_ROWS = (
    ("Accuracy (%)", "accuracy", True),
    ("Sensitivity (%)", "recall", True),
    ("Specificity (%)", "specificity", True),
    ("ROC-AUC", "roc_auc", False),
    ("F1", "f1", False),
)
_MULTICLASS_ROWS = (
    ("Accuracy (%)", "accuracy", True),
    ("Balanced accuracy (%)", "balanced_accuracy", True),
    ("Macro-F1", "macro_f1", False),
    ("Macro ROC-AUC", "macro_roc_auc", False),
)


def _cell(metrics: dict[str, Any], key: str, percent: bool) -> str:
    value = metrics.get(key)
    if value is None:
        return ""
    low, high = metrics.get("ci95", {}).get(key, (None, None))
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    text = f"{value * scale:.{digits}f}"
    return text if low is None else f"{text} ({low * scale:.{digits}f}-{high * scale:.{digits}f})"


def _metrics_table(card: dict[str, Any]) -> list[str]:
    metrics = card.get("metrics") or {}
    rows = _BINARY_ROWS if len(card["classes"]) == 2 else _MULTICLASS_ROWS
    lines = ["| Metric | Validation | Test |", "|---|--:|--:|"]
    for label, key, percent in rows:
        val, test = (_cell(metrics.get(split, {}), key, percent) for split in ("val", "test"))
        lines.append(f"| {label} | {val} | {test} |")
    test = metrics.get("test", {})
    lines += [
        "",
        f"Validation: {metrics.get('val', {}).get('n', '?')} films carved from `train/` by patient; test: the official "
        f"{test.get('n', '?')} films, which chose nothing. Intervals: 95 % stratified bootstrap.",
    ]
    return lines


def _decision(card: dict[str, Any]) -> list[str]:
    lines = [
        f"- Classes, in output order: {', '.join(f'`{c}`' for c in card['classes'])}.",
        f"- Decision: {card.get('threshold_method', 'from the card')}"
        + (
            f"; threshold {card['threshold']:.4f} on P(not {card['classes'][0]})." if len(card["classes"]) == 2 else "."
        ),
        f"- Temperature {card['temperature']:.3f}; test-time views: {', '.join(card.get('tta') or ['none'])}.",
    ]
    gate = card.get("gate")
    if gate:
        lines.append(
            f"- Input gate: {gate['score']}; limit {gate['limit']:.3f}, set on {gate['limit_set_on']}; fit on "
            f"{gate['fit_on']}. DICOM metadata (modality, body part, view position, frames) is checked first."
        )
    band = card.get("referral")
    if band:
        low, high = band["band"]
        lines.append(
            f"- Referral band: {band['method']} (alpha {band['alpha']}), films with P in {low:.3f}-{high:.3f} are "
            f"`refer`; fit on {band['fit_on']}."
        )
    else:
        lines.append("- Referral band: none (fit for binary models only).")
    return lines


def _robustness(card: dict[str, Any]) -> list[str]:
    """The card's stress figures (``stress``: per split, per case, as `pneumolab evaluate --stress` measured them)."""
    stress = card.get("stress")
    if not isinstance(stress, dict) or not stress.get("splits"):
        return []
    binary = all("sensitivity" in m for cases in stress["splits"].values() for m in cases.values())
    if binary:
        about = (
            "Sensitivity and specificity in %, at the model's own threshold; in brackets the change from the clean "
            "films."
        )
        header = ["| Split | Case | Sensitivity | Specificity | Flips |", "|---|---|--:|--:|--:|"]
    else:
        classes = list(next(iter(next(iter(stress["splits"].values())).values()))["recall"])
        about = "Accuracy and recall per class in %, the decision the model makes (argmax)."
        header = [
            f"| Split | Case | Accuracy | {' | '.join(classes)} | Flips |",
            "|---|---|--:|" + "--:|" * len(classes) + "--:|",
        ]
    lines = ["## Robustness", "", f"{stress.get('note', '')} {about}", "", *header]
    for split, cases in stress["splits"].items():
        for key, m in cases.items():
            flips = f"{100 * m.get('flip_rate', 0):.1f} %"
            if binary:
                sens = f"{100 * m['sensitivity']:.1f} ({100 * m.get('delta_sensitivity', 0):+.1f})"
                spec = f"{100 * m['specificity']:.1f} ({100 * m.get('delta_specificity', 0):+.1f})"
                lines.append(f"| {split} | `{key}` | {sens} | {spec} | {flips} |")
            else:
                recalls = " | ".join(f"{100 * m['recall'][c]:.1f}" for c in classes)
                lines.append(f"| {split} | `{key}` | {100 * m['accuracy']:.1f} | {recalls} | {flips} |")
    return [*lines, ""]


def model_card_markdown(entry: BundledModel) -> str:
    """The Markdown card of one bundled model, from its folder's ``card.json`` and ``recipe.yaml``."""
    folder = bundled_model_dir(entry.name)
    card = json.loads((folder / "card.json").read_text())
    recipe = folder / "recipe.yaml"
    aliases = ", ".join(f"`{a}`" for a in entry.aliases) or "none"
    lines = [
        f"# {entry.name}",
        "",
        f'{entry.summary}. Aliases: {aliases}. Load it with `pneumolab.load_model("{entry.name}")` or '
        f"`pneumolab predict FILE --model {entry.name}`.",
        "",
        "Generated from `card.json` by `python -m pneumolab.report.bundled_card`; do not edit by hand.",
        "",
        "## Intended use",
        "",
        "- Research and teaching on pediatric chest X-ray classification.",
        "- Not a medical device: not for diagnosis, triage, screening or any clinical decision. It has not been "
        "validated clinically, prospectively, or on any population other than its test set.",
        "- Input: one frontal chest X-ray of a child (JPEG, PNG or DICOM). Adults, lateral views and other findings "
        "are out of scope; the input gate refuses what does not look like its training films.",
        "",
        "## Model",
        "",
        f"- Architecture: `{card['architecture']}` with the `{card.get('head', 'linear')}` head, "
        f"{card.get('parameters', 0):,} parameters, one input channel.",
        f"- Input: squashed to {card['cache_size']} px, centre crop to {card['image_size']} px (crop fraction "
        f"{card['crop_fraction']}), normalised with mean {card['normalize'][0]} and std {card['normalize'][1]}.",
        f"- Initial weights: {card.get('weights_source', 'unknown')}.",
        f"- Weights: `model.safetensors`, {card.get('weights_bytes', 0) / 1e6:.1f} MB, SHA-256 "
        f"`{str(card.get('weights_sha256', ''))[:16]}...`.",
        "",
        "## How it decides",
        "",
        *_decision(card),
        "",
        "## Figures",
        "",
        *_metrics_table(card),
        "",
        *_robustness(card),
        "## Training",
        "",
        f"Trained from `{card.get('source', 'unknown')}` with pneumolab {card.get('pneumolab_version', '?')}, "
        f"exported {card.get('created', '?')[:10]}; data fingerprint `{card.get('data_fingerprint', '?')}`. "
        "The recipe, `recipe.yaml` beside the weights:",
        "",
        "```yaml",
        recipe.read_text().rstrip() if recipe.is_file() else "# no recipe.yaml in this folder",
        "```",
        "",
        "## Data",
        "",
        *(f"- {fact}" for fact in DATA_FACTS),
        "",
    ]
    return "\n".join(lines)


def write_model_cards() -> list[Path]:
    """Write ``MODEL_CARD.md`` into every installed bundled model's folder; returns the files written."""
    installed = set(bundled_names())
    written = []
    for entry in BUNDLED:
        if entry.name in installed:
            target = bundled_model_dir(entry.name) / MODEL_CARD_FILE
            write_text_atomic(target, model_card_markdown(entry))
            written.append(target)
    return written


if __name__ == "__main__":
    for path in write_model_cards():
        print(path)
