"""`/metrics` scraped from a real server by Prometheus' own parser, and the drift watch's gauges."""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace

import httpx
import numpy as np
from PIL import Image
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pneumolab.inference.steps import Decision
from pneumolab.referral import ReferralBand
from pneumolab.serve.app import create_app
from pneumolab.serve.metrics import ServiceMetrics
from pneumolab.site.drift import DriftWatch
from pneumolab.site.films import FilmScores
from tests.serve import running_server, tiny_trained


def _samples(text: str) -> dict[str, list]:
    """Every sample by name, as Prometheus' text parser reads the page."""
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((70, 80)) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_real_server_counts_decisions_probabilities_and_latency_at_metrics():
    app = create_app(tiny_trained(), workers=1)
    with running_server(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        labels = []
        for seed in range(3):
            response = client.post("/v1/predict", files={"file": (f"f{seed}.png", _png(seed), "image/png")})
            assert response.status_code == 200, response.text
            labels.append(response.json()["label"])
        page = client.get("/metrics")
        drift = client.get("/v1/model").json()["drift"]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    samples = _samples(page.text)
    counted = {(s.labels["status"], s.labels["label"]): s.value for s in samples["pneumolab_decisions_total"]}
    assert sum(counted.values()) == 3
    assert all(counted.get(("answered", label)) for label in labels)
    assert [s.value for s in samples["pneumolab_probability_pneumonia_count"]] == [3.0]
    latency = {s.labels["endpoint"]: s.value for s in samples["pneumolab_request_seconds_count"]}
    assert latency["/v1/predict"] == 3.0
    assert drift["status"].startswith("off: ") and "reference" in drift["status"]  # a model with no reference


def _reference() -> FilmScores:
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.7).astype(int)
    p = 1 / (1 + np.exp(-rng.normal(3 * labels - 1.5, 1.0)))
    gate = rng.normal(0, 1, 400)
    return FilmScores(p, np.zeros(400), gate, np.zeros(400, bool), np.empty((400, 0), np.float32), labels)


def test_the_drift_gauges_follow_a_shifted_window_and_log_one_line(caplog):
    reference = _reference()
    model = SimpleNamespace(threshold=0.5, band=ReferralBand(0.05).fit(reference.labels, reference.probabilities, 0.5))
    watch = DriftWatch(model, reference, window=80, every=20, min_films=60)
    metrics = ServiceMetrics(model, drift=watch)
    rng = np.random.default_rng(1)
    same = [
        Decision("answered", "PNEUMONIA", float(p), "", float(g))
        for p, g in zip(rng.choice(reference.probabilities, 80), rng.normal(0, 1, 80), strict=True)
    ]
    metrics.record(same)
    samples = _samples(generate_latest(metrics.registry).decode())
    assert samples["pneumolab_drift_shifted"][0].value == 0.0 and samples["pneumolab_drift_window_films"][0].value == 80
    shifted = [
        Decision("answered", "PNEUMONIA", float(p), "", float(g))
        for p, g in zip(rng.uniform(0.4, 0.6, 80), rng.normal(2.5, 1, 80), strict=True)
    ]
    with caplog.at_level(logging.WARNING, logger="pneumolab.drift"):
        metrics.record(shifted)
    samples = _samples(generate_latest(metrics.registry).decode())
    assert samples["pneumolab_drift_shifted"][0].value == 1.0
    p_values = {s.labels["test"]: s.value for s in samples["pneumolab_drift_p_value"]}
    assert set(p_values) == {"gate_score", "output"} and p_values["gate_score"] < 1e-6
    assert {s.labels["method"] for s in samples["pneumolab_drift_prevalence"]} == {"em", "bbse"}
    assert [r.getMessage() for r in caplog.records if "crossed its limit" in r.getMessage()]
    assert watch.facts()["verdict"]["kind"] == "films differ"
    json.dumps(watch.facts(), allow_nan=False)  # what /v1/model serves: strict JSON


def test_metrics_need_the_key_when_the_service_has_one():
    app = create_app(tiny_trained(), workers=1, api_key="s3cret")
    with running_server(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/metrics").status_code == 401
        scraped = client.get("/metrics", headers={"X-API-Key": "s3cret"})
        assert scraped.status_code == 200
        assert any(f.name.startswith("pneumolab") for f in text_string_to_metric_families(scraped.text))


def test_a_service_without_metrics_has_no_route_and_still_answers():
    app = create_app(tiny_trained(), workers=1, metrics=False)
    with running_server(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/metrics").status_code == 404
        answer = client.post("/v1/predict", files={"file": ("film.png", _png(3), "image/png")})
        assert answer.status_code in (200, 422), answer.text  # answered or refused by the gate, never an error
        assert client.get("/v1/model").json()["drift"] is None
