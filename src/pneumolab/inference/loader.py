"""Load a model for inference on either backend: the one entry point for predict, serve, explain and the benchmarks.

Imports point one way inside `pneumolab.inference` (see its ``__init__``); the loader is on top. An ensemble (run
folder or artefact) loads its members on the same backend.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from pneumolab.errors import SettingError, did_you_mean
from pneumolab.hardware import resolve_precision
from pneumolab.inference.ensemble import is_ensemble, load_ensemble
from pneumolab.inference.export import export_onnx
from pneumolab.inference.onnx import load_onnx
from pneumolab.inference.pytorch import load_trained
from pneumolab.inference.steps import InferenceModel

__all__ = ["BACKENDS", "load_backend"]

BACKENDS = ("pytorch", "onnx")
_CPU = torch.device("cpu")


def _export_and_load(model: str | os.PathLike[str] | None) -> InferenceModel:
    """Export a run folder, artefact or the bundled model to a temporary ONNX file and load it from there."""
    # loaded once: exported from, and kept for Grad-CAM in fp32 (so an explanation shows onnxruntime's probability)
    pytorch = load_trained(model, device=_CPU)
    pytorch.precision = resolve_precision("fp32", _CPU)
    with tempfile.TemporaryDirectory(prefix="pneumolab-onnx-") as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        export_onnx(pytorch, onnx_file)  # checked against PyTorch fp32 (<= 1e-4 in probability)
        return load_onnx(onnx_file, pytorch=pytorch)  # the session holds the graph: the file may go


def load_backend(
    model: str | os.PathLike[str] | None, backend: str = "pytorch", *, device: torch.device | None = None
) -> InferenceModel:
    """Load `model` for inference on `backend`: ``pytorch`` (`load_trained`) or ``onnx``.

    With ``onnx``, `model` is an ``.onnx`` file with its card, or anything `load_trained` reads (a run folder, an
    artefact, None for the bundled model), exported on the fly. `device` applies to ``pytorch`` only; onnxruntime
    runs on the CPU.
    """
    if backend not in BACKENDS:
        raise did_you_mean("backend", backend, BACKENDS)
    if model is not None and Path(model).is_dir() and is_ensemble(Path(model)):
        return load_ensemble(Path(model), lambda member: load_backend(member, backend, device=device))
    onnx_file = model is not None and Path(model).suffix.lower() == ".onnx"
    if backend == "pytorch":
        if onnx_file:
            raise SettingError(f"{model}: an ONNX file needs the onnx backend (--backend onnx)")
        return load_trained(model, device=device)
    return load_onnx(model) if onnx_file else _export_and_load(model)
