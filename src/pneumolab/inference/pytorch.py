"""The PyTorch backend: a trained classifier in eval mode, loaded once from a run folder, an artefact or a checkpoint.

`load_trained` reads a run folder (``best.pt`` and ``operating_point.json``), an exported artefact
(``model.safetensors`` + ``card.json``, checked against each other), a checkpoint file, or the bundled model.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from pneumolab.config import load_config
from pneumolab.constants import CLASSES
from pneumolab.data.preprocess import Preprocessing
from pneumolab.errors import ArtefactError
from pneumolab.gate import FeaturesTaken, GateSet, tap_features
from pneumolab.hardware import Precision, default_device, resolve_precision
from pneumolab.inference.card import (
    GATE_FILE,
    bundled_path,
    check_against_card,
    load_gate,
    read_card,
)
from pneumolab.inference.steps import InferenceModel
from pneumolab.models import Classifier, create_model
from pneumolab.referral import ReferralBand
from pneumolab.runs import RunDir, load_checkpoint

__all__ = ["TrainedModel", "load_trained"]


@dataclass
class TrainedModel(InferenceModel):
    """A trained classifier in eval mode plus its preprocessing and operating point."""

    model: Classifier
    name: str
    preprocessing: Preprocessing
    weights_source: str
    source: Path
    classes: tuple[str, ...] = CLASSES  # in output order
    class_bias: tuple[float, ...] | None = None  # K-class models: offsets fit on validation (None: argmax)
    view_thresholds: dict[str, float] | None = None  # K-class models: the binary views' validation thresholds
    threshold: float = 0.5
    temperature: float = 1.0
    threshold_method: str = "fixed 0.5"
    tta: tuple[str, ...] = ()
    validation_split: dict[str, Any] | None = None  # carve_validation keywords of its validation split
    gates: GateSet | None = None  # the content gate per precision, fit on the training split (None: not fitted)
    band: ReferralBand | None = None  # the referral band, fit on validation (None: not fitted)
    gate_enabled: bool = True  # False: research use, every file answered (--no-gate)
    device: torch.device = field(default_factory=default_device)
    precision: Precision | None = None
    backend: ClassVar[str] = "pytorch"  # what runs the network; predict --json and /v1/model say it

    def __post_init__(self) -> None:
        # channels_last: oneDNN's and cuDNN's fast convolution layout (1.6x on the development CPU)
        self.model = self.model.to(self.device, memory_format=torch.channels_last).eval()
        if self.precision is None:
            self.precision = resolve_precision("auto", self.device)

    @property
    def _input_device(self) -> torch.device:
        return self.device

    @property
    def compute_precision(self) -> str:
        return self.precision.name

    @property
    def explainer(self) -> TrainedModel:
        return self

    def _network(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.contiguous(memory_format=torch.channels_last)
        with self.precision.autocast():
            return self.model(batch)

    def _network_and_features(self, batch: torch.Tensor, layers: Sequence[str]) -> tuple[torch.Tensor, list]:
        with tap_features(self.model, layers) as taken:
            logits = self._network(batch)
        return logits, [t.cpu().numpy() for t in taken]

    def _features(self, batch: torch.Tensor, layers: Sequence[str]) -> list:
        # the same autocast and layout as a full pass, stopped after the deepest tapped layer
        with tap_features(self.model, layers, stop=True) as taken, contextlib.suppress(FeaturesTaken):
            self._network(batch)
        return [t.cpu().numpy() for t in taken]

    def card(self) -> dict[str, Any]:
        """The facts a report or a service shows about this model."""
        return {
            "architecture": self.name,
            **self.preprocessing.describe(),
            "classes": list(self.classes),
            "threshold": self.threshold,
            "threshold_method": self.threshold_method,
            "temperature": self.temperature,
            "class_bias": list(self.class_bias) if self.class_bias is not None else None,
            "view_thresholds": self.view_thresholds,
            "tta": list(self.tta),
            "validation_split": self.validation_split,
            "weights_source": self.weights_source,
            "gate": self.gates.describe() if self.gates is not None else None,
            "referral": self.band.describe() if self.band is not None else None,
        }


def _checkpoint_path(path: Path) -> Path:
    if path.is_dir():
        best = RunDir(path).best
        if not best.is_file():
            raise ArtefactError(f"{path}: not a trained run (no checkpoints/best.pt)")
        return best
    if path.is_file():
        return path
    raise ArtefactError(f"{path}: no such run folder or model file")


def _load_artefact(folder: Path, device: torch.device | None) -> TrainedModel:
    """An exported artefact: ``model.safetensors`` + ``card.json``, checked against each other."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card_file, weights_file = folder / "card.json", folder / "model.safetensors"
    card = read_card(card_file)
    if not weights_file.is_file():
        raise ArtefactError(f"{weights_file}: missing; the card {card_file} describes weights that are not there")
    check_against_card(weights_file, card.facts, "weights_sha256")
    model = create_model(
        card.architecture, weights="none", head=card.head, in_chans=card.in_chans, num_classes=len(card.classes)
    )
    try:
        model.load_state_dict(load_file(str(weights_file)))
    except (RuntimeError, SafetensorError) as error:
        first = str(error).splitlines()[0]
        raise ArtefactError(f"{weights_file}: weights do not fit the card's {card.architecture} ({first})") from None
    return TrainedModel(
        model=model,
        **card.operating_settings(),
        **load_gate(card.facts, folder / GATE_FILE, "gate_sha256"),
        weights_source=card.weights_source,
        source=folder,
        threshold_method=card.threshold_method,
        validation_split=card.validation_split,
        view_thresholds=card.facts.get("view_thresholds"),
        device=device or default_device(),
        precision=_pinned_precision(card.facts, device or default_device()),
    )


def _pinned_precision(facts: dict[str, Any], device: torch.device) -> Precision | None:
    """The precision a card pins (``precision: fp32``): its operating point, gate and figures were fit in it, and
    fp32 gives the same probabilities on every CPU, where bf16 kernels differ between CPUs. None: the device's own."""
    pinned = facts.get("precision")
    return resolve_precision(pinned, device) if pinned == "fp32" else None


def load_trained(path: str | os.PathLike[str] | None = None, *, device: torch.device | None = None) -> TrainedModel:
    """Load a run folder (its ``best.pt`` and ``operating_point.json``), an exported artefact folder (or its
    ``card.json``), a checkpoint file, or a bundled model by name (`BUNDLED`; ``None``: ``default``)."""
    path = bundled_path(path) or Path(path)
    if path.name == "card.json":
        path = path.parent
    if (path / "card.json").is_file():
        return _load_artefact(path, device)
    checkpoint_file = _checkpoint_path(path)
    state = load_checkpoint(checkpoint_file)
    if "model_name" not in state:
        raise ArtefactError(f"{checkpoint_file}: not a pneumolab model checkpoint (no model_name)")
    classes = tuple(state.get("classes", CLASSES))
    model = create_model(
        state["model_name"], weights="none", head=state.get("head", "linear"), num_classes=len(classes)
    )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise ArtefactError(f"{checkpoint_file}: weights do not fit {state['model_name']} ({first})") from None
    trained = TrainedModel(
        model=model,
        name=state["model_name"],
        classes=classes,
        preprocessing=Preprocessing.from_facts(state),
        weights_source=state.get("weights_source", "unknown"),
        source=path,
        device=device or default_device(),
    )
    operating_point = RunDir(path).operating_point if path.is_dir() else None
    if operating_point is not None and operating_point.is_file():
        point = json.loads(operating_point.read_text())
        trained.threshold = float(point["threshold"])
        trained.temperature = float(point["temperature"])
        trained.threshold_method = point["method"]
        trained.tta = tuple(point.get("tta", ()))
        trained.class_bias = tuple(point["class_bias"]) if point.get("class_bias") else None
        trained.view_thresholds = point.get("derived_thresholds")
        gate = load_gate(point, RunDir(path).gate)
        trained.gates, trained.band = gate["gates"], gate["band"]
    config = RunDir(path).config if path.is_dir() else None
    if config is not None and config.is_file():
        data = load_config(config).data
        trained.validation_split = data.carve_settings()
    return trained
