"""What every inference backend shares: preprocessing, TTA views, calibration, the input gate and one decision.

`InferenceModel` is the base of the PyTorch (`pneumolab.inference.pytorch.TrainedModel`) and ONNX Runtime
(`pneumolab.inference.onnx.OnnxModel`) backends: it declares everything both offer, so no caller needs to know which
it holds. A backend supplies the network (`_network`, `_network_and_features`), where its inputs live and the
precision it computes in; the steps are the same code for both: uint8 film -> `Preprocessing.transform` -> network
(-> TTA views) -> mean logits -> softmax(logits / temperature) -> `decide` (gate, referral band, threshold).

A model has K >= 2 classes (its card's). Binary models decide by a threshold on P(classes[1]); K-class models by
argmax. Either way ``probability`` is P(not classes[0]): P(PNEUMONIA) for the binary task, P(BACTERIAL) + P(VIRAL)
for the three-class one, so the two can be compared on one scale.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pneumolab.constants import CLASSES
from pneumolab.data.io import XrayMeta, load_xray
from pneumolab.data.preprocess import Preprocessing
from pneumolab.data.tta import apply_view
from pneumolab.gate import FeatureGate, GateSet, check_metadata
from pneumolab.referral import ReferralBand

__all__ = ["GATE_OFF", "Decision", "InferenceModel", "as_batch", "label_for", "positive_probability"]

GATE_OFF = "off (--no-gate): inputs are not checked; every file gets a label"


def label_for(probabilities: Sequence[float] | np.ndarray, threshold: float, classes: Sequence[str] = CLASSES) -> str:
    """The class one film's calibrated class probabilities name (the one place this rule is written): binary,
    ``classes[1]`` when its probability reaches `threshold`; K classes, the most probable."""
    row = np.asarray(probabilities, dtype=float)
    if len(row) != len(classes):
        raise ValueError(f"{len(row)} probabilities for {len(classes)} classes")
    if len(classes) == 2:
        return classes[int(row[1] >= threshold)]
    return classes[int(np.argmax(row))]


def positive_probability(probabilities: np.ndarray) -> np.ndarray:
    """P(not the first class) of each row of N x K class probabilities: P(PNEUMONIA) for the binary and the
    three-class task alike."""
    probabilities = np.asarray(probabilities, dtype=float)
    return probabilities[:, 1] if probabilities.shape[1] == 2 else 1.0 - probabilities[:, 0]


@dataclass(frozen=True)
class Decision:
    """What the model says about one film: answered, referred to a radiologist, or refused as not a chest X-ray.

    A refused film has no label and no probability (nothing that looks like a diagnosis); a referred one keeps the
    model's label and probabilities.
    """

    status: str  # "answered", "refer" or "refused"
    label: str
    probability: float | None  # P(not the first class): P(PNEUMONIA)
    reason: str = ""
    gate_score: float | None = None
    probabilities: dict[str, float] | None = None  # every class's calibrated probability (None when refused)

    def fields(self) -> dict[str, Any]:
        """The decision as the row fields `predict` and the service print."""
        return {
            "status": self.status,
            "label": self.label,
            "probability": self.probability,
            "probabilities": self.probabilities,
            "reason": self.reason,
            "gate_score": self.gate_score,
        }


class InferenceModel:
    """The inference interface and steps both backends share (module doc).

    A backend is a dataclass with these fields and supplies `_network` (a normalised float N x 1 x H x W batch on
    `_input_device` -> N x K logits), `_network_and_features` and `compute_precision`.
    """

    name: str  # the architecture
    classes: tuple[str, ...]  # in output order
    class_bias: tuple[float, ...] | None  # K-class models: log-prior offsets added after temperature scaling
    source: Path  # where the model was loaded from
    preprocessing: Preprocessing
    temperature: float
    threshold: float
    tta: tuple[str, ...]
    gates: GateSet | None
    band: ReferralBand | None
    gate_enabled: bool
    backend: ClassVar[str]  # what runs the network ("pytorch", "onnx"); predict --json and /v1/model say it

    # the preprocessing's fields, read where one number is needed (the cache side of a file read, the input side)
    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @property
    def crop_fraction(self) -> float:
        return self.preprocessing.crop_fraction

    @property
    def normalize(self) -> tuple[float, float]:
        return self.preprocessing.normalize

    @property
    def cache_size(self) -> int:
        return self.preprocessing.cache_size

    def card(self) -> dict[str, Any]:
        """The facts a report or a service shows about this model (a card's fields)."""
        raise NotImplementedError

    @property
    def explainer(self) -> InferenceModel | None:
        """The PyTorch model Grad-CAM runs on (this model, its PyTorch twin, or None when there is none)."""
        raise NotImplementedError

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
        return self.preprocessing.transform(images_u8.to(self._input_device))

    @torch.no_grad()
    def gate_features(
        self, images_u8: torch.Tensor | np.ndarray, layers: Sequence[str], *, batch_size: int = 64
    ) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Plain-view logits and the gate's features at `layers` (one array N x 2C per layer) in one pass."""
        images = as_batch(images_u8)
        logits, features = [], []
        for start in range(0, len(images), batch_size):
            out, taken = self._network_and_features(self._preprocess(images[start : start + batch_size]), layers)
            logits.append(out.float().cpu())
            features.append(taken)
        if not features:
            return torch.empty(0, len(self.classes)), []
        return torch.cat(logits), [np.concatenate(parts) for parts in zip(*features, strict=True)]

    @torch.no_grad()
    def features(self, images_u8: torch.Tensor | np.ndarray, layers: Sequence[str]) -> list[np.ndarray]:
        """The gate's features at `layers` of uint8 images (plain view), without the logits (`_features`)."""
        return self._features(self._preprocess(as_batch(images_u8)), layers)

    def _features(self, batch: torch.Tensor, layers: Sequence[str]) -> list[np.ndarray]:
        """A backend may skip what lies past the last tapped layer; by default the whole network runs."""
        return self._network_and_features(batch, layers)[1]

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
    def score(
        self, images_u8: np.ndarray, *, batch_size: int = 64, gated: bool | None = None
    ) -> tuple[np.ndarray, list[float | None]]:
        """Calibrated class probabilities (N x K) over the model's TTA views and the content gate's score (None: no
        gate, or off) of uint8 images; `gated` overrides the model's own `gate_enabled` (an ensemble passes its
        setting on).

        The gate's features come from the plain view's forward pass, and every view starts from the one
        preprocessed batch, so the gate costs no extra pass.
        """
        images = as_batch(images_u8)
        views = self.tta or ("identity",)
        gate = self.gate if (self.gate_enabled if gated is None else gated) else None
        logits, scores = [], []
        for start in range(0, len(images), batch_size):
            x = self._preprocess(images[start : start + batch_size])
            if gate is None:
                logits.append(self._views_logits(x, views))
                scores.extend([None] * len(x))
                continue
            plain, features = self._network_and_features(x, gate.layers)
            scores.extend(float(v) for v in gate.score(features))
            rest = [v for v in views if v != "identity"]
            total = plain.float().cpu() * (len(views) - len(rest))
            if rest:
                total = total + self._views_logits(x, rest) * len(rest)
            logits.append(total / len(views))
        if not logits:
            return np.empty((0, len(self.classes))), scores
        return self.class_probabilities(torch.cat(logits)), scores

    def assess(self, images_u8: np.ndarray, metas: Sequence[XrayMeta | None] | None = None) -> list[Decision]:
        """Gate, classify and decide a batch of uint8 images, with their files' metadata (`score`, then `decide`)."""
        probabilities, scores = self.score(images_u8)
        metas = list(metas) if metas is not None else [None] * len(probabilities)
        return [self.decide(row, s, meta) for row, s, meta in zip(probabilities, scores, metas, strict=True)]

    def _content_refusal(self, gate_score: float | None) -> str | None:
        """Why the content gate refuses a film with this score, or None."""
        gate = self.gate
        if gate is None or gate_score is None or gate_score <= gate.limit_:
            return None
        return (
            f"not a frontal chest X-ray: its features are unlike the training films "
            f"(gate score {gate_score:.2f} over the limit {gate.limit_:.2f})"
        )

    def decide(
        self, probabilities: Sequence[float] | np.ndarray, gate_score: float | None = None, meta: XrayMeta | None = None
    ) -> Decision:
        """The one place a film's class probabilities become a decision: gate (metadata, then content), referral
        band, label."""
        row = np.asarray(probabilities, dtype=float)
        label = label_for(row, self.threshold, self.classes)
        probability = float(positive_probability(row[None])[0])
        every = {name: float(p) for name, p in zip(self.classes, row, strict=True)}
        if not self.gate_enabled:
            return Decision("answered", label, probability, "", gate_score, every)
        refusal = check_metadata(meta) if meta is not None else None
        refusal = refusal or self._content_refusal(gate_score)
        if refusal is not None:
            return Decision("refused", "", None, refusal, gate_score)
        if self.band is not None and bool(self.band.refers([probability])[0]):
            low, high = self.band.band_
            reason = (
                f"uncertain: P(pneumonia) {probability:.3f} is in the referral band {low:.3f}-{high:.3f}; "
                "refer to a radiologist"
            )
            return Decision("refer", label, probability, reason, gate_score, every)
        return Decision("answered", label, probability, "", gate_score, every)

    @torch.no_grad()
    def logits(
        self, images_u8: torch.Tensor | np.ndarray, *, views: Sequence[str] = ("identity",), batch_size: int = 64
    ) -> torch.Tensor:
        """Mean logits (N x K, float32, CPU) of uint8 N x S x S (or N x 1 x S x S) images over the TTA `views`.

        Each view costs one forward pass per batch, never one per image.
        """
        images = as_batch(images_u8)
        outputs = [
            self._views_logits(self._preprocess(images[start : start + batch_size]), views)
            for start in range(0, len(images), batch_size)
        ]
        return torch.cat(outputs) if outputs else torch.empty(0, len(self.classes))

    def _views_logits(self, x: torch.Tensor, views: Sequence[str]) -> torch.Tensor:
        """Mean logits (float32, CPU) of one preprocessed batch over `views`."""
        total = None
        for view in views:
            out = self._network(apply_view(view, x, self.normalize)).float()
            total = out if total is None else total + out
        return (total / len(views)).cpu()

    def class_probabilities(self, logits: torch.Tensor) -> np.ndarray:
        """Calibrated class probabilities (N x K): softmax of the temperature-scaled logits, plus the class bias
        when validation chose one (a prior shift, so its argmax is the biased decision)."""
        scaled = logits.float() / self.temperature
        if self.class_bias is not None:
            scaled = scaled + torch.tensor(self.class_bias, dtype=torch.float32)
        return torch.softmax(scaled, dim=1).numpy()

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        """Calibrated P(not the first class), P(PNEUMONIA), of each film (`positive_probability`)."""
        return positive_probability(self.class_probabilities(logits))

    def load_images(self, paths: Sequence[str | os.PathLike[str]]) -> np.ndarray:
        """Read files with the training preprocessing (squash to the cache size, uint8)."""
        return np.stack([load_xray(p, size=self.cache_size) for p in paths])


def as_batch(images_u8: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 N x S x S or N x 1 x S x S images as an N x 1 x S x S tensor."""
    images = torch.as_tensor(images_u8)
    return images.unsqueeze(1) if images.ndim == 3 else images
