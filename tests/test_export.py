"""Exported artefacts (safetensors + card) and ONNX, from a tiny trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumolab.config import TrainConfig, apply_overrides
from pneumolab.errors import ArtefactError, PneumolabError
from pneumolab.evaluate.runner import evaluate_run
from pneumolab.fsutil import file_sha256
from pneumolab.inference.card import CARD_FORMAT
from pneumolab.inference.export import export_artefact, export_onnx
from pneumolab.inference.pytorch import load_trained
from pneumolab.train.api import train


@pytest.fixture
def evaluated_run(make_dataset, tmp_path):
    root = make_dataset(per_class=16)
    settings = {"data.root": str(root), "data.cache_dir": str(tmp_path / "cache"), "data.val_fraction": 0.25}
    settings |= {"model.name": "mobilenet_v2", "model.weights": "none", "image_size": 64, "batch_size": 8, "epochs": 1}
    run = tmp_path / "run"
    train(apply_overrides(TrainConfig(), settings), run, progress=False)
    evaluate_run(run, tta="cxr", n_resamples=200, progress=False)
    return run


def test_artefact_reproduces_the_run_and_refuses_a_mismatched_card(evaluated_run, tmp_path):
    artefact = export_artefact(evaluated_run, tmp_path / "artefact")
    card = json.loads((artefact / "card.json").read_text())
    assert card["architecture"] == "mobilenet_v2" and card["weights_source"] == "random"
    assert {"threshold", "temperature", "tta", "normalize", "image_size", "metrics", "data_fingerprint"} <= set(card)
    assert oct((artefact / "model.safetensors").stat().st_mode)[-3:] != "600"
    from_run, from_artefact = load_trained(evaluated_run), load_trained(artefact / "card.json")
    images = np.random.default_rng(0).integers(0, 256, (6, from_run.cache_size, from_run.cache_size), np.uint8)
    views = from_run.tta or ("identity",)
    np.testing.assert_allclose(
        from_run.probabilities(from_run.logits(images, views=views)),
        from_artefact.probabilities(from_artefact.logits(images, views=views)),
        atol=1e-6,
    )
    assert from_artefact.threshold == pytest.approx(from_run.threshold)

    card["weights_sha256"] = "0" * 64
    (artefact / "card.json").write_text(json.dumps(card))
    with pytest.raises(ArtefactError, match="does not match its card"):  # the specific error, not just the base
        load_trained(artefact)
    card["weights_sha256"] = None  # a card must record its weights' SHA-256
    (artefact / "card.json").write_text(json.dumps(card))
    with pytest.raises(ArtefactError, match=r"its card records no SHA-256 \(weights_sha256\)"):
        load_trained(artefact)
    card["weights_sha256"], card["architecture"] = file_sha256(artefact / "model.safetensors"), "resnet18"
    (artefact / "card.json").write_text(json.dumps(card))
    with pytest.raises(PneumolabError, match="do not fit the card's resnet18"):
        load_trained(artefact)
    # a card of another format is refused by name, not misread
    for version, words in ((CARD_FORMAT + 1, "is a newer format"), (None, "is an older or unknown format")):
        (artefact / "card.json").write_text(json.dumps({**card, "format": version}))
        with pytest.raises(PneumolabError, match=f"card format {version!r} {words}"):
            load_trained(artefact)


def test_onnx_matches_pytorch(evaluated_run, tmp_path):
    result = export_onnx(evaluated_run, tmp_path / "model.onnx")
    assert result["max_abs_probability_difference"] <= 1e-4
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["onnx_input"][1:] == [1, 64, 64]
