"""The report's "Input gate and referral" part: what gate/scores.csv, metrics/selective.json and the operating point
hold, the risk-coverage curve of the films the gate let through, and no such part for runs without those files."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from pneumolab.errors import PneumolabError
from pneumolab.referral import ReferralBand
from pneumolab.report import build_report, figure_png, plot_gate_scores, plot_risk_coverage, plot_run
from pneumolab.report._analyses import RiskCoverage, gate_refusals, gating_analysis, risk_coverage
from pneumolab.report._runfiles import read_run
from tests.report.conftest import FAR_OOD, GATE_ALPHA, NEAR_REFUSED, TEST_REFUSED, write_gating

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEADING = "Input gate and referral"
FAILS = "the guarantee fails under the validation-test shift"


def _section(markdown: str, run: str) -> str:
    """The run's "Input gate and referral" part of the Markdown report ("" when it has none)."""
    part = markdown.split(f"## {run} (", 1)[1].split("\n## ", 1)[0]
    if f"### {HEADING}" not in part:
        return ""
    return part.split(f"### {HEADING}", 1)[1].split("\n### ", 1)[0]


def _selective(run: Path) -> dict:
    return json.loads((run / "metrics" / "selective.json").read_text())


def _set_test_wrong(run: Path, normal: float, pneumonia: float) -> None:
    summary = _selective(run)
    summary["test"]["per_class"]["NORMAL"]["wrong_answered"] = normal
    summary["test"]["per_class"]["PNEUMONIA"]["wrong_answered"] = pneumonia
    (run / "metrics" / "selective.json").write_text(json.dumps(summary))


def _texts(fig: Figure) -> list[str]:
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    texts += [ax.get_title() for ax in fig.axes] + [ax.get_xlabel() for ax in fig.axes]
    texts += [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    return texts


# --------------------------------------------------------------------------------------------- the built report


def test_refusal_table_shows_each_groups_count_and_share(
    report_runs: list[Path], built_report: dict[str, Path]
) -> None:
    section = _section(built_report["markdown"].read_text(), "lite0-imagenet")
    assert section
    n_far, far_refused = FAR_OOD
    assert re.search(rf"\| far-ood \| [^|]+ \| {n_far} \| {far_refused} \| 90\.0 \|", section)
    assert re.search(rf"\| test \| [^|]+ \| 100 \| {len(TEST_REFUSED)} \| 6\.0 \|", section)
    assert re.search(r"\| val \| [^|]+ \| 80 \| 0 \| 0\.0 \|", section)
    assert re.search(r"\| far-ood-metadata \| [^|]+ \| 3 \| 3 \| 100\.0 \|", section)
    for kind, refused in NEAR_REFUSED.items():
        name = f"near-{kind}".replace("_", "\\_")  # Markdown-escaped
        assert re.search(rf"\| {re.escape(name)} \| [^|]+ \| 100 \| {refused} \| {100 * refused / 100:.1f} \|", section)
    # and it is the file's share, not a figure of its own
    share = _selective(report_runs[0])["refused_share"]["far-ood"]
    assert f"| {100 * share:.1f} |" in section


def test_test_refusals_are_called_a_reported_false_refusal_rate(
    report_runs: list[Path], built_report: dict[str, Path]
) -> None:
    section = _section(built_report["markdown"].read_text(), "lite0-imagenet")
    limit_set_on = json.loads((report_runs[0] / "operating_point.json").read_text())["gate"]["limit_set_on"]
    assert f"The limit was set on {limit_set_on}" in section
    assert "The gate refused 6.0 % of the 100 test films" in section
    assert "false-refusal rate, reported here, not fit" in section


def test_selective_and_per_class_tables_hold_the_files_numbers(
    report_runs: list[Path], built_report: dict[str, Path]
) -> None:
    summary = _selective(report_runs[0])
    section = _section(built_report["markdown"].read_text(), "lite0-imagenet")
    for split, name in (("val", "validation"), ("test", "test")):
        s = summary[split]
        assert (
            f"| {name} | {s['n']} | {s['refused']} | {s['referred']} | {s['answered']} | {100 * s['coverage']:.1f} | "
            f"{100 * s['accuracy_answered']:.1f} | {100 * s['accuracy_all']:.1f} |"
        ) in section
        for label, facts in s["per_class"].items():
            n = facts["n"]
            answered = f"{100 * facts['answered']:.1f} % ({round(facts['answered'] * n)} of {n})"
            wrong = f"{100 * facts['wrong_answered']:.1f} % ({round(facts['wrong_answered'] * n)} of {n})"
            verdict = "**above**" if facts["wrong_answered"] > GATE_ALPHA else "within"
            assert f"| {name} | {label} | {n} | {answered} | {wrong} | 10 % | {verdict} |" in section, (name, label)
    band = summary["referral"]["band"]
    assert f"| Referred | P(PNEUMONIA) from {band[0]:.3f} to {band[1]:.3f} |" in section


def test_the_nominal_level_is_never_shown_without_the_realised_share(built_report: dict[str, Path]) -> None:
    section = _section(built_report["markdown"].read_text(), "lite0-imagenet")
    for line in section.splitlines():
        if "10 %" in line:
            assert "Answered" in line or re.search(r"\d+\.\d % \(\d+ of \d+\)", line), line
    assert "exchangeable with validation" in section


def test_plots_are_embedded_in_the_html_and_linked_from_the_markdown(built_report: dict[str, Path]) -> None:
    images = built_report["images"] / "lite0-imagenet"
    for name in ("gate_scores.png", "risk_coverage.png"):
        assert (images / name).read_bytes().startswith(PNG_SIGNATURE)
        assert f"](images/lite0-imagenet/{name})" in _section(built_report["markdown"].read_text(), "lite0-imagenet")
    html = built_report["html"].read_text()
    part = html.split('id="gating-lite0-imagenet"', 1)[1].split("</section>", 1)[0]
    sources = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', part)
    assert [alt for _, alt in sources] == ["lite0-imagenet: Input gate scores", "lite0-imagenet: Risk-coverage"]
    assert base64.b64decode(sources[0][0]) == (images / "gate_scores.png").read_bytes()
    assert 'href="#calibration-lite0-imagenet"' in part and 'id="calibration-lite0-imagenet"' in html
    assert "false-refusal rate, reported here, not fit" in part
    assert '<tr data-group="far-ood">' in part


def test_runs_without_the_gates_files_have_no_such_section(
    report_runs: list[Path], built_report: dict[str, Path]
) -> None:
    markdown, html = built_report["markdown"].read_text(), built_report["html"].read_text()
    assert markdown.count(f"### {HEADING}") == html.count(f"<h3>{HEADING}</h3>") == 1
    for run in ("resnet50-scratch", "ensemble-mean"):
        assert _section(markdown, run) == ""
        assert f'id="gating-{run}"' not in html
        assert not (built_report["images"] / run / "gate_scores.png").exists()
        assert not (built_report["images"] / run / "risk_coverage.png").exists()
    assert gating_analysis(read_run(report_runs[1])) is None


# ------------------------------------------------------------------------------------- the guarantee, in words


def test_guarantee_fails_is_said_when_a_test_class_exceeds_alpha(make_run, tmp_path: Path) -> None:
    run = make_run("lite0")
    write_gating(run)
    _set_test_wrong(run, 0.15, 0.02)  # NORMAL above the nominal 10 %, PNEUMONIA within
    n_normal = _selective(run)["test"]["per_class"]["NORMAL"]["n"]
    out = build_report([run], tmp_path / "report")
    section = _section(out["markdown"].read_text(), "lite0")
    assert f"On test {FAILS}: NORMAL 15.0 % ({round(0.15 * n_normal)} of {n_normal}) of the films" in section
    assert "PNEUMONIA 2.0 %" not in section.split(FAILS, 1)[1].split("\n", 1)[0]  # only the class that exceeds
    assert "more than the nominal 10 % per class" in section
    assert re.search(r"\| test \| NORMAL \| [^\n]+ \| 15\.0 % [^\n]+ \| 10 % \| \*\*above\*\* \|", section)
    assert re.search(r"\| test \| PNEUMONIA \| [^\n]+ \| 2\.0 % [^\n]+ \| 10 % \| within \|", section)
    html = out["html"].read_text()
    assert re.search(rf'<p class="notice guarantee">On test {FAILS}', html)


def test_no_failure_is_claimed_when_the_test_classes_stay_within_alpha(make_run, tmp_path: Path) -> None:
    run = make_run("lite0")
    write_gating(run)
    _set_test_wrong(run, 0.05, 0.1)  # at the level is not above it
    out = build_report([run], tmp_path / "report")
    section = _section(out["markdown"].read_text(), "lite0")
    assert "guarantee fails" not in section and "guarantee fails" not in out["html"].read_text()
    assert "On test the realised shares of films answered wrongly, NORMAL 5.0 %" in section
    assert "stay within the nominal 10 % per class" in section
    assert "**above**" not in section


def test_a_band_that_answers_nothing_is_shown_as_such(make_run, tmp_path: Path) -> None:
    run = make_run("lite0")
    write_gating(run)
    summary = _selective(run)
    summary["val"].update(answered=0, referred=80, coverage=0.0, accuracy_answered=None)
    (run / "metrics" / "selective.json").write_text(json.dumps(summary))
    found = gating_analysis(read_run(run))
    assert found["curves"][0].band == (0.0, None)
    out = build_report([run], tmp_path / "report")
    assert "| validation | 80 | 0 | 80 | 0 | 0.0 | \N{EN DASH} |" in _section(out["markdown"].read_text(), "lite0")
    assert "validation + TTA: the referral band answers no film" in _texts(plot_risk_coverage(found["curves"]))


# ------------------------------------------------------------------------------------------ partial run folders


def test_without_selective_json_the_bands_point_comes_from_its_rule(make_run, tmp_path: Path) -> None:
    run = make_run("lite0")
    summary = write_gating(run)
    with_file = gating_analysis(read_run(run))
    (run / "metrics" / "selective.json").unlink()
    found = gating_analysis(read_run(run))
    assert found["summaries"] == {}
    assert any("no metrics/selective.json" in note for note in found["notes"])
    for curve, split in zip(found["curves"], ("val", "test"), strict=True):
        assert curve.band[0] == pytest.approx(summary[split]["coverage"], abs=0.011)  # saved probabilities: 7 digits
        assert curve.band[1] == pytest.approx(summary[split]["accuracy_answered"], abs=0.02)
    for a, b in zip(found["curves"], with_file["curves"], strict=True):
        np.testing.assert_array_equal(a.coverage, b.coverage)
    section = _section(build_report([run], tmp_path / "report")["markdown"].read_text(), "lite0")
    assert "Not shown: no metrics/selective.json" in section
    assert "guarantee" not in section  # no realised share: no sentence on the nominal level
    assert "10 %" not in section


def test_without_scores_csv_the_files_shares_are_shown_and_no_plots(make_run, tmp_path: Path) -> None:
    run = make_run("lite0")
    write_gating(run)
    (run / "gate" / "scores.csv").unlink()
    out = build_report([run], tmp_path / "report")
    section = _section(out["markdown"].read_text(), "lite0")
    assert re.search(r"\| far-ood \| [^|]+ \| \N{EN DASH} \| \N{EN DASH} \| 90\.0 \|", section)
    assert "Not shown: no gate/scores.csv" in section
    assert not (out["images"] / "lite0" / "gate_scores.png").exists()
    assert not (out["images"] / "lite0" / "risk_coverage.png").exists()


def test_scores_that_do_not_match_the_predictions_draw_no_curve(make_run) -> None:
    run = make_run("lite0")
    write_gating(run)
    table = pd.read_csv(run / "gate" / "scores.csv")
    table = table.drop(index=table.index[table["group"] == "test"][:1])
    table.to_csv(run / "gate" / "scores.csv", index=False)
    files = read_run(run)
    refused, why = gate_refusals(files, files.evaluation("test", True))
    assert refused is None and "do not name the films of predictions/test_tta.csv" in why
    found = gating_analysis(files)
    assert [c.label for c in found["curves"]] == ["validation + TTA"]
    assert any("no risk-coverage curve on test + TTA" in note for note in found["notes"])


def test_an_unreadable_refused_column_is_named(make_run) -> None:
    run = make_run("lite0")
    write_gating(run)
    table = pd.read_csv(run / "gate" / "scores.csv")
    table["refused"] = table["refused"].astype(object)
    table.loc[0, "refused"] = "maybe"
    table.to_csv(run / "gate" / "scores.csv", index=False)
    with pytest.raises(PneumolabError, match=r"scores\.csv: column 'refused' must hold True or False"):
        read_run(run)


def test_plot_run_draws_the_gates_plots(make_run, tmp_path: Path) -> None:
    run = make_run("lite0")
    assert not {"gate_scores", "risk_coverage"} & set(plot_run(run, tmp_path / "before"))
    write_gating(run)
    written = plot_run(run, tmp_path / "after", splits=("test",))
    assert written["gate_scores"].read_bytes().startswith(PNG_SIGNATURE)
    assert written["risk_coverage"].read_bytes().startswith(PNG_SIGNATURE)


# --------------------------------------------------------------------------------------------- the computations


def test_risk_coverage_ranks_by_distance_from_the_threshold_and_skips_refusals() -> None:
    labels = np.array([1, 0, 1, 0, 1, 0])
    probabilities = np.array([0.875, 0.5625, 0.125, 0.25, 0.6875, 0.99])  # binary fractions: exact distances
    refused = np.array([False, False, False, False, False, True])
    coverage, accuracy = risk_coverage(labels, probabilities, 0.5, refused)
    # |p - 0.5| of the five passed: 0.375 (right), 0.0625 (wrong), 0.375 (wrong), 0.25 (right), 0.1875 (right);
    # ranked 0.375 twice (tied: one point), 0.25, 0.1875, 0.0625; the refused film is never answered
    np.testing.assert_allclose(coverage, [2 / 6, 3 / 6, 4 / 6, 5 / 6])
    np.testing.assert_allclose(accuracy, [1 / 2, 2 / 3, 3 / 4, 3 / 5])
    assert risk_coverage(labels, probabilities, 0.5, np.ones(6, bool))[0].size == 0


def test_the_curve_of_the_built_run_ends_where_the_gate_stops(report_runs: list[Path]) -> None:
    found = gating_analysis(read_run(report_runs[0]))
    val, test = found["curves"]
    assert (val.label, test.label) == ("validation + TTA", "test + TTA")
    assert test.passed == pytest.approx(1 - len(TEST_REFUSED) / 100)
    assert test.coverage[-1] == pytest.approx(test.passed)
    table = pd.read_csv(report_runs[0] / "predictions" / "test_tta.csv")
    kept = np.ones(len(table), bool)
    kept[list(TEST_REFUSED)] = False
    correct = (table["probability"] >= 0.62) == table["label"]
    assert test.accuracy[-1] == pytest.approx(correct[kept].mean())
    summary = _selective(report_runs[0])["test"]
    assert test.band == (summary["coverage"], summary["accuracy_answered"])
    band = ReferralBand.from_saved(found["referral"])
    answered = kept & ~band.refers(table["probability"].to_numpy())
    assert summary["answered"] == int(answered.sum())  # the fixture's summary is the rule's


def test_gate_histogram_is_symmetric_log_for_far_scores_and_linear_otherwise() -> None:
    rng = np.random.default_rng(0)
    val = rng.normal(0, 0.5, 200)
    far = {"val": val, "test": rng.normal(0, 0.5, 100), "far-ood": 10 ** rng.uniform(1, 3, 40), "near-rot90": val + 5}
    fig = plot_gate_scores({**far, "far-ood-metadata": np.full(3, np.nan)}, 1.2, labels={"val": "validation"})
    assert [ax.get_xscale() for ax in fig.axes] == ["symlog", "symlog"]
    texts = _texts(fig)
    assert "limit 1.200 (refused above)" in texts
    assert "validation (200)" in texts
    assert not any("far-ood-metadata" in t for t in texts)  # no score, not drawn
    assert figure_png(fig).startswith(PNG_SIGNATURE)
    close = plot_gate_scores({"val": val, "far-ood": val + 3}, 1.2)
    assert [ax.get_xscale() for ax in close.axes] == ["linear"]
    assert "no gate scores" in _texts(plot_gate_scores({"val": []}, None))


def test_risk_coverage_plot_marks_the_band() -> None:
    curve = RiskCoverage("test", np.array([0.5, 0.9]), np.array([1.0, 0.9]), 0.9, band=(0.6, 0.95))
    texts = _texts(plot_risk_coverage([curve]))
    assert "test: referral band (60.0% answered, 95.0% right)" in texts
    assert "test (the gate passes 90.0%)" in texts
    assert figure_png(plot_risk_coverage([])).startswith(PNG_SIGNATURE)
