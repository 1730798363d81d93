"""The gateway's Prometheus metrics.

Labels hold only small fixed vocabularies (endpoint names, status codes, outcome words): never a
URL, a signature, a prompt or a key, which would both leak secrets and explode cardinality.
Each app owns a registry, so several apps (tests) can live in one process; under gunicorn with
several workers the counters go through prometheus_client's multi-process files instead.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._multiprocess_dir = multiprocess_dir
        self.http_requests = Counter(
            "gateway_http_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "gateway_http_request_duration_seconds",
            "Time to answer an HTTP request, by endpoint.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_latency = Histogram(
            "gateway_generate_stage_duration_seconds",
            "Time spent in each stage of /generate (triton, encode, upload).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.triton_requests = Counter(
            "gateway_triton_requests",
            "Triton inference calls, by model and outcome (ok, unavailable, overloaded, "
            "queue_timeout, deadline, invalid, error).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.upload_attempts = Counter(
            "gateway_upload_attempts",
            "PUT attempts to storage, by outcome (ok, http_5xx, http_429, http_4xx, redirect, "
            "timeout, connection_error, tls_error, etag_mismatch).",
            ["outcome"],
            registry=self.registry,
        )
        self.uploads = Counter(
            "gateway_uploads",
            "Uploads after all retries, by result (success, failure): the upload failure rate.",
            ["result"],
            registry=self.registry,
        )
        self.nsfw_checks = Counter(
            "gateway_nsfw_checks",
            "NSFW checks, by status (ok, timeout, error); non-ok statuses report score 1.0.",
            ["status"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "gateway_generate_in_flight",
            "/generate requests this process is working on (bounded by GATEWAY_MAX_IN_FLIGHT).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )

    def render(self) -> bytes:
        if self._multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self._multiprocess_dir)
            return generate_latest(registry)
        return generate_latest(self.registry)
