"""`site check`: the tests, the prevalence estimates and the verdict, on scores made to differ in known ways."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pneumolab.referral import ReferralBand
from pneumolab.site.check import calibrated_prior, render_check, shift_report
from pneumolab.site.films import FilmScores
from pneumolab.site.shift import em_prevalence


def _films(n: int, prevalence: float, *, seed: int, offset: float = 0.0) -> FilmScores:
    """Films of a calibrated model: labels at `prevalence`, features and gate score moved by `offset`."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < prevalence).astype(int)
    margins = rng.normal(3 * labels - 1.5, 1.2)
    posterior = 1 / (1 + np.exp(-(margins * 3 / 1.44 + np.log(0.7 / 0.3))))  # exact at the reference's 70 %
    features = rng.normal(labels[:, None] * 0.5 + offset, 1.0, (n, 12)).astype(np.float32)
    gate = rng.normal(offset, 1.0, n)
    return FilmScores(posterior, margins, gate, gate > 4, features, labels)


@pytest.fixture(scope="module")
def model():
    reference = _films(600, 0.7, seed=1)
    band = ReferralBand(0.05).fit(reference.labels, reference.probabilities, 0.5)
    return SimpleNamespace(threshold=0.5, band=band), reference


def test_a_second_draw_of_the_same_films_is_no_detectable_shift(model):
    served, reference = model
    report = shift_report(served, _films(300, 0.7, seed=2), reference, permutations=200, resamples=100)
    assert report["verdict"]["kind"] == "no detectable shift" and not report["verdict"]["shifted"]
    assert set(report["tests"]) == {"gate_score", "output", "features"}
    assert report["prevalence"]["agree"]


def test_other_films_are_said_to_differ_and_to_need_calibration(model):
    served, reference = model
    report = shift_report(served, _films(200, 0.7, seed=3, offset=0.6), reference, permutations=200, resamples=50)
    assert report["verdict"]["kind"] == "films differ"
    assert report["tests"]["features"]["flagged"] and report["tests"]["gate_score"]["flagged"]
    assert "site calibrate" in report["verdict"]["text"]


def test_a_prevalence_change_alone_is_named_and_estimated(model):
    served, reference = model
    local = _films(400, 0.3, seed=4)
    truth = local.labels.mean()
    report = shift_report(served, local, reference, permutations=200, resamples=100)
    assert report["verdict"]["kind"] == "prevalence change only"
    em, bbse = report["prevalence"]["em"], report["prevalence"]["bbse"]
    assert abs(em["estimate"] - truth) < 0.06 and abs(bbse["estimate"] - truth) < 0.06
    assert em["ci95"][0] < em["estimate"] < em["ci95"][1]


def test_em_recovers_a_known_prior():
    rng = np.random.default_rng(0)
    labels = rng.random(4000) < 0.2
    margins = rng.normal(np.where(labels, 2.0, -2.0), 1.0)
    likelihood_ratio = np.exp(4 * margins / 2)  # N(2,1) vs N(-2,1): log LR = 4 z
    p_at_half = likelihood_ratio / (1 + likelihood_ratio)  # posteriors under a 50 % prior
    assert abs(em_prevalence(p_at_half, 0.5) - 0.2) < 0.02


def test_the_page_shows_the_verdict_and_escapes_what_it_prints(model):
    served, reference = model
    report = shift_report(served, _films(100, 0.7, seed=5), reference, permutations=50, resamples=20)
    report.update(model="<model>", reference={"source": "validation & co"})
    page = render_check(report)
    assert report["verdict"]["text"].split(" (")[0] in page and "&lt;model&gt;" in page and "<model>" not in page


def test_film_statistics_follow_framing_and_exposure(shared_data):
    """On real films: a tighter crop raises edge-to-centre, a looser black frame darkens the border, and a
    brighter film has a higher exposure; the report compares them with the reference."""
    from PIL import Image

    from pneumolab.data.perturb import perturb_batch
    from pneumolab.site.check import film_statistics_report
    from pneumolab.site.films import STATISTICS, film_statistics

    files = sorted((shared_data / "test" / "NORMAL").glob("*.jpeg"))[:12]
    films = np.stack([np.asarray(Image.open(f).convert("L").resize((128, 128))) for f in files])
    column = {name: i for i, name in enumerate(STATISTICS)}
    clean = film_statistics(films)
    assert clean.shape == (12, len(STATISTICS)) and np.isfinite(clean).all()
    tighter = film_statistics(perturb_batch(films, "crop", 0.75))
    looser = film_statistics(perturb_batch(films, "frame_black", 1.3))
    brighter = film_statistics(perturb_batch(films, "brightness", 1.2))
    assert np.median(tighter[:, column["edge_to_centre"]] - clean[:, column["edge_to_centre"]]) > 0.05
    assert (looser[:, column["dark_border"]] > clean[:, column["dark_border"]] + 0.2).all()
    assert (looser[:, column["edge_to_centre"]] < clean[:, column["edge_to_centre"]]).all()
    assert (brighter[:, column["exposure"]] > clean[:, column["exposure"]]).all()

    def scored(statistics):
        n = len(statistics)
        return FilmScores(np.full(n, 0.5), np.zeros(n), np.zeros(n), np.zeros(n, bool), np.empty((n, 0)),
                          statistics=statistics)  # fmt: skip

    block = film_statistics_report(scored(tighter), scored(clean))
    assert set(block) == set(STATISTICS)
    assert block["edge_to_centre"]["local"][1] > block["edge_to_centre"]["reference"][1]
    assert block["edge_to_centre"]["p_value"] < 0.05
    assert film_statistics_report(scored(clean), FilmScores(**{**scored(clean).__dict__, "statistics": None})) == {}


def test_em_starts_from_the_prior_a_site_calibration_moved_the_model_to(model, tmp_path):
    """Probabilities moved to a site's 40 % are read against 40 %, not the reference films' own share."""
    served, reference = model
    import json

    from pneumolab.inference.card import bundled_path

    card = json.loads((bundled_path(None) / "card.json").read_text())
    (tmp_path / "card.json").write_text(json.dumps({**card, "site": {"prevalence": {"value": 0.4}}}))
    moved = SimpleNamespace(threshold=0.5, band=served.band, source=str(tmp_path))
    local = _films(300, 0.7, seed=6)
    as_fit = shift_report(served, local, reference, prior=calibrated_prior(served), permutations=20, resamples=0)
    as_moved = shift_report(moved, local, reference, prior=calibrated_prior(moved), permutations=20, resamples=0)
    assert as_fit["prevalence"]["reference"] == pytest.approx(reference.labels.mean())
    assert as_moved["prevalence"]["reference"] == 0.4
    # the same probabilities, calibrated to a lower prior, carry stronger evidence: more pneumonia than read at 70 %
    assert as_moved["prevalence"]["em"]["estimate"] > as_fit["prevalence"]["em"]["estimate"] + 0.1
