"""Prometheus metrics of the service (prometheus-client) at ``/metrics``, and the drift watch's gauges.

`install_metrics(app, model)` adds the route and a small ASGI middleware timing every ``/v1/*`` request, and returns
a `ServiceMetrics` whose `record(decisions)` the service calls with each batch of decisions: requests by status
(answered / refer / refused) and label, histograms of P(PNEUMONIA) and of the gate score, and the rolling drift check
(`pneumolab.site.drift.DriftWatch`) as gauges. Each app has its own registry, so two apps in one process (tests)
do not share counts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from pneumolab.inference.steps import Decision, InferenceModel
from pneumolab.site.drift import DriftWatch

__all__ = ["ServiceMetrics", "install_metrics"]

_PROBABILITY_BUCKETS = tuple(i / 10 for i in range(1, 11))
_GATE_BUCKETS = (-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 5.0, 10.0)


class ServiceMetrics:
    """The service's counters, histograms and drift gauges in their own registry."""

    def __init__(self, model: InferenceModel, *, drift_window: int = 200, drift: DriftWatch | None = None) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.decisions = Counter(
            "pneumolab_decisions", "Films decided, by status and label.", ["status", "label"], registry=registry
        )
        self.probability = Histogram(
            "pneumolab_probability_pneumonia",
            "P(PNEUMONIA) of the films not refused.",
            buckets=_PROBABILITY_BUCKETS,
            registry=registry,
        )
        self.gate_score = Histogram(
            "pneumolab_gate_score",
            "The input gate's score of every scored film.",
            buckets=_GATE_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "pneumolab_request_seconds", "Latency of /v1 requests.", ["endpoint"], registry=registry
        )
        self.drift_p = Gauge(
            "pneumolab_drift_p_value", "Drift tests' p-values over the window.", ["test"], registry=registry
        )
        self.drift_prevalence = Gauge(
            "pneumolab_drift_prevalence", "P(PNEUMONIA) the window implies.", ["method"], registry=registry
        )
        self.drift_shifted = Gauge(
            "pneumolab_drift_shifted", "1 when the last drift check said shifted.", registry=registry
        )
        self.drift_films = Gauge("pneumolab_drift_window_films", "Films in the drift window.", registry=registry)
        self.drift = drift or DriftWatch(model, window=drift_window)

    def record(self, decisions: Sequence[Decision]) -> None:
        """Count a batch of decisions and feed the drift watch."""
        for decision in decisions:
            self.decisions.labels(decision.status, decision.label or "none").inc()
            if decision.probability is not None:
                self.probability.observe(decision.probability)
            if decision.gate_score is not None:
                self.gate_score.observe(decision.gate_score)
        report = self.drift.observe(decisions)
        self.drift_films.set(self.drift.films)
        if report is not None:
            for name, facts in report["tests"].items():
                self.drift_p.labels(name).set(facts["p_value"])
            for method in ("em", "bbse"):
                self.drift_prevalence.labels(method).set(report["prevalence"][method]["estimate"])
            self.drift_shifted.set(float(report["verdict"]["shifted"]))

    def facts(self) -> dict[str, Any]:
        """The drift watch's facts for ``/v1/model``."""
        return self.drift.facts()


class _Timer:
    """ASGI middleware: the latency of every ``/v1/*`` request into the histogram (a plain ASGI wrapper, cheaper
    than Starlette's BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)


def install_metrics(
    app: FastAPI, model: InferenceModel, *, drift_window: int = 200, dependencies: Sequence[Any] = ()
) -> ServiceMetrics:
    """Add ``/metrics`` and the request timer to `app`; the service calls the returned object's `record`.

    `dependencies`: what guards ``/metrics`` (the API key's, when the service has one: the counts and the drift
    say how a site uses the model).
    """
    metrics = ServiceMetrics(model, drift_window=drift_window)
    app.add_middleware(_Timer, metrics=metrics)

    @app.get("/metrics", include_in_schema=False, dependencies=list(dependencies))
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
