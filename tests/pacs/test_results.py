"""Result objects: TID 1500 SR and Grad-CAM secondary capture, validated by dciodvfy and read back by highdicom."""

from __future__ import annotations

import json
import subprocess
import sys

import pydicom
import pytest
from pydicom.sr import _concepts_dict

from pneumolab.data.io import load_xray_with_meta
from pneumolab.pacs import results
from tests.pacs.conftest import dciodvfy_errors, shared_jpegs


def _classify(model, path):
    image, meta = load_xray_with_meta(path, size=model.cache_size)
    decision = model.assess(image[None], [meta])[0]
    return results.Classified(results.read_header(path), decision, image)


def _codes(dataset):
    """Every (scheme, value, meaning) in the coded items of an SR content tree."""
    found = []
    for item in dataset.iterall():
        if item.keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence", "MeasurementUnitsCodeSequence"):
            for code in item.value:
                found.append((code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning))
    return found


@pytest.mark.parametrize("compression", [None, "rle"])
def test_sr_and_sc_of_a_16_bit_dx_film_pass_dciodvfy(model, make_film, tmp_path, compression):
    film = make_film(shared_jpegs("PNEUMONIA", 1)[0], "dx", compression=compression)
    item = _classify(model, film)
    assert item.decision.status != "refused"
    written = results.write_datasets(
        results.build_results([item], model, results.model_identity(model)), tmp_path / "out"
    )
    assert sorted(p.name[:2] for p in written) == ["OT", "SR"]
    for path in written:
        assert dciodvfy_errors(path) == [], path.name


def test_sr_says_what_the_model_decided(model, make_film):
    normal, pneumonia = shared_jpegs("NORMAL", 1)[0], shared_jpegs("PNEUMONIA", 1)[0]
    study = pydicom.uid.generate_uid()
    items = [
        _classify(model, make_film(normal, "n", study_uid=study, instance_number=1)),
        _classify(model, make_film(pneumonia, "p", study_uid=study, instance_number=2)),
        _classify(model, make_film(pneumonia, "ct", study_uid=study, modality="CT", instance_number=3)),
    ]
    sr = results.build_sr(items, results.model_identity(model))
    groups = {g["source"]: g for g in results.read_sr_groups(sr)}
    assert len(groups) == 3
    for item in items:
        group, decision = groups[str(item.dataset.SOPInstanceUID)], item.decision
        assert f"status: {decision.status}" in group["comment"]
        if decision.status == "refused":
            assert group["probability"] is None and group["finding"] is None
            assert group["result"] == "Rejected for Quality Reasons"
            assert "CT" in decision.reason and decision.reason in group["comment"]
            continue
        assert group["probability"] == pytest.approx(decision.probability, abs=1e-6)
        assert group["finding"] == ("Present" if decision.label == "PNEUMONIA" else "Absent")
    assert items[2].decision.status == "refused"
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert "not for diagnostic use" in sr.SeriesDescription
    (equipment,) = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "pneumolab"]
    identity = results.model_identity(model)
    assert equipment.SoftwareVersions == identity.version
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    assert sr.PatientID == items[0].dataset.PatientID and sr.StudyInstanceUID == study


def test_every_code_is_in_pydicoms_dictionaries(model, make_film):
    film = make_film(shared_jpegs("NORMAL", 1)[0], "n")
    sr = results.build_sr([_classify(model, film)], results.model_identity(model))
    known = {
        (scheme, value, meaning)
        for scheme, by_name in _concepts_dict.concepts.items()
        for entries in by_name.values()
        for value, (meaning, _) in entries.items()
    }
    used = {code for code in _codes(sr) if code[0] != "RFC5646"}  # highdicom's language of content, not a concept
    assert ("SCT", "19829001", "Disorder of lung (disorder)") in used
    assert ("DCM", "122157", "Probability") in used
    assert used - known == set()


def test_uids_are_derived_from_model_and_source(model, make_film):
    film = make_film(shared_jpegs("PNEUMONIA", 1)[0], "p")
    item = _classify(model, film)
    identity = results.model_identity(model)
    first = results.build_results([item], model, identity)
    again = results.build_results([_classify(model, film)], model, results.model_identity(model))
    uids = [(d.SOPInstanceUID, d.SeriesInstanceUID) for d in first]
    assert uids == [(d.SOPInstanceUID, d.SeriesInstanceUID) for d in again]
    other = results.ModelIdentity(identity.name, identity.version, "0" * 64)
    assert {d.SOPInstanceUID for d in results.build_results([item], model, other)}.isdisjoint(u for u, _ in uids)
    sc = first[1]
    assert sc.PatientID == item.dataset.PatientID and sc.PatientName == item.dataset.PatientName
    assert sc.StudyInstanceUID == item.dataset.StudyInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == item.dataset.SOPInstanceUID
    assert sc.BurnedInAnnotation == "YES" and "not for diagnostic use" in sc.SeriesDescription


def test_predict_dicom_out_writes_results_with_predicts_numbers(make_film, tmp_path):
    film = make_film(shared_jpegs("PNEUMONIA", 1)[0], "p", compression="jpegls")
    jpeg = shared_jpegs("NORMAL", 1)[0]
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "pneumolab.cli", "predict", str(film), str(jpeg), "--dicom-out", str(out), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    row = next(r for r in json.loads(run.stdout)["predictions"] if r["file"] == str(film))
    sr_file = next(out.glob("SR-*.dcm"))
    (group,) = results.read_sr_groups(pydicom.dcmread(sr_file))
    assert group["probability"] == pytest.approx(row["probability"], abs=1e-6)
    assert len(list(out.glob("OT-*.dcm"))) == 1
    assert "not a DICOM file" in run.stderr
