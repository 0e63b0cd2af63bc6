"""Helpers for the service tests: a tiny untrained model and a real uvicorn server in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn

from pneumolab.data.preprocess import Preprocessing
from pneumolab.inference.pytorch import TrainedModel
from pneumolab.models import create_model


def tiny_trained(name: str = "resnet18", size: int = 64) -> TrainedModel:
    """Random weights, no training: fast, deterministic, and the real inference path."""
    torch.manual_seed(0)
    model = create_model(name, weights="none", head="linear")
    spec = model.spec
    return TrainedModel(
        model=model,
        name=name,
        preprocessing=Preprocessing(
            image_size=size, crop_fraction=1.0, normalize=(spec.gray_mean, spec.gray_std), cache_size=size
        ),
        weights_source="random",
        source=Path("."),
        device=torch.device("cpu"),
    )


@contextmanager
def running_server(app, *, root_path: str = "") -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 (a free port) in a thread; yield its base URL; shut it down after.

    `root_path` is uvicorn's ``--root-path``: the prefix a reverse proxy strips before forwarding.
    """
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", root_path=root_path)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
