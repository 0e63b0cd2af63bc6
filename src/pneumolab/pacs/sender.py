"""Send result objects to the destination, with bounded retries; the last failure's reason is kept.

The destination is a DICOM AE (C-STORE, `Destination`) or a DICOMweb server (STOW-RS, `StowDestination`);
`parse_destination` reads either from ``--dest``. A STOW-RS store counts as done only when a QIDO-RS query then
lists every instance sent: an HTTP 200 alone is not trusted.

A result's UIDs are derived from the model and its sources (`pneumolab.pacs.results`), so a retry or a resend
after a restart stores the same objects again, which the PACS keeps once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from pneumolab.errors import SettingError
from pneumolab.network import is_loopback

__all__ = [
    "PASSWORD_ENV",
    "TOKEN_ENV",
    "USERNAME_ENV",
    "AnyDestination",
    "Destination",
    "SendError",
    "StowDestination",
    "parse_destination",
    "send_files",
]

log = logging.getLogger("pneumolab.pacs")

TOKEN_ENV = "PNEUMOLAB_DEST_TOKEN"  # a bearer token for a STOW-RS destination
USERNAME_ENV, PASSWORD_ENV = "PNEUMOLAB_DEST_USERNAME", "PNEUMOLAB_DEST_PASSWORD"  # or basic authentication


class SendError(RuntimeError):
    """The results could not be stored at the destination; the message says why (the last attempt's reason)."""


@dataclass(frozen=True)
class Destination:
    """The AE results go to by C-STORE: ``AE@HOST:PORT``."""

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


@dataclass(frozen=True)
class StowDestination:
    """The DICOMweb server results go to by STOW-RS, e.g. ``http://127.0.0.1:8042/dicom-web`` (Orthanc).

    Credentials are never part of the URL or the command line: `parse_destination` reads them from the environment
    (`TOKEN_ENV`, or `USERNAME_ENV` and `PASSWORD_ENV`); they are left out of the repr.
    """

    url: str  # the DICOMweb root, without a trailing slash
    token: str | None = field(default=None, repr=False)
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    ca_bundle: Path | None = None  # PEM file of CAs to trust for https (default: the system's)


AnyDestination: TypeAlias = Destination | StowDestination  # what --dest reads: C-STORE or STOW-RS


def parse_destination(
    text: str, *, ca_bundle: Path | None = None, environ: Mapping[str, str] | None = None
) -> AnyDestination:
    """Read ``--dest``: ``AE@HOST:PORT`` (C-STORE) or an ``http(s)://`` DICOMweb root (STOW-RS).

    Args:
        text: The ``--dest`` text.
        ca_bundle: CAs to trust for an https destination.
        environ: Where credentials are read from (default: ``os.environ``).

    Raises:
        SettingError: Neither form; a URL with credentials, a query or a fragment; credentials set halfway, or sent
            over plain http beyond this machine; a CA bundle for a C-STORE destination or one that is not a file.
    """
    if not text.lower().startswith(("http://", "https://")):
        if "://" in text:
            raise SettingError(f"--dest {text}: expected AE@HOST:PORT or an http(s):// DICOMweb URL")
        if ca_bundle is not None:
            raise SettingError("--dest-ca is for an https:// destination, not a C-STORE one")
        return Destination.parse(text)
    if "@" in re.split(r"[/?#]", text.split("://", 1)[1], maxsplit=1)[0]:  # first: no message below shows a password
        raise SettingError(f"--dest: put credentials in {TOKEN_ENV} or {USERNAME_ENV}/{PASSWORD_ENV}, not the URL")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        raise SettingError(f"--dest {text}: not a valid URL") from None
    if not parts.hostname:
        raise SettingError(f"--dest {text}: the URL has no host")
    if parts.query or parts.fragment:
        raise SettingError(f"--dest {text}: a DICOMweb root has no query or fragment")
    env = os.environ if environ is None else environ
    token, username, password = (env.get(name) or None for name in (TOKEN_ENV, USERNAME_ENV, PASSWORD_ENV))
    if (username is None) != (password is None):
        raise SettingError(f"{USERNAME_ENV} and {PASSWORD_ENV} go together")
    if token and username:
        raise SettingError(f"set {TOKEN_ENV} or {USERNAME_ENV}/{PASSWORD_ENV}, not both")
    if (token or username) and parts.scheme == "http" and not is_loopback(parts.hostname):
        raise SettingError(f"--dest {text}: credentials would travel in clear; use https:// beyond this machine")
    if ca_bundle is not None and (parts.scheme != "https" or not Path(ca_bundle).is_file()):
        raise SettingError(f"--dest-ca {ca_bundle}: needs an https:// destination and an existing PEM file")
    url = text.rstrip("/")
    return StowDestination(url, token=token, username=username, password=password, ca_bundle=ca_bundle)


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


def _stow_once(files: Sequence[Path], dest: StowDestination, timeout: float) -> None:
    """POST each study's files to ``{url}/studies/{study}``, then check by QIDO-RS that every instance is listed."""
    import ssl

    import httpx
    import pydicom

    studies: dict[str, dict[str, dict[str, Path]]] = {}  # study -> series -> SOP Instance UID -> file
    for file in files:
        header = pydicom.dcmread(file, stop_before_pixels=True)
        series = studies.setdefault(str(header.StudyInstanceUID), {}).setdefault(str(header.SeriesInstanceUID), {})
        series[str(header.SOPInstanceUID)] = file
    basic = dest.username is not None and dest.password is not None
    auth = httpx.BasicAuth(dest.username or "", dest.password or "") if basic else None
    headers = {"Authorization": f"Bearer {dest.token}"} if dest.token else {}
    verify: Any = ssl.create_default_context(cafile=str(dest.ca_bundle)) if dest.ca_bundle else True
    try:
        with httpx.Client(timeout=timeout, auth=auth, headers=headers, verify=verify) as client:
            for study, series in studies.items():
                _stow_study(client, dest, study, series)
    except httpx.HTTPError as error:
        raise SendError(f"STOW-RS to {dest.url}: {type(error).__name__}: {error}") from None


def _stow_study(client: Any, dest: StowDestination, study: str, series: dict[str, dict[str, Path]]) -> None:
    """One study's STOW-RS request (a ``multipart/related`` body, one part per file) and its QIDO-RS check."""
    sent = [file for instances in series.values() for file in instances.values()]
    boundary = uuid.uuid4().hex.encode()
    parts = [b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary, f.read_bytes()) for f in sent]
    answer = client.post(
        f"{dest.url}/studies/{study}",
        content=b"".join(parts) + b"--%s--\r\n" % boundary,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary.decode()}',
            "Accept": "application/dicom+json",
        },
    )
    if not answer.is_success:
        raise SendError(f"STOW-RS to {dest.url} answered {answer.status_code}: {_stow_reason(answer)}")
    missing = [
        sop for uid, instances in series.items() for sop in sorted(set(instances) - _listed(client, dest, study, uid))
    ]
    if missing:  # the HTTP status is not trusted: what the server lists afterwards is
        failed = _failures(answer)
        raise SendError(
            f"STOW-RS to {dest.url} answered {answer.status_code} but the query did not find {len(missing)} of "
            f"{len(sent)} instances (first: {missing[0]})" + (f"; {failed}" if failed else "")
        )


def _listed(client: Any, dest: StowDestination, study: str, series: str) -> set[str]:
    """The SOP Instance UIDs a QIDO-RS query lists in one series."""
    answer = client.get(
        f"{dest.url}/studies/{study}/series/{series}/instances",
        params={"includefield": "00080018"},
        headers={"Accept": "application/dicom+json"},
    )
    if answer.status_code == 204:  # no match
        return set()
    if not answer.is_success:
        raise SendError(f"QIDO-RS query to {dest.url} answered {answer.status_code}: {_stow_reason(answer)}")
    try:
        found = answer.json()
    except ValueError:
        raise SendError(f"QIDO-RS query to {dest.url} answered what is not JSON") from None
    return {
        str(value)
        for item in (found if isinstance(found, list) else [])
        if isinstance(item, dict)
        for value in (item.get("00080018") or {}).get("Value", [])[:1]
    }


def _stow_reason(answer: Any) -> str:
    """Why a STOW-RS or QIDO-RS answer is not a success: the failed instances' FailureReason codes, an Orthanc
    error's message, a plain-text body's first line, or the HTTP reason phrase."""
    failed = _failures(answer)
    if failed:
        return failed
    with contextlib.suppress(ValueError):
        body = answer.json()
        if isinstance(body, dict) and isinstance(body.get("Message"), str):  # Orthanc: {"Message": ..., ...}
            return body["Message"][:200]
    if answer.headers.get("content-type", "").startswith("text/plain") and answer.text.strip():
        return answer.text.strip().splitlines()[0][:200]
    return answer.reason_phrase or "no reason given"


def _failures(answer: Any) -> str:
    """The FailedSOPSequence of a STOW-RS answer as ``N failed, FailureReason 0x....``, or "" when there is none."""
    try:
        body = answer.json()
    except ValueError:
        return ""
    failed = (body.get("00081198") or {}).get("Value") or [] if isinstance(body, dict) else []
    codes = [
        f"0x{value:04X}"
        for item in failed
        if isinstance(item, dict)
        for value in ((item.get("00081197") or {}).get("Value") or [])[:1]
        if isinstance(value, int)
    ]
    return f"{len(failed)} failed, FailureReason {', '.join(codes) or 'not given'}" if failed else ""


def send_files(
    files: Sequence[Path],
    dest: AnyDestination,
    *,
    calling_ae: str = "PNEUMOLAB",
    retries: int = 3,
    delay: float = 2.0,
    timeout: float = 30.0,
) -> int:
    """Store `files` at `dest` (C-STORE or STOW-RS), trying up to ``1 + retries`` times with doubling delays.

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
            if isinstance(dest, StowDestination):
                _stow_once(files, dest, timeout)
            else:
                _send_once(files, dest, calling_ae, timeout)
            return attempt + 1
        except (SendError, OSError, RuntimeError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            log.warning("send attempt %d of %d failed: %s", attempt + 1, 1 + retries, reason)
    raise SendError(f"{len(files)} result files not stored after {1 + retries} attempts: {reason}")
