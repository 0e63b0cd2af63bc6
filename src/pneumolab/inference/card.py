"""The model card: what a trained model is and how to run it, as `pneumolab export` writes it beside the weights.

``card.json`` holds the architecture, preprocessing, classes, operating point (threshold, temperature, TTA views),
the input gate's and referral band's facts, provenance (source run, metrics, data fingerprint, version) and the
SHA-256 of each file it describes. `read_card` checks the format number and gives a `ModelCard`; the writer is
`pneumolab.inference.export.build_card`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumolab import CLASSES
from pneumolab.data.preprocess import Preprocessing
from pneumolab.errors import ArtefactError
from pneumolab.fsutil import file_sha256
from pneumolab.gate import GateSet
from pneumolab.referral import ReferralBand

__all__ = [
    "CARD_FORMAT",
    "DEFAULT_MODEL",
    "GATE_FILE",
    "ModelCard",
    "bundled_model_dir",
    "bundled_names",
    "bundled_path",
    "check_against_card",
    "load_gate",
    "read_card",
]

CARD_FORMAT = 1
"""The card format this version writes and reads; a card of another format is refused on read, naming both."""
# The name that selects the model shipped inside the package (`pneumolab predict IMAGE` with no --model).
DEFAULT_MODEL = "default"
# The content gate's arrays (means, precisions), beside the weights of an artefact or in a run folder.
GATE_FILE = "gate.safetensors"


@dataclass(frozen=True)
class ModelCard:
    """A card as read: the fields inference needs, typed, and the whole JSON (`facts`) for reports and services."""

    architecture: str
    head: str
    in_chans: int
    preprocessing: Preprocessing
    classes: tuple[str, ...]
    threshold: float
    threshold_method: str
    temperature: float
    tta: tuple[str, ...]
    weights_source: str
    validation_split: dict[str, Any] | None
    facts: dict[str, Any]
    class_bias: tuple[float, ...] | None = None  # K-class models: log-prior offsets fit on validation, or none

    def operating_settings(self) -> dict[str, Any]:
        """What every backend takes from the card: the network's name, its preprocessing and operating point."""
        return {
            "name": self.architecture,
            "classes": self.classes,
            "preprocessing": self.preprocessing,
            "threshold": self.threshold,
            "temperature": self.temperature,
            "class_bias": self.class_bias,
            "tta": self.tta,
        }

    @classmethod
    def from_dict(cls, facts: dict[str, Any], where: str) -> ModelCard:
        """Check the format and the fields; `where` names the file in the one-line error."""
        version = facts.get("format")
        if version != CARD_FORMAT:
            age = "a newer" if isinstance(version, int) and version > CARD_FORMAT else "an older or unknown"
            raise ArtefactError(
                f"{where}: card format {version!r} is {age} format than this pneumolab reads ({CARD_FORMAT}); "
                "export the model again with this version, or install the version that wrote it"
            )
        try:
            card = cls(
                architecture=str(facts["architecture"]),
                head=str(facts.get("head", "linear")),
                in_chans=int(facts.get("in_chans", 1)),
                preprocessing=Preprocessing.from_facts(facts),
                classes=tuple(facts.get("classes", CLASSES)),
                threshold=float(facts["threshold"]),
                threshold_method=str(facts.get("threshold_method", "from the card")),
                temperature=float(facts["temperature"]),
                tta=tuple(facts.get("tta", ())),
                weights_source=str(facts.get("weights_source", "unknown")),
                validation_split=facts.get("validation_split"),
                facts=facts,
                class_bias=tuple(float(b) for b in facts["class_bias"]) if facts.get("class_bias") else None,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ArtefactError(f"{where}: not a model card ({type(error).__name__}: {error})") from None
        if len(card.classes) < 2 or len(set(card.classes)) != len(card.classes):
            raise ArtefactError(f"{where}: classes {list(card.classes)}; a model needs two or more distinct classes")
        if card.class_bias is not None and len(card.class_bias) != len(card.classes):
            raise ArtefactError(f"{where}: {len(card.class_bias)} class_bias values for {len(card.classes)} classes")
        return card


def read_card(card_file: Path) -> ModelCard:
    """A model card (JSON written by `pneumolab export`), or a one-line error naming the file."""
    try:
        facts = json.loads(card_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ArtefactError(f"{card_file}: not a readable model card ({error})") from None
    if not isinstance(facts, dict):
        raise ArtefactError(f"{card_file}: not a model card (a JSON object is expected)")
    return ModelCard.from_dict(facts, str(card_file))


def check_against_card(file: Path, facts: dict[str, Any], key: str) -> None:
    """Refuse `file` when its SHA-256 differs from the one the card records under `key` (weights, ONNX graph)."""
    digest = file_sha256(file)
    if facts.get(key) not in (None, digest):
        raise ArtefactError(f"{file}: does not match its card (SHA-256 {digest[:12]}..., card says "
                             f"{str(facts[key])[:12]}...)")  # fmt: skip


def load_gate(facts: dict[str, Any], arrays_file: Path, sha_key: str | None = None) -> dict[str, Any]:
    """``{"gates": GateSet | None, "band": ReferralBand | None}`` from a card or operating point's facts and the
    gate's arrays file (checked against ``facts[sha_key]`` when given)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    loaded: dict[str, Any] = {"gates": None, "band": None}
    if facts.get("referral"):
        loaded["band"] = ReferralBand.from_saved(facts["referral"])
    if facts.get("gate"):
        if not arrays_file.is_file():
            raise ArtefactError(f"{arrays_file}: missing; the card describes an input gate whose arrays are not there")
        if sha_key is not None:
            check_against_card(arrays_file, facts, sha_key)
        try:
            loaded["gates"] = GateSet.from_saved(facts["gate"], load_file(str(arrays_file)))
        except (KeyError, SafetensorError) as error:
            raise ArtefactError(f"{arrays_file}: not the gate its card describes ({error})") from None
    return loaded


def bundled_names() -> tuple[str, ...]:
    """The names `--model` accepts for the models shipped inside the package (``default``, ``three-class``)."""
    root = Path(__file__).resolve().parent.parent / "bundled"
    return tuple(sorted(p.name for p in root.iterdir() if (p / "card.json").is_file())) if root.is_dir() else ()


def bundled_path(model: str | os.PathLike[str] | None) -> Path | None:
    """The bundled artefact `model` names (None: ``default``), unless a file or folder of that name exists here;
    None when `model` names no bundled model."""
    if model is None:
        return bundled_model_dir()
    if str(model) in bundled_names() and not Path(model).exists():
        return bundled_model_dir(str(model))
    return None


def bundled_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The artefact folder of a model shipped inside the package (``pneumolab/bundled/<name>/``)."""
    folder = Path(__file__).resolve().parent.parent / "bundled" / name
    if not (folder / "card.json").is_file():
        raise ArtefactError(f"{folder}: no bundled model {name!r} in this installation; pass --model RUN")
    return folder
