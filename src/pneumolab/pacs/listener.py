"""`pneumolab listen`: a DICOM node (pynetdicom) that takes chest films by C-STORE and sends results back.

The C-STORE handler writes the received bytes to the spool (temporary name, fsync, rename) and only then answers
success; over the size cap, or when the spool's disk would fall under its reserve, it answers 0xA700 (out of
resources) and keeps nothing. C-ECHO is answered. CR, DX and secondary-capture image storage is accepted, in the
transfer syntaxes the ``dicom`` extra decodes, and SR storage too (so that a PACS forwarding a whole study, our own
results included, succeeds; the worker skips them); other SOP classes are refused at association negotiation.
Calling AE titles can be limited to an allow-list. The node listens on loopback by default and, like `serve`,
refuses an interface beyond this machine unless TLS with client certificates protects it or the risk is accepted.

Logs carry UIDs, AE titles, sizes and counts, never a patient's name or id.
"""

from __future__ import annotations

import logging
import signal
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumolab.errors import MissingExtraError, SettingError
from pneumolab.network import is_loopback
from pneumolab.pacs.sender import AnyDestination
from pneumolab.pacs.spool import Spool, safe_uid
from pneumolab.pacs.worker import Dispatcher, WorkerSettings

__all__ = [
    "IMAGE_STORAGE",
    "REPORT_STORAGE",
    "TRANSFER_SYNTAXES",
    "Listener",
    "NodeSettings",
    "check_exposure",
    "run_node",
]

log = logging.getLogger("pneumolab.pacs")

IMAGE_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
# accepted so that a PACS forwarding a whole study (our own results included) succeeds; skipped by the worker
REPORT_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR Storage",
}
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.4.50",  # JPEG baseline (pylibjpeg-libjpeg)
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless (pyjpegls)
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless (pylibjpeg-openjpeg)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE lossless (pydicom)
]
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
_FORGET_AFTER_S = 3600.0  # how long past the quiet period an arrival time is kept (`Listener._handle_store`)


def check_exposure(host: str, *, tls_protected: bool, allow_unprotected_remote: bool = False) -> None:
    """Refuse to listen beyond this machine unprotected: anyone who can reach the port could store films and
    read results (AE titles are sent in clear and can be spoofed, so an allow-list alone protects nothing).

    Raises:
        SettingError: `host` is not a loopback address, TLS with client certificates is not set, and the risk was
            not accepted.
    """
    if tls_protected or allow_unprotected_remote:
        return
    if not is_loopback(host):
        raise SettingError(
            f"--host {host}: listens beyond this machine unprotected, so anyone who can reach it may send films "
            "and get results; set --tls-cert, --tls-key and --tls-ca (client certificates), or pass "
            "--allow-unprotected-remote to accept the risk"
        )


@dataclass
class NodeSettings:
    """Everything `pneumolab listen` is told (defaults: a loopback node with a 5 s quiet period)."""

    spool: Path
    dest: AnyDestination
    ae_title: str = "PNEUMOLAB"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_aes: Sequence[str] = ()
    quiet_seconds: float = 5.0
    restart_grace: float = 30.0
    max_instance_bytes: int = 200 * 2**20
    reserve_bytes: int = 512 * 2**20
    max_associations: int = 10
    idle_timeout: float = 60.0
    retries: int = 3
    retry_delay: float = 2.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    allow_unprotected_remote: bool = False
    worker: WorkerSettings = field(default_factory=WorkerSettings)


class _LateHandshake(ssl.SSLContext):
    """A server context whose TLS handshake waits for the association's first read, in the association's thread.

    pynetdicom wraps each accepted socket in the server's one accepting thread, where the handshake would wait on
    the peer: one that never starts it (a bare TCP connection) stopped every other association for as long as it
    stayed. The first read is bounded by the timeout `Listener._handle_open` sets.
    """

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


class Listener:
    """The C-STORE / C-ECHO SCP writing to a spool (module doc)."""

    def __init__(self, settings: NodeSettings, spool: Spool) -> None:
        self.settings = settings
        self.spool = spool
        self._last_received: dict[str, float] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def last_received(self) -> dict[str, float]:
        """Study -> when its last instance was acknowledged (epoch seconds)."""
        with self._lock:
            return dict(self._last_received)

    def _handle_echo(self, event: Any) -> int:
        return 0x0000

    def _handle_open(self, event: Any) -> None:
        """Give each accepted connection a read timeout: pynetdicom reads a PDU with blocking reads on a socket that
        has none, so a peer that sends part of a PDU (an HTTP request, a probe, a link gone dead) and then nothing
        would hold its thread, and one of the --max-associations, for ever; now the read fails after
        --idle-timeout seconds and the connection is closed."""
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None and self.settings.idle_timeout > 0:
            sock.socket.settimeout(self.settings.idle_timeout)

    def _handle_store(self, event: Any) -> int:
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_file_meta_info

        calling = event.assoc.requestor.ae_title
        sop = safe_uid(event.request.AffectedSOPInstanceUID or "")
        data = event.request.DataSet.getvalue()
        size = len(data)
        if sop is None:
            self.spool.journal("refused", reason="no valid SOP Instance UID", calling_ae=calling, bytes=size)
            return CANNOT_UNDERSTAND
        if size > self.settings.max_instance_bytes:
            reason = f"{size} bytes over the cap of {self.settings.max_instance_bytes}"
            self.spool.journal("refused", sop=sop, reason=reason, status="0xA700", calling_ae=calling)
            return OUT_OF_RESOURCES
        if self.spool.free_bytes() - size < self.settings.reserve_bytes:
            reason = f"the spool's disk would fall under its reserve of {self.settings.reserve_bytes} bytes"
            self.spool.journal("refused", sop=sop, reason=reason, status="0xA700", calling_ae=calling)
            return OUT_OF_RESOURCES
        try:
            study = safe_uid(event.dataset.StudyInstanceUID)
        except Exception:  # a dataset pydicom cannot parse
            study = None
        if study is None:
            self.spool.journal("refused", sop=sop, reason="no valid Study Instance UID", calling_ae=calling)
            return CANNOT_UNDERSTAND
        meta = DicomBytesIO()
        write_file_meta_info(meta, event.file_meta, enforce_standard=True)
        try:
            stored = self.spool.store(study, sop, [b"\0" * 128, b"DICM", meta.getvalue(), data])
        except OSError as error:
            self.spool.journal("refused", study=study, sop=sop, reason=f"spool write failed: {error.strerror}")
            return OUT_OF_RESOURCES
        with self._lock:
            now = time.time()
            self._last_received[study] = now
            # an arrival time older than the quiet period no longer holds its study back (the dispatcher takes the
            # later of it and the files' time), so it is forgotten, after an hour's margin for clock steps: else a
            # node running for months would keep an entry for every study it ever received
            horizon = now - self.settings.quiet_seconds - _FORGET_AFTER_S
            for old in [uid for uid, when in self._last_received.items() if when < horizon]:
                del self._last_received[old]
        self.spool.journal("received", study=study, sop=sop, bytes=stored.size, calling_ae=calling)
        return 0x0000

    def _ssl_context(self) -> Any:
        s = self.settings
        if not (s.tls_cert or s.tls_key or s.tls_ca):
            return None
        if not (s.tls_cert and s.tls_key):
            raise SettingError("--tls-cert and --tls-key go together")
        context = _LateHandshake(ssl.PROTOCOL_TLS_SERVER)  # as ssl.create_default_context(Purpose.CLIENT_AUTH)
        context.load_cert_chain(s.tls_cert, s.tls_key)
        if s.tls_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(s.tls_ca)
        return context

    def start(self) -> None:
        """Bind and serve in background threads.

        Raises:
            SettingError: The interface is exposed unprotected (`check_exposure`), or TLS files are incomplete.
        """
        try:
            from pynetdicom import AE, evt
            from pynetdicom.sop_class import Verification
        except ImportError:
            raise MissingExtraError('pneumolab listen needs pynetdicom: pip install "pneumolab[pacs]"') from None
        s = self.settings
        check_exposure(s.host, tls_protected=bool(s.tls_ca), allow_unprotected_remote=s.allow_unprotected_remote)
        ae = AE(s.ae_title)
        for sop_class in [*IMAGE_STORAGE, *REPORT_STORAGE]:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = 0  # no limit on what we receive
        ae.network_timeout = s.idle_timeout  # an association that never releases is closed
        ae.acse_timeout = ae.dimse_timeout = min(60.0, s.idle_timeout)
        ae.require_called_aet = True
        if s.allowed_aes:
            ae.require_calling_aet = list(s.allowed_aes)
        handlers = [
            (evt.EVT_CONN_OPEN, self._handle_open),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
        ]
        self._server = ae.start_server(
            (s.host, s.port), block=False, evt_handlers=handlers, ssl_context=self._ssl_context()
        )
        log.info("listening as %s on %s:%d", s.ae_title, s.host, self.port)

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the one the system chose for 0)."""
        return self._server.server_address[1] if self._server is not None else self.settings.port

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def run_node(settings: NodeSettings, *, stop: threading.Event | None = None, on_ready: Any = None) -> None:
    """Run the whole node (listener, dispatcher, worker, sender) until `stop` is set or the process gets SIGINT
    (Ctrl-C) or SIGTERM.

    Args:
        settings: The node's settings.
        stop: Set it to stop (default: run until KeyboardInterrupt).
        on_ready: Called with the `Listener` once it accepts associations.
    """
    spool = Spool(settings.spool)
    listener = Listener(settings, spool)
    dispatcher = Dispatcher(
        spool,
        settings.worker,
        settings.dest,
        calling_ae=settings.ae_title,
        quiet_seconds=settings.quiet_seconds,
        retries=settings.retries,
        retry_delay=settings.retry_delay,
        last_received=listener.last_received,
        restart_grace=settings.restart_grace,
    )
    listener.start()  # exposure is checked before the model loads
    spool.journal("started", ae_title=settings.ae_title, port=listener.port)
    dispatcher.start()
    if on_ready is not None:
        on_ready(listener)
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C and a service manager's SIGTERM both stop the node cleanly, even where the parent process left
        # SIGINT ignored (a child of a shell's background job, of a test runner's worker)
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        listener.stop()
        dispatcher.stop()
        spool.journal("stopped")
