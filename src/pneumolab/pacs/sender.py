"""Send result objects to the destination AE by C-STORE, with bounded retries; the last failure's reason is kept.

A result's UIDs are derived from the model and its sources (`pneumolab.pacs.results`), so a retry or a resend
after a restart stores the same objects again, which the PACS keeps once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pneumolab.errors import SettingError

__all__ = ["Destination", "SendError", "send_files"]

log = logging.getLogger("pneumolab.pacs")


class SendError(RuntimeError):
    """The results could not be stored at the destination; the message says why (the last attempt's reason)."""


@dataclass(frozen=True)
class Destination:
    """The AE results go to: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AE@HOST:PORT`` (e.g. ``ORTHANC@127.0.0.1:4242``).

        Raises:
            SettingError: Not of that form.
        """
        try:
            ae_title, address = text.split("@", 1)
            host, port = address.rsplit(":", 1)
            parsed = cls(ae_title.strip(), host.strip("[] "), int(port))
        except ValueError:
            raise SettingError(f"--dest {text}: expected AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242") from None
        if not 0 < len(parsed.ae_title) <= 16 or not 0 < parsed.port < 65536:
            raise SettingError(f"--dest {text}: the AE title has 1-16 characters and the port is 1-65535")
        return parsed


def _send_once(files: Sequence[Path], dest: Destination, calling_ae: str, timeout: float) -> None:
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for context in (Comprehensive3DSRStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        ae.add_requested_context(context)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise SendError(f"association with {dest.ae_title}@{dest.host}:{dest.port} was not established")
    try:
        for file, dataset in zip(files, datasets, strict=True):
            status = assoc.send_c_store(dataset)
            if not status or status.Status not in (0x0000, 0xB000, 0xB007, 0xB006):
                code = f"0x{status.Status:04X}" if status else "no answer"
                raise SendError(f"{file.name}: C-STORE to {dest.ae_title} answered {code}")
    finally:
        if assoc.is_established:
            assoc.release()


def send_files(
    files: Sequence[Path],
    dest: Destination,
    *,
    calling_ae: str = "PNEUMOLAB",
    retries: int = 3,
    delay: float = 2.0,
    timeout: float = 30.0,
) -> int:
    """Store `files` at `dest`, trying up to ``1 + retries`` times with doubling delays.

    Returns:
        The number of attempts it took.

    Raises:
        SendError: Every attempt failed; the message is the last attempt's reason.
    """
    reason = ""
    for attempt in range(1 + retries):
        if attempt:
            time.sleep(delay * 2 ** (attempt - 1))
        try:
            _send_once(files, dest, calling_ae, timeout)
            return attempt + 1
        except (SendError, OSError, RuntimeError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            log.warning("send attempt %d of %d failed: %s", attempt + 1, 1 + retries, reason)
    raise SendError(f"{len(files)} result files not stored after {1 + retries} attempts: {reason}")
