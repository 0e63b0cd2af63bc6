"""The report of K-class runs (NORMAL / BACTERIAL / VIRAL): its K-class table, confusion matrices, per-class curves,
errors and model card come from the run's files, its binary parts read the pneumonia-vs-normal view, and a binary
run beside it is reported exactly as alone."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image
from scipy.special import expit, softmax
from sklearn.metrics import brier_score_loss, roc_auc_score

from pneumolab.errors import ArtefactError
from pneumolab.evaluate.calibration import expected_calibration_error
from pneumolab.evaluate.runner import ensemble_runs
from pneumolab.report import DPI, build_report, plot_class_roc_pr, plot_confusion
from pneumolab.report._runfiles import read_run
from pneumolab.report.render import _markdown_escape
from tests.report.conftest import write_multiclass_run, write_run

BINARY, KIND = "lite0-binary", "resnet18-kind"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kind-runs")
    return {BINARY: write_run(root, BINARY, seed=5, tta=False), KIND: write_multiclass_run(root, KIND)}


@pytest.fixture(scope="module")
def mixed(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_report([runs[BINARY], runs[KIND]], tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="module")
def binary_alone(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_report([runs[BINARY]], tmp_path_factory.mktemp("binary"))


def _metrics(run: Path, stem: str) -> dict:
    return json.loads((run / "metrics" / f"{stem}.json").read_text())


def _cell(value: float, interval: list[float], percent: bool) -> str:
    if percent:
        return f"{100 * value:.1f} ({100 * interval[0]:.1f}-{100 * interval[1]:.1f})"
    return f"{value:.3f} ({interval[0]:.3f}-{interval[1]:.3f})"


def _run_part(markdown: str, name: str) -> str:
    """A run's part of the Markdown report, from its heading to the next run's anchor (or the footer)."""
    part = markdown.split(f"## {name} (", 1)[1]
    return re.split(r'\n<a id="run-|\n---\n', part, maxsplit=1)[0]


def _table_rows(markdown: str, start: str, end: str) -> list[str]:
    section = markdown.split(start, 1)[1].split(end, 1)[0]
    return [line for line in section.splitlines() if line.startswith("| [")]


def test_report_of_a_binary_and_a_kclass_run_renders_html_and_markdown(mixed: dict[str, Path]) -> None:
    html, markdown = mixed["html"].read_text(), mixed["markdown"].read_text()
    assert "<script" not in html.lower()
    pngs = sorted(mixed["images"].rglob("*.png"))
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == len(pngs)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(links) == sorted(str(p.relative_to(mixed["markdown"].parent)) for p in pngs)
    kind_images = {p.name for p in (mixed["images"] / KIND).iterdir()}
    # per-class curves and K x K matrices for both test variants, the view's reliability, the gate; no risk-coverage
    assert kind_images == {
        "history.png",
        "gate_scores.png",
        *(f"{k}_test{v}.png" for k in ("confusion", "roc_pr", "reliability") for v in ("", "_tta")),
    }
    assert 'id="multiclass"' in html and f'id="multiclass-{KIND}"' in html


def test_kclass_table_shows_the_numbers_of_the_metrics_files(runs: dict[str, Path], mixed: dict[str, Path]) -> None:
    markdown = mixed["markdown"].read_text()
    rows = _table_rows(markdown, "### Three-class (K-class) results", "### Published results")
    assert len(rows) == 4 and all(row.startswith(f"| [{_markdown_escape(KIND)}]") for row in rows)  # only K-class
    header = next(
        line
        for line in markdown.splitlines()
        if line.startswith("| Model | Evaluation | Images | Accuracy (%) | Balanced accuracy (%) | Macro-F1")
    )
    assert "Bacterial vs viral: Sensitivity (VIRAL positive) (%)" in header
    assert all(row.count("|") == header.count("|") for row in rows)
    for row, stem in zip(rows, ("test", "test_tta", "val", "val_tta"), strict=True):
        metrics = _metrics(runs[KIND], stem)
        ci = metrics["ci95"]
        expected = [_cell(metrics[k], ci[k], True) for k in ("accuracy", "balanced_accuracy", "macro_f1")]
        expected += [_cell(metrics[k], ci[k], False) for k in ("macro_roc_auc", "log_loss", "brier", "ece")]
        kind = metrics["views"]["bacterial_vs_viral"]
        expected += [f"{kind['n']}"] + [
            _cell(kind[k], kind["ci95"][k], True) for k in ("accuracy", "recall", "specificity")
        ]
        expected += [_cell(kind["roc_auc"], kind["ci95"]["roc_auc"], False)]
        assert " | ".join(expected) in row, stem
    # the binary comparison table shows the K-class run's pneumonia-vs-normal view, and says so
    view = _metrics(runs[KIND], "test")["views"]["pneumonia_vs_normal"]
    main = _table_rows(markdown, "## Model comparison", "### Three-class")
    kind_row = next(r for r in main if r.startswith(f"| [{_markdown_escape(KIND)}]") and "| test (" in r)
    assert "(pneumonia vs normal: P(BACTERIAL) + P(VIRAL))" in kind_row
    assert f"| {_cell(view['accuracy'], view['ci95']['accuracy'], True)} |" in kind_row
    assert f"| {_cell(view['roc_auc'], view['ci95']['roc_auc'], False)} |" in kind_row
    assert f"| {view['threshold']:.3f} | max balanced accuracy on validation, for this view;" in kind_row
    assert "P(PNEUMONIA) = 1 - P(NORMAL)" in markdown.split("### Three-class")[0]


def test_confusion_matrices_are_three_by_three(runs: dict[str, Path], mixed: dict[str, Path]) -> None:
    path = mixed["images"] / KIND / "confusion_test.png"
    with Image.open(path) as image:
        assert image.size == (round(9.8 * DPI), round(4.4 * DPI))  # the 3-class figure, wider than the 2 x 2 one
    counts = _metrics(runs[KIND], "test")["confusion"]["counts"]
    assert read_run(runs[KIND]).evaluation("test").confusion().tolist() == counts
    texts = {
        t.get_text() for ax in plot_confusion(counts, classes=("NORMAL", "BACTERIAL", "VIRAL")).axes for t in ax.texts
    }
    assert {f"{c:,}" for row in counts for c in row} <= texts
    assert {t.get_text() for t in plot_confusion(counts, classes=("N", "B", "V")).axes[0].get_xticklabels()} == {
        "N",
        "B",
        "V",
    }
    with pytest.raises(ValueError, match="3 x 3"):
        plot_confusion([[1, 2], [3, 4]], classes=("N", "B", "V"))
    section = _run_part(mixed["markdown"].read_text(), KIND).split("### Three-class results (test)", 1)[1]
    assert f"](images/{KIND}/confusion_test.png)" in section.split("### Error analysis")[0]


def test_per_class_section_shows_the_decision_rule_and_per_class_metrics(
    runs: dict[str, Path], mixed: dict[str, Path]
) -> None:
    section = _run_part(mixed["markdown"].read_text(), KIND).split("### Three-class results (test)", 1)[1]
    section = section.split("### Error analysis", 1)[0]
    point = json.loads((runs[KIND] / "operating_point.json").read_text())["variants"]["plain"]
    check = point["class_bias_check"]
    assert f"T = {point['temperature']:.2f}" in section
    assert (
        f"balanced accuracy {100 * check['balanced_accuracy_argmax']:.1f} % by plain argmax, "
        f"{100 * check['balanced_accuracy_with_bias']:.1f} % with a class bias" in section
    )
    metrics = _metrics(runs[KIND], "test")
    for name in ("NORMAL", "BACTERIAL", "VIRAL"):
        cells = [
            _cell(metrics[f"{k}/{name}"], metrics["ci95"][f"{k}/{name}"], True) for k in ("precision", "recall", "f1")
        ]
        cells += [
            _cell(metrics[f"{k}/{name}"], metrics["ci95"][f"{k}/{name}"], False)
            for k in ("roc_auc", "average_precision")
        ]
        assert f"| {name} | {metrics['n_per_class'][name]} | " + " | ".join(cells) + " |" in section
    assert "VIRAL positive" in section


def test_per_class_errors_list_the_most_confident_mistakes(runs: dict[str, Path], mixed: dict[str, Path]) -> None:
    table = pd.read_csv(runs[KIND] / "predictions" / "test.csv")
    html = mixed["html"].read_text()
    block = html.split('<div class="errors class-errors">', 2)[1]  # test (plain) comes first
    assert block.startswith("\n  <h4>test: 96 images (36 NORMAL, 36 BACTERIAL, 24 VIRAL)</h4>")
    counts = _metrics(runs[KIND], "test")["confusion"]["counts"]
    classes = ("NORMAL", "BACTERIAL", "VIRAL")
    for index, name in enumerate(classes):
        wrong = table[(table["label"] == index) & (table["prediction"] != index)]
        confidence = wrong.apply(lambda r: r[f"p_{classes[int(r['prediction'])]}"], axis=1)
        expected = wrong.loc[confidence.sort_values(ascending=False, kind="stable").index[:5], "path"].tolist()
        assert expected, name  # the synthetic model makes mistakes in every class
        listed = block.split(f'<ul class="small examples" data-class="{name}">', 1)[1].split("</ul>", 1)[0]
        assert re.findall(r"<code>([^<]+)</code>", listed) == expected
        assert all((table["path"] == path).any() for path in expected)
        row = block.split(f'<tr data-class="{name}">', 1)[1].split("</tr>", 1)[0]
        called = re.findall(r'<td class="num">([^<]+)</td>', row)[3:]
        assert called == ["\N{EN DASH}" if j == index else str(c) for j, c in enumerate(counts[index])]


def test_binary_analyses_of_a_kclass_run_read_its_pneumonia_view(runs: dict[str, Path], mixed: dict[str, Path]) -> None:
    part = _run_part(mixed["markdown"].read_text(), KIND)
    chosen = "_tta" if json.loads((runs[KIND] / "operating_point.json").read_text())["tta"] else ""
    table = pd.read_csv(runs[KIND] / "predictions" / f"test{chosen}.csv")
    y = (table["label"] != 0).to_numpy().astype(int)
    logits = table[["logit_NORMAL", "logit_BACTERIAL", "logit_VIRAL"]].to_numpy()
    before = 1 - softmax(logits, axis=1)[:, 0]  # T = 1, no class bias
    after = table["probability"].to_numpy()
    assert np.allclose(after, 1 - table["p_NORMAL"], atol=1e-6)
    calibration = part.split("### Calibration before and after", 1)[1].split("\n### ", 1)[0]
    assert "measured on the pneumonia-vs-normal view, P(BACTERIAL) + P(VIRAL)" in calibration
    assert (
        f"| before temperature scaling and class bias (T = 1, no bias) | {expected_calibration_error(y, before):.3f} | "
        f"{brier_score_loss(y, before):.3f} |" in calibration
    )
    assert f"| {expected_calibration_error(y, after):.3f} | {brier_score_loss(y, after):.3f} |" in calibration
    overlap = part.split("### Test results without patient overlap", 1)[1]
    assert "the pneumonia-vs-normal view, P(BACTERIAL) + P(VIRAL)" in overlap
    assert "Not shown: the risk-coverage curve, not drawn for K-class runs" in part
    assert "No referral band: none is fit for K-class runs" in part
    margins = read_run(runs[KIND]).evaluation("test").pneumonia_view.logits()
    assert np.allclose(expit(margins), before, atol=1e-6)


def test_kclass_model_card_names_its_task_views_and_limits(runs: dict[str, Path], mixed: dict[str, Path]) -> None:
    card = _run_part(mixed["markdown"].read_text(), KIND).split("### Model card:", 1)[1]
    metrics = _metrics(runs[KIND], "test")
    assert "| Task | kind: NORMAL / BACTERIAL / VIRAL" in card
    assert card.count("| Classes | NORMAL, BACTERIAL, VIRAL |") == 3  # training facts and both test variants
    low, high = metrics["ci95"]["macro_f1"]
    assert f"| Macro-F1 | {100 * metrics['macro_f1']:.1f} % (95 % CI {100 * low:.1f}-{100 * high:.1f}) |" in card
    assert "| Bacterial vs viral view (VIRAL positive) |" in card
    assert "| Images | 96 (36 NORMAL, 36 BACTERIAL, 24 VIRAL) |" in card
    assert "come from the release's file names" in card
    assert "No referral band for K classes" in card
    assert "bacterial and viral pneumonia are not told apart" not in card


def test_a_binary_run_is_reported_as_without_a_kclass_run(
    mixed: dict[str, Path], binary_alone: dict[str, Path]
) -> None:
    together, alone = mixed["markdown"].read_text(), binary_alone["markdown"].read_text()
    assert _run_part(together, BINARY) == _run_part(alone, BINARY)
    binary_rows = [r for r in _table_rows(together, "## Model comparison", "###") if r.startswith(f"| [{BINARY}]")]
    # beside a run with TTA, the binary run also gets its "test + TTA: not evaluated" rows, as beside any such run
    evaluated = [r for r in binary_rows if "| not evaluated |" not in r]
    assert evaluated == _table_rows(alone, "## Model comparison", "###")
    assert len(binary_rows) == 4
    assert "Three-class (K-class) results" not in alone and "Three-class" not in binary_alone["html"].read_text()
    assert "K-class" not in alone


def test_a_kclass_ensemble_is_reported_without_logits_or_temperature(runs: dict[str, Path], tmp_path: Path) -> None:
    other = write_multiclass_run(tmp_path / "runs", "resnet18-kind-b", seed=4, tta=False, gating=False)
    ensemble = tmp_path / "kind-ensemble"
    ensemble_runs([runs[KIND], other], ensemble, n_resamples=200)
    out = build_report([ensemble], tmp_path / "report")
    part = _run_part(out["markdown"].read_text(), "kind-ensemble")
    assert "Decision rule: argmax of the mean combination; no temperature scaling." in part
    assert "Before temperature scaling: not shown (the predictions hold no logits)." in part
    assert (out["images"] / "kind-ensemble" / "confusion_test.png").is_file()
    assert "Most confident mistakes among the true VIRAL films" in part
    rows = _table_rows(out["markdown"].read_text(), "### Three-class (K-class) results", "### Published results")
    assert len(rows) == 2  # test and validation, no TTA


def test_runfiles_reads_kclass_predictions_and_names_a_bad_file(runs: dict[str, Path], tmp_path: Path) -> None:
    evaluation = read_run(runs[KIND]).evaluation("test")
    assert evaluation.classes == ("NORMAL", "BACTERIAL", "VIRAL") and evaluation.is_multiclass
    assert evaluation.class_probabilities().shape == (96, 3)
    assert not read_run(runs[BINARY]).evaluation("test").is_multiclass
    run = shutil.copytree(runs[KIND], tmp_path / "bad")
    path = run / "predictions" / "test.csv"
    table = pd.read_csv(path)
    table.loc[5, "label"] = 3
    table.to_csv(path, index=False)
    with pytest.raises(ArtefactError) as error:
        read_run(run)
    message = str(error.value)
    assert "\n" not in message
    assert message == f"{path}: column 'label' must hold class indices 0 to 2 (NORMAL, BACTERIAL, VIRAL) only"
    table.loc[5, "label"] = 1
    table.loc[7, "p_VIRAL"] = 1.5
    table.to_csv(path, index=False)
    with pytest.raises(ArtefactError, match=r"test\.csv: column 'p_VIRAL' must hold numbers within \[0, 1\]"):
        read_run(run)
    (run / "metrics" / "test.json").unlink()  # without metrics, the p_ columns alone make it K-class
    table.loc[7, "p_VIRAL"] = 0.2
    table.loc[9, "prediction"] = 4
    table.to_csv(path, index=False)
    with pytest.raises(ArtefactError, match="column 'prediction' must hold class indices 0 to 2"):
        read_run(run)


def test_class_roc_pr_draws_one_curve_per_class_with_its_auc() -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    probabilities = softmax(rng.normal(0, 1, (60, 3)) + 2 * np.eye(3)[labels], axis=1)
    fig = plot_class_roc_pr(labels, probabilities, ("NORMAL", "BACTERIAL", "VIRAL"), title="run: test")
    assert isinstance(fig, Figure)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    for index, name in enumerate(("NORMAL", "BACTERIAL", "VIRAL")):
        auc = roc_auc_score(labels == index, probabilities[:, index])
        assert f"{name}: AUC {auc:.3f}" in legend
    assert len([t for t in fig.axes[1].get_legend().get_texts() if "AP" in t.get_text()]) == 3
    missing = plot_class_roc_pr(np.zeros(6, int), np.full((6, 3), 1 / 3), ("A", "B", "C"))
    assert any("undefined" in t.get_text() for t in missing.axes[0].get_legend().get_texts())
    with pytest.raises(ValueError, match="6 x 3"):
        plot_class_roc_pr(np.zeros(6, int), np.full((6, 2), 0.5), ("A", "B", "C"))
