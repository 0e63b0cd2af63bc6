"""`site check`: how a site's unlabelled films differ from the films the model's operating point was fit on.

Three two-sample tests against the model's reference (`pneumolab.site.films`): KS on the input gate's score, KS on
P(PNEUMONIA), and MMD with a permutation p-value on the gate's pooled features (`pneumolab.site.shift`). The gate
score and the features depend on the class, so a change of prevalence alone moves them too: they are compared with
the reference subsampled to the prevalence EM estimates (one class kept whole), and only what that does not explain
counts as the films differing. The
prevalence the model implies by EM and by BBSE with bootstrap intervals; the shares the gate refuses and the band
refers; and how the films are framed and exposed (`pneumolab.site.films.STATISTICS`, what the stress evaluation
perturbs), each against the prevalence-matched reference with its KS p-value. Those say what differs; they are not
in the verdict's family of tests (the features already carry what the network sees of framing and exposure).

The verdict, at a family-wise level of 5 % (Bonferroni over the tests that ran):

* **the films themselves differ**: the gate score or the features moved. The band's promise and the probabilities
  were made for other films: calibrate on a few labelled local films before trusting them;
* **a prevalence change only**: only the outputs moved, as a change in the share of pneumonia moves them; EM and
  BBSE say by how much (when they disagree, prevalence alone does not explain it, and the verdict says so);
* **no detectable shift** at this many films.

Written as JSON and as one self-contained HTML page (jinja2, like the report's).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from pneumolab.fsutil import write_json_atomic, write_text_atomic
from pneumolab.inference.card import read_card
from pneumolab.inference.loader import load_backend
from pneumolab.inference.steps import InferenceModel
from pneumolab.site.films import STATISTICS, FilmScores, load_reference, read_films, score_films
from pneumolab.site.shift import ks_test, mmd_test, prevalence_estimates

__all__ = ["LEVEL", "calibrated_prior", "check_site", "render_check", "shift_report"]

LEVEL = 0.05  # family-wise: each of m tests is judged at LEVEL / m


def shift_report(
    model: InferenceModel,
    local: FilmScores,
    reference: FilmScores,
    *,
    prior: float | None = None,
    permutations: int = 500,
    resamples: int = 300,
    seed: int = 0,
) -> dict[str, Any]:
    """The tests, prevalence estimates, shares and verdict for scored local films against a reference; `prior` is
    the share of pneumonia the model's probabilities are calibrated to when it is not the reference's
    (`calibrated_prior`)."""
    kept = ~local.refused
    prevalence = prevalence_estimates(
        local.probabilities[kept],
        reference_labels=reference.labels,
        reference_probabilities=reference.probabilities,
        threshold=model.threshold,
        prior=prior,
        resamples=resamples,
        seed=seed,
    )
    # the films' own tests compare with the reference at the prevalence the model implies: a change of prevalence
    # alone moves the gate score and the features too (they depend on the class), and must not read as other films
    matched = reference.subset(prevalence_matched(reference.labels, prevalence["em"]["estimate"], seed=seed))
    tests: dict[str, dict[str, float]] = {}
    gated = np.isfinite(local.gate_scores).all() and np.isfinite(reference.gate_scores).all()
    if gated and len(local.gate_scores):
        tests["gate_score"] = {"test": "KS", **ks_test(local.gate_scores, matched.gate_scores)}
    tests["output"] = {"test": "KS", **ks_test(local.probabilities, reference.probabilities)}
    if local.features.shape[1] and reference.features.shape[1]:
        tests["features"] = {
            "test": f"MMD, Gaussian kernel, {permutations} permutations",
            **mmd_test(local.features, matched.features, permutations=permutations, seed=seed),
        }
    each = LEVEL / len(tests)
    for facts in tests.values():
        facts["flagged"] = bool(facts["p_value"] < each)
    band = model.band
    referred = band.refers(local.probabilities[kept]) if band is not None and kept.any() else np.zeros(0, bool)
    shares = {
        "n": len(local),
        "refused": float(local.refused.mean()) if len(local) else 0.0,
        "referred": float(referred.mean()) if len(referred) else 0.0,
        "reference_refused": float(reference.refused.mean()),
        "reference_referred": float(band.refers(reference.probabilities).mean()) if band is not None else 0.0,
    }
    return {
        "n": len(local),
        "n_reference": len(reference),
        "film_statistics": film_statistics_report(local, matched),
        "level": LEVEL,
        "level_per_test": each,
        "tests": tests,
        "prevalence": prevalence,
        "shares": shares,
        "verdict": verdict(tests, prevalence, len(local)),
    }


def calibrated_prior(model: Any) -> float | None:
    """The share of pneumonia `site calibrate` moved the model's probabilities to, from its artefact's card (None:
    not moved, so the reference films' own share, which they were fit on)."""
    source = getattr(model, "source", None)
    card_file = Path(source) / "card.json" if source else None
    if card_file is None or not card_file.is_file():
        return None
    value = ((read_card(card_file).facts.get("site") or {}).get("prevalence") or {}).get("value")
    return None if value is None else float(value)


def film_statistics_report(local: FilmScores, reference: FilmScores) -> dict[str, dict[str, Any]]:
    """Per framing / exposure statistic: local and reference medians and quartiles, KS statistic and p-value (empty
    when the reference was written without them)."""
    if local.statistics is None or reference.statistics is None or not len(local) or not len(reference):
        return {}
    out = {}
    for column, (name, meaning) in enumerate(STATISTICS.items()):
        mine, theirs = local.statistics[:, column], reference.statistics[:, column]
        out[name] = {
            "meaning": meaning,
            "local": [float(q) for q in np.quantile(mine, (0.25, 0.5, 0.75))],
            "reference": [float(q) for q in np.quantile(theirs, (0.25, 0.5, 0.75))],
            **ks_test(mine, theirs),
        }
    return out


def prevalence_matched(labels: np.ndarray, prevalence: float, *, seed: int = 0) -> np.ndarray:
    """Rows of the reference whose share of PNEUMONIA is `prevalence`: one class kept whole, the other subsampled."""
    labels = np.asarray(labels).astype(int)
    rows = [np.flatnonzero(labels == c) for c in (0, 1)]
    q = float(np.clip(prevalence, 0.01, 0.99))
    if q / (1 - q) > len(rows[1]) / max(len(rows[0]), 1):
        keep = (max(1, round(len(rows[1]) * (1 - q) / q)), len(rows[1]))
    else:
        keep = (len(rows[0]), max(1, round(len(rows[0]) * q / (1 - q))))
    rng = np.random.default_rng(seed)
    return np.sort(
        np.concatenate([rng.choice(r, min(k, len(r)), replace=False) for r, k in zip(rows, keep, strict=True)])
    )


def verdict(tests: dict[str, dict[str, Any]], prevalence: dict[str, Any], n: int) -> dict[str, Any]:
    """The verdict in words, with the numbers behind it (module doc)."""
    films = [name for name in ("gate_score", "features") if tests.get(name, {}).get("flagged")]
    em, bbse = prevalence["em"]["estimate"], prevalence["bbse"]["estimate"]
    estimates = f"EM says {em:.0%} pneumonia, BBSE {bbse:.0%} (validation {prevalence['reference']:.0%}); " + (
        "they agree" if prevalence["agree"] else "they disagree, so prevalence alone does not explain the shift"
    )
    p_values = ", ".join(f"{name.replace('_', ' ')} p = {tests[name]['p_value']:.2g}" for name in tests)
    if films:
        kind = "films differ"
        text = (
            f"The films themselves differ from the model's validation films ({p_values}): calibrate on a few "
            "labelled local films (pneumolab site calibrate) before trusting the referral band and the "
            f"probabilities. Prevalence alone does not explain the shift; {estimates}."
        )
    elif tests["output"]["flagged"]:
        kind = "prevalence change only"
        text = f"Only the outputs moved ({p_values}), as a change of prevalence moves them: {estimates}."
    else:
        kind = "no detectable shift"
        text = f"No detectable shift at {n} films ({p_values}); {estimates}."
    return {"kind": kind, "shifted": kind != "no detectable shift", "text": text}


def check_site(
    model: str | os.PathLike[str] | None,
    inputs: list[str | os.PathLike[str]],
    *,
    reference_data: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    backend: str = "pytorch",
    progress: bool = True,
) -> dict[str, Any]:
    """Check unlabelled local films (files and folders) against the model's reference; with `out`, write
    ``site-check.json`` and ``site-check.html`` there. Returns the report."""
    trained = load_backend(model, backend)
    reference, facts = load_reference(trained, reference_data, progress=progress)
    paths, images = read_films(trained, inputs)
    local = score_films(trained, images, progress=progress)
    report = {
        "model": str(trained.source),
        "reference": facts,
        "inputs": [str(i) for i in inputs],
        **shift_report(trained, local, reference, prior=calibrated_prior(trained)),
    }
    report["films"] = [
        {"path": str(path), "probability": float(p), "gate_score": float(g), "refused": bool(r)}
        for path, p, g, r in zip(paths, local.probabilities, local.gate_scores, local.refused, strict=True)
    ]
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "site-check.json", report)
        write_text_atomic(folder / "site-check.html", render_check(report))
    return report


def _percent(value: float | None) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.1%}"


def render_check(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("pneumolab.site", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    environment.filters["percent"] = _percent
    environment.filters["json"] = lambda value: html.escape(json.dumps(value, indent=2))
    return environment.get_template("check.html.j2").render(report=report)
