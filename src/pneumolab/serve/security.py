"""What keeps the service safe to expose: the API key, the Host check's names, security headers, and header values
that cannot carry anything but one short ASCII line.

The key is checked per route (a FastAPI dependency, declared in OpenAPI, and the same check before the body is
read), never by matching the raw path, so it holds under a mount prefix or a proxy's ``--root-path``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Sequence

from fastapi import HTTPException, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pneumolab.errors import SettingError
from pneumolab.network import is_loopback

__all__ = [
    "API_CSP",
    "API_KEY_HEADER",
    "SecurityHeadersMiddleware",
    "allowed_host_names",
    "check_exposure",
    "header_value",
    "is_loopback",
    "key_guard",
    "keyed_route_class",
    "loopback_hosts",
    "page_csp",
]

API_KEY_HEADER = "X-API-Key"
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
"""The Content-Security-Policy of every answer that is not a page: nothing may load, nothing may frame it."""
_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": API_CSP,
    "Cache-Control": "no-store",  # answers about patients' films stay out of shared and browser caches
}
_scheme = APIKeyHeader(
    name=API_KEY_HEADER, scheme_name="APIKey", auto_error=False, description="The key `serve --api-key` was given."
)


def header_value(text: str, limit: int = 256) -> str:
    """`text` as an HTTP header value: one line, ASCII (anything else backslash-escaped), at most `limit` characters."""
    value = " ".join(text.split()).encode("ascii", "backslashreplace").decode("ascii")
    return value if len(value) <= limit else value[: limit - 3] + "..."


def loopback_hosts() -> list[str]:
    """The Host header names of this machine, the only ones a loopback service answers (DNS rebinding)."""
    return ["localhost", "127.0.0.1", "[::1]"]


def allowed_host_names(host: str, extra: Sequence[str] = ()) -> list[str] | None:
    """The ``Host`` names a service listening on `host` answers: this machine's own on loopback, plus `extra`;
    beyond loopback only `extra`, or any name (None) when there is none (the API key guards such a service)."""
    names = [*(loopback_hosts() if is_loopback(host) else []), *extra]
    return names or None


def check_exposure(host: str, api_key: str | None, *, allow_unauthenticated_remote: bool = False) -> None:
    """Refuse to listen beyond this machine with no API key: anyone who can reach the port could use the model.

    Loopback addresses (127.0.0.0/8, ::1) and ``localhost`` are always allowed.

    Raises:
        PneumolabError: `host` is not a loopback address, `api_key` is empty, and the risk was not accepted.
    """
    if api_key or allow_unauthenticated_remote or is_loopback(host):
        return
    raise SettingError(
        f"--host {host}: listens beyond this machine with no API key, so anyone who can reach it may use the "
        "model; set --api-key (or PNEUMOLAB_API_KEY), or pass --allow-unauthenticated-remote to accept the risk"
    )


def key_guard(api_key: str) -> Callable[..., None]:
    """The dependency that requires ``X-API-Key: <api_key>`` (401 otherwise), declared as OpenAPI's ``APIKey``."""
    expected = api_key.encode()

    def require_key(given: str | None = Security(_scheme)) -> None:
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise HTTPException(
                401, f"missing or wrong {API_KEY_HEADER} header", headers={"WWW-Authenticate": "APIKey"}
            )

    return require_key


def keyed_route_class(require_key: Callable[..., None]) -> type[APIRoute]:
    """A route class that runs `require_key` before FastAPI reads the body (its dependencies run only after), so
    a client without the key never has an upload parsed or spooled to disk."""

    class KeyedRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def checked(request: Request) -> Response:
                require_key(request.headers.get(API_KEY_HEADER))
                return await handler(request)

            return checked

    return KeyedRoute


def page_csp(html: str) -> str:
    """A Content-Security-Policy for a page whose scripts and styles are inline: each block allowed by its SHA-256,
    data only from this origin, pictures also from the page's own blob: URLs."""
    sources = {}
    for tag in ("script", "style"):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        hashes = [base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() for block in blocks]
        sources[tag] = " ".join(f"'sha256-{digest}'" for digest in hashes) or "'none'"
    return (
        f"default-src 'none'; script-src {sources['script']}; style-src {sources['style']}; "
        "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


class SecurityHeadersMiddleware:
    """Adds the security headers to every answer; one that sets its own (the page's CSP) keeps it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, with_headers)
