"""Prometheus metrics of one app, in its own CollectorRegistry (so several apps, e.g. in tests, do not clash)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests by route and outcome, latency, queue time and compute time, batch sizes, queue depth."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("stn_requests", "HTTP requests by route template, method and status code",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("stn_request_duration_seconds", "HTTP request latency (whole request)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("stn_queue_time_seconds", "Time an image waited for its localisation batch",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_time = Histogram("stn_compute_time_seconds",
                                      "Compute time by stage: prepare (decode+resize), localise (per batch), "
                                      "rectify (sample+encode, per image)",
                                      ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("stn_batch_size", "Images per localisation batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("stn_queue_depth", "Images admitted and not finished (decoding, queued, computing)",
                                 ["model"], registry=r)
        self.memory_reserved = Gauge("stn_memory_reserved_bytes", "Estimated bytes of all admitted requests "
                                     "(STN_MEMORY_BUDGET_MB bounds it)", registry=r)
        self.images = Counter("stn_images", "Images rectified", ["model"], registry=r)
        self.ready = Gauge("stn_ready", "1 when the service is ready", registry=r)
        self.connections_closed = Counter("stn_connections_closed", "Connections the server ended: head_timeout (no "
                                          "complete request head in STN_HEAD_TIMEOUT_S), evicted (the oldest waiting "
                                          "for a head, to make room under STN_MAX_CONNECTIONS), refused (no room), small_pieces (a body "
                                          "in pieces too small on average: 400)",
                                          ["reason"], registry=r)

    def observe_batch(self, model: str, size: int, queue_seconds: Sequence[float], compute_seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        h = self.queue_time.labels(model)
        for q in queue_seconds:
            h.observe(q)
        self.compute_time.labels(model, "localise").observe(compute_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware counting requests by route template and status, and timing them."""

    def __init__(self, app, metrics: Metrics) -> None:  # noqa: ANN001 (ASGI app)
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message) -> None:  # noqa: ANN001
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")  # Starlette's; or the front door's template (service.api.frontdoor.ROUTE_KEY)
            template = getattr(route, "path", None) or scope.get("stn.route") or "unmatched"
            self.metrics.requests.labels(template, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - start)
