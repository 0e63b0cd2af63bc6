"""An ensemble as one servable model: its members, the combiner fit on validation, its own operating point.

`EnsembleModel` is an `InferenceModel`, so `predict`, `serve`, the benchmarks and `export` take it wherever they
take one network. Each member runs with its own preprocessing, TTA views, temperature and input gate; the combiner
(`EnsembleCombiner`, mean / weighted / stacking) turns their calibrated probabilities into the ensemble's, and the
ensemble's threshold and referral band (fit on the ensemble's validation predictions) decide. A film is refused
when any member's gate refuses it: each member knows only the films it was trained on.

Two forms load: an ensemble run folder (``pneumolab run``'s ``ensemble/``: ``env.json`` names the member runs and
the combiner, ``operating_point.json`` holds the threshold and band), and an ensemble artefact (``pneumolab export
ENSEMBLE --out DIR``: ``DIR/ensemble.json`` and one artefact per member under ``DIR/members/``). Grad-CAM explains
one network, so an ensemble is explained per member (`pneumolab explain IMAGE --model MEMBER`).

An ensemble artefact names each member by a folder inside its own ``members/`` (no absolute path, no ``..``, no
link out of it) and records the SHA-256 of each member's card, which in turn records its weights' and gate's: a
member swapped or edited after export is refused on load, as is a card without its SHA-256.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pneumolab.constants import CLASSES, __version__
from pneumolab.data.preprocess import Preprocessing
from pneumolab.errors import ArtefactError
from pneumolab.evaluate.ensemble import EnsembleCombiner
from pneumolab.fsutil import FolderKind, atomic_dir, check_destination, file_sha256
from pneumolab.gate import GateSet
from pneumolab.inference.card import CARD_FORMAT
from pneumolab.inference.steps import GATE_OFF, InferenceModel, positive_probability
from pneumolab.referral import ReferralBand
from pneumolab.runs import RunDir

__all__ = ["ENSEMBLE_CARD", "ENSEMBLE_KIND", "EnsembleModel", "export_ensemble", "is_ensemble", "load_ensemble"]

ENSEMBLE_CARD = "ensemble.json"  # an ensemble artefact's card, beside members/
ENSEMBLE_KIND = FolderKind("ensemble artefact", marker=ENSEMBLE_CARD, contents=(ENSEMBLE_CARD, "members"))


@dataclass
class EnsembleModel(InferenceModel):
    """Members (any backend), the combiner and the ensemble's operating point."""

    members: list[InferenceModel]
    member_names: list[str]
    member_sources: list[Path]  # where each member was loaded from (run folders or artefacts)
    combiner: EnsembleCombiner
    source: Path
    threshold: float
    threshold_method: str = "from the ensemble's operating point"
    band: ReferralBand | None = None
    gate_enabled: bool = True
    name: str = field(init=False)
    preprocessing: Preprocessing = field(init=False)
    temperature: float = field(default=1.0, init=False)  # the members are calibrated; the combiner is not rescaled
    tta: tuple[str, ...] = field(default=(), init=False)  # each member applies its own views
    gates: GateSet | None = field(default=None, init=False)  # each member has its own
    classes: tuple[str, ...] = field(default=CLASSES, init=False)  # the members' (all the same)
    class_bias: None = field(default=None, init=False)
    backend: ClassVar[str] = "ensemble"

    def __post_init__(self) -> None:
        sizes = sorted({m.cache_size for m in self.members})
        if len(sizes) > 1:  # a file is read once, at one side, for all members
            raise ArtefactError(f"{self.source}: the members read films at different cache sizes {sizes}")
        self.classes = tuple(self.members[0].classes)
        other = [n for n, m in zip(self.member_names, self.members, strict=True) if tuple(m.classes) != self.classes]
        if other:
            raise ArtefactError(f"{self.source}: member {other[0]} predicts other classes than "
                                f"{self.member_names[0]} ({', '.join(self.classes)})")  # fmt: skip
        self.name = f"ensemble ({self.combiner.method}) of {', '.join(self.member_names)}"
        self.preprocessing = self.members[0].preprocessing

    @property
    def compute_precision(self) -> str:
        return "/".join(dict.fromkeys(m.compute_precision for m in self.members))

    @property
    def explainer(self) -> None:
        return None  # Grad-CAM explains one network: explain the members

    @property
    def gate_status(self) -> str:
        if not self.gate_enabled:
            return GATE_OFF
        statuses = {m.gate_status for m in self.members}
        if statuses == {"on"}:
            return "on (every member's gate; a film any of them refuses is refused)"
        named = "; ".join(f"{n}: {m.gate_status}" for n, m in zip(self.member_names, self.members, strict=True))
        return f"partly on: {named}"

    def score(
        self, images_u8: np.ndarray, *, batch_size: int = 64, gated: bool | None = None
    ) -> tuple[np.ndarray, list[float | None]]:
        """The combined class probabilities (N x K), and as gate score the largest margin of a member's score over
        its limit (> 0: that member refuses; None when no member has a gate or the gate is off)."""
        gated = self.gate_enabled if gated is None else gated
        member_probabilities, margins = [], []
        for member in self.members:
            probabilities, scores = member.score(images_u8, batch_size=batch_size, gated=gated)
            # binary combiners pool P(PNEUMONIA); K-class ones the class probabilities
            member_probabilities.append(
                positive_probability(probabilities) if len(self.classes) == 2 else probabilities
            )
            gate = member.gate
            if gate is not None:
                margins.append([None if s is None else s - gate.limit_ for s in scores])
        combined = self.combiner.predict_proba(np.stack(member_probabilities))
        scores: list[float | None] = []
        for i in range(len(combined)):
            known = [m[i] for m in margins if m[i] is not None]
            scores.append(max(known) if known else None)
        if combined.ndim == 2:
            return combined, scores
        return np.column_stack([1.0 - combined, combined]), scores

    def _content_refusal(self, gate_score: float | None) -> str | None:
        if gate_score is None or gate_score <= 0:
            return None
        return (
            "not a frontal chest X-ray: its features are unlike the training films of a member "
            f"(gate score {gate_score:.2f} over that member's limit)"
        )

    def card(self) -> dict[str, Any]:
        return {
            "kind": "ensemble",
            "architecture": self.name,
            "classes": list(self.classes),
            "combiner": self.combiner.describe(),
            "threshold": self.threshold,
            "threshold_method": self.threshold_method,
            "temperature": None,
            "tta": [],
            "referral": self.band.describe() if self.band is not None else None,
            "gate": None,
            "members": [{"name": n, **m.card()} for n, m in zip(self.member_names, self.members, strict=True)],
        }


def is_ensemble(path: Path) -> bool:
    """An ensemble artefact folder, or an ensemble run folder."""
    if (path / ENSEMBLE_CARD).is_file():
        return True
    env = RunDir(path).env
    return env.is_file() and "ensemble" in json.loads(env.read_text())


def _member_path(folder: Path, recorded: str) -> Path:
    """A member run as recorded (relative to where `pneumolab run` ran), else the ensemble folder's sibling."""
    for candidate in (Path(recorded), folder.parent / Path(recorded).name):
        if candidate.is_dir():
            return candidate
    raise ArtefactError(f"{folder}: member run {recorded} is not there (nor beside the ensemble folder)")


def _artefact_member(path: Path, entry: dict[str, Any]) -> Path:
    """A member folder of an ensemble artefact, checked: inside ``path/members/`` (after resolving links), and its
    card's SHA-256 the one the ensemble recorded."""
    where = path / ENSEMBLE_CARD
    recorded = str(entry.get("folder", ""))
    members = (path / "members").resolve()
    folder = (members / recorded).resolve()
    if not recorded or Path(recorded).is_absolute() or folder.parent != members:
        raise ArtefactError(f"{where}: member folder {recorded!r} is not a folder inside members/")
    expected = entry.get("card_sha256")
    if not expected:
        raise ArtefactError(f"{where}: member {recorded} has no card SHA-256; export the ensemble again")
    card = folder / "card.json"
    if not card.is_file():
        raise ArtefactError(f"{card}: missing; the ensemble's member {recorded} is not there")
    if file_sha256(card) != expected:
        raise ArtefactError(f"{card}: does not match the ensemble (SHA-256 {file_sha256(card)[:12]}..., "
                            f"{ENSEMBLE_CARD} says {str(expected)[:12]}...)")  # fmt: skip
    return folder


def load_ensemble(path: Path, load_member: Callable[[Path], InferenceModel]) -> EnsembleModel:
    """An ensemble run folder or artefact, each member loaded by `load_member` (the backend's loader)."""
    if (path / ENSEMBLE_CARD).is_file():
        card = json.loads((path / ENSEMBLE_CARD).read_text())
        if card.get("format") != CARD_FORMAT:
            raise ArtefactError(f"{path / ENSEMBLE_CARD}: card format {card.get('format')!r}, this pneumolab reads "
                                 f"{CARD_FORMAT}")  # fmt: skip
        names = [m["name"] for m in card["members"]]
        folders = [_artefact_member(path, m) for m in card["members"]]
        combiner_facts, point = card["combiner"], card
    else:
        run = RunDir(path)
        env = json.loads(run.env.read_text())["ensemble"]
        folders = [_member_path(path, m) for m in env["members"]]
        names = [f.name for f in folders]
        combiner_facts = env
        point_file = run.operating_point
        if not point_file.is_file():
            raise ArtefactError(f"{path}: the ensemble was not evaluated (no operating_point.json)")
        point = json.loads(point_file.read_text())
    try:
        combiner = EnsembleCombiner.from_saved(combiner_facts)
    except KeyError as error:
        raise ArtefactError(f"{path}: the ensemble's combiner is not recorded whole (no {error})") from None
    if combiner.n_members_ != len(folders):
        raise ArtefactError(f"{path}: the combiner has {combiner.n_members_} weights for {len(folders)} members")
    return EnsembleModel(
        members=[load_member(folder) for folder in folders],
        member_names=names,
        member_sources=folders,
        combiner=combiner,
        source=path,
        threshold=float(point["threshold"]),
        threshold_method=str(point.get("method") or point.get("threshold_method") or "from the operating point"),
        band=ReferralBand.from_saved(point["referral"]) if point.get("referral") else None,
    )


def export_ensemble(
    ensemble: EnsembleModel, out: Path, export_member: Callable[[Path, Path], Any], *, force: bool = False
) -> Path:
    """Write an ensemble artefact: ``out/ensemble.json`` and ``out/members/<i>-<name>/`` (``export_member(source,
    dest)`` writes one member's artefact), each member's card hashed. An existing `out` is replaced only when it is
    an ensemble artefact (or empty), or with `force`."""
    check_destination(out, ENSEMBLE_KIND, force=force)
    with atomic_dir(out, kind=ENSEMBLE_KIND, force=force) as tmp:
        entries = []
        for i, (name, source) in enumerate(zip(ensemble.member_names, ensemble.member_sources, strict=True)):
            folder = f"{i}-{Path(name).name}"
            export_member(source, tmp / "members" / folder)
            card_sha256 = file_sha256(tmp / "members" / folder / "card.json")
            entries.append({"name": name, "folder": folder, "card_sha256": card_sha256})
        card = {
            "format": CARD_FORMAT,
            "pneumolab_version": __version__,
            "kind": "ensemble",
            "classes": list(ensemble.classes),
            "combiner": ensemble.combiner.describe(),
            "threshold": ensemble.threshold,
            "threshold_method": ensemble.threshold_method,
            "referral": ensemble.band.describe() if ensemble.band is not None else None,
            "members": entries,
            "source": str(ensemble.source),
        }
        (tmp / ENSEMBLE_CARD).write_text(json.dumps(card, indent=2) + "\n")
    return out
