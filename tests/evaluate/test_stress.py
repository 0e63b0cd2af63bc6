"""The stress evaluation: seeded perturbations of a film, and what a model's metrics do under them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumolab.data.perturb import PERTURBATIONS, perturb_batch, perturb_film
from pneumolab.errors import UnknownNameError
from pneumolab.evaluate.stress import SELECTION, StressCase, parse_cases, stress_evaluate, stress_log_loss
from tests.conftest import synthetic_xray
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def films() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([synthetic_xray(rng, (96, 96), label=i % 2) for i in range(8)])


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_every_perturbation_is_seeded_per_film_and_keeps_the_film_shape(films: np.ndarray, name: str) -> None:
    strength = PERTURBATIONS[name].strengths[-1]
    once = perturb_batch(films, name, strength, seed=3)
    again = perturb_batch(films, name, strength, seed=3)
    assert once.shape == films.shape and once.dtype == np.uint8
    np.testing.assert_array_equal(once, again)  # the same copy on every call, in every order:
    np.testing.assert_array_equal(perturb_film(films[5], name, strength, seed=3, index=5), once[5])
    assert not np.array_equal(once, films)  # it does something at this strength


def test_framing_perturbations_frame_tighter_and_looser() -> None:
    film = np.zeros((100, 100), np.uint8)
    film[40:60, 40:60] = 255  # a bright square in the middle
    tighter = perturb_film(film, "crop", 0.5)
    looser = perturb_film(film, "frame_black", 2.0)
    assert (tighter > 128).mean() == pytest.approx(4 * (film > 128).mean(), rel=0.1)
    assert (looser > 128).mean() == pytest.approx((film > 128).mean() / 4, rel=0.15)
    assert looser[:20].max() == 0  # the border is black
    edge = perturb_film(np.full((100, 100), 90, np.uint8), "frame_edge", 1.5)
    assert edge.min() >= 85  # the border continues the film's edge


def test_stress_cases_parse_by_set_or_name() -> None:
    assert parse_cases("selection") == SELECTION
    assert parse_cases("crop:0.8, gamma:1.4") == (StressCase("crop", 0.8), StressCase("gamma", 1.4))
    with pytest.raises(UnknownNameError, match="did you mean crop"):
        parse_cases("crap:0.8")


def _reads_the_border(films: np.ndarray) -> np.ndarray:
    """A 'model' that calls PNEUMONIA what fills its frame: P rises as the dark border shrinks (a framing reader)."""
    border = np.concatenate([films[:, :8].reshape(len(films), -1), films[:, -8:].reshape(len(films), -1)], 1)
    p = 0.05 + 0.9 * border.mean(1) / 255.0
    return np.column_stack([1 - p, p])


def test_a_model_that_reads_the_framing_fails_the_framing_cases(films: np.ndarray) -> None:
    labels = np.arange(len(films)) % 2
    cases = parse_cases("crop:0.75,frame_black:1.3,gamma:1.4")
    paths = [f"f{i}.jpeg" for i in range(8)]
    block = stress_evaluate(_reads_the_border, films, labels, classes=("NORMAL", "PNEUMONIA"), threshold=0.5,
                            cases=cases, paths=paths)  # fmt: skip
    crop, frame = block["cases"]["crop:0.75"], block["cases"]["frame_black:1.3"]
    assert crop["mean_abs_change"] > 0 and frame["mean_abs_change"] > 0.05
    assert crop["flip_rate"] + frame["flip_rate"] > 0
    assert block["flippers"][0]["largest_change"] >= block["flippers"][-1]["largest_change"]
    assert stress_log_loss(block) is None  # not every selection case ran
    invariant = stress_evaluate(lambda f: np.tile([0.3, 0.7], (len(f), 1)), films, labels,
                                classes=("NORMAL", "PNEUMONIA"), threshold=0.5, cases=SELECTION)  # fmt: skip
    assert all(c["flip_rate"] == 0 and c["mean_abs_change"] == 0 for c in invariant["cases"].values())
    assert invariant["stress_log_loss"] == pytest.approx(invariant["clean"]["log_loss"])


def test_k_class_stress_reports_accuracy_per_class(films: np.ndarray) -> None:
    labels = np.arange(len(films)) % 3
    probabilities = lambda f: np.tile([0.2, 0.5, 0.3], (len(f), 1))  # noqa: E731
    block = stress_evaluate(probabilities, films, labels, classes=("NORMAL", "BACTERIAL", "VIRAL"), threshold=0.5,
                            cases=parse_cases("crop:0.8"))  # fmt: skip
    case = block["cases"]["crop:0.8"]
    assert "specificity" not in case and set(case["recall"]) == {"NORMAL", "BACTERIAL", "VIRAL"}
    assert case["recall"]["BACTERIAL"] == 1.0 and case["accuracy"] == pytest.approx(np.mean(labels == 1))


def test_evaluate_stress_on_the_bundled_model_prints_a_stress_block(make_dataset) -> None:
    root = make_dataset(splits=("train", "test"), per_class=3, size=(80, 80))
    out = run_cli("evaluate", "default", "--data", str(root), "--split", "test", "--stress",
                  "--stress-set", "crop:0.8,frame_edge:1.2", "--no-gate", "--resamples", "100", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    block = json.loads(out.stdout)["stress"]
    assert block["split"] == "test" and block["n"] == 6
    assert set(block["cases"]) == {"crop:0.8", "frame_edge:1.2"}
    assert {"sensitivity", "specificity", "flip_rate", "delta_specificity"} <= set(block["cases"]["crop:0.8"])
