"""Network facts that the service, the DICOM node and its sender share, without their libraries."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name) stays on this machine: 127.0.0.0/8, ::1 or localhost."""
    bare = host.strip().strip("[]").lower()
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:  # a host name: only localhost is known to stay on this machine
        return bare in {"localhost", "localhost."}
