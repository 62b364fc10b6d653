"""Prometheus metrics of one worker, served at ``GET /metrics``.

Every name starts with ``mserve_``; ``docs/metrics.md`` lists them. Each worker has its own
registry, so a scrape shows exactly one deployment.
"""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# 100 µs .. 10 s, roughly ×2.5 a step.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, deployment: str):
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry, namespace="mserve")
        self.requests = Counter(
            "mserve_requests", "Inference requests by version, outcome and HTTP status (499: cancelled by the client).",
            ["version", "outcome", "code"], registry=registry)
        self.latency = Histogram(
            "mserve_request_duration_seconds", "Inference request latency, body read to answer.",
            ["version"], buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_time = Histogram(
            "mserve_queue_duration_seconds", "Time a request waited before its model run began.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.inference_time = Histogram(
            "mserve_inference_duration_seconds", "Duration of one session.run (one batch).",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram(
            "mserve_batch_size", "Requests combined into one model run.",
            buckets=BATCH_BUCKETS, registry=registry)
        self.inline_runs = Counter(
            "mserve_inline_runs", "Model runs made on the event loop for a lone request "
            "(no thread hand-off).", registry=registry)
        self.queue_depth = Gauge(
            "mserve_queue_depth", "Requests waiting for or in a model run.", registry=registry)
        # Changed twice per request on the event loop: a plain int read at scrape time
        # rather than two locked gauge updates.
        self.depth = 0
        self.queue_depth.set_function(lambda: self.depth)
        self.load_time = Gauge(
            "mserve_model_load_seconds", "Time to load and warm up each loaded version.",
            ["version"], registry=registry)
        self.info = Gauge("mserve_deployment_info", "The deployment this worker serves.",
                          ["deployment"], registry=registry)
        self.info.labels(deployment).set(1)
        self._children: dict[tuple[str, int], tuple] = {}

    def observe_request(self, version: str, status: int, seconds: float) -> None:
        key = (version, status)
        children = self._children.get(key)
        if children is None:  # label lookups are slow: one per (version, status), cached
            outcome = "success" if status < 400 else "cancelled" if status == 499 else "failure"
            children = self._children[key] = (self.requests.labels(version, outcome, str(status)),
                                               self.latency.labels(version))
        children[0].inc()
        if status < 400:
            children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
