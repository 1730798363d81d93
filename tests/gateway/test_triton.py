"""The Triton wrapper's pure parts: gRPC failures to HTTP errors and the NSFW fail-safe.
(The calls themselves run against the real Triton in test_views/test_generate.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    Overloaded,
    QueueTimeout,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.triton import TritonGateway, _nsfw


class Outputs:
    """What an InferResult offers the gateway: named arrays, None when absent."""

    def __init__(self, **arrays: np.ndarray) -> None:
        self.arrays = arrays

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.arrays.get(name)


def outputs(score: float | None, status: bytes | None) -> Outputs:
    arrays = {}
    if score is not None:
        arrays["NSFW_SCORE"] = np.array([[score]], dtype=np.float32)
    if status is not None:
        arrays["NSFW_STATUS"] = np.array([[status]], dtype=np.object_)
    return Outputs(**arrays)


@pytest.mark.parametrize(
    ("score", "status", "expected"),
    [
        (0.05, b"ok", (pytest.approx(0.05), "ok")),
        (1.0, b"timeout", (1.0, "timeout")),
        (0.2, b"timeout", (1.0, "timeout")),  # whatever the model sent, a timeout scores 1.0
        (0.2, b"error", (1.0, "error")),
        (None, b"ok", (1.0, "error")),  # score missing
        (0.2, None, (1.0, "error")),  # status missing
        (0.2, b"weird", (1.0, "error")),
        (float("nan"), b"ok", (1.0, "error")),
        (1.5, b"ok", (1.0, "error")),
    ],
)
def test_nsfw_fail_safe(score: float | None, status: bytes | None, expected: tuple) -> None:
    assert _nsfw(outputs(score, status)) == expected  # type: ignore[arg-type]


@pytest.fixture
def gateway() -> TritonGateway:
    import urllib3

    gw = TritonGateway(
        "127.0.0.1:1", "http://127.0.0.1:1/metrics", model="txt2img", nsfw_model="txt2img_nsfw",
        probe_timeout_s=1, retry_after_s=7, http=urllib3.PoolManager(),
    )
    yield gw
    gw.close()


@pytest.mark.parametrize(
    ("status", "message", "error", "http"),
    [
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", Unavailable, 503),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", UpstreamTimeout, 504),
        ("StatusCode.CANCELLED", "generation timeout after 3 of 100 steps", UpstreamTimeout, 504),
        ("StatusCode.RESOURCE_EXHAUSTED", "queue full", Overloaded, 429),
        ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", Overloaded, 429),
        ("StatusCode.INTERNAL", "Exceeds maximum queue size", Overloaded, 429),
        # Triton 2.51's own words through an ensemble (queue full, queue timeout).
        ("StatusCode.UNAVAILABLE", "in ensemble 'txt2img', [request id: <id_unknown>] Exceeds maximum queue size", Overloaded, 429),
        ("StatusCode.UNAVAILABLE", "in ensemble 'txt2img', Request timeout expired", QueueTimeout, 503),
        ("StatusCode.INVALID_ARGUMENT", "WIDTH must be ...", InvalidRequest, 400),
        ("StatusCode.NOT_FOUND", "Request for unknown model", Unavailable, 503),
        ("StatusCode.INTERNAL", "generation failed: boom", UpstreamError, 502),
        ("StatusCode.UNKNOWN", "", UpstreamError, 502),
    ],
)
def test_grpc_failures_map_to_http_never_500(
    gateway: TritonGateway, status: str, message: str, error: type[GatewayError], http: int
) -> None:
    mapped = gateway._map_error(InferenceServerException(message, status=status), "txt2img", 0.1, 5)
    assert type(mapped) is error and mapped.status == http
    if http in (429, 503):
        assert mapped.retry_after == 7
