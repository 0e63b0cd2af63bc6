"""Grad-CAM for every registry architecture (random weights, small input) and end to end on a trained run."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pneumolab.inference.explain import explain_image, grad_cam
from pneumolab.models import list_models
from tests.serve import tiny_trained


@pytest.mark.parametrize("name", list_models())
def test_grad_cam_works_for_every_architecture(name):
    image = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    heatmap = grad_cam(tiny_trained(name), image)
    assert heatmap.shape == (64, 64) and heatmap.dtype == np.float32
    assert np.isfinite(heatmap).all() and heatmap.min() >= 0.0 and heatmap.max() <= 1.0


def test_explain_renders_the_film_and_the_heatmap(tmp_path):
    trained = tiny_trained("resnet18", size=96)
    source = tmp_path / "xray.png"
    Image.fromarray((np.random.default_rng(1).random((120, 100)) * 255).astype(np.uint8)).save(source)
    explanation = explain_image(trained, source)
    assert explanation.label in ("NORMAL", "PNEUMONIA") and 0.0 <= explanation.probability <= 1.0
    picture = Image.open(io.BytesIO(explanation.png))
    assert picture.size == (2 * 96, 96 + 22) and picture.mode == "RGB"


def test_explain_command_on_a_trained_run(make_dataset, tmp_path):
    from pneumolab.config import TrainConfig, apply_overrides
    from pneumolab.train.api import train

    root = make_dataset(per_class=12)
    settings = {"data.root": str(root), "data.cache_dir": str(tmp_path / "cache"), "data.val_fraction": 0.25}
    settings |= {"model.name": "densenet121", "model.weights": "none", "image_size": 64, "batch_size": 8, "epochs": 1}
    train(apply_overrides(TrainConfig(), settings), tmp_path / "run", progress=False)
    image = next((root / "test" / "PNEUMONIA").iterdir())
    out = tmp_path / "cam.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pneumolab.cli",
            "explain",
            str(image),
            "--model",
            str(tmp_path / "run"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size[0] == 128
