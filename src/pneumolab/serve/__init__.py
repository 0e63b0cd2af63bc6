"""A small web service on a trained model: FastAPI app, JSON API and one static page."""

from __future__ import annotations

from pneumolab.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
