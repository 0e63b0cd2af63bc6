"""The FastAPI app: predict and explain uploaded X-rays with one model loaded once.

Every bad request gets a 4xx JSON ``{"detail": "<one line naming the file>"}``; decoding and inference run in a
bounded thread pool so the event loop keeps serving, and concurrent predictions share model calls (micro-batching).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from pneumolab import CLASSES
from pneumolab.data.io import load_xray
from pneumolab.errors import ImageReadError, PneumolabError
from pneumolab.infer import TrainedModel
from pneumolab.onnx_backend import OnnxModel, load_backend
from pneumolab.serve.batching import MicroBatcher

__all__ = ["ALLOWED_CONTENT_TYPES", "create_app", "serve"]

ALLOWED_CONTENT_TYPES = frozenset(
    {"image/jpeg", "image/jpg", "image/pjpeg", "image/png", "application/dicom", "application/octet-stream", ""}
)
MULTIPART_SLACK = 64 * 1024  # multipart boundaries and part headers around the file itself


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n} bytes"


class _GateMiddleware:
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
    trained: TrainedModel | OnnxModel,
    *,
    max_upload_bytes: int = 32 * 2**20,
    max_pixels: int = 60_000_000,
    api_key: str | None = None,
    workers: int = 2,
    request_timeout_s: float = 60,
    max_batch: int = 16,
    batch_wait_s: float = 0.0,
) -> FastAPI:
    """Build the service around an already loaded model.

    Args:
        trained: The model, loaded once (`pneumolab.infer.load_trained`, or `pneumolab.onnx_backend.load_backend`
            for the ONNX backend, which explains only when it holds the PyTorch model too).
        max_upload_bytes: Largest accepted file; larger bodies get 413.
        max_pixels: Largest accepted image (width x height), checked before decoding.
        api_key: When set, every `/v1/*` request needs the header ``X-API-Key`` equal to it (401 otherwise).
        workers: Threads that decode and run the model.
        request_timeout_s: Inference time limit per request (504 past it).
        max_batch: Most concurrent /v1/predict images run through the model in one call (1: no batching).
        batch_wait_s: How long a lone request waits for others to batch with (0: only those already waiting).
    """
    if workers < 1:
        raise PneumolabError(f"workers: must be at least 1, got {workers}")
    views = tuple(trained.tta) or ("identity",)
    # Grad-CAM needs the PyTorch graph; the ONNX backend has it when it was loaded from PyTorch weights
    gradcam_model = trained.pytorch if isinstance(trained, OnnxModel) else trained
    model_lock = threading.Lock()  # Grad-CAM registers hooks on the model: one model call at a time
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pneumolab-serve")

    def _probabilities(images: np.ndarray) -> np.ndarray:
        with model_lock:
            return trained.probabilities(trained.logits(images, views=views))

    batcher = MicroBatcher(_probabilities, pool, max_batch=max_batch, max_wait_s=batch_wait_s)

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
    app.add_middleware(_GateMiddleware, api_key=api_key, max_body=max_upload_bytes + MULTIPART_SLACK)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(error.detail)}, status_code=error.status_code, headers=error.headers)

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

    def _decode(name: str, data: bytes):
        return load_xray(data, size=trained.cache_size, name=name, max_pixels=max_pixels)

    async def _predict(name: str, data: bytes) -> float:
        image = await _in_pool(_decode, name, data)
        return await batcher.probability(image)

    def _explain(name: str, data: bytes):
        from pneumolab.explain import explain_image

        _decode(name, data)  # the upload limits (max_pixels) before explain_image decodes it again
        with model_lock:
            return explain_image(gradcam_model, data, name=name)

    def _label(probability: float) -> str:
        return CLASSES[int(probability >= trained.threshold)]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(_index_html())

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the model is loaded and the server answers."""
        return {"status": "ok", "model": trained.name}

    @app.get("/v1/model")
    async def model_card() -> dict[str, Any]:
        """The model's card (architecture, preprocessing, threshold, TTA views), its backend and batch limit."""
        return {**trained.card(), "backend": trained.backend, "max_batch": max_batch}

    @app.post("/v1/predict")
    async def predict(file: UploadFile | None = File(None)) -> dict[str, Any]:
        """Classify one X-ray (JPEG, PNG or DICOM) as NORMAL or PNEUMONIA."""
        name, data = await _read_upload(file)
        probability = await _limited(name, _predict(name, data))
        return {
            "file": name,
            "label": _label(probability),
            "probability": probability,
            "threshold": trained.threshold,
            "model": trained.name,
        }

    @app.post("/v1/explain", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def explain(file: UploadFile | None = File(None)) -> Response:
        """Grad-CAM for PNEUMONIA beside the film, as a PNG; the label and probability are in headers."""
        name, data = await _read_upload(file)
        if gradcam_model is None:
            detail = f"{name}: Grad-CAM needs the PyTorch weights; this service runs an ONNX file alone"
            raise HTTPException(501, detail + " (serve a run folder or artefact to explain)")
        explanation = await _limited(name, _in_pool(_explain, name, data))
        headers = {
            "X-Label": explanation.label,
            "X-Probability": f"{explanation.probability:.6f}",
            "X-Threshold": f"{trained.threshold:.6f}",
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
) -> None:
    """Load the model once and serve it with uvicorn until interrupted (key from ``PNEUMOLAB_API_KEY`` if unset).

    `backend`: ``pytorch`` or ``onnx`` (onnxruntime; `model_path` may then be an ``.onnx`` file with its card).
    """
    import uvicorn

    api_key = api_key or os.environ.get("PNEUMOLAB_API_KEY") or None
    app = create_app(load_backend(model_path, backend), api_key=api_key, max_batch=max_batch)
    uvicorn.run(app, host=host, port=port)
