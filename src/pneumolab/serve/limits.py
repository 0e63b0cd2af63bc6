"""The request body limit as ASGI middleware: every request, whatever its path or route, and chunked uploads too.

A declared ``Content-Length`` over the limit is answered before anything is read; a body without one (chunked
transfer encoding) is counted as it arrives and refused the moment it passes the limit, so no more of it is read.
Either way the answer is a 413 with a one-line JSON ``detail`` (FastAPI's own ``max_body_size`` answers a declared
oversize with plain text, which the page and clients cannot parse).
"""

from __future__ import annotations

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimitMiddleware", "BodyTooLarge"]


class BodyTooLarge(HTTPException):
    """Raised from `receive` past the limit; FastAPI passes its own HTTPException through body parsing unchanged."""

    def __init__(self, detail: str) -> None:
        super().__init__(413, detail, headers={"Connection": "close"})


class BodyLimitMiddleware:
    """Refuses request bodies over `max_body` bytes with 413 ``{"detail": detail}``, reading no further."""

    def __init__(self, app: ASGIApp, *, max_body: int, detail: str) -> None:
        self.app, self.max_body, self.detail = app, max_body, detail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.detail)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:  # read outside a route (which answers it through the app's handler)
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse({"detail": self.detail}, status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)
