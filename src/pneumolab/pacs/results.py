"""The result objects a DICOM node sends back: a TID 1500 structured report and a secondary capture (highdicom).

One **SR** (Comprehensive 3D SR, TID 1500 Measurement Report) per study and batch of films, with one TID 1501
image-level measurement group per film the model looked at:

* the finding type, *Disorder of lung* (SNOMED CT 19829001: the code dictionary has no code for pneumonia itself),
  and a qualitative evaluation of the same concept = *Present* (the model says PNEUMONIA) or *Absent* (NORMAL);
* *Probability* (DCM 122157, UCUM ``1``): the calibrated P(pneumonia) that `pneumolab predict` prints;
* *Procedure Result* (DCM 122177): *Imaging result normal / abnormal* when answered, *Imaging result equivocal*
  when referred to a radiologist, *Rejected for Quality Reasons* when the input gate refused the film (no finding,
  no probability then), and a *Comment* (DCM 121106) with the status word and its reason;
* the algorithm (name and version) in every group, in the observer context and in the Contributing Equipment
  Sequence.

The SR is UNVERIFIED and its series description says it is not for diagnostic use. One **SC** per film that was
not refused: the film with the Grad-CAM overlay and the result burnt in, the patient and study modules copied from
the source.

Every UID is derived (`pydicom.uid.generate_uid` with ``entropy_srcs``) from the model's SHA-256 and the source
SOP Instance UIDs, so sending the same study again yields the same objects, which a PACS stores once. Every code
comes from pydicom's code dictionaries (`pydicom.sr.codedict.codes`); the tests check each against them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumolab.constants import __version__
from pneumolab.errors import MissingExtraError
from pneumolab.inference.steps import Decision, InferenceModel

__all__ = [
    "NOT_FOR_DIAGNOSIS",
    "Classified",
    "ModelIdentity",
    "build_results",
    "build_sc",
    "build_sr",
    "decision_from_row",
    "model_identity",
    "read_header",
    "read_sr_groups",
    "result_uid",
    "results_for_rows",
    "sc_pixels",
    "write_datasets",
]

NOT_FOR_DIAGNOSIS = "not for diagnostic use"
MANUFACTURER = "pneumolab"
_SR_SERIES_NUMBER = 9801
_SC_SERIES_NUMBER = 9802
_MODEL_FILES = ("card.json", "model.safetensors", "gate.safetensors", "ensemble.json")


def _pacs_imports() -> tuple[Any, Any]:
    try:
        import highdicom
        from pydicom.sr.codedict import codes
    except ImportError:
        raise MissingExtraError('DICOM results need highdicom: pip install "pneumolab[pacs]"') from None
    return highdicom, codes


@dataclass(frozen=True)
class ModelIdentity:
    """What identifies the algorithm in every result: its name, version and the SHA-256 its UIDs derive from.

    Attributes:
        name: ``pneumolab <architecture>``.
        version: pneumolab's version and the first 12 hex digits of `sha256`.
        sha256: Hex SHA-256 over the model's files (card, weights, gate) and its decision settings.
    """

    name: str
    version: str
    sha256: str


def model_identity(model: InferenceModel) -> ModelIdentity:
    """The identity of a loaded model: the SHA-256 of its files and of the card it runs with (gate on or off)."""
    digest = hashlib.sha256()
    source = Path(model.source)
    files = [source / n for n in _MODEL_FILES] if source.is_dir() else [source]
    for file in files:
        if file.is_file():
            digest.update(file.name.encode())
            digest.update(hashlib.file_digest(file.open("rb"), "sha256").digest())
    card = {"card": model.card(), "gate_enabled": model.gate_enabled, "backend": model.backend}
    digest.update(json.dumps(card, sort_keys=True, default=str).encode())
    sha = digest.hexdigest()
    return ModelIdentity(f"{MANUFACTURER} {model.name}", f"{__version__}+{sha[:12]}", sha)


def result_uid(identity: ModelIdentity, kind: str, *sources: str) -> str:
    """A UID derived from the model, the kind of object (``sr``, ``sc``, ``sr-series`` ...) and source UIDs."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[identity.sha256, kind, *sources])


@dataclass(frozen=True)
class Classified:
    """One source film with the model's decision about it.

    Attributes:
        dataset: The source header (pixel data not needed).
        decision: What the model said (`InferenceModel.decide`); for a film that could not be decoded, a refused
            decision whose reason says why.
    """

    dataset: Any
    decision: Decision
    image: np.ndarray | None = None  # the uint8 square the model read (None: not decoded; then no SC)


def _status_codes(codes: Any, decision: Decision) -> tuple[Any, Any | None]:
    """(Procedure Result value, Finding value or None) for a decision."""
    if decision.status == "refused":
        return codes.DCM.RejectedForQualityReasons, None
    present = decision.label != "NORMAL"
    finding = codes.SCT.Present if present else codes.SCT.Absent
    if decision.status == "refer":
        return codes.SCT.ImagingResultEquivocal, finding
    return (codes.SCT.ImagingResultAbnormal if present else codes.SCT.ImagingResultNormal), finding


def _comment(decision: Decision) -> str:
    words = [f"status: {decision.status}"]
    if decision.label:
        words.append(f"label: {decision.label}")
    if decision.reason:
        words.append(f"reason: {decision.reason}")
    return "; ".join(words)[:1024]


def _equipment(highdicom: Any, codes: Any, identity: ModelIdentity) -> Any:
    return highdicom.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=identity.name,
        software_versions=identity.version,
        contribution_description=f"AI result, {NOT_FOR_DIAGNOSIS}",
    )


def build_sr(classified: Sequence[Classified], identity: ModelIdentity) -> Any:
    """The TID 1500 SR for films of one study: one TID 1501 group per film (module doc).

    Raises:
        ValueError: No film, or films of more than one study.
    """
    highdicom, codes = _pacs_imports()
    from highdicom import sr

    if not classified:
        raise ValueError("an SR needs at least one film")
    studies = {c.dataset.StudyInstanceUID for c in classified}
    if len(studies) != 1:
        raise ValueError(f"an SR covers one study, got {len(studies)}")
    study_uid = next(iter(studies))
    ordered = sorted(classified, key=lambda c: str(c.dataset.SOPInstanceUID))
    algorithm = sr.AlgorithmIdentification(name=identity.name, version=identity.version)
    groups = []
    for item in ordered:
        source_uid = str(item.dataset.SOPInstanceUID)
        result, finding = _status_codes(codes, item.decision)
        evaluations = [sr.QualitativeEvaluation(codes.DCM.ProcedureResult, result)]
        measurements = []
        if finding is not None:
            evaluations.insert(0, sr.QualitativeEvaluation(codes.SCT.DisorderOfLung, finding))
            measurements.append(
                sr.Measurement(
                    name=codes.DCM.Probability,
                    value=round(float(item.decision.probability), 6),
                    unit=codes.UCUM.NoUnits,
                    algorithm_id=algorithm,
                )
            )
        group = sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=sr.TrackingIdentifier(
                uid=result_uid(identity, "tracking", source_uid), identifier=f"film {source_uid}"[:64]
            ),
            finding_type=codes.SCT.DisorderOfLung,
            algorithm_id=algorithm,
            measurements=measurements or None,
            qualitative_evaluations=evaluations,
            source_images=[sr.SourceImageForMeasurementGroup.from_source_image(item.dataset)],
        )
        # the status word and its reason as text: TID 1501 has no coded slot for a free-text reason
        group[0].ContentSequence.append(
            sr.TextContentItem(codes.DCM.Comment, _comment(item.decision), sr.RelationshipTypeValues.CONTAINS)
        )
        groups.append(group)
    device = sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid(identity, "device"), name=identity.name, manufacturer_name=MANUFACTURER,
            model_name=identity.version,
        ),
    )  # fmt: skip
    report = sr.MeasurementReport(
        observation_context=sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.ChestImaging,
        imaging_measurements=groups,
    )
    sources = [str(c.dataset.SOPInstanceUID) for c in ordered]
    document = sr.Comprehensive3DSR(
        evidence=[c.dataset for c in ordered],
        content=report[0],
        series_instance_uid=result_uid(identity, "sr-series", study_uid),
        series_number=_SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(identity, "sr", *sources),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_verified=False,
        contributing_equipment=[_equipment(highdicom, codes, identity)],
    )
    document.SeriesDescription = f"pneumolab AI result, {NOT_FOR_DIAGNOSIS}"
    return document


def sc_pixels(model: InferenceModel, image_u8: np.ndarray, decision: Decision) -> np.ndarray:
    """The film as the model saw it (crop and resize, not normalised) with the Grad-CAM of PNEUMONIA over it and
    the result burnt in above: an RGB uint8 array about 512 px wide."""
    import torch
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    from pneumolab.inference.explain import grad_cam

    explainer = model.explainer
    if explainer is None:
        raise ValueError(f"{model.source}: this model has no PyTorch network for Grad-CAM")
    heatmap = grad_cam(explainer, image_u8, explainer.classes.index(explainer.classes[-1]))
    as_shown = dataclasses.replace(model.preprocessing, normalize=(0.0, 1.0 / 255.0))
    shown = as_shown.transform(torch.as_tensor(image_u8)[None, None])[0, 0].clamp(0, 255).round().numpy()
    film = np.repeat(shown[..., None] / 255.0, 3, axis=2)
    overlay = np.clip(0.6 * film + 0.4 * colormaps["jet"](heatmap)[..., :3], 0.0, 1.0)
    picture = Image.fromarray((overlay * 255).round().astype(np.uint8))
    scale = max(1, 512 // picture.width)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.BICUBIC)
    verdict = decision.label if decision.status == "answered" else f"REFER to a radiologist ({decision.label}?)"
    lines = [
        f"{verdict}   P(pneumonia) = {decision.probability:.3f}   threshold {model.threshold:.3f}",
        f"Grad-CAM of PNEUMONIA, {model.name}; AI result, {NOT_FOR_DIAGNOSIS.upper()}",
    ]
    font = ImageFont.load_default(size=15)
    top = 8 + 20 * len(lines)
    canvas = Image.new("RGB", (picture.width, picture.height + top), "black")
    canvas.paste(picture, (0, top))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((6, 4 + i * 20), line, fill="white", font=font)
    return np.asarray(canvas)


def build_sc(source: Any, pixels: np.ndarray, identity: ModelIdentity) -> Any:
    """The secondary capture of one film: `pixels` (RGB uint8, `sc_pixels`), patient and study from `source`."""
    highdicom, codes = _pacs_imports()
    from pydicom.uid import ExplicitVRLittleEndian

    source_uid = str(source.SOPInstanceUID)
    image = highdicom.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(pixels, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=result_uid(identity, "sc-series", str(source.StudyInstanceUID)),
        series_number=_SC_SERIES_NUMBER,
        sop_instance_uid=result_uid(identity, "sc", source_uid),
        instance_number=int(getattr(source, "InstanceNumber", None) or 1),
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[_equipment(highdicom, codes, identity)],
    )
    image.SeriesDescription = f"pneumolab Grad-CAM, {NOT_FOR_DIAGNOSIS}"
    # the body part tells a validator that laterality does not apply (the chest is not a paired part)
    image.BodyPartExamined = str(getattr(source, "BodyPartExamined", "") or "CHEST")
    image.BurnedInAnnotation = "YES"
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.DerivationDescription = f"Grad-CAM overlay and AI result by {identity.name} {identity.version}"
    reference = highdicom.sr.SourceImageForMeasurementGroup.from_source_image(source)  # SOP class + instance
    image.SourceImageSequence = reference.ReferencedSOPSequence
    return image


def read_sr_groups(dataset: Any) -> list[dict[str, Any]]:
    """The per-film facts of an SR `build_sr` wrote: ``{source, finding, probability, result, comment}`` each.

    Read back through highdicom's parser, as a consumer would.
    """
    _pacs_imports()
    from highdicom import sr

    document = sr.Comprehensive3DSR.from_dataset(dataset)
    out = []
    for group in document.content.get_image_measurement_groups():
        source = group.source_images[0].referenced_sop_instance_uid if group.source_images else None
        facts: dict[str, Any] = {"source": source, "finding": None, "probability": None, "result": None}
        for evaluation in group.get_qualitative_evaluations():
            meaning = evaluation.name.meaning
            if evaluation.name.value == "19829001":  # disorder of lung: present / absent
                facts["finding"] = evaluation.value.meaning
            elif meaning == "Procedure Result":
                facts["result"] = evaluation.value.meaning
        for measurement in group.get_measurements():
            if measurement.name.meaning == "Probability":
                facts["probability"] = float(measurement.value)
        comments = [
            i.TextValue
            for i in group[0].ContentSequence
            if getattr(i, "ValueType", "") == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121106"
        ]
        facts["comment"] = comments[0] if comments else ""
        out.append(facts)
    return out


def build_results(
    classified: Sequence[Classified], model: InferenceModel, identity: ModelIdentity, *, with_sc: bool = True
) -> list[Any]:
    """Every result object for some films: one SR per study, then (`with_sc`) one SC per decoded film that was not
    refused."""
    studies: dict[str, list[Classified]] = {}
    for item in classified:
        studies.setdefault(str(item.dataset.StudyInstanceUID), []).append(item)
    out = [build_sr(items, identity) for _, items in sorted(studies.items())]
    if with_sc:
        for item in classified:
            if item.image is not None and item.decision.status != "refused":
                out.append(build_sc(item.dataset, sc_pixels(model, item.image, item.decision), identity))
    return out


def write_datasets(datasets: Sequence[Any], out_dir: str | Path) -> list[Path]:
    """Write result objects as DICOM files named ``<Modality>-<SOPInstanceUID>.dcm`` (atomic; a resend of the same
    result replaces its file)."""
    from pneumolab.fsutil import atomic_path

    written = []
    for dataset in datasets:
        target = Path(out_dir) / f"{dataset.Modality}-{dataset.SOPInstanceUID}.dcm"
        with atomic_path(target) as tmp:
            dataset.save_as(tmp, enforce_file_format=True)
        written.append(target)
    return written


def read_header(path: str | Path) -> Any | None:
    """A DICOM file's header (no pixel data), or None when it is not a DICOM file with the UIDs a result needs."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise MissingExtraError('DICOM results need pydicom: pip install "pneumolab[pacs]"') from None
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        needed = (dataset.SOPClassUID, dataset.SOPInstanceUID, dataset.StudyInstanceUID)
    except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError):
        return None
    return dataset if all(needed) else None


def decision_from_row(row: dict[str, Any]) -> Decision:
    """The `Decision` behind one row of `predict_files`."""
    return Decision(
        row["status"], row["label"], row["probability"], row["reason"], row["gate_score"], row["probabilities"]
    )


def results_for_rows(
    model: InferenceModel, rows: Sequence[dict[str, Any]], out_dir: str | Path, *, with_sc: bool = True
) -> tuple[list[Path], list[tuple[str, str]]]:
    """`pneumolab predict --dicom-out`: the SR and SC of the DICOM files among `predict_files`'s rows.

    Returns:
        ``(written, skipped)``: the files written, and ``(file, reason)`` for rows that get no result object.
    """
    from pneumolab.data.io import load_xray

    classified, skipped = [], []
    for row in rows:
        header = read_header(row["file"])
        if header is None:
            skipped.append((row["file"], "not a DICOM file with SOP, study and instance UIDs: no DICOM result"))
            continue
        decision = decision_from_row(row)
        image = load_xray(row["file"], size=model.cache_size) if decision.status != "refused" else None
        classified.append(Classified(header, decision, image))
    if not classified:
        return [], skipped
    return write_datasets(build_results(classified, model, model_identity(model), with_sc=with_sc), out_dir), skipped
