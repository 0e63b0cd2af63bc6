"""The listener alone (no model, no Orthanc): exposure refusal, durable spool, out-of-resources answers."""

from __future__ import annotations

import json

import pydicom
import pytest

from pneumolab.errors import SettingError
from pneumolab.pacs.convert import DX_STORAGE, film_to_dicom
from pneumolab.pacs.listener import Listener, NodeSettings, check_exposure
from pneumolab.pacs.sender import Destination
from pneumolab.pacs.spool import Spool, safe_uid


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "pacs.example.org"])
def test_an_exposed_interface_is_refused_unless_protected(host):
    with pytest.raises(SettingError, match="--allow-unprotected-remote"):
        check_exposure(host, tls_protected=False)
    check_exposure(host, tls_protected=True)
    check_exposure(host, tls_protected=False, allow_unprotected_remote=True)
    check_exposure("127.0.0.1", tls_protected=False)
    check_exposure("localhost", tls_protected=False)


def test_uids_that_are_not_uids_never_become_file_names():
    assert safe_uid("1.2.3.4") == "1.2.3.4"
    assert safe_uid("../../etc/passwd") is None and safe_uid("") is None and safe_uid("1." * 40) is None


def _send(port, dataset):
    from pynetdicom import AE

    ae = AE("PYTEST")
    ae.add_requested_context(DX_STORAGE)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOLAB")
    assert assoc.is_established
    try:
        return assoc.send_c_store(dataset).Status
    finally:
        assoc.release()


def test_store_is_spooled_durably_and_oversize_is_out_of_resources(tmp_path):
    import numpy as np

    spool = Spool(tmp_path / "spool")
    settings = NodeSettings(spool=spool.root, dest=Destination.parse("X@127.0.0.1:1"), port=0,
                            max_instance_bytes=200_000)  # fmt: skip
    listener = Listener(settings, spool)
    listener.start()
    try:
        study = pydicom.uid.generate_uid()
        small = film_to_dicom(np.full((64, 64), 0.5), patient_id="P", study_uid=study)
        big = film_to_dicom(np.full((512, 512), 0.5), patient_id="P", study_uid=study)
        assert _send(listener.port, small) == 0x0000
        assert _send(listener.port, big) == 0xA700
    finally:
        listener.stop()
    stored = list((spool.root / "incoming" / study).glob("*.dcm"))
    assert [p.stem for p in stored] == [small.SOPInstanceUID]
    assert pydicom.dcmread(stored[0]).SOPInstanceUID == small.SOPInstanceUID
    events = [e["event"] for e in spool.events()]
    assert events.count("received") == 1 and events.count("refused") == 1
    assert list((spool.root / "tmp").iterdir()) == []
    assert "Destination" not in Destination.parse("ORTHANC@127.0.0.1:4242").ae_title
    with pytest.raises(SettingError):
        Destination.parse("ORTHANC:4242")


def test_a_batch_finished_as_the_node_died_is_journaled_processed_once_and_sent(tmp_path):
    from pneumolab.pacs.worker import Dispatcher, WorkerSettings

    spool = Spool(tmp_path / "spool")
    outcome = {"instances": {"1.2.3.4": {"status": "answered", "label": "NORMAL", "probability": 0.1,
                                         "reason": ""}}, "results": []}  # fmt: skip
    batches = {}
    for study in ("1.2.3", "1.2.5"):  # the worker wrote both outcomes; the node journaled one before it died
        (spool.root / "incoming" / study).mkdir(parents=True)
        (spool.root / "incoming" / study / "1.2.3.4.dcm").write_bytes(b"film")
        batches[study] = spool.take_batch(study)
        (batches[study] / "outcome.json").write_text(json.dumps(outcome))
    spool.journal("processed", study="1.2.5", batch=batches["1.2.5"].name, counts={"answered": 1},
                  instances=outcome["instances"], results=0)  # fmt: skip
    dispatcher = Dispatcher(spool, WorkerSettings(), Destination.parse("X@127.0.0.1:1"))
    dispatcher.resume()
    processed = [e["batch"] for e in spool.events() if e["event"] == "processed"]
    assert sorted(processed) == sorted(b.name for b in batches.values())  # one each, none twice
    assert {dispatcher._to_send.get_nowait().name for _ in batches} == {b.name for b in batches.values()}


def test_a_film_re_sent_while_its_results_are_being_sent_counts_as_seen(tmp_path):
    from pneumolab.pacs.worker import Dispatcher, WorkerSettings

    spool = Spool(tmp_path / "spool")
    dispatcher = Dispatcher(spool, WorkerSettings(), Destination.parse("X@127.0.0.1:1"))
    for sop in ("1.2.3.4", "1.2.3.5"):
        (spool.root / "incoming" / "1.2.3").mkdir(parents=True, exist_ok=True)
        (spool.root / "incoming" / "1.2.3" / f"{sop}.dcm").write_bytes(b"film")
        batch = spool.take_batch("1.2.3")
        if sop == "1.2.3.4":
            (batch / "outcome.json").write_text("{}")  # built, being sent
    assert dispatcher._seen("1.2.3") == {"1.2.3.4"}  # not the one still waiting for the worker
    spool.finish(batch, {})  # and what was sent before
    assert dispatcher._seen("1.2.3") == {"1.2.3.4", "1.2.3.5"} and dispatcher._seen("9.9") == set()
