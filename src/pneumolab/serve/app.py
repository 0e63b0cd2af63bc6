"""The FastAPI app: gate, predict and explain uploaded X-rays with one model loaded once.

Every upload first meets the model's input gate (`InferenceModel.assess`): a file that is not a frontal chest X-ray
(by its DICOM metadata or its content) gets HTTP 422 ``{"detail": "<file>: not a frontal chest X-ray: ...", "file",
"status": "refused", "reason", "gate_score", ...}`` and no label, probability or heatmap; one the model is unsure of is
answered with ``status: "refer"`` (refer to a radiologist). Every response says what the gate does (``gate``: on,
metadata only, or off when the service runs with ``gate=False`` for research). Every other bad request gets a 4xx
JSON ``{"detail": "<one line naming the file>"}``. The odd-but-readable things the reader notices about a file go in
the response's ``notes``, never into the log as Python warnings.

Each endpoint has its own bounded lane (`pneumolab.serve.lanes`): predict decodes in its threads and shares model
calls (micro-batching, one model call at a time); explain runs Grad-CAM in its own few threads on each thread's own
copy of the network, so explains never hold up predict; a full lane answers 503 with ``Retry-After`` at once. The
body limit stops a chunked upload at the limit; the API key is a dependency of every protected route; every answer
carries security headers, and a Host check guards against DNS rebinding (`pneumolab.serve.security`). `serve`
refuses to listen beyond this machine without an API key (`check_exposure`) unless told the risk is accepted.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import threading
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, File, HTTPException, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from pneumolab.data.io import XrayMeta, load_xray_with_meta
from pneumolab.errors import ImageReadError, InputRefusedError, SettingError
from pneumolab.inference.loader import load_backend
from pneumolab.inference.steps import Decision, InferenceModel
from pneumolab.serve.batching import MicroBatcher
from pneumolab.serve.docs import docs_html
from pneumolab.serve.lanes import Lane, LaneFull, Slot
from pneumolab.serve.limits import BodyLimitMiddleware
from pneumolab.serve.metrics import install_metrics
from pneumolab.serve.security import (
    SecurityHeadersMiddleware,
    allowed_host_names,
    check_exposure,
    header_value,
    key_guard,
    keyed_route_class,
    loopback_hosts,
    page_csp,
)

__all__ = [
    "ALLOWED_CONTENT_TYPES",
    "Prediction",
    "Refusal",
    "check_exposure",
    "create_app",
    "loopback_hosts",
    "serve",
]

ALLOWED_CONTENT_TYPES = frozenset(
    {"image/jpeg", "image/jpg", "image/pjpeg", "image/png", "application/dicom", "application/octet-stream", ""}
)
MULTIPART_SLACK = 64 * 1024  # multipart boundaries and part headers around the file itself
_NAME_LIMIT = 120  # characters of an upload's file name in a detail: a hostile name cannot flood a message
_NOTES_LIMIT = 1000  # characters of the notes in a JSON answer (the X-Notes header: 256)


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n} bytes"


def _upload_name(filename: str | None) -> str:
    """The upload's file name as messages show it: its last part, one line, at most `_NAME_LIMIT` characters."""
    name = " ".join(os.path.basename((filename or "").replace("\\", "/")).split()) or "upload"
    return name if len(name) <= _NAME_LIMIT else f"{name[:60]}...{name[-(_NAME_LIMIT - 63) :]}"


def _notes(meta: XrayMeta) -> str:
    notes = "; ".join(" ".join(note.split()) for note in meta.notes)
    return notes if len(notes) <= _NOTES_LIMIT else notes[: _NOTES_LIMIT - 3] + "..."


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
    body = Refusal(
        detail=f"{name}: {why}",
        file=name,
        status="refused",
        reason=reason,
        gate_score=gate_score,
        notes=_notes(meta),
        gate=gate,
    )
    return _Refused(body)


def _with_gate(model: Any, gate: bool) -> Any:
    """A shallow copy of `model` with its input gate on or off (the caller's model, maybe in other apps, keeps its
    own setting; the weights are shared, not copied)."""
    if model is None:
        return None
    copied = copy.copy(model)
    copied.gate_enabled = gate
    return copied


def _own_network(model: Any) -> Any:
    """A copy of `model` with its own network (weights copied): Grad-CAM's hooks on it touch no other thread's."""
    copied = copy.copy(model)
    copied.model = copy.deepcopy(model.model)
    return copied


def _index_html() -> str:
    return (resources.files("pneumolab.serve") / "static" / "index.html").read_text(encoding="utf-8")


def create_app(
    trained: InferenceModel,
    *,
    max_upload_bytes: int = 32 * 2**20,
    max_pixels: int = 60_000_000,
    api_key: str | None = None,
    workers: int = 2,
    predict_queue: int = 64,
    explain_workers: int = 1,
    explain_queue: int = 2,
    request_timeout_s: float = 60,
    max_batch: int = 16,
    batch_wait_s: float = 0.0,
    gate: bool = True,
    allowed_hosts: Sequence[str] | None = None,
    metrics: bool = True,
) -> FastAPI:
    """Build the service around an already loaded model.

    Args:
        trained: The model, loaded once on either backend (`pneumolab.inference.loader.load_backend`); the ONNX one
            explains only when it holds the PyTorch model too.
        max_upload_bytes: Largest accepted file; a larger body gets 413, read no further than the limit (chunked
            uploads too).
        max_pixels: Largest accepted image (width x height), checked before decoding.
        api_key: When set, the ``/v1/*`` routes and ``/openapi.json`` need the header ``X-API-Key`` equal to it (401
            otherwise), and there is no ``/docs`` page.
        workers: Threads that decode /v1/predict uploads (the model runs in one more, one call at a time).
        predict_queue: /v1/predict requests that may wait beyond `workers` (decoding or batching); more get 503.
        explain_workers: Threads that run /v1/explain (each on its own copy of the network), at a lower CPU priority.
        explain_queue: /v1/explain requests that may wait beyond `explain_workers`; more get 503.
        request_timeout_s: Time limit per request (504 past it); work not yet started is dropped.
        max_batch: Most concurrent /v1/predict images run through the model in one call (1: no batching).
        batch_wait_s: How long a lone request waits for others to batch with (0: only those already waiting).
        gate: The input gate and referral band (this setting wins over the model's own ``gate_enabled``). False is
            for research only: every readable file gets a label, and every response's ``gate`` says the gate is off.
        allowed_hosts: The ``Host`` names answered (400 otherwise; ``*.example.org`` patterns); None: any. `serve`
            passes this machine's names when it listens on loopback (against DNS rebinding).
        metrics: ``/metrics`` (Prometheus: counts, latencies, the drift watch); False: no such route and nothing
            recorded (``drift`` in ``/v1/model`` is null).
    """
    if workers < 1:
        raise SettingError(f"workers: must be at least 1, got {workers}")
    trained = _with_gate(trained, gate)
    # Grad-CAM needs the PyTorch graph; the ONNX backend has it when it was loaded from PyTorch weights
    gradcam_model = trained if trained.explainer is trained else _with_gate(trained.explainer, gate)
    gate_status = trained.gate_status
    predict_lane = Lane("predict", workers=workers, queue=predict_queue, retry_after_s=1)
    explain_lane = Lane("explain", workers=explain_workers, queue=explain_queue, retry_after_s=5, nice=10)
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pneumolab-model")
    explainers = threading.local()  # each explain thread's own copy of the network

    def _assess(uploads: list[tuple[np.ndarray, XrayMeta]]) -> list[Decision]:
        # the only caller of `trained`: one batch at a time, in one thread
        decisions = trained.assess(np.stack([image for image, _ in uploads]), [meta for _, meta in uploads])
        if watch is not None:
            watch.record(decisions)  # counts, histograms and the drift watch (pneumolab.serve.metrics)
        return decisions

    batcher = MicroBatcher(_assess, model_thread, max_batch=max_batch, max_wait_s=batch_wait_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await batcher.close()
        model_thread.shutdown(wait=False, cancel_futures=True)
        predict_lane.close()
        explain_lane.close()

    app = FastAPI(
        title="pneumolab",
        summary="Chest X-ray pneumonia classifier (NORMAL vs PNEUMONIA) with Grad-CAM explanations.",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load their code from a CDN: a local page instead (`docs_html`)
        redoc_url=None,
        openapi_url=None,  # served below, behind the key when there is one
        form_limits={"max_files": 1, "max_fields": 8},
    )
    app.state.batcher = batcher  # its batch_sizes show how much batching happened
    app.state.lanes = {"predict": predict_lane, "explain": explain_lane}
    guard = [Security(key_guard(api_key))] if api_key else []  # /metrics needs the key when the service has one
    # /metrics and the /v1 request timer
    watch = install_metrics(app, trained, dependencies=guard) if metrics else None
    # the last added runs first: the headers (on every answer), the Host check, then the body limit
    limit = f"request body: over the upload limit of {_mib(max_upload_bytes)}"
    app.add_middleware(BodyLimitMiddleware, max_body=max_upload_bytes + MULTIPART_SLACK, detail=limit)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts) if allowed_hosts else ["*"])
    app.add_middleware(SecurityHeadersMiddleware)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(_Refused)
    async def _refused(_: Request, error: _Refused) -> JSONResponse:
        return JSONResponse(error.body.model_dump(), status_code=422)

    @app.exception_handler(LaneFull)
    async def _busy(_: Request, error: LaneFull) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        parts = []
        for item in error.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "request"
            parts.append(f"{where}: {item.get('msg', 'invalid')}")
        return JSONResponse({"detail": header_value("; ".join(parts) or "invalid request", 600)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:  # a bug: tests must never reach it
        return JSONResponse({"detail": f"internal error: {type(error).__name__}"}, status_code=500)

    async def _limited(name: str, work: Awaitable[Any]) -> Any:
        """`work` within the request time limit; an unreadable image is the client's 400."""
        try:
            return await asyncio.wait_for(work, request_timeout_s)
        except TimeoutError:
            raise HTTPException(504, f"{name}: took longer than {request_timeout_s:g} s") from None
        except ImageReadError as error:
            raise HTTPException(400, str(error)) from None

    async def _read_upload(file: UploadFile | None) -> tuple[str, bytes]:
        if file is None:
            raise HTTPException(400, "no file uploaded: send the X-ray in the multipart form field 'file'")
        name = _upload_name(file.filename)
        content_type = (file.content_type or "").split(";")[0].strip().lower()
        if content_type not in ALLOWED_CONTENT_TYPES:
            shown = header_value(content_type, 60)
            raise HTTPException(
                415, f"{name}: unsupported content type {shown!r} (send image/jpeg, image/png or DICOM)"
            )
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name}: file is over the upload limit of {_mib(max_upload_bytes)}")
        return name, data

    def _decode(name: str, data: bytes) -> tuple[np.ndarray, XrayMeta]:
        # with its metadata for the gate, and its notes for the response instead of warnings in the log
        return load_xray_with_meta(data, size=trained.cache_size, name=name, max_pixels=max_pixels)

    async def _predict(slot: Slot, name: str, data: bytes) -> tuple[Decision, XrayMeta]:
        image, meta = await slot.run(_decode, name, data)
        return await batcher.submit((image, meta)), meta

    def _explain(slot: Slot, name: str, data: bytes, panel: str, target: str | None):
        from pneumolab.inference.explain import explain_image

        _, meta = _decode(name, data)  # the upload limits (max_pixels) before explain_image decodes it again
        slot.check()  # the request has timed out: no Grad-CAM for nobody
        if getattr(explainers, "model", None) is None:
            explainers.model = _own_network(gradcam_model)
        try:
            return explain_image(explainers.model, data, name=name, panel=panel, target=target), meta
        except InputRefusedError as refused:
            raise _refusal(name, refused.reason, refused.gate_score, meta, gate_status) from None

    require_key = key_guard(api_key) if api_key else None
    guarded = APIRouter(
        dependencies=[Security(require_key)] if require_key else [],
        route_class=keyed_route_class(require_key) if require_key else APIRoute,
    )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        html = _index_html()
        return HTMLResponse(html, headers={"Content-Security-Policy": page_csp(html), "Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the model is loaded and the server answers; what the input gate does (no API key needed)."""
        return {"status": "ok", "model": trained.name, "gate": gate_status}

    @guarded.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> dict[str, Any]:
        root_path = request.scope.get("root_path", "").rstrip("/")
        return {**app.openapi(), **({"servers": [{"url": root_path}]} if root_path else {})}

    if api_key is None:  # a key holder reads the schema; a browser cannot send the key to a page

        @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
        async def docs() -> HTMLResponse:
            html = docs_html(app.openapi())
            return HTMLResponse(html, headers={"Content-Security-Policy": page_csp(html)})

    @guarded.get("/v1/model")
    async def model_card() -> dict[str, Any]:
        """The model's card (architecture, preprocessing, threshold, TTA views, referral band), its backend and
        batch limit; ``gate`` says what the input gate does, ``gate_facts`` are the card's facts about it."""
        card = trained.card()
        facts = {"gate": gate_status, "gate_facts": card.get("gate")}
        return {**card, **facts, "backend": trained.backend, "max_batch": max_batch, "drift": watch and watch.facts()}

    @guarded.post("/v1/predict", response_model=Prediction, responses={422: _REFUSED_DOC, 503: {"description": "busy"}})
    async def predict(file: UploadFile | None = File(None)) -> Prediction:
        """Gate one X-ray (JPEG, PNG or DICOM), then classify it as NORMAL or PNEUMONIA (or refer it).

        A file that is not a frontal chest X-ray gets 422 with the gate's reason and no label; a full queue gets 503
        with ``Retry-After``.
        """
        name, data = await _read_upload(file)
        with predict_lane.slot() as slot:
            decision, meta = await _limited(name, _predict(slot, name, data))
        if decision.status == "refused":
            raise _refusal(name, decision.reason, decision.gate_score, meta, gate_status)
        fields = decision.fields()
        return Prediction(
            file=name, **fields, threshold=trained.threshold, notes=_notes(meta), model=trained.name, gate=gate_status
        )

    @guarded.post(
        "/v1/explain",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 422: _REFUSED_DOC, 503: {"description": "busy"}},
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

        A file that is not a frontal chest X-ray gets the 422 of /v1/predict and no heatmap; explains run in their own
        small lane, and a full one gets 503 with ``Retry-After``.
        """
        name, data = await _read_upload(file)
        if gradcam_model is None:
            detail = f"{name}: Grad-CAM needs one PyTorch network; this service runs an ONNX file alone or an ensemble"
            raise HTTPException(501, detail + " (serve a run folder or artefact to explain; an ensemble, per member)")
        if target is not None and target not in trained.classes:
            shown = header_value(target, 60)
            raise HTTPException(422, f"target: {shown!r} is not one of the model's classes {list(trained.classes)}")
        with explain_lane.slot() as slot:
            explanation, meta = await _limited(name, slot.run(_explain, slot, name, data, panel, target))
        decision = explanation.decision
        headers = {
            "X-Status": decision.status,
            "X-Label": header_value(decision.label),
            "X-Probability": f"{decision.probability:.6f}",
            "X-Probabilities": header_value(
                json.dumps({c: round(p, 6) for c, p in (decision.probabilities or {}).items()}), 1024
            ),
            "X-Target": header_value(explanation.target),
            "X-Threshold": f"{trained.threshold:.6f}",
            "X-Reason": header_value(decision.reason),
            "X-Notes": header_value(_notes(meta)),
            "X-Gate": header_value(gate_status),
        }
        return Response(explanation.png, media_type="image/png", headers=headers)

    app.include_router(guarded)
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
    allowed_hosts: Sequence[str] = (),
    root_path: str = "",
    ssl_keyfile: str | None = None,
    ssl_certfile: str | None = None,
    metrics: bool = True,
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
        allowed_hosts: ``Host`` names to answer besides this machine's own (which a loopback `host` always answers);
            none on a `host` beyond loopback: any name.
        root_path: The path prefix a reverse proxy strips before forwarding (uvicorn's ``--root-path``).
        ssl_keyfile: TLS private key (PEM), with `ssl_certfile`: uvicorn serves HTTPS itself.
        ssl_certfile: TLS certificate chain (PEM).
        metrics: Serve ``/metrics`` and record what it shows (see `create_app`).

    Raises:
        PneumolabError: `host` is not a loopback address and there is no API key, or only one TLS file is given,
            before any model is loaded.
    """
    import uvicorn

    api_key = api_key or os.environ.get("PNEUMOLAB_API_KEY") or None
    check_exposure(host, api_key, allow_unauthenticated_remote=allow_unauthenticated_remote)
    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise SettingError("--ssl-keyfile and --ssl-certfile: give both (the key and its certificate) or neither")
    hosts = allowed_host_names(host, allowed_hosts)
    trained = load_backend(model_path, backend)
    app = create_app(trained, api_key=api_key, max_batch=max_batch, gate=gate, allowed_hosts=hosts, metrics=metrics)
    uvicorn.run(app, host=host, port=port, root_path=root_path, ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile)
