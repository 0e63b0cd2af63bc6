"""The ONNX backend: the network in onnxruntime, preprocessing and TTA in the same torch code as the PyTorch one.

`OnnxModel` is an `InferenceModel` like `TrainedModel`, so `predict_files`, the service and the benchmarks take
either. `load_onnx` reads an ``.onnx`` file with the card that `export_onnx` writes beside it (``model.onnx`` ->
``model.json``; the file's SHA-256 is checked against the card); `pneumolab.inference.loader` exports a run folder,
artefact or the bundled model to a temporary file first and keeps the PyTorch model too, for Grad-CAM.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from pneumolab.constants import CLASSES
from pneumolab.data.preprocess import Preprocessing
from pneumolab.errors import ArtefactError, MissingExtraError
from pneumolab.gate import GateSet
from pneumolab.inference.card import check_against_card, load_gate, read_card
from pneumolab.inference.pytorch import TrainedModel
from pneumolab.inference.steps import InferenceModel
from pneumolab.referral import ReferralBand

__all__ = ["OnnxModel", "load_onnx"]

_CPU = torch.device("cpu")


@dataclass
class OnnxModel(InferenceModel):
    """An onnxruntime session on the CPU plus the preprocessing and operating point of the model's card."""

    session: Any  # onnxruntime.InferenceSession
    name: str
    source: Path
    preprocessing: Preprocessing
    threshold: float
    temperature: float
    tta: tuple[str, ...]
    info: dict[str, Any]  # the card as written beside the .onnx file
    classes: tuple[str, ...] = CLASSES  # in output order
    class_bias: tuple[float, ...] | None = None
    pytorch: TrainedModel | None = None  # the same weights in PyTorch (fp32), when at hand: for Grad-CAM
    gates: GateSet | None = None
    band: ReferralBand | None = None
    gate_enabled: bool = True
    backend: ClassVar[str] = "onnx"

    @property
    def _input_device(self) -> torch.device:
        return _CPU

    @property
    def compute_precision(self) -> str:
        return "fp32"  # the exported graph is fp32 (CPUExecutionProvider)

    @property
    def explainer(self) -> TrainedModel | None:
        return self.pytorch

    def __post_init__(self) -> None:
        self._feed = self.session.get_inputs()[0].name  # looked up once, not per batch and view
        self._outputs = [output.name for output in self.session.get_outputs()]

    def _network(self, batch: torch.Tensor) -> torch.Tensor:
        # onnxruntime reads C-ordered buffers; a flipped or rotated view may be a strided one
        return torch.from_numpy(self.session.run(self._outputs[:1], {self._feed: batch.contiguous().numpy()})[0])

    def _network_and_features(self, batch: torch.Tensor, layers: Sequence[str]) -> tuple[torch.Tensor, list]:
        # export_onnx writes the gate's features as outputs gate.0, gate.1 ... after the logits
        wanted = [f"gate.{i}" for i in range(len(layers))]
        if self._outputs[1:] != wanted:
            raise ArtefactError(f"{self.name}: the ONNX graph has no gate outputs; export it again to gate it")
        logits, *features = self.session.run(None, {self._feed: batch.contiguous().numpy()})
        return torch.from_numpy(logits), features

    def card(self) -> dict[str, Any]:
        """The model's card (a superset of `TrainedModel.card`, with the ONNX file's SHA-256)."""
        return dict(self.info)


def _session(path: Path) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingExtraError('the ONNX backend needs onnxruntime: pip install "pneumolab[onnx]"') from None
    options = ort.SessionOptions()
    # the threads torch would use (the physical cores, or OMP_NUM_THREADS): both backends get the same budget
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) subclass only Exception
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ArtefactError(f"{path}: not a loadable ONNX model ({reason})") from None


def load_onnx(path: str | os.PathLike[str], *, pytorch: TrainedModel | None = None) -> OnnxModel:
    """Load an ``.onnx`` file and the card beside it (``model.onnx`` -> ``model.json``), as `export_onnx` writes.

    Args:
        pytorch: The same model in PyTorch, kept for Grad-CAM (None: the service cannot explain).

    Raises:
        ArtefactError: no file, no readable card, a SHA-256 that differs from the card's ``onnx_sha256``, a file
            onnxruntime cannot load, or an input size that differs from the card's.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{path}: no such ONNX file")
    card_file = path.with_suffix(".json")
    if not card_file.is_file():
        raise ArtefactError(f"{card_file}: missing; {path.name} needs the card that `pneumolab export` writes")
    card = read_card(card_file)
    check_against_card(path, card.facts, "onnx_sha256")
    session = _session(path)
    model = OnnxModel(
        session=session,
        **card.operating_settings(),
        source=path,
        info=card.facts,
        pytorch=pytorch,
        **load_gate(card.facts, path.with_suffix(".gate.safetensors"), "gate_sha256"),
    )
    side = session.get_inputs()[0].shape[2:]  # [batch, channels, H, W]; a mismatch would fail on every request
    if side != [model.image_size, model.image_size]:
        raise ArtefactError(f"{path}: takes {side} pixel input, but its card says {model.image_size}")
    return model
