"""Export a trained model as one loadable artefact, or as ONNX.

The artefact is a folder with ``model.safetensors`` (the weights, no pickle) and ``card.json`` (architecture,
preprocessing, classes, threshold, temperature, TTA views, metrics, data fingerprint and the SHA-256 of the weights
file). `pneumolab.inference.pytorch.load_trained` reads it like a run folder and refuses a card that does not match
its weights.

ONNX: the network alone (normalised N x 1 x H x W float in, 2 logits out) with a dynamic batch axis, checked
against PyTorch fp32 on the images given; preprocessing, TTA and the threshold stay in pneumolab, described by the
card written beside the ``.onnx`` file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from pneumolab.constants import __version__
from pneumolab.errors import ArtefactError
from pneumolab.fsutil import atomic_dir, atomic_path, check_destination, file_sha256, write_json_atomic
from pneumolab.gate import tap_features
from pneumolab.inference.card import ARTEFACT_KIND, CARD_FORMAT, GATE_FILE
from pneumolab.inference.pytorch import TrainedModel, load_trained
from pneumolab.models import count_parameters
from pneumolab.runs import EVALUATED_SPLITS, RunDir

__all__ = ["build_card", "export_artefact", "export_onnx", "write_gate_arrays"]


def _run_facts(source: Path) -> dict[str, Any]:
    """Metrics and data fingerprint from a run folder (empty for other sources)."""
    facts: dict[str, Any] = {}
    if not source.is_dir():
        return facts
    run = RunDir(source)
    if run.env.is_file():
        facts["data_fingerprint"] = json.loads(run.env.read_text()).get("data_fingerprint")
    suffix = run.used_suffix() or ""
    metrics = {}
    for split in EVALUATED_SPLITS:
        path = run.metrics(f"{split}{suffix}")
        if path.is_file():
            metrics[split] = {k: v for k, v in json.loads(path.read_text()).items() if k != "bootstrap"}
    facts["metrics"] = metrics
    return facts


def build_card(trained: TrainedModel) -> dict[str, Any]:
    """The JSON card of a trained model (without the weights hash, which `export_artefact` adds)."""
    return {
        "format": CARD_FORMAT,
        "pneumolab_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **trained.card(),
        "head": trained.model.head_name,
        "in_chans": trained.model.in_chans,
        "parameters": count_parameters(trained.model)[0],
        "source": str(trained.source),
        **_run_facts(trained.source),
    }


def export_artefact(model: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write ``out/model.safetensors`` and ``out/card.json`` for a run folder or artefact; return `out`.

    An existing `out` is replaced only when it is an artefact (or empty), or with `force`; the old copy stays until
    the new one is in place (`pneumolab.fsutil.atomic_dir`).
    """
    out = Path(out)
    check_destination(out, ARTEFACT_KIND, force=force)  # before loading: a refusal comes at once
    trained = load_trained(model, device=torch.device("cpu"))
    card = build_card(trained)
    with atomic_dir(out, kind=ARTEFACT_KIND, force=force) as tmp:
        weights = tmp / "model.safetensors"
        state = {k: v.detach().contiguous().cpu() for k, v in trained.model.state_dict().items()}
        # bytes then write_bytes: the file gets the usual permissions (save_file creates it private)
        weights.write_bytes(save(state, metadata={"format": "pt", "architecture": trained.name}))
        card["weights_sha256"] = file_sha256(weights)
        card["weights_bytes"] = weights.stat().st_size
        if trained.gates is not None:
            card["gate_sha256"] = write_gate_arrays(trained, tmp / GATE_FILE)
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out


def write_gate_arrays(trained: TrainedModel, dest: Path) -> str:
    """Write the model's content-gate arrays (every precision's) as safetensors; return the file's SHA-256."""
    gates = trained.gates
    dest.write_bytes(save(gates.arrays(), metadata={"format": "pt", "layers": ",".join(gates.layers)}))
    return file_sha256(dest)


class _WithGateFeatures(torch.nn.Module):
    """The network with the gate's features as extra outputs, for ONNX export (the tracer records the hooks)."""

    def __init__(self, network: torch.nn.Module, layers: tuple[str, ...]) -> None:
        super().__init__()
        self.network = network
        self.layers = layers

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with tap_features(self.network, self.layers) as taken:
            logits = self.network(x)
        return (logits, *taken)


def export_onnx(
    model: str | os.PathLike[str] | TrainedModel | None,
    out: str | os.PathLike[str],
    *,
    check_images: np.ndarray | None = None,
    opset: int = 18,
) -> dict[str, Any]:
    """Export to ONNX (dynamic batch axis), verify against PyTorch fp32, write the card beside it.

    Args:
        model: anything `load_trained` reads, or a model already loaded on the CPU (its network is set to fp32 and
            the contiguous memory format in place).
        check_images: uint8 N x S x S images to compare the two on (the model's cache size); random ones if None.

    Returns:
        ``{"onnx": path, "card": path, "max_abs_probability_difference": float, "checked_images": n}``.
    """
    import onnxruntime as ort

    trained = model if isinstance(model, TrainedModel) else load_trained(model, device=torch.device("cpu"))
    network = trained.model.float().eval().to(memory_format=torch.contiguous_format)
    size = trained.image_size
    example = torch.zeros(2, trained.model.in_chans, size, size)
    out = Path(out)
    gated = trained.gates is not None
    # eval(): the exporter restores the wrapper's mode afterwards, recursively, onto the network too
    graph = _WithGateFeatures(network, trained.gates.layers).eval() if gated else network
    outputs = ["logits", *(f"gate.{i}" for i in range(len(trained.gates.layers) if gated else 0))]
    with atomic_path(out) as tmp:
        torch.onnx.export(
            graph,
            (example,),
            str(tmp),
            input_names=["image"],
            output_names=outputs,
            dynamic_axes={"image": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            opset_version=opset,
            dynamo=False,  # the TorchScript exporter: checked on Lite0 and MobileNetV2 (tests, CLI run)
        )
        if check_images is None:
            check_images = np.random.default_rng(0).integers(
                0, 256, (8, trained.cache_size, trained.cache_size), np.uint8
            )
        x = trained.preprocessing.transform(torch.as_tensor(check_images).unsqueeze(1))
        with torch.no_grad():
            reference = trained.class_probabilities(network(x))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        logits = session.run(["logits"], {"image": x.numpy()})[0]
        difference = float(np.abs(reference - trained.class_probabilities(torch.from_numpy(logits))).max())
        if difference > 1e-4:
            raise ArtefactError(f"{out}: ONNX output differs from PyTorch by {difference:.2e} (limit 1e-4)")
        if gated:  # the gate must refuse the same films on both backends
            with torch.no_grad():
                reference_features = [f.numpy() for f in graph(x)[1:]]
            onnx_features = session.run(outputs[1:], {"image": x.numpy()})
            fp32_gate = trained.gates.for_precision("fp32")  # the one the ONNX backend scores with
            reference_scores = fp32_gate.score(reference_features)
            gate_gap = float(np.abs(reference_scores - fp32_gate.score(onnx_features)).max())
            # float32 sums differ relatively: far-out images (random check images) score in the tens
            allowed = 1e-3 * max(1.0, float(np.abs(reference_scores).max()))
            if gate_gap > allowed:
                raise ArtefactError(
                    f"{out}: ONNX gate scores differ from PyTorch by {gate_gap:.2e} (limit {allowed:.1e})"
                )
    card = {
        **build_card(trained),
        "onnx_sha256": file_sha256(out),
        "onnx_input": ["batch", trained.model.in_chans, size, size],
    }
    if gated:  # the gate's arrays beside the graph: model.onnx -> model.gate.safetensors
        with atomic_path(out.with_suffix(".gate.safetensors")) as tmp_gate:
            card["gate_sha256"] = write_gate_arrays(trained, tmp_gate)
    card_path = write_json_atomic(out.with_suffix(".json"), card)
    return {
        "onnx": str(out),
        "card": str(card_path),
        "max_abs_probability_difference": difference,
        "checked_images": len(check_images),
    }
