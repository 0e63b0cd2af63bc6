"""Calibrate a model on a few labelled films of a new site, and write the result as a new artefact.

What was fit on the model's validation films is fit again on the local ones (`SiteCalibrator`, scikit-learn
conventions):

* the probabilities: a temperature, or a logistic recalibration ``sigmoid(a z + b)`` of the logit margin ``z``
  (Platt), stored as the card's temperature ``1 / a`` and class bias ``(0, b)``, which every backend already applies.
  A fit learns the labelled films' share of pneumonia as its prior, and labelled films are usually gathered per
  class, not at the site's prevalence; so the bias is moved by ``logit(q) - logit(share)`` to the site's prevalence
  ``q`` (Saerens et al. 2002): given, or estimated by EM (`estimate_prevalence`) from the site's unlabelled films
  with the recalibrated probabilities, which label shift alone no longer biases. The move is monotone, so the
  decisions below (threshold, band) are the same films either way; only the probabilities change;
* the threshold, by the model's own rule (its card's ``threshold_method``). For a sensitivity target the threshold
  is the highest one whose one-sided Clopper-Pearson lower bound on local sensitivity reaches the target (a
  Learn-then-Test fixed-sequence test: sensitivity falls as the threshold rises, so the first threshold that fails
  ends the scan), so the target holds on new films of the site with the stated confidence, not just on these;
* the class-conditional referral band (`pneumolab.referral.ReferralBand`) at the card's alpha. Split conformal
  needs ``n + 1 >= 1 / alpha`` films of each class (below that every film of the class would be referred), so
  fewer is refused in one line; at any n the realised per-class error is itself random, Beta(n + 1 - l, l) with
  ``l = ceil((n + 1)(1 - alpha))`` (Vovk 2012), and its 5-95 % range is recorded.

`calibrate_artefact` writes a NEW artefact: the weights and gate copied byte for byte, the card's operating point
replaced, and ``site`` recording where each value came from (site, date, counts per class, before and after values,
the local figures before and from a patient-grouped cross-fit with 95 % intervals); its ``reference.npz`` (the local
films' scores) is what `site check` and the drift watch compare new films with. The original is untouched.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from scipy.special import expit, logit
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils.validation import check_is_fitted

from pneumolab.errors import ArtefactError, SettingError
from pneumolab.evaluate.calibration import TemperatureScaler, ThresholdSelector, expected_calibration_error
from pneumolab.fsutil import atomic_dir, file_sha256
from pneumolab.inference.card import GATE_FILE, read_card
from pneumolab.inference.loader import load_backend
from pneumolab.referral import ReferralBand
from pneumolab.site.films import (
    REFERENCE_FILE,
    FilmScores,
    check_binary,
    labelled_films,
    read_films,
    save_reference,
    score_films,
)
from pneumolab.site.shift import em_prevalence

__all__ = [
    "RECALIBRATIONS",
    "SiteCalibrator",
    "band_error_range",
    "calibrate_artefact",
    "check_band_counts",
    "estimate_prevalence",
    "site_figures",
    "threshold_rule",
]

RECALIBRATIONS = ("logistic", "temperature")
DEFAULT_CONFIDENCE = 0.9  # one-sided confidence of the sensitivity bound: the target holds in 90 % of sites' draws
_CROSSFIT_FOLDS = 10  # many folds: each fit keeps 90 % of the few local films, which the band needs most


def threshold_rule(method: str) -> ThresholdSelector:
    """The threshold rule a card's ``threshold_method`` words name (e.g. ``sensitivity >= 0.95 on validation``)."""
    words = method.lower()
    target = re.search(r"sensitivity\s*>=\s*([0-9.]+)", words)
    if target:
        return ThresholdSelector("target_sensitivity", target_sensitivity=float(target.group(1)))
    fixed = re.search(r"fixed at\s*([0-9.]+)", words)
    if fixed:
        return ThresholdSelector("fixed", fixed=float(fixed.group(1)))
    for key, name in (("youden", "youden"), ("f1", "f1")):
        if key in words:
            return ThresholdSelector(name)
    return ThresholdSelector("balanced_accuracy")


def band_needs(alpha: float) -> int:
    """Films of one class a band at `alpha` needs: the least n with ``n + 1 >= 1 / alpha``."""
    return max(1, math.ceil(1 / alpha - 1 - 1e-9))


def check_band_counts(counts: dict[str, int], alpha: float, where: str) -> None:
    """Refuse in one line when a class has too few films for a band at `alpha` (module doc)."""
    need = band_needs(alpha)
    for name, n in counts.items():
        if n < need:
            low, high = band_error_range(max(n, 1), alpha) if n else (0.0, 1.0)
            raise SettingError(
                f"{where}: {n} {name} films; a referral band at alpha {alpha:g} needs n + 1 >= 1/alpha, i.e. at "
                f"least {need} per class (below that every {name} film is referred); with {need} its realised "
                f"{name} error would range over {low:.1%}-{high:.1%} (5-95 %). Add films or pass --alpha "
                f"{1 / (n + 1):.3g}"
                if n
                else f"{where}: no {name} films; calibration needs films of both classes"
            )


def band_error_range(n: int, alpha: float, coverage: float = 0.9) -> tuple[float, float]:
    """The central `coverage` range of a class-conditional band's realised error with n films of the class."""
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank > n:
        return 0.0, 0.0  # every film of the class is referred: none is answered wrongly, none answered
    tail = (1 - coverage) / 2
    error = stats.beta(n + 1 - rank, rank)
    return float(error.ppf(tail)), float(error.ppf(1 - tail))


def _sensitivity_threshold(labels: np.ndarray, p: np.ndarray, target: float, confidence: float):
    """The highest threshold whose Clopper-Pearson lower bound on sensitivity reaches `target`; also the bound
    and whether the target was reachable at all with these films."""
    positives = np.sort(p[labels == 1])
    n = len(positives)
    allowed, bound = -1, 0.0
    for misses in range(n):
        low = float(stats.beta.ppf(1 - confidence, n - misses, misses + 1))
        if low < target:
            break
        allowed, bound = misses, low
    reachable = allowed >= 0
    at = positives[max(allowed, 0)]  # misses = allowed: the films below `at` are the misses
    below = p[p < at]
    threshold = float((at + below.max()) / 2) if below.size else float(at / 2)
    if not reachable:
        bound = float(stats.beta.ppf(1 - confidence, n, 1))
    return threshold, bound, reachable


class SiteCalibrator(BaseEstimator):
    """Recalibration, threshold and referral band fit on local labelled films (module doc).

    Args:
        method: ``logistic`` (a, b) or ``temperature`` (one scale).
        threshold_method: the card's words for its threshold rule.
        alpha: the band's per-class level; None fits no band.
        confidence: one-sided confidence of the sensitivity bound.
        strict: refuse too few films for the band (False: fit it anyway; every film of such a class is referred,
            which a cross-fit must be able to show).
        prevalence: the site's share of pneumonia the probabilities are moved to (None: the labelled films' share).
    """

    def __init__(
        self,
        method: str = "logistic",
        threshold_method: str = "max balanced accuracy on validation",
        alpha: float | None = 0.02,
        confidence: float = DEFAULT_CONFIDENCE,
        strict: bool = True,
        prevalence: float | None = None,
    ) -> None:
        if method not in RECALIBRATIONS:
            raise SettingError(f"recalibration method: {method!r} is not one of {', '.join(RECALIBRATIONS)}")
        if not 0.5 <= confidence < 1:
            raise SettingError(f"confidence: must be in [0.5, 1), got {confidence}")
        if prevalence is not None and not 0 < prevalence < 1:
            raise SettingError(f"prevalence: must be in (0, 1), got {prevalence}")
        self.method = method
        self.threshold_method = threshold_method
        self.alpha = alpha
        self.confidence = confidence
        self.strict = strict
        self.prevalence = prevalence

    def fit(self, margins: np.ndarray, labels: np.ndarray) -> SiteCalibrator:
        """Fit on the local films' logit margins (before any temperature) and 0/1 labels."""
        z, y = np.asarray(margins, float), np.asarray(labels).astype(int)
        counts = {"NORMAL": int((y == 0).sum()), "PNEUMONIA": int((y == 1).sum())}
        if self.strict and self.alpha is not None:
            check_band_counts(counts, self.alpha, "local films")
        if min(counts.values()) == 0:
            raise SettingError("local films: calibration needs films of both classes")
        if self.method == "temperature":
            self.temperature_, self.bias_ = float(TemperatureScaler().fit(z, y).temperature_), 0.0
        else:
            fit = LogisticRegression(C=1e4).fit(z[:, None], y)
            slope = float(fit.coef_[0, 0])
            if slope <= 0:
                raise SettingError("local films: the model ranks them backwards (logistic slope <= 0); do not use it")
            self.temperature_, self.bias_ = 1.0 / slope, float(fit.intercept_[0])
        self.labelled_prevalence_ = float(y.mean())
        if self.prevalence is not None:  # from the labelled films' prior to the site's (module doc)
            self.bias_ += float(logit(self.prevalence) - logit(self.labelled_prevalence_))
        p = self.transform(z)
        rule = threshold_rule(self.threshold_method)
        self.sensitivity_bound_ = None
        if rule.method == "target_sensitivity":
            self.threshold_, bound, reachable = _sensitivity_threshold(y, p, rule.target_sensitivity, self.confidence)
            self.sensitivity_bound_ = {
                "target": rule.target_sensitivity,
                "confidence": self.confidence,
                "lower_bound": bound,
                "reachable": reachable,
            }
            self.threshold_method_ = (
                f"sensitivity >= {rule.target_sensitivity:g} ({self.confidence:.0%} "
                "Clopper-Pearson lower bound) on local films"
            )
        else:
            self.threshold_ = float(rule.fit(y, p).threshold_)
            self.threshold_method_ = rule.describe().replace("on validation", "on local films")
        self.band_ = ReferralBand(self.alpha).fit(y, p, self.threshold_) if self.alpha is not None else None
        self.counts_ = counts
        return self

    def transform(self, margins: np.ndarray) -> np.ndarray:
        """Recalibrated P(PNEUMONIA) of logit margins."""
        check_is_fitted(self, "temperature_")
        return expit(np.asarray(margins, float) / self.temperature_ + self.bias_)


def estimate_prevalence(calibrator: SiteCalibrator, margins: np.ndarray) -> float:
    """The site's share of pneumonia by EM on unlabelled films' margins, through a calibrator fit with no
    `prevalence` (its probabilities then carry the labelled films' prior, which EM starts from)."""
    check_is_fitted(calibrator, "labelled_prevalence_")
    if calibrator.prevalence is not None:
        raise SettingError("estimate the prevalence with a calibrator fit without one")
    return em_prevalence(calibrator.transform(margins), calibrator.labelled_prevalence_)


def site_figures(
    labels: np.ndarray,
    p: np.ndarray,
    threshold: float | np.ndarray,
    referred: np.ndarray | None,
    *,
    intervals: bool = False,
) -> dict[str, Any]:
    """The figures a site cares about: accuracy, sensitivity, specificity, ECE, log loss, coverage, selective
    accuracy, and per class the share of its films answered wrongly (the band's promise). `threshold` may be one
    per film (a cross-fit's folds). With `intervals`,
    ``ci95``: Clopper-Pearson for the shares, a percentile bootstrap (scipy) for ECE and log loss."""
    y, p = np.asarray(labels).astype(int), np.asarray(p, float)
    said = (p >= threshold).astype(int)
    answered = np.ones(len(y), bool) if referred is None else ~np.asarray(referred, bool)
    wrong = said != y
    counts = {
        "accuracy": (int((~wrong).sum()), len(y)),
        "sensitivity": (int((said[y == 1] == 1).sum()), int((y == 1).sum())),
        "specificity": (int((said[y == 0] == 0).sum()), int((y == 0).sum())),
        "coverage": (int(answered.sum()), len(y)),
        "selective_accuracy": (int((answered & ~wrong).sum()), int(answered.sum())),
        "error_normal": (int((answered & wrong)[y == 0].sum()), int((y == 0).sum())),
        "error_pneumonia": (int((answered & wrong)[y == 1].sum()), int((y == 1).sum())),
    }
    out: dict[str, Any] = {key: (k / n if n else None) for key, (k, n) in counts.items()}
    out["ece"] = float(expected_calibration_error(y, p))
    out["log_loss"] = float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1]))
    out["n"] = len(y)
    if intervals:
        ci = {
            key: list(stats.binomtest(k, n).proportion_ci(0.95, method="exact")) if n else None
            for key, (k, n) in counts.items()
        }
        for key, function in (("ece", expected_calibration_error), ("log_loss", _log_loss)):
            boot = stats.bootstrap(
                (y, p), function, paired=True, vectorized=False, n_resamples=400, method="percentile", random_state=0
            )
            ci[key] = [float(boot.confidence_interval.low), float(boot.confidence_interval.high)]
        out["ci95"] = {key: [float(v) for v in value] if value else None for key, value in ci.items()}
    return out


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    return float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1]))


def crossfit(scores: FilmScores, calibrator: SiteCalibrator, *, folds: int = _CROSSFIT_FOLDS) -> dict[str, Any]:
    """Out-of-fold figures: the calibration fit on the other patients' films, applied to each fold's films."""
    y, groups = scores.labels.astype(int), scores.patients
    folds = max(2, min(folds, len(np.unique(groups[y == 0])), len(np.unique(groups[y == 1]))))
    p_out, said_threshold, referred = np.zeros(len(y)), np.zeros(len(y)), np.zeros(len(y), bool)
    # at the labelled films' own prior: these films are not at the site's prevalence, so probabilities moved to it
    # would read as miscalibrated here (the decisions do not depend on it)
    params = {**calibrator.get_params(), "strict": False, "prevalence": None}
    for train, held in StratifiedGroupKFold(folds, shuffle=True, random_state=0).split(y, y, groups):
        fold = SiteCalibrator(**params).fit(scores.margins[train], y[train])
        p_out[held] = fold.transform(scores.margins[held])
        said_threshold[held] = fold.threshold_
        if fold.band_ is not None:
            referred[held] = fold.band_.refers(p_out[held])
    return {
        "folds": folds,
        "grouped_by": "patient",
        # each film decided by its own fold's threshold and band, as the fit on the other patients would decide it
        **site_figures(y, p_out, said_threshold, referred if calibrator.alpha is not None else None, intervals=True),
    }


def calibrate_artefact(
    model: str | os.PathLike[str] | None,
    *,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    site: str | None = None,
    method: str = "logistic",
    alpha: float | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    prevalence: float | None = None,
    unlabelled: list[str | os.PathLike[str]] | None = None,
    backend: str = "pytorch",
    progress: bool = True,
) -> dict[str, Any]:
    """Fit the model's operating point on labelled local films and write a new artefact at `out` (module doc).

    The probabilities are moved to the site's prevalence: `prevalence` when given, else estimated by EM from the
    `unlabelled` films (files or folders of the site), else the labelled films' own share is kept.

    Returns the new card. Raises `SettingError` (one line) for too few films of a class, `ArtefactError` for a
    model that is not an artefact (a run folder: export it first) or an `out` that already exists.
    """
    trained = load_backend(model, backend)
    check_binary(trained)
    source = Path(trained.source)
    if not (source / "card.json").is_file():
        raise ArtefactError(f"{source}: not an exported artefact; run pneumolab export {source} first")
    out = Path(out)
    if out.exists():
        raise ArtefactError(f"{out}: already exists; the calibrated model is written to a new folder")
    card = dict(read_card(source / "card.json").facts)
    alpha = alpha if alpha is not None else (card.get("referral") or {}).get("alpha", 0.02)
    images, labels, patients, _ = labelled_films(trained, data, progress=progress)
    counts_all = {"NORMAL": int((labels == 0).sum()), "PNEUMONIA": int((labels == 1).sum())}
    check_band_counts(counts_all, alpha, str(data))
    scores = score_films(trained, images, progress=progress, labels=labels, patients=patients)
    kept = scores.subset(np.flatnonzero(~scores.refused))  # the gate refuses these in service too
    counts = {"NORMAL": int((kept.labels == 0).sum()), "PNEUMONIA": int((kept.labels == 1).sum())}
    check_band_counts(counts, alpha, f"{data} (after {int(scores.refused.sum())} films refused by the gate)")
    if prevalence is not None and unlabelled:
        raise SettingError(
            "--prevalence and --unlabelled: give the site's prevalence or films to estimate it, not both"
        )
    calibrator = SiteCalibrator(method, card.get("threshold_method", ""), alpha, confidence)
    share = float(kept.labels.mean())
    prevalence_facts: dict[str, Any] = {"value": share, "how": "the labelled films' own share (nothing else given)"}
    if prevalence is not None:
        prevalence_facts = {"value": prevalence, "how": "given"}
    elif unlabelled:
        paths, unlabelled_images = read_films(trained, unlabelled)
        site_films = score_films(trained, unlabelled_images, progress=progress)
        answered = ~site_films.refused
        if not answered.any():
            raise SettingError(
                f"{unlabelled[0]}: every unlabelled film was refused by the gate; nothing to estimate from"
            )
        estimate = estimate_prevalence(calibrator.fit(kept.margins, kept.labels), site_films.margins[answered])
        prevalence_facts = {
            "value": estimate,
            "how": f"EM (Saerens et al. 2002) on {int(answered.sum())} unlabelled films of the site, through the "
            f"recalibration ({len(paths) - int(answered.sum())} refused by the gate)",
            "inputs": [str(i) for i in unlabelled],
        }
    prevalence_facts["labelled_share"] = share
    calibrator.set_params(prevalence=prevalence_facts["value"])  # the labelled share itself moves nothing
    calibrator.fit(kept.margins, kept.labels)
    band = calibrator.band_
    before_band = ReferralBand.from_saved(card["referral"]) if card.get("referral") else None
    before = site_figures(
        kept.labels,
        kept.probabilities,
        trained.threshold,
        before_band.refers(kept.probabilities) if before_band else None,
        intervals=True,
    )
    site_name = site or Path(data).resolve().stem
    band_facts = band.describe()
    band_facts.update(
        fit_on=f"site {site_name} ({counts['NORMAL']} NORMAL, {counts['PNEUMONIA']} PNEUMONIA films)",
        guarantee=f"per class, at most {alpha:.0%} of films answered wrongly if new films are exchangeable with "
        f"site {site_name}'s calibration films",
        realised_error_range={name: list(band_error_range(n, alpha)) for name, n in counts.items()},
    )
    after_kept = calibrator.transform(kept.margins)
    new_reference = FilmScores(**{**kept.__dict__, "probabilities": after_kept})
    site_facts = {
        "name": site_name,
        "date": dt.date.today().isoformat(),
        "data": str(data),
        "counts": counts,
        "patients": len(np.unique(kept.patients)),
        "refused_by_gate": int(scores.refused.sum()),
        "source_artefact": str(source),
        "source_weights_sha256": card.get("weights_sha256"),
        "recalibration": method,
        "prevalence": prevalence_facts,
        "before": {
            "temperature": card.get("temperature"),
            "class_bias": card.get("class_bias"),
            "threshold": card.get("threshold"),
            "threshold_method": card.get("threshold_method"),
            "band": (card.get("referral") or {}).get("band"),
        },
        "after": {
            "temperature": calibrator.temperature_,
            "class_bias": [0.0, calibrator.bias_],
            "threshold": calibrator.threshold_,
            "threshold_method": calibrator.threshold_method_,
            "band": list(band.band_),
            "sensitivity_bound": calibrator.sensitivity_bound_,
        },
        "local_figures": {
            "before": {"how": "the original card on all local films (nothing fit)", **before},
            "after": {
                "how": "patient-grouped cross-fit on the local films (out of fold), at their own share of pneumonia",
                **crossfit(kept, calibrator),
            },
        },
    }
    card.update(
        temperature=calibrator.temperature_,
        class_bias=[0.0, calibrator.bias_] if method == "logistic" or calibrator.bias_ else None,
        threshold=calibrator.threshold_,
        threshold_method=calibrator.threshold_method_,
        referral=band_facts,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        source=str(source),
        site=site_facts,
    )
    with atomic_dir(out) as tmp:
        shutil.copyfile(source / "model.safetensors", tmp / "model.safetensors")
        if (source / GATE_FILE).is_file():
            shutil.copyfile(source / GATE_FILE, tmp / GATE_FILE)
        save_reference(
            new_reference,
            tmp / REFERENCE_FILE,
            source=f"site {site_name}: {len(kept)} calibration films",
            backend=trained.backend,
            precision=trained.compute_precision,
        )
        card["reference_sha256"] = file_sha256(tmp / REFERENCE_FILE)
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
