"""The FastAPI app: gate, predict and explain uploaded X-rays with one model loaded once.

Every upload first meets the model's input gate (`InferenceModel.assess`): a file that is not a frontal chest X-ray
(by its DICOM metadata or its content) gets HTTP 422 ``{"detail": "<file>: not a frontal chest X-ray: ...", "file",
"status": "refused", "reason", "gate_score", ...}`` and no label, probability or heatmap; one the model is unsure of is
answered with ``status: "refer"`` (refer to a radiologist). Every response says what the gate does (``gate``: on,
metadata only, or off when the service runs with ``gate=False`` for research). Every other bad request gets a 4xx
JSON ``{"detail": "<one line naming the file>"}``. The odd-but-readable things the reader notices about a file go in
the response's ``notes``, never into the log as Python warnings.

Decoding and inference run in a bounded thread pool so the event loop keeps serving, and concurrent predictions share
model calls (micro-batching). `serve` refuses to listen beyond this machine without an API key
(`check_exposure`) unless told the risk is accepted.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import ipaddress
import json
import os
import threading
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from pneumolab.data.io import XrayMeta, load_xray_with_meta
from pneumolab.errors import ImageReadError, InputRefusedError, SettingError
from pneumolab.inference.loader import load_backend
from pneumolab.inference.steps import Decision, InferenceModel
from pneumolab.serve.batching import MicroBatcher

__all__ = ["ALLOWED_CONTENT_TYPES", "Prediction", "Refusal", "check_exposure", "create_app", "serve"]

ALLOWED_CONTENT_TYPES = frozenset(
    {"image/jpeg", "image/jpg", "image/pjpeg", "image/png", "application/dicom", "application/octet-stream", ""}
)
MULTIPART_SLACK = 64 * 1024  # multipart boundaries and part headers around the file itself


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n} bytes"


class Prediction(BaseModel):
    """A film the gate let through: answered, or referred to a radiologist (``status: "refer"``, with a reason)."""

    file: str
    status: Literal["answered", "refer"]
    label: str
    probability: float  # P(not the first class): P(PNEUMONIA), for a three-class model P(BACTERIAL) + P(VIRAL)
    probabilities: dict[str, float]  # every class's calibrated probability, in the model's class order
    threshold: float  # a binary model's threshold on probability (a K-class model decides by the largest class)
    reason: str
    gate_score: float | None
    notes: str  # odd but readable things about the file ("; "-separated, "" when none)
    model: str
    gate: str  # what the input gate does: "on", "metadata only: ...", or "off ..."


class Refusal(BaseModel):
    """The 422 body of an upload the input gate refused: not a frontal chest X-ray, so no label and no heatmap."""

    detail: str
    file: str
    status: Literal["refused"]
    reason: str
    gate_score: float | None
    notes: str
    gate: str


_REFUSED_DOC = {
    "model": Refusal,
    "description": "Not a frontal chest X-ray (refused by the input gate: its DICOM metadata or its content), or an "
    "invalid request (then only `detail`).",
}
_NOT_FRONTAL = "not a frontal chest X-ray"


class _Refused(Exception):
    """Raised inside a request to answer it with the 422 `Refusal` body."""

    def __init__(self, body: Refusal) -> None:
        super().__init__(body.detail)
        self.body = body


def _refusal(name: str, reason: str, gate_score: float | None, meta: XrayMeta, gate: str) -> _Refused:
    # the content gate's reasons start with the words already; the metadata check's name the tag instead
    why = reason if reason.startswith(_NOT_FRONTAL) else f"{_NOT_FRONTAL}: {reason}"
    notes = "; ".join(meta.notes)
    body = Refusal(
        detail=f"{name}: {why}",
        file=name,
        status="refused",
        reason=reason,
        gate_score=gate_score,
        notes=notes,
        gate=gate,
    )
    return _Refused(body)


def _header(text: str) -> str:
    """`text` as an HTTP header value (latin-1, one line): anything else is escaped, never a 500."""
    return " ".join(text.split()).encode("ascii", "backslashreplace").decode("ascii")


def check_exposure(host: str, api_key: str | None, *, allow_unauthenticated_remote: bool = False) -> None:
    """Refuse to listen beyond this machine with no API key: anyone who can reach the port could use the model.

    Loopback addresses (127.0.0.0/8, ::1) and ``localhost`` are always allowed.

    Raises:
        PneumolabError: `host` is not a loopback address, `api_key` is empty, and the risk was not accepted.
    """
    if api_key or allow_unauthenticated_remote:
        return
    bare = host.strip().strip("[]").lower()
    try:
        loopback = ipaddress.ip_address(bare).is_loopback
    except ValueError:  # a host name: only localhost is known to stay on this machine
        loopback = bare in {"localhost", "localhost."}
    if not loopback:
        raise SettingError(
            f"--host {host}: listens beyond this machine with no API key, so anyone who can reach it may use the "
            "model; set --api-key (or PNEUMOLAB_API_KEY), or pass --allow-unauthenticated-remote to accept the risk"
        )


def _with_gate(model: Any, gate: bool) -> Any:
    """A shallow copy of `model` with its input gate on or off (the caller's model, maybe in other apps, keeps its
    own setting; the weights are shared, not copied)."""
    if model is None:
        return None
    copied = copy.copy(model)
    copied.gate_enabled = gate
    return copied


class _AccessMiddleware:
    """Checks the API key and the declared body size of `/v1/*` requests before any body is read."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if self.api_key is not None and not hmac.compare_digest(
                headers.get("x-api-key", "").encode(), self.api_key.encode()
            ):
                await JSONResponse({"detail": "missing or wrong X-API-Key header"}, status_code=401)(
                    scope, receive, send
                )
                return
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_body:
                detail = f"request body: {_mib(int(length))} is over the upload limit of {_mib(self.max_body)}"
                await JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


def _index_html() -> str:
    return (resources.files("pneumolab.serve") / "static" / "index.html").read_text(encoding="utf-8")


def create_app(
    trained: InferenceModel,
    *,
    max_upload_bytes: int = 32 * 2**20,
    max_pixels: int = 60_000_000,
    api_key: str | None = None,
    workers: int = 2,
    request_timeout_s: float = 60,
    max_batch: int = 16,
    batch_wait_s: float = 0.0,
    gate: bool = True,
) -> FastAPI:
    """Build the service around an already loaded model.

    Args:
        trained: The model, loaded once on either backend (`pneumolab.inference.loader.load_backend`); the ONNX one
            explains only when it holds the PyTorch model too.
        max_upload_bytes: Largest accepted file; larger bodies get 413.
        max_pixels: Largest accepted image (width x height), checked before decoding.
        api_key: When set, every `/v1/*` request needs the header ``X-API-Key`` equal to it (401 otherwise).
        workers: Threads that decode and run the model.
        request_timeout_s: Inference time limit per request (504 past it).
        max_batch: Most concurrent /v1/predict images run through the model in one call (1: no batching).
        batch_wait_s: How long a lone request waits for others to batch with (0: only those already waiting).
        gate: The input gate and referral band (this setting wins over the model's own ``gate_enabled``). False is
            for research only: every readable file gets a label, and every response's ``gate`` says the gate is off.
    """
    if workers < 1:
        raise SettingError(f"workers: must be at least 1, got {workers}")
    trained = _with_gate(trained, gate)
    # Grad-CAM needs the PyTorch graph; the ONNX backend has it when it was loaded from PyTorch weights
    gradcam_model = trained if trained.explainer is trained else _with_gate(trained.explainer, gate)
    gate_status = trained.gate_status
    model_lock = threading.Lock()  # Grad-CAM registers hooks on the model: one model call at a time
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pneumolab-serve")

    def _assess(uploads: list[tuple[np.ndarray, XrayMeta]]) -> list[Decision]:
        with model_lock:
            return trained.assess(np.stack([image for image, _ in uploads]), [meta for _, meta in uploads])

    batcher = MicroBatcher(_assess, pool, max_batch=max_batch, max_wait_s=batch_wait_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await batcher.close()
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="pneumolab",
        summary="Chest X-ray pneumonia classifier (NORMAL vs PNEUMONIA) with Grad-CAM explanations.",
        version="1",
        lifespan=lifespan,
    )
    app.state.batcher = batcher  # its batch_sizes show how much batching happened
    app.add_middleware(_AccessMiddleware, api_key=api_key, max_body=max_upload_bytes + MULTIPART_SLACK)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(_Refused)
    async def _refused(_: Request, error: _Refused) -> JSONResponse:
        return JSONResponse(error.body.model_dump(), status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        parts = []
        for item in error.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "request"
            parts.append(f"{where}: {item.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:  # a bug: tests must never reach it
        return JSONResponse({"detail": f"internal error: {type(error).__name__}"}, status_code=500)

    def _in_pool(function: Any, *args: Any) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(pool, partial(function, *args))

    async def _limited(name: str, work: Awaitable[Any]) -> Any:
        """`work` within the request time limit; an unreadable image is the client's 400."""
        try:
            return await asyncio.wait_for(work, request_timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"{name}: inference took longer than {request_timeout_s:g} s") from None
        except ImageReadError as error:
            raise HTTPException(400, str(error)) from None

    async def _read_upload(file: UploadFile | None) -> tuple[str, bytes]:
        if file is None:
            raise HTTPException(400, "no file uploaded: send the X-ray in the multipart form field 'file'")
        name = os.path.basename(file.filename or "") or "upload"
        content_type = (file.content_type or "").split(";")[0].strip().lower()
        if content_type not in ALLOWED_CONTENT_TYPES:
            raise HTTPException(
                415, f"{name}: unsupported content type {content_type!r} (send image/jpeg, image/png or DICOM)"
            )
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name}: file is over the upload limit of {_mib(max_upload_bytes)}")
        return name, data

    def _decode(name: str, data: bytes) -> tuple[np.ndarray, XrayMeta]:
        # with its metadata for the gate, and its notes for the response instead of warnings in the log
        return load_xray_with_meta(data, size=trained.cache_size, name=name, max_pixels=max_pixels)

    async def _predict(name: str, data: bytes) -> tuple[Decision, XrayMeta]:
        image, meta = await _in_pool(_decode, name, data)
        return await batcher.submit((image, meta)), meta

    def _explain(name: str, data: bytes, panel: str, target: str | None):
        from pneumolab.inference.explain import explain_image

        _, meta = _decode(name, data)  # the upload limits (max_pixels) before explain_image decodes it again
        with model_lock:
            try:
                return explain_image(gradcam_model, data, name=name, panel=panel, target=target), meta
            except InputRefusedError as refused:
                raise _refusal(name, refused.reason, refused.gate_score, meta, gate_status) from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(_index_html())

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the model is loaded and the server answers; what the input gate does (no API key needed)."""
        return {"status": "ok", "model": trained.name, "gate": gate_status}

    @app.get("/v1/model")
    async def model_card() -> dict[str, Any]:
        """The model's card (architecture, preprocessing, threshold, TTA views, referral band), its backend and
        batch limit; ``gate`` says what the input gate does, ``gate_facts`` are the card's facts about it."""
        card = trained.card()
        facts = {"gate": gate_status, "gate_facts": card.get("gate")}
        return {**card, **facts, "backend": trained.backend, "max_batch": max_batch}

    @app.post("/v1/predict", response_model=Prediction, responses={422: _REFUSED_DOC})
    async def predict(file: UploadFile | None = File(None)) -> Prediction:
        """Gate one X-ray (JPEG, PNG or DICOM), then classify it as NORMAL or PNEUMONIA (or refer it).

        A file that is not a frontal chest X-ray gets 422 with the gate's reason and no label.
        """
        name, data = await _read_upload(file)
        decision, meta = await _limited(name, _predict(name, data))
        if decision.status == "refused":
            raise _refusal(name, decision.reason, decision.gate_score, meta, gate_status)
        notes = "; ".join(meta.notes)
        fields = decision.fields()
        return Prediction(
            file=name, **fields, threshold=trained.threshold, notes=notes, model=trained.name, gate=gate_status
        )

    @app.post(
        "/v1/explain",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 422: _REFUSED_DOC},
    )
    async def explain(
        file: UploadFile | None = File(None),
        panel: Literal["both", "overlay"] = Query(
            "both", description="both: the film and the overlay side by side; overlay: the overlay alone, enlarged"
        ),
        target: str | None = Query(
            None, description="class whose score is explained (default: the predicted class; binary: PNEUMONIA)"
        ),
    ) -> Response:
        """Grad-CAM for one class over the film, as a PNG; the decision is in ``X-*`` headers.

        A file that is not a frontal chest X-ray gets the 422 of /v1/predict and no heatmap.
        """
        name, data = await _read_upload(file)
        if gradcam_model is None:
            detail = f"{name}: Grad-CAM needs one PyTorch network; this service runs an ONNX file alone or an ensemble"
            raise HTTPException(501, detail + " (serve a run folder or artefact to explain; an ensemble, per member)")
        if target is not None and target not in trained.classes:
            raise HTTPException(422, f"target: {target!r} is not one of the model's classes {list(trained.classes)}")
        explanation, meta = await _limited(name, _in_pool(_explain, name, data, panel, target))
        decision = explanation.decision
        headers = {
            "X-Status": decision.status,
            "X-Label": decision.label,
            "X-Probability": f"{decision.probability:.6f}",
            "X-Probabilities": json.dumps({c: round(p, 6) for c, p in (decision.probabilities or {}).items()}),
            "X-Target": explanation.target,
            "X-Threshold": f"{trained.threshold:.6f}",
            "X-Reason": _header(decision.reason),
            "X-Notes": _header("; ".join(meta.notes)),
            "X-Gate": _header(gate_status),
        }
        return Response(explanation.png, media_type="image/png", headers=headers)

    return app


def serve(
    model_path: str | os.PathLike[str] | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    backend: str = "pytorch",
    max_batch: int = 16,
    gate: bool = True,
    allow_unauthenticated_remote: bool = False,
) -> None:
    """Load the model once and serve it with uvicorn until interrupted (key from ``PNEUMOLAB_API_KEY`` if unset).

    Args:
        model_path: A run folder, artefact or ``.onnx`` file (None: the bundled model).
        host: Interface to listen on; one beyond this machine needs an API key (see `check_exposure`).
        port: TCP port.
        api_key: Required ``X-API-Key`` of `/v1/*` requests.
        backend: ``pytorch`` or ``onnx`` (onnxruntime; `model_path` may then be an ``.onnx`` file with its card).
        max_batch: Most concurrent /v1/predict images in one model call.
        gate: The input gate and referral band (False: research use, see `create_app`).
        allow_unauthenticated_remote: Listen beyond this machine with no API key anyway.

    Raises:
        PneumolabError: `host` is not a loopback address and there is no API key, before any model is loaded.
    """
    import uvicorn

    api_key = api_key or os.environ.get("PNEUMOLAB_API_KEY") or None
    check_exposure(host, api_key, allow_unauthenticated_remote=allow_unauthenticated_remote)
    app = create_app(load_backend(model_path, backend), api_key=api_key, max_batch=max_batch, gate=gate)
    uvicorn.run(app, host=host, port=port)
