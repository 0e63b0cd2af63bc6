"""The report's Robustness part, from a run's metrics/stress.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pneumolab.evaluate.stress import FRAMING, SELECTION, stress_evaluate
from pneumolab.report import build_report
from tests.conftest import synthetic_xray


def _write_stress(run: Path) -> dict:
    rng = np.random.default_rng(1)
    films = np.stack([synthetic_xray(rng, (64, 64), label=i % 2) for i in range(10)])
    labels = np.arange(10) % 2

    def reads_the_border(batch: np.ndarray) -> np.ndarray:
        p = 0.05 + 0.9 * batch[:, :6].reshape(len(batch), -1).mean(1) / 255.0
        return np.column_stack([1 - p, p])

    cases = tuple(sorted(set(FRAMING) | set(SELECTION)))
    paths = [f"x{i}.jpeg" for i in range(10)]
    block = stress_evaluate(reads_the_border, films, labels, classes=("NORMAL", "PNEUMONIA"), threshold=0.4,
                            cases=cases, paths=paths)  # fmt: skip
    blocks = {"val": {**block, "split": "val"}, "test": {**block, "split": "test"}}
    # the stress evaluation of a trained run draws its first flippers' Grad-CAM there (tests/test_pipeline.py)
    (run / "plots" / "stress").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 20), "red").save(run / "plots" / "stress" / "val-0.png")
    blocks["val"]["flippers"] = [dict(f) for f in block["flippers"]]
    blocks["val"]["flippers"][0].update(gradcam="plots/stress/val-0.png", gradcam_target="PNEUMONIA")
    (run / "metrics" / "stress.json").write_text(json.dumps(blocks))
    return blocks


def test_a_run_with_a_stress_evaluation_gets_the_robustness_part(make_run, tmp_path: Path) -> None:
    run = make_run("mnv2")
    blocks = _write_stress(run)
    out = build_report([run], tmp_path / "report")
    html, markdown = out["html"].read_text(), out["markdown"].read_text()
    assert 'id="robustness-' in html and "### Robustness" in markdown
    assert html.count('class="small stress"') == 2  # a table per split
    assert "<code>crop:0.8</code>" in html and "| frame\\_black:1.2 |" in markdown
    assert list((tmp_path / "report" / "images").rglob("stress_framing.png"))
    assert f"{blocks['val']['stress_log_loss']:.4f}" in html
    assert "x0.jpeg" in html or "x1.jpeg" in html
    assert "Label flipped by" in html
    first = blocks["val"]["flippers"][0]
    assert html.count("flipper-heatmaps") == 1 and f"under {first['largest_change_by']}" in html
    assert (tmp_path / "report" / "images" / run.name / "stress_val_0.png").is_file()
    assert "images/" in markdown and "stress_val_0.png" in markdown


def test_a_run_without_one_has_no_robustness_part(make_run, tmp_path: Path) -> None:
    out = build_report([make_run("plain")], tmp_path / "report")
    assert "robustness-" not in out["html"].read_text()
