"""`pneumolab listen` end to end against a real Orthanc: Orthanc and storescu send, SR and SC come back."""

from __future__ import annotations

import shutil
import subprocess
import time
from io import BytesIO

import pydicom
import pytest

from pneumolab.inference.files import predict_files
from pneumolab.pacs import results
from tests.pacs.conftest import dciodvfy_errors, shared_jpegs
from tests.pacs.orthanc import Node, Orthanc, echo, free_port


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc and a node sending to it, for the whole module."""
    folder = tmp_path_factory.mktemp("pacs")
    port = free_port()
    orthanc = Orthanc(folder, port)
    node = Node(folder / "spool", port, orthanc, "--allow-ae", "ORTHANC", "--allow-ae", "STORESCU",
                "--allow-ae", "PYTEST", "--restart-grace", "15")  # fmt: skip
    yield orthanc, node
    node.stop()
    orthanc.stop()


def test_orthanc_sends_a_study_and_gets_sr_and_sc_back(pacs, model, make_film):
    orthanc, node = pacs
    study = pydicom.uid.generate_uid()
    films = [
        make_film(shared_jpegs("PNEUMONIA", 1)[0], "p", study_uid=study, instance_number=1, compression="rle"),
        make_film(shared_jpegs("NORMAL", 1)[0], "n", study_uid=study, instance_number=2),
    ]
    for film in films:
        orthanc.upload(film)
    orthanc.send_study_to_listener(study)
    found = orthanc.wait_for(study, {"SR": 1, "OT": 2}, timeout=90)
    (sr_entry,) = [i for i in found if i["Modality"] == "SR"]
    sr_bytes = orthanc.file(sr_entry["ID"])
    groups = {g["source"]: g for g in results.read_sr_groups(pydicom.dcmread(BytesIO(sr_bytes)))}
    rows, failures = predict_files(model, films)  # what `pneumolab predict` says about the same files
    assert failures == []
    for film, row in zip(films, rows, strict=True):
        group = groups[str(pydicom.dcmread(film, stop_before_pixels=True).SOPInstanceUID)]
        assert group["probability"] == pytest.approx(row["probability"], abs=1e-6)
        assert f"status: {row['status']}" in group["comment"]
        assert group["finding"] == ("Present" if row["label"] == "PNEUMONIA" else "Absent")
    sr_file = node.spool.parent / "sr-from-orthanc.dcm"
    sr_file.write_bytes(sr_bytes)
    assert dciodvfy_errors(sr_file) == []
    # the node keeps no patient identifiers in its journal or its log
    text = (node.spool / "journal.jsonl").read_text() + (node.spool.parent / "spool.log").read_text()
    assert "PAT-SECRET-1" not in text and "Secretname" not in text
    # sending the same study again stores the same objects: Orthanc still holds one SR
    orthanc.send_study_to_listener(study)
    deadline = time.monotonic() + 60
    while sum(e["event"] == "done" or e["event"] == "sent" for e in node.journal()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert sum(i["Modality"] == "SR" for i in orthanc.instances(study)) == 1


def test_storescu_as_a_second_sender(pacs, make_film):
    orthanc, node = pacs
    storescu = shutil.which("storescu")
    if storescu is None:
        pytest.skip("dcmtk's storescu is absent (make pacs-tools)")
    study = pydicom.uid.generate_uid()
    film = make_film(shared_jpegs("PNEUMONIA", 2)[1], "s", study_uid=study, compression="jpegls")
    run = subprocess.run(
        [storescu, "-aet", "STORESCU", "-aec", "PNEUMOLAB", "-xt", "127.0.0.1", str(node.port), str(film)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    found = orthanc.wait_for(study, {"SR": 1, "OT": 1}, timeout=90)
    assert {i["Modality"] for i in found} == {"SR", "OT"}  # the film itself went to the node only


def test_a_calling_ae_not_allowed_is_rejected(pacs):
    _, node = pacs
    assert echo(node.port, calling="PYTEST")
    assert not echo(node.port, calling="INTRUDER")


def _scu(port: int, contexts, calling: str = "PYTEST"):
    from pynetdicom import AE

    ae = AE(calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for context in contexts:
        ae.add_requested_context(context, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    return ae.associate("127.0.0.1", port, ae_title="PNEUMOLAB")


def _wait_accounted(node: Node, sops: set[str], timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        outcomes = node.outcomes()
        if sops <= outcomes.keys():
            return outcomes
        if time.monotonic() > deadline:
            pytest.fail(f"not accounted for after {timeout} s: {sorted(sops - outcomes.keys())}")
        time.sleep(0.5)


def test_hostile_inputs_are_accounted_for_and_the_node_stays_up(pacs, make_film):
    from pneumolab.pacs.convert import DX_STORAGE

    orthanc, node = pacs
    jpeg = shared_jpegs("PNEUMONIA", 1)[0]
    study = pydicom.uid.generate_uid()
    ct = pydicom.dcmread(make_film(jpeg, "ct", study_uid=study, modality="CT", instance_number=1))
    cine = pydicom.dcmread(make_film(jpeg, "mf", study_uid=study, frames=2, instance_number=2))
    lateral = pydicom.dcmread(make_film(jpeg, "lat", study_uid=study, view_position="LL", instance_number=3))
    truncated = pydicom.dcmread(make_film(jpeg, "tr", study_uid=study, instance_number=4))
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 3]
    good = pydicom.dcmread(make_film(jpeg, "ok", study_uid=study, instance_number=5))
    pdf = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage: not negotiated
    assoc = _scu(node.port, [DX_STORAGE, pdf])
    assert assoc.is_established
    acknowledged = set()
    for dataset in (ct, cine, lateral, truncated, good, good):  # the last one a duplicate
        assert assoc.send_c_store(dataset).Status == 0
        acknowledged.add(str(dataset.SOPInstanceUID))
    assert [c.abstract_syntax for c in assoc.accepted_contexts] == [DX_STORAGE]
    assoc.release()
    # a study split over a second association, which aborts after one acknowledged film
    second = pydicom.dcmread(make_film(jpeg, "ok2", study_uid=study, instance_number=6))
    assoc = _scu(node.port, [DX_STORAGE])
    assert assoc.send_c_store(second).Status == 0
    acknowledged.add(str(second.SOPInstanceUID))
    assoc.abort()
    outcomes = _wait_accounted(node, acknowledged, timeout=120)
    statuses = {uid: outcomes[uid]["status"] for uid in acknowledged}
    for dataset in (ct, cine, lateral, truncated):
        facts = outcomes[str(dataset.SOPInstanceUID)]
        assert facts["status"] == "refused" and facts["reason"], facts
    assert "CT" in outcomes[str(ct.SOPInstanceUID)]["reason"]
    assert "multi-frame" in outcomes[str(cine.SOPInstanceUID)]["reason"]
    assert statuses[str(good.SOPInstanceUID)] in ("answered", "refer")
    assert echo(node.port)
    orthanc.wait_for(study, {"SR": 1}, timeout=60)
    # the same film again, after it was processed: skipped as a duplicate, no second SR
    assoc = _scu(node.port, [DX_STORAGE])
    assert assoc.send_c_store(good).Status == 0
    assoc.release()
    deadline = time.monotonic() + 60
    while not any(
        e["event"] == "processed" and e["instances"].get(str(good.SOPInstanceUID), {}).get("status") == "skipped"
        for e in node.journal()
    ):
        assert time.monotonic() < deadline, "the duplicate was not skipped"
        time.sleep(0.5)


def test_kill_9_mid_burst_loses_no_acknowledged_film(pacs, make_film):
    from pneumolab.pacs.convert import DX_STORAGE

    orthanc, node = pacs
    jpeg = shared_jpegs("NORMAL", 2)[1]
    study = pydicom.uid.generate_uid()
    films = [pydicom.dcmread(make_film(jpeg, f"b{i}", study_uid=study, instance_number=i)) for i in range(8)]
    acknowledged, refused = set(), []
    for i, dataset in enumerate(films):
        if i == 4:
            node.kill()  # mid-burst: four acknowledged, the rest find nobody listening
        assoc = _scu(node.port, [DX_STORAGE])
        if assoc.is_established:
            if assoc.send_c_store(dataset).Status == 0:
                acknowledged.add(str(dataset.SOPInstanceUID))
            assoc.release()
        else:
            refused.append(dataset)
    assert len(acknowledged) == 4 and len(refused) == 4
    node.start()  # resumes from the spool
    for dataset in refused:  # the sender retries what was not acknowledged
        assoc = _scu(node.port, [DX_STORAGE])
        assert assoc.send_c_store(dataset).Status == 0
        acknowledged.add(str(dataset.SOPInstanceUID))
        assoc.release()
    outcomes = _wait_accounted(node, acknowledged, timeout=150)
    assert all(outcomes[uid]["status"] in ("answered", "refer") for uid in acknowledged)
    # the films spooled before the kill waited --restart-grace for the re-sent ones: one study, one SR, every film
    (sr_entry,) = [i for i in orthanc.wait_for(study, {"SR": 1}, timeout=90) if i["Modality"] == "SR"]
    sr = pydicom.dcmread(BytesIO(orthanc.file(sr_entry["ID"])))
    assert {g["source"] for g in results.read_sr_groups(sr)} == acknowledged
    assert sum(e["event"] == "complete" and e["study"] == study for e in node.journal()) == 1
    # Ctrl-C stops a node by itself, even one that came back from a kill -9, and even when its parent (a test
    # runner's worker) ignores SIGINT (under 10 s on an idle 2-core machine; the limit leaves room for a busy one)
    assert node.stop(timeout=40), "the node did not stop within 40 s of SIGINT"
    node.start()  # the module's other tests may follow
