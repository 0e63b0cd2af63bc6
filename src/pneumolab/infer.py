"""Load a trained model once and turn uint8 images into calibrated PNEUMONIA probabilities.

`TrainedModel` carries the model and everything its preprocessing and decision need (image size, crop,
normalisation, cache size, temperature, threshold, TTA views), so evaluation, predict and the service run the
same steps: file -> `load_xray(size=cache_size)` -> `eval_transform` -> model (-> TTA views) -> mean logits ->
softmax(logits / temperature) -> threshold.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from pneumolab import CLASSES
from pneumolab.config import load_config
from pneumolab.data.augment import eval_transform
from pneumolab.data.io import IMAGE_SUFFIXES, XrayMeta, load_xray, load_xray_with_meta
from pneumolab.data.tta import apply_view
from pneumolab.errors import ImageReadError, PneumolabError
from pneumolab.fsutil import file_sha256
from pneumolab.gate import FeatureGate, GateSet, check_metadata, tap_features
from pneumolab.hardware import Precision, default_device, resolve_precision
from pneumolab.models import Classifier, create_model
from pneumolab.referral import ReferralBand
from pneumolab.runs import RunDir, load_checkpoint

if TYPE_CHECKING:  # the ONNX backend builds on this module
    from pneumolab.onnx_backend import OnnxModel

__all__ = [
    "DEFAULT_MODEL",
    "GATE_FILE",
    "Decision",
    "InferenceSteps",
    "TrainedModel",
    "bundled_model_dir",
    "collect_image_paths",
    "load_trained",
    "predict_files",
]

# The name that selects the model shipped inside the package (`pneumolab predict IMAGE` with no --model).
DEFAULT_MODEL = "default"
# The content gate's arrays (means, precisions), beside the weights of an artefact or in a run folder.
GATE_FILE = "gate.safetensors"
GATE_OFF = "off (--no-gate): inputs are not checked; every file gets a label"


@dataclass(frozen=True)
class Decision:
    """What the model says about one film: answered, referred to a radiologist, or refused as not a chest X-ray.

    A refused film has no label and no probability (nothing that looks like a diagnosis); a referred one keeps the
    model's label and probability.
    """

    status: str  # "answered", "refer" or "refused"
    label: str
    probability: float | None
    reason: str = ""
    gate_score: float | None = None

    def fields(self) -> dict[str, Any]:
        """The decision as the row fields `predict` and the service print."""
        return {
            "status": self.status,
            "label": self.label,
            "probability": self.probability,
            "reason": self.reason,
            "gate_score": self.gate_score,
        }


class InferenceSteps:
    """The preprocessing, TTA and calibration steps every inference backend shares (PyTorch, ONNX Runtime).

    A backend sets ``image_size``, ``crop_fraction``, ``normalize``, ``cache_size`` and ``temperature`` and supplies
    `_network` (a normalised float N x 1 x H x W batch on `_input_device` -> N x 2 logits), so the backends feed their
    networks the same tensors.
    """

    image_size: int
    crop_fraction: float
    normalize: tuple[float, float]
    cache_size: int
    temperature: float
    threshold: float
    tta: tuple[str, ...]
    gates: GateSet | None
    band: ReferralBand | None
    gate_enabled: bool

    @property
    def _input_device(self) -> torch.device:
        raise NotImplementedError

    @property
    def compute_precision(self) -> str:
        """The precision the network runs in (``bf16``, ``fp32``, ``fp16``): it picks the gate fit in it."""
        raise NotImplementedError

    @property
    def gate(self) -> FeatureGate | None:
        """The content gate for this backend's precision (None: no gate fitted)."""
        return None if self.gates is None else self.gates.for_precision(self.compute_precision)

    def _network(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _network_and_features(self, batch: torch.Tensor, layers: Sequence[str]) -> tuple[torch.Tensor, list]:
        """Logits and, per tapped layer, the channel mean + std features (N x 2C float32 arrays)."""
        raise NotImplementedError

    def _preprocess(self, images_u8: torch.Tensor) -> torch.Tensor:
        return eval_transform(
            images_u8.to(self._input_device),
            image_size=self.image_size,
            crop_fraction=self.crop_fraction,
            normalize=self.normalize,
        )

    @torch.no_grad()
    def gate_features(
        self, images_u8: torch.Tensor | np.ndarray, layers: Sequence[str], *, batch_size: int = 64
    ) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Plain-view logits and the gate's features at `layers` (one array N x 2C per layer) in one pass."""
        images = _as_batch(images_u8)
        logits, features = [], []
        for start in range(0, len(images), batch_size):
            out, taken = self._network_and_features(self._preprocess(images[start : start + batch_size]), layers)
            logits.append(out.float().cpu())
            features.append(taken)
        if not features:
            return torch.empty(0, len(CLASSES)), []
        return torch.cat(logits), [np.concatenate(parts) for parts in zip(*features, strict=True)]

    @property
    def gate_status(self) -> str:
        """What the input gate does for this model, for every output: on, metadata only, or off."""
        if not self.gate_enabled:
            return GATE_OFF
        if self.gate is None:
            return "metadata only: this model has no fitted content gate (pneumolab gate MODEL --data DIR)"
        if self.gate.precision != self.compute_precision:
            return (f"on, with the gate fit in {self.gate.precision} while the network runs in "
                    f"{self.compute_precision}: expect more refusals of real films")  # fmt: skip
        return "on"

    @torch.no_grad()
    def assess(
        self, images_u8: np.ndarray, metas: Sequence[XrayMeta | None] | None = None, *, batch_size: int = 64
    ) -> list[Decision]:
        """Gate, classify and decide a batch of uint8 images (the model's TTA views), with their files' metadata.

        The content gate's features come from the plain view's forward pass, and every view starts from the one
        preprocessed batch, so the gate costs no extra pass.
        """
        images = _as_batch(images_u8)
        metas = list(metas) if metas is not None else [None] * len(images)
        views = self.tta or ("identity",)
        gate = self.gate if self.gate_enabled else None
        logits, scores = [], []
        for start in range(0, len(images), batch_size):
            x = self._preprocess(images[start : start + batch_size])
            if gate is None:
                logits.append(self._views_logits(x, views))
                scores.extend([None] * len(x))
                continue
            plain, features = self._network_and_features(x, gate.layers)
            scores.extend(gate.score(features))
            rest = [v for v in views if v != "identity"]
            total = plain.float().cpu() * (len(views) - len(rest))
            if rest:
                total = total + self._views_logits(x, rest) * len(rest)
            logits.append(total / len(views))
        probabilities = self.probabilities(torch.cat(logits)) if logits else np.empty(0)
        return [
            self.decide(float(p), None if s is None else float(s), meta)
            for p, s, meta in zip(probabilities, scores, metas, strict=True)
        ]

    def decide(self, probability: float, gate_score: float | None = None, meta: XrayMeta | None = None) -> Decision:
        """The one place a probability becomes a decision: gate (metadata, then content), referral band, label."""
        label = CLASSES[int(probability >= self.threshold)]
        if not self.gate_enabled:
            return Decision("answered", label, probability, "", gate_score)
        refusal = check_metadata(meta) if meta is not None else None
        if refusal is None and self.gate is not None and gate_score is not None and gate_score > self.gate.limit_:
            refusal = (
                f"not a frontal chest X-ray: its features are unlike the training films "
                f"(gate score {gate_score:.2f} over the limit {self.gate.limit_:.2f})"
            )
        if refusal is not None:
            return Decision("refused", "", None, refusal, gate_score)
        if self.band is not None and bool(self.band.refers([probability])[0]):
            low, high = self.band.band_
            reason = (
                f"uncertain: P(pneumonia) {probability:.3f} is in the referral band {low:.3f}-{high:.3f}; "
                "refer to a radiologist"
            )
            return Decision("refer", label, probability, reason, gate_score)
        return Decision("answered", label, probability, "", gate_score)

    @torch.no_grad()
    def logits(
        self, images_u8: torch.Tensor | np.ndarray, *, views: Sequence[str] = ("identity",), batch_size: int = 64
    ) -> torch.Tensor:
        """Mean logits (N x 2, float32, CPU) of uint8 N x S x S (or N x 1 x S x S) images over the TTA `views`.

        Each view costs one forward pass per batch, never one per image.
        """
        images = _as_batch(images_u8)
        outputs = [
            self._views_logits(self._preprocess(images[start : start + batch_size]), views)
            for start in range(0, len(images), batch_size)
        ]
        return torch.cat(outputs) if outputs else torch.empty(0, len(CLASSES))

    def _views_logits(self, x: torch.Tensor, views: Sequence[str]) -> torch.Tensor:
        """Mean logits (float32, CPU) of one preprocessed batch over `views`."""
        total = None
        for view in views:
            out = self._network(apply_view(view, x, self.normalize)).float()
            total = out if total is None else total + out
        return (total / len(views)).cpu()

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        """Calibrated P(PNEUMONIA): softmax of the temperature-scaled logits."""
        return torch.softmax(logits.float() / self.temperature, dim=1)[:, 1].numpy()

    def load_images(self, paths: Sequence[str | os.PathLike[str]]) -> np.ndarray:
        """Read files with the training preprocessing (squash to the cache size, uint8)."""
        return np.stack([load_xray(p, size=self.cache_size) for p in paths])


def _as_batch(images_u8: torch.Tensor | np.ndarray) -> torch.Tensor:
    images = torch.as_tensor(images_u8)
    return images.unsqueeze(1) if images.ndim == 3 else images


@dataclass
class TrainedModel(InferenceSteps):
    """A trained classifier in eval mode plus its preprocessing and operating point."""

    model: Classifier
    name: str
    image_size: int
    crop_fraction: float
    normalize: tuple[float, float]
    cache_size: int
    weights_source: str
    source: Path
    threshold: float = 0.5
    temperature: float = 1.0
    threshold_method: str = "fixed 0.5"
    tta: tuple[str, ...] = ()
    validation_split: dict[str, Any] | None = None  # {"fraction", "seed"} of the carve the model was tuned on
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

    def _network(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.contiguous(memory_format=torch.channels_last)
        with self.precision.autocast():
            return self.model(batch)

    def _network_and_features(self, batch: torch.Tensor, layers: Sequence[str]) -> tuple[torch.Tensor, list]:
        with tap_features(self.model, layers) as taken:
            logits = self._network(batch)
        return logits, [t.cpu().numpy() for t in taken]

    def card(self) -> dict[str, Any]:
        """The facts a report or a service shows about this model."""
        return {
            "architecture": self.name,
            "image_size": self.image_size,
            "crop_fraction": self.crop_fraction,
            "normalize": list(self.normalize),
            "cache_size": self.cache_size,
            "classes": list(CLASSES),
            "threshold": self.threshold,
            "threshold_method": self.threshold_method,
            "temperature": self.temperature,
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
            raise PneumolabError(f"{path}: not a trained run (no checkpoints/best.pt)")
        return best
    if path.is_file():
        return path
    raise PneumolabError(f"{path}: no such run folder or model file")


def _load_artefact(folder: Path, device: torch.device | None) -> TrainedModel:
    """An exported artefact: ``model.safetensors`` + ``card.json``, checked against each other."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card_file, weights_file = folder / "card.json", folder / "model.safetensors"
    card = read_card(card_file)
    if not weights_file.is_file():
        raise PneumolabError(f"{weights_file}: missing; the card {card_file} describes weights that are not there")
    check_against_card(weights_file, card, "weights_sha256")
    model = create_model(card["architecture"], weights="none", head=card["head"], in_chans=card.get("in_chans", 1))
    try:
        model.load_state_dict(load_file(str(weights_file)))
    except (RuntimeError, SafetensorError) as error:
        first = str(error).splitlines()[0]
        raise PneumolabError(
            f"{weights_file}: weights do not fit the card's {card['architecture']} ({first})"
        ) from None
    return TrainedModel(
        model=model,
        **card_settings(card),
        **load_gate(card, folder / GATE_FILE, "gate_sha256"),
        weights_source=card.get("weights_source", "unknown"),
        source=folder,
        threshold_method=card.get("threshold_method", "from the card"),
        validation_split=card.get("validation_split"),
        device=device or default_device(),
    )


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
            raise PneumolabError(f"{arrays_file}: missing; the card describes an input gate whose arrays are not there")
        if sha_key is not None:
            check_against_card(arrays_file, facts, sha_key)
        try:
            loaded["gates"] = GateSet.from_saved(facts["gate"], load_file(str(arrays_file)))
        except (KeyError, SafetensorError) as error:
            raise PneumolabError(f"{arrays_file}: not the gate its card describes ({error})") from None
    return loaded


def read_card(card_file: Path) -> dict[str, Any]:
    """A model card (JSON written by `pneumolab export`), or a one-line error naming the file."""
    try:
        return json.loads(card_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PneumolabError(f"{card_file}: not a readable model card ({error})") from None


def check_against_card(file: Path, card: dict[str, Any], key: str) -> None:
    """Refuse `file` when its SHA-256 differs from the one the card records under `key` (weights, ONNX graph)."""
    digest = file_sha256(file)
    if card.get(key) not in (None, digest):
        raise PneumolabError(f"{file}: does not match its card (SHA-256 {digest[:12]}..., card says "
                             f"{str(card[key])[:12]}...)")  # fmt: skip


def card_settings(card: dict[str, Any]) -> dict[str, Any]:
    """What every backend takes from a card: preprocessing and operating point (KeyError when a field is missing)."""
    return {
        "name": card["architecture"],
        "image_size": int(card["image_size"]),
        "crop_fraction": float(card["crop_fraction"]),
        "normalize": tuple(card["normalize"]),
        "cache_size": int(card["cache_size"]),
        "threshold": float(card["threshold"]),
        "temperature": float(card["temperature"]),
        "tta": tuple(card.get("tta", ())),
    }


def bundled_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The artefact folder of a model shipped inside the package (``pneumolab/bundled/<name>/``)."""
    folder = Path(__file__).parent / "bundled" / name
    if not (folder / "card.json").is_file():
        raise PneumolabError(f"{folder}: no bundled model {name!r} in this installation; pass --model RUN")
    return folder


def load_trained(path: str | os.PathLike[str] | None = None, *, device: torch.device | None = None) -> TrainedModel:
    """Load a run folder (its ``best.pt`` and ``operating_point.json``), an exported artefact folder (or its
    ``card.json``), a checkpoint file, or the bundled model (``None`` or ``"default"`` when no such path exists)."""
    if path is None or (str(path) == DEFAULT_MODEL and not Path(path).exists()):
        path = bundled_model_dir()
    path = Path(path)
    if path.name == "card.json":
        path = path.parent
    if (path / "card.json").is_file():
        return _load_artefact(path, device)
    checkpoint_file = _checkpoint_path(path)
    state = load_checkpoint(checkpoint_file)
    if "model_name" not in state:
        raise PneumolabError(f"{checkpoint_file}: not a pneumolab model checkpoint (no model_name)")
    model = create_model(state["model_name"], weights="none", head=state.get("head", "linear"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise PneumolabError(f"{checkpoint_file}: weights do not fit {state['model_name']} ({first})") from None
    trained = TrainedModel(
        model=model,
        name=state["model_name"],
        image_size=int(state["image_size"]),
        crop_fraction=float(state["crop_fraction"]),
        normalize=tuple(state["normalize"]),
        cache_size=int(state.get("cache_size", 256)),
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
        gate = load_gate(point, RunDir(path).gate)
        trained.gates, trained.band = gate["gates"], gate["band"]
    config = path / "config.yaml" if path.is_dir() else None
    if config is not None and config.is_file():
        data = load_config(config).data
        trained.validation_split = {"fraction": data.val_fraction, "seed": data.split_seed}
    return trained


def collect_image_paths(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (recursively) and glob patterns into image paths.

    Returns:
        ``(paths, problems)``: image files in a stable order, and ``(input, reason)`` for inputs that matched
        nothing.
    """
    import glob

    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    for item in map(str, inputs):
        candidates = (
            [Path(p) for p in sorted(glob.glob(item, recursive=True))] if glob.has_magic(item) else [Path(item)]
        )
        if not candidates:
            problems.append((item, "no file matches this pattern"))
        for candidate in candidates:
            if candidate.is_dir():
                found = sorted(p for p in candidate.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
                if not found:
                    problems.append((str(candidate), "folder holds no JPEG, PNG or DICOM file"))
                paths.extend(found)
            elif candidate.is_file():
                paths.append(candidate)
            else:
                problems.append((str(candidate), "no such file or folder"))
    return paths, problems


def predict_files(
    trained: TrainedModel | OnnxModel, paths: Sequence[Path], *, batch_size: int = 32
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Gate and predict image files in batches (either backend); a file that cannot be read is reported, the rest
    decided.

    Returns:
        ``(rows, failures)``: per readable file ``{file, status, label, probability, threshold, reason, gate_score,
        notes}`` (`Decision.fields`; ``notes`` are odd but readable things about the file, "" when none), and
        ``(file, reason)`` for unreadable ones.
    """
    rows: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    for start in range(0, len(paths), batch_size):
        images, metas, kept = [], [], []
        for path in paths[start : start + batch_size]:
            try:
                image, meta = load_xray_with_meta(path, size=trained.cache_size)
            except ImageReadError as error:
                failures.append((str(path), error.reason))
                continue
            images.append(image)
            metas.append(meta)
            kept.append(path)
        if not images:
            continue
        decisions = trained.assess(np.stack(images), metas)
        for path, meta, decision in zip(kept, metas, decisions, strict=True):
            fields = decision.fields()
            rows.append(
                {
                    "file": str(path),
                    "status": fields.pop("status"),
                    "label": fields.pop("label"),
                    "probability": fields.pop("probability"),
                    "threshold": trained.threshold,
                    **fields,
                    "notes": "; ".join(meta.notes),
                }
            )
    return rows, failures
