"""The plots: each function gives a figure that renders; `plot_run` draws what a run folder's files allow."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from pneumolab.errors import PneumolabError
from pneumolab.report import (
    DPI,
    figure_png,
    plot_confusion,
    plot_history,
    plot_reliability,
    plot_roc_pr,
    plot_run,
    save_figure,
)
from tests.report.conftest import write_ensemble

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _scores(n: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 8 >= 3).astype(int)
    probabilities = 1 / (1 + np.exp(-(np.where(labels == 1, 1.5, -1.5) + rng.normal(0, 1.5, n))))
    return labels, probabilities


def _texts(fig: Figure) -> list[str]:
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    texts += [ax.get_title() for ax in fig.axes]
    texts += [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    return texts


def test_every_plot_renders_to_png() -> None:
    labels, probabilities = _scores()
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [0.6, 0.4, 0.3], "val_loss": [0.5, 0.3, 0.35]})
    figures = [
        plot_history(history),
        plot_confusion([[37, 2], [16, 45]], title="run: test"),
        plot_roc_pr(labels, probabilities, 0.6),
        plot_reliability(labels, probabilities),
    ]
    for fig in figures:
        assert isinstance(fig, Figure)
        assert figure_png(fig).startswith(PNG_SIGNATURE)


def test_save_figure_writes_atomically_at_the_set_resolution(tmp_path: Path) -> None:
    dest = tmp_path / "deep" / "folder" / "confusion.png"
    assert save_figure(plot_confusion([[5, 1], [2, 9]]), dest) == dest
    assert [p.name for p in dest.parent.iterdir()] == ["confusion.png"]  # no temporary file left behind
    with Image.open(dest) as image:
        assert image.format == "PNG"
        assert image.size == (round(8.4 * DPI), round(3.7 * DPI))


def test_history_marks_the_best_epoch_and_skips_absent_columns() -> None:
    history = pd.DataFrame(
        {"epoch": [1, 2, 3, 4], "train_loss": [0.6, 0.4, 0.3, 0.2], "val_loss": [0.5, 0.3, 0.2, 0.4]}
    )
    fig = plot_history(history)
    assert len(fig.axes) == 1  # loss only: no accuracy or ROC-AUC columns
    assert "best epoch (3)" in _texts(fig)
    assert "best epoch (2)" in _texts(plot_history(history, best_epoch=2))
    assert "no training history" in _texts(plot_history(pd.DataFrame({"epoch": [1], "lr": [0.1]})))


def test_confusion_shows_counts_and_row_shares() -> None:
    texts = _texts(plot_confusion([[30, 10], [0, 0]]))
    assert {"30", "10", "75.0%", "25.0%"} <= set(texts)
    assert "\N{EN DASH}" in texts  # a true class without images has no share
    with pytest.raises(ValueError, match="2 x 2"):
        plot_confusion([[1, 2, 3]])


def test_roc_pr_legends_carry_auc_ap_and_the_operating_point() -> None:
    labels, probabilities = _scores()
    texts = " ".join(_texts(plot_roc_pr(labels, probabilities, 0.62)))
    assert "AUC 0." in texts
    assert "AP 0." in texts
    assert "threshold 0.62" in texts
    one_class = _texts(plot_roc_pr(np.ones(10, int), np.linspace(0, 1, 10), 0.5))
    assert any("undefined" in t for t in one_class)


def test_reliability_shows_the_given_or_the_computed_ece() -> None:
    labels, probabilities = np.ones(20, int), np.full(20, 0.95)
    assert "Reliability (ECE 0.050)" in _texts(plot_reliability(labels, probabilities))
    assert "Reliability (ECE 0.123)" in _texts(plot_reliability(labels, probabilities, ece=0.123))
    with pytest.raises(ValueError, match="within"):
        plot_reliability([0, 1], [0.2, 1.5])


def test_plot_run_writes_every_plot_into_the_run_by_default(make_run) -> None:
    run = make_run("lite0", tta=True)
    written = plot_run(run)
    variants = ("val", "val_tta", "test", "test_tta")
    expected = {"history"} | {f"{kind}_{v}" for kind in ("confusion", "roc_pr", "reliability") for v in variants}
    assert set(written) == expected
    assert all(path.parent == run / "plots" and path.is_file() for path in written.values())


def test_plot_run_draws_what_exists_only(make_run, tmp_path: Path) -> None:
    run = make_run("partial", tta=False)
    (run / "predictions" / "test.csv").unlink()  # metrics remain: the confusion matrix still comes from them
    (run / "history.csv").unlink()
    written = plot_run(run, tmp_path / "out", splits=("test",))
    assert set(written) == {"confusion_test"}

    unevaluated = make_run("unevaluated", evaluated=False)
    assert set(plot_run(unevaluated, tmp_path / "out2")) == {"history"}

    ensemble = write_ensemble(tmp_path / "runs", "ensemble", [run, unevaluated])
    assert "history" not in plot_run(ensemble, tmp_path / "out3")


def test_plot_run_names_an_unreadable_file(make_run, tmp_path: Path) -> None:
    run = make_run("broken", tta=False)
    (run / "predictions" / "test.csv").write_text("path,label\nx.jpeg,7\n")
    with pytest.raises(PneumolabError, match=r"test\.csv: missing column"):
        plot_run(run, tmp_path / "out")
    shutil.rmtree(run)
    with pytest.raises(PneumolabError, match="no such run folder"):
        plot_run(run)


def test_reliability_overlays_the_curve_before_temperature_scaling() -> None:
    labels, probabilities = _scores()
    assert "before temperature scaling (T = 1)" not in _texts(plot_reliability(labels, probabilities))
    logits = np.log(probabilities / (1 - probabilities))
    texts = _texts(plot_reliability(labels, 1 / (1 + np.exp(-logits / 1.5)), uncalibrated=probabilities))
    assert "before temperature scaling (T = 1)" in texts
    assert "bin mean probability, temperature-scaled" in texts
    with pytest.raises(ValueError, match="differ in length"):
        plot_reliability(labels, probabilities, uncalibrated=probabilities[:-1])
