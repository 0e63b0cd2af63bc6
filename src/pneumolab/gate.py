"""The input gate: refuse what is not a frontal chest X-ray before any diagnosis is made.

Two checks, in this order:

1. **Metadata** (`check_metadata`, DICOM only). Modality must be a projection radiograph: CR, DX or RG. ``OT``
   (other) and a missing Modality pass on to the content check, because scanned films and X-rays converted from
   JPEG are routinely written that way, and refusing them would refuse real chest films. BodyPartExamined, when
   present, must name the chest; ViewPosition lateral (LL, RL, LATERAL) or oblique is refused (the models saw
   frontal films only); a DICOM with more than one frame (a CT or MR series, a cine loop) is refused.
2. **Content** (`FeatureGate`). Class-conditional Mahalanobis distance (Lee et al. 2018; FRODO, Calli et al. 2019)
   of the network's own features: at each tapped depth the per-channel mean and standard deviation of the feature
   map, a mean per class and one shared Ledoit-Wolf covariance fit on the run's *training* split; per depth the
   distance to the nearest class mean; the log-distances standardised on the *validation* split and averaged over
   depths; the limit is the validation quantile that keeps `keep` of the real films (default 99.5 %). Nothing is
   fit on test.

The features move with the precision the network runs in: bf16 autocast shifts them enough that a gate fit on bf16
features refused 5 % of the real test films when the same network ran in fp32 (ONNX Runtime), against 1.3 % in
bf16. So a gate is fit once per precision a model may run in (`GateSet`: the run's own, and fp32 for ONNX), and each
backend scores with the one fit in its precision.

Which depths, pooling and combination were chosen, and against what (max softmax, energy, single depths, max vs
mean over depths), is measured in ``benchmarks/gate.py`` and written in BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.covariance import LedoitWolf
from sklearn.utils.validation import check_is_fitted

from pneumolab.data.io import XrayMeta
from pneumolab.errors import SettingError

__all__ = [
    "PROJECTION_MODALITIES",
    "FeatureGate",
    "FeaturesTaken",
    "GateSet",
    "XrayMeta",
    "check_metadata",
    "default_gate_layers",
    "tap_features",
]

PROJECTION_MODALITIES = frozenset({"CR", "DX", "RG"})
"""DICOM Modality values of projection radiographs (computed, digital, conventional film)."""

_PASS_TO_CONTENT = frozenset({"", "OT"})  # no tag, or "other": scanned films and converted JPEGs look like this
_CHEST_WORDS = ("CHEST", "THORAX", "LUNG", "THORACIC")
_NOT_FRONTAL = {"LL": "lateral", "RL": "lateral", "LATERAL": "lateral", "LAT": "lateral", "RLO": "oblique",
                "LLO": "oblique", "OBLIQUE": "oblique"}  # fmt: skip
_GATE_DEPTHS = 5  # stem and the first four stages: chosen in benchmarks/gate.py (BENCHMARKS.md)


def check_metadata(meta: XrayMeta) -> str | None:
    """The reason to refuse a file by its metadata, or None when it passes on to the content check."""
    if meta.frames > 1:
        return f"multi-frame DICOM ({meta.frames} frames): a series or cine loop, not one chest film"
    if meta.modality not in PROJECTION_MODALITIES | _PASS_TO_CONTENT:
        return f"DICOM modality {meta.modality} is not a projection radiograph (CR, DX)"
    if meta.body_part and not any(word in meta.body_part for word in _CHEST_WORDS):
        return f"DICOM body part {meta.body_part}, not the chest"
    view = _NOT_FRONTAL.get(meta.view_position)
    if view is not None:
        return f"DICOM view position {meta.view_position} ({view}): the model reads frontal (PA / AP) films only"
    return None


def default_gate_layers(model: torch.nn.Module) -> tuple[str, ...]:
    """The modules the content gate taps: the output of the stem and of the first four stages (`ModelSpec`)."""
    groups = model.spec.freeze_groups[:_GATE_DEPTHS]
    return tuple(group.prefixes[-1] for group in groups)


class FeaturesTaken(Exception):  # a signal that ends a forward pass early, not an error
    """Raised by `tap_features(stop=True)` once the last tapped layer has run: the rest of the network is skipped."""


@contextmanager
def tap_features(model: torch.nn.Module, layers: Sequence[str], *, stop: bool = False) -> Iterator[list[torch.Tensor]]:
    """While inside, every forward pass appends, per layer in order, the feature map's channel means and standard
    deviations (N x 2C, float32) to the yielded list; the hooks are gone on exit (so a traced or exported graph,
    which runs the hooks, gets them as outputs). With `stop`, the last layer's hook raises `FeaturesTaken`, so a
    pass that needs the features alone (fitting the gate) does not run the deeper layers and the head."""
    taken: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        out = output.float()
        taken.append(torch.cat([out.mean(dim=(2, 3)), out.std(dim=(2, 3))], dim=1))
        if stop and len(taken) % len(layers) == 0:
            raise FeaturesTaken

    handles = [model.get_submodule(name).register_forward_hook(hook) for name in layers]
    try:
        yield taken
    finally:
        for handle in handles:
            handle.remove()


class FeatureGate(BaseEstimator):
    """Class-conditional Mahalanobis out-of-distribution score over several depths, with a refusal limit.

    Follows scikit-learn's conventions: ``__init__`` stores (and checks) settings, ``fit`` returns ``self``, the
    learned state ends in ``_``.

    Args:
        keep: Share of validation films the limit keeps (answers), e.g. 0.995.
        layers: Names of the tapped modules (recorded for the card; the features arrive in this order).
        precision: The precision the network ran in when the features were computed (``bf16``, ``fp32``, ...).
    """

    def __init__(self, keep: float = 0.995, layers: Sequence[str] = (), precision: str = "fp32") -> None:
        if not 0.5 <= keep < 1:
            raise SettingError(f"gate keep: must be in [0.5, 1), got {keep}")
        self.keep = keep
        self.layers = tuple(layers)
        self.precision = precision

    def fit(self, train: Sequence[np.ndarray], labels: np.ndarray, val: Sequence[np.ndarray]) -> FeatureGate:
        """Fit class means and covariances on `train` features (one array N x D per layer, with `labels`), then the
        standardisation and the limit on `val` features (the validation films, classes pooled)."""
        labels = np.asarray(labels)
        if len(train) != len(val) or not len(train):
            raise ValueError("train and val need the same, non-zero number of layers")
        classes = np.unique(labels)
        self.means_, self.precisions_ = [], []
        for features in train:
            features = np.asarray(features, np.float64)
            means = np.stack([features[labels == c].mean(axis=0) for c in classes])
            centred = features - means[np.searchsorted(classes, labels)]
            self.means_.append(means.astype(np.float32))
            self.precisions_.append(LedoitWolf(assume_centered=True).fit(centred).precision_.astype(np.float32))
        log_val = np.log(self._distances(val))  # layers x N
        self.loc_ = log_val.mean(axis=1).astype(np.float32)
        self.scale_ = log_val.std(axis=1).astype(np.float32)
        val_scores = self.score(val)
        self.limit_ = float(np.quantile(val_scores, self.keep, method="higher"))
        self.n_train_, self.n_val_ = len(labels), len(val_scores)
        return self

    def _distances(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean, layers x N."""
        rows = []
        for x, means, precision in zip(features, self.means_, self.precisions_, strict=True):
            x = np.asarray(x, np.float32)
            per_class = [np.einsum("nd,de,ne->n", x - m, precision, x - m) for m in means]
            rows.append(np.maximum(np.min(per_class, axis=0), 1e-12))
        return np.stack(rows)

    def score(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Out-of-distribution score per image (higher = less like the training films); refuse above `limit_`."""
        check_is_fitted(self, "means_")
        z = (np.log(self._distances(features)) - self.loc_[:, None]) / self.scale_[:, None]
        return z.mean(axis=0)

    def refuses(self, scores: np.ndarray) -> np.ndarray:
        """Whether each score is over the limit."""
        check_is_fitted(self, "limit_")
        return np.asarray(scores) > self.limit_

    # --- persistence: arrays in safetensors, facts in the card ------------------------------------------------

    def arrays(self) -> dict[str, torch.Tensor]:
        """The learned arrays, by name, for a safetensors file."""
        check_is_fitted(self, "limit_")
        tensors = {"loc": torch.from_numpy(self.loc_), "scale": torch.from_numpy(self.scale_)}
        for i, (means, precision) in enumerate(zip(self.means_, self.precisions_, strict=True)):
            tensors[f"means.{i}"] = torch.from_numpy(np.ascontiguousarray(means))
            tensors[f"precision.{i}"] = torch.from_numpy(np.ascontiguousarray(precision))
        return tensors

    def describe(self) -> dict[str, Any]:
        """The facts a card records: score, layers, limit, and how the limit was set."""
        check_is_fitted(self, "limit_")
        return {
            "score": "class-conditional Mahalanobis (Ledoit-Wolf), channel mean + std, mean of standardised "
            "log-distances over layers",
            "layers": list(self.layers),
            "limit": self.limit_,
            "keep": self.keep,
            "limit_set_on": f"validation ({self.n_val_} films): the {self.keep:.1%} quantile of their scores",
            "fit_on": f"training split ({self.n_train_} films)",
            "precision": self.precision,
            "n_train": self.n_train_,
            "n_val": self.n_val_,
        }

    @classmethod
    def from_saved(cls, facts: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FeatureGate:
        """Rebuild a fitted gate from `describe()` and `arrays()` output (KeyError when a part is missing)."""
        # cards written before the gate was fit per precision hold one gate, fit in bf16 on the CPU
        gate = cls(keep=float(facts["keep"]), layers=facts["layers"], precision=facts.get("precision", "bf16"))
        count = len(gate.layers)
        gate.means_ = [tensors[f"means.{i}"].numpy() for i in range(count)]
        gate.precisions_ = [tensors[f"precision.{i}"].numpy() for i in range(count)]
        gate.loc_, gate.scale_ = tensors["loc"].numpy(), tensors["scale"].numpy()
        gate.limit_ = float(facts["limit"])
        gate.n_train_, gate.n_val_ = int(facts["n_train"]), int(facts["n_val"])
        return gate


class GateSet:
    """One content gate per precision the model may run in (fit on the same films), and the choice between them.

    The card records the first gate's facts (the precision the run was evaluated in, whose scores the report draws)
    plus ``limits`` by precision; the arrays file holds each gate's arrays under ``<precision>/``.
    """

    def __init__(self, gates: Sequence[FeatureGate]) -> None:
        if not gates:
            raise ValueError("a GateSet needs at least one fitted gate")
        self.gates = {gate.precision: gate for gate in gates}
        self.primary = gates[0]

    @property
    def layers(self) -> tuple[str, ...]:
        return self.primary.layers

    def for_precision(self, precision: str) -> FeatureGate:
        """The gate fit in `precision`; else the fp32 one (closest to fp16), else the primary."""
        return self.gates.get(precision) or self.gates.get("fp32") or self.primary

    def describe(self) -> dict[str, Any]:
        return {**self.primary.describe(), "limits": {name: gate.limit_ for name, gate in self.gates.items()}}

    def arrays(self) -> dict[str, torch.Tensor]:
        return {f"{name}/{key}": value for name, gate in self.gates.items() for key, value in gate.arrays().items()}

    @classmethod
    def from_saved(cls, facts: dict[str, Any], tensors: dict[str, torch.Tensor]) -> GateSet:
        """Rebuild from `describe()` and `arrays()` output; a card from before per-precision gates gives one gate."""
        limits = facts.get("limits")
        if not limits:
            return cls([FeatureGate.from_saved(facts, tensors)])
        gates = []
        for name, limit in limits.items():
            prefix = f"{name}/"
            own = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
            gates.append(FeatureGate.from_saved({**facts, "limit": limit, "precision": name}, own))
        return cls(gates)
