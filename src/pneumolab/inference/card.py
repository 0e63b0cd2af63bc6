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

from pneumolab.constants import CLASSES
from pneumolab.data.preprocess import Preprocessing
from pneumolab.errors import ArtefactError
from pneumolab.fsutil import FolderKind, file_sha256
from pneumolab.gate import GateSet
from pneumolab.referral import ReferralBand

__all__ = [
    "ARTEFACT_KIND",
    "BUNDLED",
    "CARD_FORMAT",
    "DEFAULT_MODEL",
    "GATE_FILE",
    "BundledModel",
    "ModelCard",
    "bundled_entry",
    "bundled_model_dir",
    "bundled_names",
    "bundled_path",
    "check_against_card",
    "load_gate",
    "read_card",
]

CARD_FORMAT = 1
"""The card format this version writes and reads; a card of another format is refused on read, naming both."""
# The alias of the model shipped inside the package that `pneumolab predict IMAGE` uses with no --model (`BUNDLED`).
DEFAULT_MODEL = "default"
# The content gate's arrays (means, precisions), beside the weights of an artefact or in a run folder.
GATE_FILE = "gate.safetensors"
# What `export` and `gate` write: a folder holding these files only may be replaced by another export; any other
# existing folder (a user's) is refused unless --force is given.
ARTEFACT_KIND = FolderKind("model artefact", marker="card.json", contents=("card.json", "model.safetensors", GATE_FILE))


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
    """Refuse `file` when the card records no SHA-256 under `key` (weights, ONNX graph, gate arrays), or another."""
    if not facts.get(key):
        raise ArtefactError(f"{file}: its card records no SHA-256 ({key}); export the model again with this pneumolab")
    digest = file_sha256(file)
    if facts[key] != digest:
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


@dataclass(frozen=True)
class BundledModel:
    """One model shipped inside the package: the name that says what it is, its folder and its short aliases."""

    name: str  # architecture-resolution-data-task-version, as timm and torchxrayvision name weights
    folder: str  # under pneumolab/bundled/: model.safetensors, card.json, gate.safetensors, recipe.yaml, MODEL_CARD.md
    aliases: tuple[str, ...]
    summary: str


# The one table of bundled names (a new bundled model: its folder, then one row here). Folder names stay as they
# were shipped; the descriptive name is what documentation and cards use.
BUNDLED: tuple[BundledModel, ...] = (
    BundledModel(
        "mobilenetv2-128-kermany-binary-v2",
        folder="mobilenetv2-128-kermany-binary-v2",
        aliases=("default",),
        summary="NORMAL / PNEUMONIA; MobileNetV2 at 128 px from ImageNet weights, fine-tuned on the Kermany films "
        "with framing-free augmentation (chosen by the framing rule, 0.2.0)",
    ),
    BundledModel(
        "mobilenetv2-224-kermany-binary-v1",
        folder="default",
        aliases=(),
        summary="NORMAL / PNEUMONIA; MobileNetV2 at 224 px from ImageNet weights, fine-tuned on the Kermany films "
        "(the bundled default before 0.2.0; it reads the framing: docs/results/2026-12-06-framing.md)",
    ),
    BundledModel(
        "mobilenetv2-224-kermany-3class-v2",
        folder="mobilenetv2-224-kermany-3class-v2",
        aliases=("three-class",),
        summary="NORMAL / BACTERIAL / VIRAL; MobileNetV2 at 224 px from ImageNet weights, the Kermany films, "
        "framing-free augmentation (chosen by the framing rule, 0.2.0)",
    ),
    BundledModel(
        "mobilenetv2-224-kermany-3class-v1",
        folder="three-class",
        aliases=(),
        summary="NORMAL / BACTERIAL / VIRAL; MobileNetV2 at 224 px from ImageNet weights, the Kermany films (the "
        "bundled three-class model before 0.2.0; it reads the framing)",
    ),
)


def _bundled_root() -> Path:
    return Path(__file__).resolve().parent.parent / "bundled"


def bundled_entry(name: str) -> BundledModel | None:
    """The table row `name` (a descriptive name, an alias or a folder) selects, or None."""
    return next((m for m in BUNDLED if name == m.name or name in m.aliases or name == m.folder), None)


def bundled_names() -> tuple[str, ...]:
    """Every name `--model` accepts for a bundled model installed here: descriptive names and their aliases."""
    root = _bundled_root()
    installed = [m for m in BUNDLED if (root / m.folder / "card.json").is_file()]
    return tuple(name for m in installed for name in (m.name, *m.aliases))


def bundled_path(model: str | os.PathLike[str] | None) -> Path | None:
    """The bundled artefact `model` names (None: ``default``), or None when `model` names no bundled model.

    A bare name that is both a bundled model's and an existing file or folder's is refused, naming both: a name
    must never change meaning with the working directory.
    """
    if model is None:
        return bundled_model_dir()
    text = os.fspath(model)
    entry = bundled_entry(text) if "/" not in text and os.sep not in text else None
    if entry is None:
        return None
    if Path(text).exists():
        raise ArtefactError(
            f"{text}: names both the bundled model {entry.name} and the folder {Path(text).resolve()}; pass "
            f"{Path(text).resolve()} for the folder, or {entry.name} for the bundled model"
        )
    return bundled_model_dir(text)


def bundled_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The artefact folder of a model shipped inside the package (``pneumolab/bundled/<folder>/``), by any of its
    names in `BUNDLED`."""
    entry = bundled_entry(name)
    folder = _bundled_root() / (entry.folder if entry is not None else name)
    if not (folder / "card.json").is_file():
        known = ", ".join(bundled_names()) or "none"
        raise ArtefactError(f"{folder}: no bundled model {name!r} in this installation (bundled: {known}); pass "
                            "--model RUN")  # fmt: skip
    return folder
