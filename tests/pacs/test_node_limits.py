"""`pneumolab listen` under odd and hostile connections, end to end against a real Orthanc: an association that
never releases, more associations than allowed, a destination that is down, peers that send part of a PDU (or, to a
TLS node, nothing) and wait. Every acknowledged film ends in the journal, and the node stays up."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.pacs.conftest import shared_jpegs
from tests.pacs.orthanc import Node, Orthanc, echo, free_port

IDLE_S = 3  # the node's --idle-timeout
MAX_ASSOCIATIONS = 2
VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc and a node sending to it that closes silent associations after IDLE_S and takes two at once."""
    folder = tmp_path_factory.mktemp("pacs-limits")
    port = free_port()
    orthanc = Orthanc(folder, port)
    node = Node(folder / "spool", port, orthanc, "--idle-timeout", str(IDLE_S), "--max-associations",
                str(MAX_ASSOCIATIONS), "--allow-ae", "ORTHANC", "--allow-ae", "PYTEST")  # fmt: skip
    yield orthanc, node
    node.stop()
    orthanc.stop()


@pytest.fixture(scope="module")
def down_node(pacs, tmp_path_factory):
    """A node whose destination is down: a port bound (so that nothing else takes it) where nothing listens."""
    orthanc, _ = pacs
    folder = tmp_path_factory.mktemp("pacs-down")
    with socket.socket() as nobody:
        nobody.bind(("127.0.0.1", 0))  # bound, never listening: a connection is refused at once
        dest = f"ORTHANC@127.0.0.1:{nobody.getsockname()[1]}"
        node = Node(folder / "spool-down", free_port(), orthanc, "--allow-ae", "ORTHANC", "--allow-ae", "PYTEST",
                    dest=dest)  # fmt: skip
        yield node
        node.stop()


def _scu(port: int, contexts, *, network_timeout: float | None = 30, handlers=()) -> Any:
    """An association from PYTEST to the node (`network_timeout` None: this side never gives up on a silence)."""
    from pynetdicom import AE

    ae = AE("PYTEST")
    ae.acse_timeout = ae.dimse_timeout = 30
    ae.network_timeout = network_timeout
    for context in contexts:
        ae.add_requested_context(context, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    return ae.associate("127.0.0.1", port, ae_title="PNEUMOLAB", evt_handlers=list(handlers))


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `condition` until it is truthy (returned), failing with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout} s: {what}")
        time.sleep(0.2)


def _film(make_film, kind: str, name: str, study: str) -> pydicom.Dataset:
    return pydicom.dcmread(make_film(shared_jpegs(kind, 1)[0], name, study_uid=study))


def _outcome(node: Node, sop: str, timeout: float = 90) -> dict:
    """One instance's outcome in the node's journal, once it is there."""
    return _wait(lambda: node.outcomes().get(sop), timeout, f"{sop} was not processed")


def _assert_every_acknowledged_accounted_for(node: Node, timeout: float = 60) -> None:
    """Each instance the node acknowledged (journal `received`) has its outcome in a `processed` event (a refusal
    with its reason), or lies in a batch whose `failed` event says why."""
    received = {e["sop"] for e in node.journal() if e["event"] == "received"}
    deadline = time.monotonic() + timeout
    while True:
        journal, outcomes = node.journal(), node.outcomes()
        failed = {p.stem for e in journal if e["event"] == "failed" and e["reason"]
                  for p in (node.spool / "failed" / e["batch"]).glob("*.dcm")}  # fmt: skip
        missing = received - outcomes.keys() - failed
        if not missing:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"acknowledged, not accounted for after {timeout} s: {sorted(missing)}")
        time.sleep(0.2)
    refused = {uid: facts for uid, facts in outcomes.items() if facts["status"] == "refused"}
    assert all(facts["reason"] for facts in refused.values()), refused


def test_an_association_that_never_releases_is_closed_and_its_film_still_processed(pacs, make_film):
    from pneumolab.pacs.convert import DX_STORAGE

    orthanc, node = pacs
    study = pydicom.uid.generate_uid()
    film = _film(make_film, "PNEUMONIA", "silent", study)
    sop = str(film.SOPInstanceUID)
    assoc = _scu(node.port, [DX_STORAGE], network_timeout=None)  # only the node can end this association
    assert assoc.is_established
    assert assoc.send_c_store(film).Status == 0
    acknowledged = time.monotonic()
    # neither release nor abort: the node closes the association after its idle timeout
    _wait(lambda: not assoc.is_established, IDLE_S + 30, "the node did not close a silent association")
    silent_for = time.monotonic() - acknowledged
    assert assoc.is_aborted and not assoc.is_released
    assert silent_for > IDLE_S * 0.8, f"closed after {silent_for:.1f} s of silence, before the idle timeout"
    # the film acknowledged before the silence is processed and its SR reaches Orthanc
    assert _outcome(node, sop)["status"] in ("answered", "refer")
    orthanc.wait_for(study, {"SR": 1}, timeout=60)
    assert echo(node.port)
    _assert_every_acknowledged_accounted_for(node)


def test_associations_over_the_limit_are_rejected_and_the_node_stays_up(pacs, make_film):
    from pynetdicom import evt

    from pneumolab.pacs.convert import DX_STORAGE

    orthanc, node = pacs
    held = [_scu(node.port, [DX_STORAGE, VERIFICATION]) for _ in range(MAX_ASSOCIATIONS)]
    study = pydicom.uid.generate_uid()
    film = _film(make_film, "NORMAL", "after-limit", study)
    try:
        assert all(a.is_established for a in held)
        for a in held:  # each answers, and its idle timer starts again
            assert a.send_c_echo().Status == 0
        answers = []
        third = _scu(node.port, [DX_STORAGE], handlers=[(evt.EVT_ACSE_RECV, lambda e: answers.append(e.primitive))])
        assert not third.is_established and third.is_rejected
        assert all(a.is_established for a in held), "a held association ended: the limit was not what rejected"
        # A-ASSOCIATE-RJ: rejected-transient (2), by the service provider's presentation layer (3), because its
        # local limit is exceeded (2); not the permanent rejection an unknown AE title gets
        (reject,) = [p for p in answers if getattr(p, "result", None) is not None]
        assert (reject.result, reject.result_source, reject.diagnostic) == (0x02, 0x03, 0x02), reject.reason_str
        assert node.process.poll() is None
        assert all(a.send_c_echo().Status == 0 for a in held), "the rejection disturbed the held associations"
        held[0].release()

        # a slot is free again once the released association's thread has ended (moments after the release)
        def accepted() -> Any:
            assoc = _scu(node.port, [DX_STORAGE])
            return assoc if assoc.is_established else None

        held.append(_wait(accepted, 30, "no association was accepted after one of the held ones was released"))
        assert held[-1].send_c_store(film).Status == 0
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
    assert _outcome(node, str(film.SOPInstanceUID))["status"] in ("answered", "refer")
    orthanc.wait_for(study, {"SR": 1}, timeout=60)
    assert echo(node.port)
    _assert_every_acknowledged_accounted_for(node)


def test_a_destination_down_fails_the_study_after_the_retries_and_the_node_stays_up(down_node, make_film):
    from pneumolab.pacs.convert import DX_STORAGE

    node = down_node
    study = pydicom.uid.generate_uid()
    film = _film(make_film, "PNEUMONIA", "undeliverable", study)
    sop = str(film.SOPInstanceUID)
    assoc = _scu(node.port, [DX_STORAGE])
    assert assoc.is_established
    try:
        assert assoc.send_c_store(film).Status == 0
    finally:
        assoc.release()

    def failed() -> dict | None:
        return next((e for e in node.journal() if e["event"] == "failed" and e["study"] == study), None)

    # the first study of a new node waits for its model to load; the send then fails within seconds (--retries 1,
    # one retry after 2 s)
    event = _wait(failed, 120, "the study did not end in a failed event")
    assert "not established" in event["reason"] and "after 2 attempts" in event["reason"], event["reason"]
    assert node.dest.split("@")[1] in event["reason"], event["reason"]
    journal = node.journal()
    (processed,) = [e for e in journal if e["event"] == "processed" and e["study"] == study]
    assert processed["instances"][sop]["status"] in ("answered", "refer"), processed
    assert event["batch"] == processed["batch"]
    assert 1.5 < event["time"] - processed["time"] < 30, "the retry delay (2 s) was not waited, or far more"
    assert not [e for e in journal if e["event"] in ("sent", "done") and e.get("study") == study]
    # nothing is lost: the failed batch keeps the film, its results and the reason
    batch = node.spool / "failed" / event["batch"]
    assert (batch / f"{sop}.dcm").is_file() and (batch / "reason.json").is_file()
    assert list((batch / "results").glob("*.dcm"))
    log = (node.spool.parent / f"{node.spool.name}.log").read_text()
    assert "send attempt 1 of 2 failed" in log and "send attempt 2 of 2 failed" in log
    assert node.process.poll() is None
    assert echo(node.port)
    _assert_every_acknowledged_accounted_for(node)


def _closed_by_node(probe: socket.socket, timeout: float) -> bool:
    """Read what the node sends (an A-ABORT, say) until it closes the connection; False after `timeout` s."""
    deadline = time.monotonic() + timeout
    probe.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            if not probe.recv(4096):
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def test_a_peer_that_sends_part_of_a_pdu_and_waits_is_closed_and_frees_its_slot(pacs):
    from pneumolab.pacs.convert import DX_STORAGE

    _, node = pacs
    received = sum(e["event"] == "received" for e in node.journal())
    probes = {
        "an HTTP request": b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n",  # a browser or a health check on the wrong port
        "half a PDU header": b"\x01\x00\x00",  # the start of an A-ASSOCIATE-RQ, then silence
        "a short PDU": b"\x01\x00\x00\x00\x01\x00" + bytes(10),  # announces 256 bytes, sends 10
        "nothing": b"",
    }  # more than --max-associations of them at once
    sockets = {}
    for what, data in probes.items():
        sockets[what] = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        sockets[what].sendall(data)
    try:
        for what, probe in sockets.items():
            assert _closed_by_node(probe, IDLE_S + 30), f"the node kept a connection that sent {what}"
    finally:
        for probe in sockets.values():
            probe.close()

    # every slot is free again: --max-associations associations at once are accepted
    def all_slots() -> bool:
        held = [_scu(node.port, [DX_STORAGE]) for _ in range(MAX_ASSOCIATIONS)]
        accepted = all(a.is_established for a in held)
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        return accepted

    _wait(all_slots, 30, f"fewer than {MAX_ASSOCIATIONS} associations are accepted at once after the probes")
    assert node.process.poll() is None and echo(node.port)
    assert sum(e["event"] == "received" for e in node.journal()) == received


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA and the server and client certificates it signs (PEM files under `folder`), made by openssl."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is absent")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=pneumolab test CA")  # fmt: skip
    for who in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj",
            "/CN=localhost")  # fmt: skip
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            f"{who}.pem", "-days", "1")  # fmt: skip
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_a_tls_peer_that_never_starts_the_handshake_blocks_no_one(tmp_path):
    """The listener alone, with TLS and client certificates (what a node beyond loopback must have)."""
    import ssl

    from pynetdicom import AE

    from pneumolab.pacs.listener import Listener, NodeSettings
    from pneumolab.pacs.sender import Destination
    from pneumolab.pacs.spool import Spool

    pem = _certificates(tmp_path)
    spool = Spool(tmp_path / "spool")
    settings = NodeSettings(spool=spool.root, dest=Destination.parse("X@127.0.0.1:1"), port=0, idle_timeout=IDLE_S,
                            tls_cert=pem["server.pem"], tls_key=pem["server.key"], tls_ca=pem["ca.pem"])  # fmt: skip
    listener = Listener(settings, spool)
    listener.start()

    def tls_echo(with_certificate: bool = True) -> bool:
        context = ssl.create_default_context(cafile=pem["ca.pem"])
        context.check_hostname = False
        if with_certificate:
            context.load_cert_chain(pem["client.pem"], pem["client.key"])
        ae = AE("PYTEST")
        ae.add_requested_context(VERIFICATION)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMOLAB", tls_args=(context, None))
        if not assoc.is_established:
            return False
        try:
            return assoc.send_c_echo().Status == 0
        finally:
            assoc.release()

    try:
        assert tls_echo()
        silent = socket.create_connection(("127.0.0.1", listener.port), timeout=10)  # no ClientHello, ever
        try:
            started = time.monotonic()
            assert tls_echo(), "a silent TCP connection stopped the TLS node from accepting associations"
            assert time.monotonic() - started < IDLE_S, "the association waited for the silent peer"
            assert _closed_by_node(silent, IDLE_S + 30), "the node kept a connection that never began TLS"
        finally:
            silent.close()
        assert not tls_echo(with_certificate=False)  # the handshake, later, still wants a client certificate
        assert tls_echo()
    finally:
        listener.stop()
    assert not [e for e in spool.events() if e["event"] == "received"]


def test_arrival_times_of_studies_long_quiet_are_forgotten(tmp_path):
    """The listener's in-memory arrival times do not grow with every study a node ever received."""
    import numpy as np

    from pneumolab.pacs.convert import DX_STORAGE, film_to_dicom
    from pneumolab.pacs.listener import Listener, NodeSettings
    from pneumolab.pacs.sender import Destination
    from pneumolab.pacs.spool import Spool

    spool = Spool(tmp_path / "spool")
    settings = NodeSettings(spool=spool.root, dest=Destination.parse("X@127.0.0.1:1"), port=0, quiet_seconds=5)
    listener = Listener(settings, spool)
    listener.start()
    try:
        now = time.time()
        listener._last_received.update({"1.2.3": now - 5 - 3601, "1.2.4": now - 5 - 3000})  # long quiet; recent
        study = pydicom.uid.generate_uid()
        film = film_to_dicom(np.full((64, 64), 0.5), patient_id="P", study_uid=study)
        assoc = _scu(listener.port, [DX_STORAGE])
        try:
            assert assoc.send_c_store(film).Status == 0
        finally:
            assoc.release()
    finally:
        listener.stop()
    assert set(listener.last_received()) == {"1.2.4", study}
