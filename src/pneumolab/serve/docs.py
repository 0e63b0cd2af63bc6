"""The API's reference page, drawn on the server from the OpenAPI schema: plain HTML, no script, nothing fetched from
outside (FastAPI's Swagger UI loads its code from a CDN, so it is off)."""

from __future__ import annotations

from html import escape
from typing import Any

__all__ = ["docs_html"]

_STYLE = "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}code{font-size:1rem}"


def _parameters(operation: dict[str, Any]) -> str:
    names = [f"{p['name']} ({p['in']})" for p in operation.get("parameters", [])]
    content = operation.get("requestBody", {}).get("content", {})
    names += [f"body: {kind}" for kind in content]
    return ", ".join(names)


def docs_html(schema: dict[str, Any]) -> str:
    """Each operation's method, path, parameters, answers and description, and a link to the schema itself."""
    rows = []
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            answers = ", ".join(sorted(operation.get("responses", {})))
            rows.append(
                f"<h2><code>{escape(method.upper())} {escape(path)}</code></h2>"
                f"<p><b>{escape(operation.get('summary', ''))}</b></p>"
                f"<p>{escape(operation.get('description', ''))}</p>"
                f"<p>Parameters: {escape(_parameters(operation)) or 'none'}. Answers: {escape(answers)}.</p>"
            )
    info = schema.get("info", {})
    title = escape(f"{info.get('title', 'API')} {info.get('version', '')}".strip())
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{title}</h1><p>{escape(info.get('summary', ''))} "
        f'The machine-readable schema: <a href="openapi.json">openapi.json</a>.</p>{"".join(rows)}</body></html>'
    )
