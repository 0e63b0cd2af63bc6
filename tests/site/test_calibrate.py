"""`site calibrate`: refusals for too few films, the threshold's bound, and the new artefact's provenance card."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.special import expit
from typer.testing import CliRunner

from pneumolab.cli import app
from pneumolab.errors import SettingError
from pneumolab.fsutil import file_sha256
from pneumolab.inference.card import bundled_path
from pneumolab.inference.pytorch import load_trained
from pneumolab.site.calibrate import SiteCalibrator, band_error_range, check_band_counts, estimate_prevalence
from tests.site.conftest import write_labels_csv


def _local(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n), np.ones(n)].astype(int)
    return rng.normal(4 * labels - 2, 1.5), labels


@pytest.mark.parametrize(("n", "alpha"), [(48, 0.02), (18, 0.05), (8, 0.1)])
def test_too_few_films_for_alpha_are_refused_in_one_line_with_the_error_range(n, alpha):
    assert n + 1 < 1 / alpha
    with pytest.raises(SettingError) as caught:
        check_band_counts({"NORMAL": n, "PNEUMONIA": 500}, alpha, "local.csv")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("local.csv: ") and f"{n} NORMAL films" in message
    assert "n + 1 >= 1/alpha" in message and "would range over" in message
    check_band_counts({"NORMAL": math.ceil(1 / alpha - 1), "PNEUMONIA": 500}, alpha, "local.csv")  # enough


def test_the_cli_refuses_before_scoring_and_writes_nothing(shared_data, tmp_path):
    csv = write_labels_csv(shared_data, tmp_path / "local", 10)
    result = CliRunner().invoke(app, ["site", "calibrate", "default", "--data", str(csv), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and isinstance(result.exception, SettingError)  # main() turns it into exit 2
    assert "needs n + 1 >= 1/alpha" in str(result.exception) and not (tmp_path / "o").exists()


def test_the_realised_error_range_narrows_with_more_films():
    small, large = band_error_range(60, 0.02), band_error_range(600, 0.02)
    assert small[0] < 0.02 < small[1] and large[0] < 0.02 < large[1]
    assert large[1] - large[0] < small[1] - small[0]


def test_the_sensitivity_threshold_holds_its_lower_bound_and_the_band_its_films():
    margins, labels = _local(120)
    fitted = SiteCalibrator("logistic", "sensitivity >= 0.95 on validation", 0.02, 0.9).fit(margins, labels)
    bound = fitted.sensitivity_bound_
    assert bound["reachable"] and bound["lower_bound"] >= 0.95
    p = fitted.transform(margins)
    assert np.mean(p[labels == 1] >= fitted.threshold_) >= bound["lower_bound"]
    assert fitted.band_.counts_ == (120, 120) and fitted.threshold_method_.startswith("sensitivity >= 0.95 (90%")
    # the logistic fit is a temperature and a bias, which every backend applies
    assert np.allclose(p, expit(margins / fitted.temperature_ + fitted.bias_))


def test_the_probabilities_move_to_the_site_prevalence_and_the_decisions_stay():
    """Labelled films come per class (here half pneumonia); the site has 20 %: EM on its unlabelled films finds it,
    and the calibrator moved there is calibrated on the site while deciding exactly the same films."""
    margins, labels = _local(400)
    rng = np.random.default_rng(2)
    site_labels = (rng.random(3000) < 0.2).astype(int)
    site_margins = rng.normal(4 * site_labels - 2, 1.5)
    plain = SiteCalibrator("logistic", "sensitivity >= 0.95 on validation", 0.02).fit(margins, labels)
    estimate = estimate_prevalence(plain, site_margins)
    assert abs(estimate - site_labels.mean()) < 0.06  # the few labelled films' fit is itself noisy
    moved = SiteCalibrator("logistic", "sensitivity >= 0.95 on validation", 0.02, prevalence=estimate)
    moved.fit(margins, labels)
    assert moved.bias_ - plain.bias_ == pytest.approx(np.log(estimate / (1 - estimate)))  # from 50 %
    p_plain, p_moved = plain.transform(site_margins), moved.transform(site_margins)
    assert p_moved.mean() == pytest.approx(estimate, abs=2e-3)  # EM's fixed point: the mean posterior is the prior
    assert abs(p_moved.mean() - site_labels.mean()) < abs(p_plain.mean() - site_labels.mean()) / 3
    assert ((p_plain >= plain.threshold_) == (p_moved >= moved.threshold_)).all()
    assert (plain.band_.refers(p_plain) == moved.band_.refers(p_moved)).all()
    with pytest.raises(SettingError, match="without one"):
        estimate_prevalence(moved, site_margins)
    with pytest.raises(SettingError, match="prevalence"):
        SiteCalibrator(prevalence=1.0)


def test_a_new_artefact_records_its_provenance_and_the_original_is_untouched(calibrated):
    out, card = calibrated
    bundled = bundled_path(None)  # the current default, whichever it is
    site = card["site"]
    assert site["name"] == "st-elsewhere" and site["date"] and site["source_artefact"] == str(bundled)
    assert sum(site["counts"].values()) + site["refused_by_gate"] == 16
    assert site["before"]["threshold"] == json.loads((bundled / "card.json").read_text())["threshold"]
    assert site["after"]["threshold"] == card["threshold"] and card["class_bias"][1] == site["after"]["class_bias"][1]
    for when in ("before", "after"):
        figures = site["local_figures"][when]
        assert {"ece", "log_loss", "coverage", "error_normal", "error_pneumonia", "sensitivity"} <= set(figures)
        low, high = figures["ci95"]["sensitivity"]
        assert low <= figures["sensitivity"] <= high
    assert site["local_figures"]["after"]["grouped_by"] == "patient"
    assert card["referral"]["fit_on"].startswith("site st-elsewhere") and card["referral"]["alpha"] == 0.2
    assert (
        card["weights_sha256"] == file_sha256(out / "model.safetensors") == file_sha256(bundled / "model.safetensors")
    )
    assert card["reference_sha256"] == file_sha256(out / "reference.npz")
    assert json.loads((bundled / "card.json").read_text()).get("site") is None  # the original is untouched
    # the prevalence came from the unlabelled films the fixture gave (all pneumonia): EM moved it above the share
    prevalence = site["prevalence"]
    assert prevalence["how"].startswith("EM") and prevalence["inputs"]
    assert prevalence["labelled_share"] == pytest.approx(site["counts"]["PNEUMONIA"] / sum(site["counts"].values()))
    assert prevalence["value"] > prevalence["labelled_share"]


def test_predict_takes_the_calibrated_artefact(calibrated, shared_data):
    out, card = calibrated
    model = load_trained(out)
    assert model.threshold == card["threshold"] and model.temperature == card["temperature"]
    film = sorted((shared_data / "test" / "PNEUMONIA").iterdir())[40]
    result = CliRunner().invoke(app, ["predict", str(film), "--model", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert str(film.name) in result.stdout
