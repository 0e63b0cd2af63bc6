"""Three analyses of a run's saved predictions that the report computes rather than reads.

* `calibration_before_after`: ECE and Brier score of the test probabilities before temperature scaling (T = 1, the
  sigmoid of the saved logit margin) and after it (the saved, temperature-scaled probability). An ensemble saves no
  logits and is not scaled: its evaluation records the T it would use (fit on validation, not applied), and the
  report shows what scaling by it would change.
* `overlap_removed`: the test metrics again, at the model's own threshold, without the test images whose patient id
  (parsed from the file name) also names a train/val image of the run's ``split.csv``, and without test images whose
  bytes equal a train/val image's (the SHA-256 that ``split.csv`` records; for a split file from before it recorded
  them, the dataset's files are hashed, when the dataset root is here).
* `gating_analysis`: what the input gate and the referral band did (``gate/scores.csv``, ``metrics/selective.json``,
  the operating point's ``gate`` and ``referral``), with the risk-coverage curve of the films the gate let through:
  ranked by ``|p - threshold|``, the accuracy of the most confident ones against the share answered.

All work on the variant the model uses (`used_evaluation`). What a run's files do not allow is skipped with a
sentence saying why (``note``), never an error. Numbers are returned raw; the report formats them.

A K-class run: calibration and overlap are computed on its pneumonia-vs-normal view (`Evaluation.pneumonia_view`:
label != 0 is pneumonia, P(PNEUMONIA) = 1 - P(NORMAL), the view's validation threshold; ``view`` is True in their
results), and none at all when its first class is not NORMAL (``skipped`` says why). It has no risk-coverage curve:
the curve ranks films by a binary confidence, and a K-class model decides by argmax with no referral band.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.metrics import brier_score_loss

from pneumolab.constants import CLASSES
from pneumolab.data.dataset import find_dataset_root, parse_name
from pneumolab.errors import ArtefactError, PneumolabError
from pneumolab.evaluate.calibration import expected_calibration_error, log_odds
from pneumolab.evaluate.overlap import overlap_rows
from pneumolab.fsutil import file_sha256
from pneumolab.referral import ReferralBand
from pneumolab.report._runfiles import SPLITS, Evaluation, RunFiles, finite, read_config, read_split_table
from pneumolab.runs import RunDir

__all__ = [
    "FileHashes",
    "RiskCoverage",
    "calibration_before_after",
    "gate_refusals",
    "gating_analysis",
    "overlap_removed",
    "risk_coverage",
    "shared_patient_mask",
    "used_evaluation",
    "used_test_evaluation",
]

# bootstrap settings of evaluate_predictions when the metrics file does not record its own
_DEFAULT_RESAMPLES, _DEFAULT_SEED = 2000, 0


def used_evaluation(run: RunFiles, split: str) -> Evaluation | None:
    """The variant of `split` the model uses (its operating point's choice), when its per-image predictions exist.

    Without an operating point, the plain variant is taken, else the TTA one.
    """
    for tta in (False, True) if run.chosen_tta is None else (run.chosen_tta,):
        evaluation = run.evaluation(split, tta)
        if evaluation is not None and evaluation.predictions is not None:
            return evaluation
    return None


def used_test_evaluation(run: RunFiles) -> Evaluation | None:
    """The test variant the model uses, when its per-image predictions exist (`used_evaluation`)."""
    return used_evaluation(run, "test")


NO_VIEW = "a K-class run whose first class is not NORMAL has no pneumonia-vs-normal view"


def _binary_of(evaluation: Evaluation) -> Evaluation | None:
    """The evaluation the binary analyses read: itself, or a K-class one's pneumonia-vs-normal view (or None)."""
    return evaluation.pneumonia_view if evaluation.is_multiclass else evaluation


# --------------------------------------------------------------------------------------------------- calibration


def _calibration(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    return {
        "ece": expected_calibration_error(labels, probabilities),
        "brier": float(brier_score_loss(labels, probabilities, pos_label=1)),
    }


def calibration_before_after(evaluation: Evaluation, temperature_if_scaled: float | None = None) -> dict[str, Any]:
    """ECE (`expected_calibration_error`, its default bins) and Brier score before and after temperature scaling.

    Args:
        evaluation: an evaluated variant with predictions.
        temperature_if_scaled: for a variant that was not temperature-scaled (an ensemble), the temperature its
            evaluation fit on validation without applying it (``operating_point.json``); nothing is fit here.

    Returns:
        ``label`` (the variant), ``temperature`` (None when none is recorded), ``before`` and ``after``
        (``{"ece", "brier"}`` or None), ``fitted_apart`` and ``note`` (why ``before`` is None, else None).
        ``before`` uses ``sigmoid(logit)``, ``after`` the saved probability (``sigmoid(logit / T)``). Without logits
        or a temperature (an ensemble), ``before`` is the saved probability and ``after`` rescales its log-odds by
        `temperature_if_scaled` (``fitted_apart``: the model itself does not use it); without that either, only
        the saved probability is measured, as ``after``. ``view``: True when computed on a K-class evaluation's
        pneumonia-vs-normal view (``before``: T = 1 and no class bias); ``skipped``: why nothing was measured (a
        K-class run without that view), else None.
    """
    if evaluation.predictions is None:
        raise ArtefactError(f"{evaluation.key}: no predictions to measure calibration on")
    view, binary = evaluation.is_multiclass, _binary_of(evaluation)
    if binary is None:
        return {
            "label": evaluation.label,
            "temperature": evaluation.metric("temperature"),
            "before": None,
            "after": None,
            "fitted_apart": False,
            "note": None,
            "view": view,
            "skipped": NO_VIEW,
        }
    evaluation, table = binary, binary.predictions
    labels = table["label"].to_numpy()
    saved = table["probability"].to_numpy(dtype=np.float64)
    temperature = evaluation.metric("temperature")
    logits = evaluation.logits()
    note, fitted_apart = None, False
    if logits is None:
        note = "the predictions hold no logits"
    elif temperature is None:
        note = "no temperature in the metrics file, so the saved probabilities are not temperature-scaled"
    if note is None:
        before, after = _calibration(labels, expit(logits)), _calibration(labels, saved)
    elif finite(temperature_if_scaled) is not None and temperature_if_scaled > 0:
        temperature, note, fitted_apart = float(temperature_if_scaled), None, True
        before, after = _calibration(labels, saved), _calibration(labels, expit(log_odds(saved) / temperature))
    else:
        before, after = None, _calibration(labels, saved)
    return {
        "label": evaluation.label,
        "temperature": temperature,
        "before": before,
        "after": after,
        "fitted_apart": fitted_apart,
        "note": note,
        "view": view,
        "skipped": None,
    }


# ------------------------------------------------------------------------------------------------- overlap removal


class FileHashes:
    """SHA-256 of files' bytes, each file read once however many runs of a report share it."""

    def __init__(self) -> None:
        self._known: dict[Path, str] = {}

    def __call__(self, path: Path) -> str:
        """The hex SHA-256 of `path`'s bytes."""
        key = path.resolve()
        if key not in self._known:
            self._known[key] = file_sha256(key)
        return self._known[key]


def _patient_ids(paths: Sequence[str], labels: Sequence[int]) -> list[str | None]:
    """The patient id in each file name (`parse_name`), None for a name that matches no known pattern."""
    ids = []
    for path, label in zip(paths, labels, strict=True):
        info = parse_name(PurePath(str(path)).name, CLASSES[int(label)])
        ids.append(info.patient_id if info.from_name else None)
    return ids


def shared_patient_mask(paths: Sequence[str], labels: Sequence[int], train_patients: set[str]) -> np.ndarray:
    """True for each test image whose patient id, parsed from its file name, also names a train/val image.

    Args:
        paths: the test images' paths (only the file names are read).
        labels: 0 / 1 per image (the parser is told the class).
        train_patients: the patient ids of the train and validation images (``split.csv``).

    Returns:
        A boolean mask over `paths`. A name that matches no known pattern is its own patient and never counts.
    """
    return np.array([i is not None and i in train_patients for i in _patient_ids(paths, labels)], dtype=bool)


def _split_sources(run: RunFiles) -> list[tuple[Path, pd.DataFrame | None, dict[str, Any] | None]]:
    """(folder, split.csv, config.yaml) of the run, or of an ensemble's members when the ensemble has no split.csv."""
    if run.split_table is not None or run.ensemble is None:
        return [(run.path, run.split_table, run.config)]
    sources = []
    for member in run.ensemble.get("members") or []:
        folder = Path(str(member))
        if folder.is_dir():
            member_run = RunDir(folder)
            sources.append((folder, read_split_table(member_run.split), read_config(member_run.config)))
    return sources


def _recorded_duplicates(
    sources: list[tuple[Path, pd.DataFrame, dict[str, Any] | None]], test_paths: list[str]
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """(mask of test images byte-identical to a train/val image, facts) from the SHA-256 the split files record;
    None when a split file does not record them."""
    tables = [split for _, split, _ in sources]
    if not all("sha256" in t.columns and t["sha256"].notna().all() for t in tables):
        return None, {}
    every = pd.concat(tables, ignore_index=True)
    train_rows = every.loc[every["split"] != "test"].drop_duplicates("path")
    train_hashes = set(train_rows["sha256"])
    by_path = dict(zip(every["path"], every["sha256"], strict=False))
    missing = [path for path in test_paths if path not in by_path]
    if missing:
        return None, {"note": f"{len(missing):,} test images are not in split.csv (e.g. {missing[0]})"}
    mask = np.array([by_path[path] in train_hashes for path in test_paths], dtype=bool)
    return mask, {"root": None, "n_train_hashed": len(train_rows), "n_test_hashed": len(test_paths)}


def _exact_duplicates(
    root_setting: Any, train_paths: list[str], test_paths: list[str], hashes: FileHashes
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """(mask of test images byte-identical to a train/val image, facts); the mask is None with a ``note`` why."""
    if not root_setting:
        return None, {"note": "config.yaml names no dataset root (data.root)"}
    folder = Path(str(root_setting))
    if not folder.is_dir():
        return None, {"note": f"the dataset root {folder} (config.yaml data.root) does not exist here"}
    try:
        root = find_dataset_root(folder).resolve()
    except PneumolabError as error:
        return None, {"note": str(error)}
    missing = [path for path in (*train_paths, *test_paths) if not (root / path).is_file()]
    if missing:
        return None, {"note": f"{len(missing):,} of the run's images are not under {root} (e.g. {missing[0]})"}
    try:
        train_hashes = {hashes(root / path) for path in train_paths}
        mask = np.array([hashes(root / path) in train_hashes for path in test_paths], dtype=bool)
    except OSError as error:
        return None, {"note": f"reading the images under {root} failed ({error})"}
    return mask, {"root": str(root), "n_train_hashed": len(train_paths), "n_test_hashed": len(test_paths)}


def overlap_removed(run: RunFiles, evaluation: Evaluation, hashes: FileHashes | None = None) -> dict[str, Any]:
    """The test metrics with and without the images that overlap the run's train/val images.

    Patient overlap: test images whose patient id (`shared_patient_mask`) names a non-test row of ``split.csv`` (an
    ensemble without one uses its members'). Exact duplicates: test images whose SHA-256 equals a train/val image's,
    read under the dataset root of ``config.yaml`` (``data.root``, relative to the current folder, as evaluation
    reads it); without that root they are not checked and ``duplicates_facts["note"]`` says why. Metrics are
    `evaluate_predictions` at the variant's threshold with the metrics file's bootstrap settings. A run whose
    evaluation wrote ``metrics/overlap.json`` for this variant is read from it (``from_file`` True); only older runs
    and ensembles are computed here.

    Args:
        run: the run.
        evaluation: the test variant it uses, with predictions.
        hashes: a file-hash memo shared by the runs of one report.

    Returns:
        ``label``, ``threshold``, ``note`` (why nothing was computed, else None), ``n``, ``shared_images``,
        ``shared_patients``, ``split_files`` (the split.csv files read), ``members_split`` (they are an ensemble's
        members'), ``duplicates`` (test images byte-identical
        to a train/val image, None when not checked), ``duplicates_only`` (those not already removed by patient),
        ``duplicates_facts`` (``root`` and counts hashed, or ``note``), and ``rows``: ``{"name", "n", "removed",
        "metrics" (the metric object, or None), "why" (why no metrics)}``, all test images first. ``view``: True
        when computed on a K-class evaluation's pneumonia-vs-normal view, at that view's threshold.
    """
    table = evaluation.predictions
    if table is None:
        raise ArtefactError(f"{evaluation.key}: no predictions to recompute metrics from")
    view, binary = evaluation.is_multiclass, _binary_of(evaluation)
    result: dict[str, Any] = {"label": evaluation.label, "n": len(table), "note": None, "rows": [], "view": view}
    if binary is None:
        result.update(threshold=None, note=NO_VIEW)
        return result
    saved = run.overlap or {}
    if saved.get("variant") == evaluation.key and saved.get("rows"):
        keys = ("threshold", "shared_images", "shared_patients", "duplicates", "duplicates_only", "duplicates_facts")
        result.update({key: saved.get(key) for key in keys}, rows=saved["rows"], from_file=True)
        result.update(split_files=[str(run.run_dir.split)], members_split=False)
        return result
    evaluation, table = binary, binary.predictions
    threshold = run.threshold(evaluation.split, evaluation.tta)
    result["threshold"] = threshold
    if threshold is None:
        result["note"] = "no decision threshold recorded for this variant"
        return result
    sources = [(folder, split, config) for folder, split, config in _split_sources(run) if split is not None]
    if not sources:
        result["note"] = "no split.csv (the run's train/validation/test assignment): overlap not checked"
        return result
    train = pd.concat([split[split["split"] != "test"] for _, split, _ in sources], ignore_index=True)
    train_paths = list(dict.fromkeys(train["path"]))
    test_paths, labels = table["path"].tolist(), table["label"].to_numpy()
    train_patients = set(train["patient_id"])
    test_patients = _patient_ids(test_paths, labels)
    shared_ids = {i for i in test_patients if i is not None and i in train_patients}
    shared = np.array([i in shared_ids for i in test_patients], dtype=bool)
    result["split_files"] = [str(RunDir(folder).split) for folder, _, _ in sources]
    result["members_split"] = run.split_table is None
    result["shared_images"] = int(shared.sum())
    result["shared_patients"] = len(shared_ids)
    root_setting = next(
        (root for _, _, config in sources if (root := ((config or {}).get("data") or {}).get("root"))), None
    )
    duplicates, facts = _recorded_duplicates(sources, test_paths)
    if duplicates is None:  # a split.csv from before it recorded SHA-256: hash the files, when they are here
        duplicates, facts = _exact_duplicates(root_setting, train_paths, test_paths, hashes or FileHashes())
    result["duplicates_facts"] = facts
    result["duplicates"] = None if duplicates is None else int(duplicates.sum())
    result["duplicates_only"] = None if duplicates is None else int((duplicates & ~shared).sum())

    bootstrap = (evaluation.metrics or {}).get("bootstrap") or {}
    n_resamples = int(finite(bootstrap.get("n_resamples")) or _DEFAULT_RESAMPLES)
    seed = int(finite(bootstrap.get("seed")) or _DEFAULT_SEED)
    probabilities = table["probability"].to_numpy()
    result["rows"] = overlap_rows(
        labels, probabilities, threshold, shared, duplicates, n_resamples=n_resamples, seed=seed
    )
    return result


# --------------------------------------------------------------------------------------- input gate and referral


@dataclass(frozen=True)
class RiskCoverage:
    """Accuracy of the answered films as fewer are answered, on one split of the variant the model uses.

    Attributes:
        label: the variant, e.g. ``test + TTA``.
        coverage: share of all the split's films answered (gate refusals included in the count), ascending.
        accuracy: accuracy of the answered films at each coverage.
        passed: share of the split's films the gate let through: the curve's right end.
        band: the fitted referral band's point, ``(coverage, accuracy of the answered films or None when it answers
            none)``, or None when neither ``metrics/selective.json`` nor the band's facts are there.
    """

    label: str
    coverage: np.ndarray
    accuracy: np.ndarray
    passed: float
    band: tuple[float, float | None] | None = None


def risk_coverage(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, refused: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and accuracy when only the most confident of the films the gate let through are answered.

    The films not `refused` are ranked by ``|p - threshold|``, most confident first; answering the first k gives
    coverage k / n (n: all films, refused ones included) and the accuracy of their decisions ``p >= threshold``.
    Films of equal confidence are answered together (one point).

    Args:
        labels: 0 (NORMAL) / 1 (PNEUMONIA) per film.
        probabilities: PNEUMONIA probability per film.
        threshold: the model's decision threshold.
        refused: True for each film the input gate refused (never answered); none by default.

    Returns:
        ``(coverage, accuracy)``, ascending coverage; empty when no film passed the gate.
    """
    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    kept = np.ones(y.size, dtype=bool) if refused is None else ~np.asarray(refused, dtype=bool)
    if not kept.any():
        return np.zeros(0), np.zeros(0)
    confidence = np.abs(p[kept] - threshold)
    order = np.argsort(-confidence, kind="stable")
    confidence = confidence[order]
    correct = ((p[kept] >= threshold).astype(np.int64) == y[kept])[order]
    answered = np.arange(1, confidence.size + 1)
    last = np.append(confidence[1:] != confidence[:-1], True)  # the last film of each group of equal confidence
    return answered[last] / y.size, np.cumsum(correct)[last] / answered[last]


def gate_refusals(run: RunFiles, evaluation: Evaluation) -> tuple[np.ndarray | None, str | None]:
    """Which of a variant's films the gate refused: ``gate/scores.csv``'s rows of its split, matched by path.

    Returns:
        ``(refused mask over the predictions' rows, None)``, or ``(None, why not)`` when the file is absent or its
        rows of the split do not name the predictions' films one to one.
    """
    table, predictions = run.gate_scores, evaluation.predictions
    if table is None:
        return None, "no gate/scores.csv, so which films the gate refused is not recorded"
    if predictions is None:
        return None, f"no predictions/{evaluation.key}.csv"
    rows = table[table["group"] == evaluation.split]
    paths = predictions["path"]
    if len(rows) != len(paths) or rows["name"].duplicated().any() or set(rows["name"]) != set(paths):
        return None, (
            f"the {evaluation.split} rows of gate/scores.csv do not name the films of predictions/{evaluation.key}.csv"
        )
    return rows.set_index("name")["refused"].reindex(paths).to_numpy(dtype=bool), None


def _band_point(
    summary: dict[str, Any] | None,
    band: ReferralBand | None,
    probabilities: np.ndarray,
    correct: np.ndarray,
    refused: np.ndarray,
) -> tuple[float, float | None] | None:
    """The band's (coverage, accuracy of the answered): ``metrics/selective.json``'s, else its rule applied here."""
    coverage = finite((summary or {}).get("coverage"))
    if coverage is not None:
        return coverage, finite(summary.get("accuracy_answered"))
    if band is None or not len(probabilities):
        return None
    answered = ~refused & ~band.refers(probabilities)
    return float(answered.mean()), float(correct[answered].mean()) if answered.any() else None


def gating_analysis(run: RunFiles) -> dict[str, Any] | None:
    """What the input gate and the referral band did, from the run's files; None when the run has neither.

    An ensemble, or a run evaluated before the gate existed, holds none of ``gate/scores.csv``,
    ``metrics/selective.json`` and the operating point's ``gate`` / ``referral``: then None, and the report shows no
    such section. Nothing is fit here; the band's rule (`ReferralBand.refers`) is applied to the saved probabilities
    only when ``metrics/selective.json`` does not hold the band's coverage.

    Returns:
        ``gate`` and ``referral`` (their facts, or None); ``groups``: per ``gate/scores.csv`` group in the file's order
        ``{"group", "n", "refused", "share", "scores"}`` (``scores``: the finite gate scores; from
        ``metrics/selective.json``'s ``refused_share`` alone, ``n`` and ``refused`` are None and ``scores`` empty);
        ``summaries``: ``{split: selective summary}`` as ``metrics/selective.json`` holds them; ``curves``: a
        `RiskCoverage` per split of the used variant with predictions and known refusals; ``notes``: why a part
        is missing.
    """
    gate, referral, selective, scores = run.gate_facts, run.referral_facts, run.selective, run.gate_scores
    if gate is None and referral is None and selective is None and scores is None:
        return None
    notes: list[str] = []
    groups: list[dict[str, Any]] = []
    if scores is not None:
        for group, rows in scores.groupby("group", sort=False):
            values = rows["gate_score"].to_numpy(dtype=np.float64)
            refused = int(rows["refused"].sum())
            groups.append(
                {
                    "group": str(group),
                    "n": len(rows),
                    "refused": refused,
                    "share": refused / len(rows),
                    "scores": values[np.isfinite(values)],
                }
            )
    else:
        shares = (selective or {}).get("refused_share") or {}
        for group, share in shares.items():
            if finite(share) is not None:
                groups.append(
                    {"group": str(group), "n": None, "refused": None, "share": finite(share), "scores": np.zeros(0)}
                )
        notes.append("no gate/scores.csv: no score distribution, and the risk-coverage curve is not drawn")
    summaries = {s: (selective or {}).get(s) for s in SPLITS if isinstance((selective or {}).get(s), dict)}
    if selective is None:
        notes.append("no metrics/selective.json: the band's per-class coverage is not recorded")
    band = None
    if referral is not None:
        try:
            band = ReferralBand.from_saved(referral)
        except (KeyError, TypeError, ValueError, PneumolabError):
            notes.append("the operating point's referral facts are incomplete")
    curves = []
    if run.is_multiclass:
        notes.append(
            "the risk-coverage curve, not drawn for K-class runs: it ranks films by |P(PNEUMONIA) - threshold|, a "
            "binary confidence, while a K-class model decides by argmax and has no referral band"
        )
    for split in SPLITS if scores is not None and not run.is_multiclass else ():
        evaluation = used_evaluation(run, split)
        if evaluation is None:
            continue
        refused, why = gate_refusals(run, evaluation)
        threshold = run.threshold(split, evaluation.tta)
        if threshold is None and band is not None:
            threshold = band.threshold_
        if refused is None or threshold is None:
            notes.append(f"no risk-coverage curve on {evaluation.label}: {why or 'no decision threshold recorded'}")
            continue
        table = evaluation.predictions
        y, p = table["label"].to_numpy(), table["probability"].to_numpy(dtype=np.float64)
        coverage, accuracy = risk_coverage(y, p, threshold, refused)
        correct = (p >= threshold).astype(np.int64) == y
        curves.append(
            RiskCoverage(
                label=evaluation.label,
                coverage=coverage,
                accuracy=accuracy,
                passed=float((~refused).mean()),
                band=_band_point(summaries.get(split), band, p, correct, refused),
            )
        )
    return {
        "gate": gate,
        "referral": referral,
        "groups": groups,
        "summaries": summaries,
        "curves": curves,
        "notes": notes,
    }
