"""Stress evaluation: a model's unperturbed metrics on perturbed copies of the same films (the framing issue).

For every case (a perturbation of `pneumolab.data.perturb` at one strength) the films of one split are perturbed,
scored by the model exactly as in use (its preprocessing, variant, temperature and threshold; the gate off, so every
film counts), and compared with the clean films: accuracy, sensitivity, specificity, ROC-AUC and log loss at the
model's own threshold (binary), or accuracy, per-class recall and log loss (K classes); the mean |change| in
P(not the first class), and the share of films whose label flips.

`stress_log_loss` is the selection objective the framing rule uses (docs/results/2026-12-06-framing.md): the mean
of the validation log loss over the clean films and the `SELECTION` cases, nine equal terms. Perturbed validation
films are validation (EVALUATION.md rule 10); perturbed test films are reported, never used to choose.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import log_loss

from pneumolab.data.perturb import PERTURBATIONS, perturb_batch
from pneumolab.errors import SettingError, did_you_mean
from pneumolab.evaluate.metrics import binary_metrics

__all__ = [
    "FRAMING",
    "SELECTION",
    "STRESS_SETS",
    "StressCase",
    "parse_cases",
    "stress_evaluate",
    "stress_log_loss",
]


@dataclass(frozen=True, order=True)
class StressCase:
    """One perturbation at one strength; its key reads ``name:strength`` (e.g. ``crop:0.8``)."""

    name: str
    strength: float

    @property
    def key(self) -> str:
        return f"{self.name}:{self.strength:g}"

    @classmethod
    def parse(cls, text: str) -> StressCase:
        name, _, strength = text.strip().partition(":")
        if name not in PERTURBATIONS:
            raise did_you_mean("perturbation", name, PERTURBATIONS)
        try:
            value = float(strength) if strength else PERTURBATIONS[name].strengths[0]
        except ValueError:
            raise SettingError(f"stress case {text!r}: the strength after ':' must be a number") from None
        return cls(name, value)


def _cases(*keys: str) -> tuple[StressCase, ...]:
    return tuple(StressCase.parse(k) for k in keys)


# The rule's set (committed before any candidate's test figure): framing both ways, exposure, resolution,
# re-compression, markers.
SELECTION = _cases(
    "crop:0.8", "frame_black:1.2", "frame_edge:1.2", "gamma:0.7", "gamma:1.4", "lowres:0.5", "jpeg:20", "markers:2"
)
# The framing curve: tighter (crop) and looser (frame) at every strength.
FRAMING = _cases("crop:0.9", "crop:0.8", "crop:0.75", "frame_black:1.1", "frame_black:1.2", "frame_black:1.3",
                 "frame_edge:1.1", "frame_edge:1.2", "frame_edge:1.3")  # fmt: skip
# The report's table: framing curve, the selection set and one strength of the other kinds.
STANDARD = tuple(
    sorted(set(FRAMING) | set(SELECTION) | set(_cases("contrast:0.7", "blur:2", "rotate:10", "shift:0.1")))
)
STRESS_SETS = {"selection": SELECTION, "framing": FRAMING, "standard": STANDARD}


def parse_cases(spec: str | Sequence[str]) -> tuple[StressCase, ...]:
    """A named set (``selection``, ``framing``, ``standard``) or comma-separated ``name:strength`` cases."""
    if isinstance(spec, str):
        if spec in STRESS_SETS:
            return STRESS_SETS[spec]
        spec = [s for s in spec.split(",") if s.strip()]
    cases = tuple(dict.fromkeys(StressCase.parse(s) for s in spec))
    if not cases:
        raise SettingError("no stress cases given")
    return cases


def _case_metrics(
    labels: np.ndarray, probabilities: np.ndarray, clean: np.ndarray, classes: Sequence[str], threshold: float
) -> dict[str, Any]:
    k = len(classes)
    labels_now = _labels(probabilities, threshold)
    out: dict[str, Any] = {
        "log_loss": float(log_loss(labels, np.clip(probabilities, 1e-7, 1.0), labels=list(range(k)))),
        "mean_abs_change": float(np.mean(np.abs((1.0 - probabilities[:, 0]) - (1.0 - clean[:, 0])))),
        "flip_rate": float(np.mean(labels_now != _labels(clean, threshold))),
        "accuracy": float(np.mean(labels_now == labels)),
    }
    if k == 2:
        point = binary_metrics(labels, probabilities[:, 1], threshold)
        out.update(sensitivity=point["recall"], specificity=point["specificity"], roc_auc=point["roc_auc"])
    else:
        out["recall"] = {c: float(np.mean(labels_now[labels == i] == i)) for i, c in enumerate(classes)}
    return out


def _labels(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    if probabilities.shape[1] == 2:
        return (probabilities[:, 1] >= threshold).astype(np.int64)
    return probabilities.argmax(1)


def stress_evaluate(
    score: Callable[[np.ndarray], np.ndarray],
    films: np.ndarray,
    labels: np.ndarray,
    *,
    classes: Sequence[str],
    threshold: float,
    cases: Sequence[StressCase] = STANDARD,
    seed: int = 0,
    paths: Sequence[str] | None = None,
    n_flippers: int = 8,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The stress block of one split.

    Args:
        score: uint8 ``N x S x S`` films -> calibrated class probabilities (N x K), as the model is used.
        films: the split's films at the model's cache size.
        labels: class index per film.
        classes: the model's class names (K = 2: binary metrics at `threshold`).
        threshold: the model's own operating point (binary); ignored for K classes (argmax).
        cases: the perturbations and strengths.
        seed: seeds every film's perturbation (with its index and the perturbation's name).
        paths: the films' files, for the list of those whose label flips most easily.
        n_flippers: how many of those to list.
        progress: called with each case's key before it runs.

    Returns:
        ``{"seed", "n", "clean": metrics, "cases": {key: metrics + deltas}, "flippers": [...],
        "stress_log_loss" (when every `SELECTION` case ran), "seconds"}``; deltas are the case's value minus the
        clean one (``delta_specificity`` etc.).
    """
    started = time.perf_counter()
    labels = np.asarray(labels, dtype=np.int64)
    clean = score(films)
    result: dict[str, Any] = {
        "seed": seed,
        "n": len(labels),
        "threshold": float(threshold) if len(classes) == 2 else None,
        "clean": _case_metrics(labels, clean, clean, classes, threshold),
        "cases": {},
    }
    worst_change = np.zeros(len(labels))
    worst_case = [""] * len(labels)  # the case that moved each film most
    flipped_by: list[list[str]] = [[] for _ in labels]
    for case in cases:
        if progress is not None:
            progress(case.key)
        probabilities = score(perturb_batch(films, case.name, case.strength, seed=seed))
        metrics = _case_metrics(labels, probabilities, clean, classes, threshold)
        for key in ("accuracy", "sensitivity", "specificity", "roc_auc", "log_loss"):
            if key in metrics:
                metrics[f"delta_{key}"] = metrics[key] - result["clean"][key]
        result["cases"][case.key] = {"perturbation": case.name, "strength": case.strength, **metrics}
        change = np.abs(probabilities[:, 0] - clean[:, 0])
        for i in np.flatnonzero(change > worst_change):
            worst_case[i] = case.key
        worst_change = np.maximum(worst_change, change)
        for i in np.flatnonzero(_labels(probabilities, threshold) != _labels(clean, threshold)):
            flipped_by[i].append(case.key)
    order = np.argsort(-worst_change, kind="stable")[:n_flippers]
    result["flippers"] = [
        {
            "index": int(i),
            "path": None if paths is None else str(paths[i]),
            "label": classes[labels[i]],
            "clean_probability": float(1.0 - clean[i, 0]),
            "largest_change": float(worst_change[i]),
            "largest_change_by": worst_case[i] or None,
            "flipped_by": flipped_by[i],
        }
        for i in order
    ]
    selection = stress_log_loss(result)
    if selection is not None:
        result["stress_log_loss"] = selection
    result["seconds"] = time.perf_counter() - started
    return result


def stress_log_loss(block: dict[str, Any]) -> float | None:
    """The framing rule's objective from a stress block: the mean log loss over clean + every `SELECTION` case
    (None when one of them did not run)."""
    cases = block.get("cases", {})
    if any(case.key not in cases for case in SELECTION):
        return None
    terms = [block["clean"]["log_loss"], *(cases[case.key]["log_loss"] for case in SELECTION)]
    return float(np.mean(terms))
