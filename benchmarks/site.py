"""Measure `site check` and `site calibrate` with the official test split as a second site (issue 26).

EVALUATION.md rule 11: many patient-grouped draws from test, reported as mean and 5-95 % range with k and the
number of draws; nothing here chooses or tunes a model. The model (default: the bundled one) scores the validation
split (its reference, carved again from the card) and the 624 test films once per run (kept in memory, and in
``--scores`` so a second run skips the network); every draw after that is arithmetic on those scores.

* calibration: for k = 25, 50, 100, 200 labelled films per class, drawn by patient from test, `SiteCalibrator`
  (the card's threshold rule with its Clopper-Pearson bound, the band at the card's alpha or each `--alpha`, a
  logistic recalibration) is fit on the draw and measured on the rest of test: the band's per-class error of the
  answered films against alpha, coverage, selective accuracy, ECE, log loss, sensitivity against the target; beside
  the card's own operating point on the same rest. The draw is half pneumonia, the site is not: the probabilities
  are moved to the prevalence EM estimates from the rest's films, unlabelled (`estimate_prevalence`, what
  `site calibrate --unlabelled` does); ``ece_labelled_prior`` is the ECE without that move, ``ece_true_prior`` the
  ECE with the rest's true prevalence instead of EM's;
* check: for n = 50, 100, 200, 400 unlabelled films, how often `site check`'s verdict says shifted for a draw from
  test (power, against the whole validation reference) and for a draw from validation (false alarms, against the
  validation films not drawn); EM and BBSE prevalence estimates against test's 62.5 %. Test draws are
  patient-grouped at test's own prevalence; validation draws are by film (the cached reference keeps no patient
  ids; validation has few films per patient). Per framing / exposure statistic, how often its KS test (against
  the prevalence-matched reference) has p < 0.05 in each.

    nice -n 15 python benchmarks/site.py --model src/pneumolab/bundled/mobilenetv2-128-kermany-binary-v2 \
        --data ../shared/data/chest_xray --draws 300 --check-draws 100 [--alpha 0.02 0.03] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from pneumolab.data.cache import default_cache_root, prepare_cache
from pneumolab.data.tasks import task_for_classes, task_labels
from pneumolab.inference.loader import load_backend
from pneumolab.referral import ReferralBand
from pneumolab.site.calibrate import SiteCalibrator, estimate_prevalence, site_figures
from pneumolab.site.check import calibrated_prior, shift_report
from pneumolab.site.films import FilmScores, load_reference, score_films

KS = (25, 50, 100, 200)
NS = (50, 100, 200, 400)


def test_scores(model, data: str, cache_file: Path) -> FilmScores:
    """The test films' scores, labels and patients (from `cache_file` when a previous run left it)."""
    if cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as saved:
            return FilmScores(**{key: saved[key] for key in saved.files})
    task = task_for_classes(model.classes)
    cache, _ = prepare_cache(data, size=model.cache_size, classes=task.folder_classes)
    rows = np.flatnonzero(cache.manifest["split"].to_numpy() == "test")
    labels = task_labels(cache.manifest, model.classes)[rows]
    patients = cache.manifest["patient_id"].to_numpy()[rows]
    scores = score_films(model, np.asarray(cache.images[rows]), labels=labels, patients=patients)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache_file, **{k: v for k, v in scores.__dict__.items() if v is not None})
    return scores


def patient_draw(scores: FilmScores, per_class: dict[int, int], rng: np.random.Generator) -> np.ndarray:
    """Rows of whole patients, taken in random order per class until each class has its count (or just over)."""
    chosen = []
    for label, count in per_class.items():
        rows = np.flatnonzero(scores.labels == label)
        patients = rng.permutation(np.unique(scores.patients[rows]))
        taken = 0
        for patient in patients:
            if taken >= count:
                break
            mine = rows[scores.patients[rows] == patient]
            chosen.extend(mine.tolist())
            taken += len(mine)
    return np.array(sorted(chosen))


def summary(values: list[float]) -> dict[str, float]:
    array = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if not array.size:
        return {"mean": float("nan"), "p5": float("nan"), "p95": float("nan")}
    return {"mean": float(array.mean()), "p5": float(np.quantile(array, 0.05)), "p95": float(np.quantile(array, 0.95))}


def calibration_rows(model, test: FilmScores, draws: int, rng, alpha: float | None = None) -> list[dict]:
    card = model.card()
    alpha = alpha or card["referral"]["alpha"]
    band = ReferralBand.from_saved(card["referral"])
    card_figures = site_figures(test.labels, test.probabilities, model.threshold, band.refers(test.probabilities))
    rows = [{"k": "card (validation fit)", **{key: {"mean": card_figures[key]} for key in card_figures}}]
    target = 0.95
    for k in KS:
        collected: dict[str, list[float]] = {}
        for _ in range(draws):
            fit_rows = patient_draw(test, {0: k, 1: k}, rng)
            rest = np.setdiff1d(np.arange(len(test)), fit_rows)
            plain = SiteCalibrator("logistic", card["threshold_method"], alpha, strict=False)
            plain.fit(test.margins[fit_rows], test.labels[fit_rows])
            prevalence = estimate_prevalence(plain, test.margins[rest])  # the rest's films, unlabelled
            fitted = SiteCalibrator("logistic", card["threshold_method"], alpha, strict=False, prevalence=prevalence)
            fitted.fit(test.margins[fit_rows], test.labels[fit_rows])
            p = fitted.transform(test.margins[rest])
            figures = site_figures(test.labels[rest], p, fitted.threshold_, fitted.band_.refers(p))
            figures["sensitivity_met"] = float(figures["sensitivity"] >= target)
            figures["ece_labelled_prior"] = site_figures(
                test.labels[rest], plain.transform(test.margins[rest]), 0.5, None
            )["ece"]
            figures["prevalence_em"], figures["prevalence_rest"] = prevalence, float(test.labels[rest].mean())
            # what ECE reads with the rest's true prevalence instead of EM's: the floor of ECE on this many films
            oracle = SiteCalibrator("logistic", card["threshold_method"], None, prevalence=figures["prevalence_rest"])
            oracle.fit(test.margins[fit_rows], test.labels[fit_rows])
            figures["ece_true_prior"] = site_figures(
                test.labels[rest], oracle.transform(test.margins[rest]), 0.5, None
            )["ece"]
            for key, value in figures.items():
                collected.setdefault(key, []).append(value)
        rows.append({"k": k, "alpha": alpha, **{key: summary(values) for key, values in collected.items()}})
        print(f"alpha={alpha} k={k}: done", flush=True)
    return rows


def check_rows(model, reference: FilmScores, test: FilmScores, draws: int, rng) -> list[dict]:
    rows, prior = [], calibrated_prior(model)
    for n in NS:
        flagged_test, flagged_val, em, bbse, verdicts = [], [], [], [], {}
        statistics: dict[str, dict[str, list[bool]]] = {"test": {}, "val": {}}
        for _ in range(draws):
            local = test.subset(patient_draw(test, {0: round(n * 0.375), 1: n - round(n * 0.375)}, rng))
            report = shift_report(model, local, reference, prior=prior, permutations=200, resamples=100)
            flagged_test.append(report["verdict"]["shifted"])
            verdicts[report["verdict"]["kind"]] = verdicts.get(report["verdict"]["kind"], 0) + 1
            em.append(report["prevalence"]["em"]["estimate"])
            bbse.append(report["prevalence"]["bbse"]["estimate"])
            for name, facts in report["film_statistics"].items():
                statistics["test"].setdefault(name, []).append(facts["p_value"] < 0.05)
            if n < len(reference):
                drawn = rng.choice(len(reference), n, replace=False)
                rest = reference.subset(np.setdiff1d(np.arange(len(reference)), drawn))
                val_report = shift_report(
                    model, reference.subset(drawn), rest, prior=prior, permutations=200, resamples=100
                )
                flagged_val.append(val_report["verdict"]["shifted"])
                for name, facts in val_report["film_statistics"].items():
                    statistics["val"].setdefault(name, []).append(facts["p_value"] < 0.05)
        rows.append(
            {
                "n": n,
                "power_test": float(np.mean(flagged_test)),
                "false_alarms_val": float(np.mean(flagged_val)) if flagged_val else None,
                "verdicts_test": verdicts,
                "em": summary(em),
                "bbse": summary(bbse),
                "statistics_p_below_5pct": {
                    where: {name: float(np.mean(flags)) for name, flags in by_name.items()}
                    for where, by_name in statistics.items()
                },
            }
        )
        print(f"n={n}: done", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="artefact folder (default: the bundled model)")
    parser.add_argument("--data", required=True, help="the Kermany dataset (train/ and test/)")
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--check-draws", type=int, default=None, help="draws per n for the check (default: --draws)")
    parser.add_argument("--alpha", type=float, nargs="+", default=None, help="band levels (default: the card's)")
    parser.add_argument("--backend", default="pytorch")
    parser.add_argument("--scores", type=Path, default=None, help="where the test films' scores are kept")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    model = load_backend(args.model, args.backend)
    reference, facts = load_reference(model, args.data)
    card = Path(model.source) / "card.json"
    key = hashlib.sha256(card.read_bytes() if card.is_file() else str(model.source).encode()).hexdigest()[:12]
    scores_file = args.scores or default_cache_root().parent / "site-bench" / f"test-{key}-{args.backend}.npz"
    test = test_scores(model, args.data, scores_file)
    print(f"scored: {len(reference)} validation, {len(test)} test films ({time.perf_counter() - started:.0f} s)")
    rng = np.random.default_rng(0)
    result = {
        "model": str(model.source),
        "reference": facts,
        "draws": args.draws,
        "test_prevalence": float(test.labels.mean()),
        "calibration": [
            row for alpha in args.alpha or [None] for row in calibration_rows(model, test, args.draws, rng, alpha)
        ],
        "check": check_rows(model, reference, test, args.check_draws or args.draws, rng),
        "seconds": time.perf_counter() - started,
    }
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
