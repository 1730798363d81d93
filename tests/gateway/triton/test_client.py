"""The Triton wrapper's pure parts: what a gRPC failure means (failover, outcome, HTTP error)
and the NSFW fail-safe.
(The calls themselves run against the real Triton in test_views/test_generate.py.)"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import urllib3
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from embedded.process import free_port
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    Overloaded,
    QueueTimeout,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.triton.client import TritonGateway
from gateway.triton.contract import read_nsfw
from gateway.triton.failures import TritonFailure, classify
from gateway.vocabulary import FailoverReason, TritonOutcome


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
    reading = read_nsfw(outputs(score, status))  # type: ignore[arg-type]
    assert (reading.score, reading.status) == expected


SERVER_UNAVAILABLE = "the inference server is unavailable; retry later"
MODEL_UNAVAILABLE = "model txt2img is not available; retry later"
AT_CAPACITY = "the inference server is at capacity; retry later"
LATE = "generation did not finish within 5s"


@pytest.mark.parametrize(
    ("status", "message", "failure", "error", "http", "words"),
    [
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", TritonFailure.UNREACHABLE, Unavailable, 503, SERVER_UNAVAILABLE),
        # tritonclient's own failures before any answer carry no status.
        (None, "failed to connect to the server", TritonFailure.UNREACHABLE, Unavailable, 503, SERVER_UNAVAILABLE),
        ("StatusCode.UNAVAILABLE", "Server is stopping", TritonFailure.STOPPING, Unavailable, 503, SERVER_UNAVAILABLE),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", TritonFailure.DEADLINE, UpstreamTimeout, 504, LATE),
        ("StatusCode.CANCELLED", "generation timeout after 3 of 100 steps", TritonFailure.DEADLINE, UpstreamTimeout, 504, LATE),
        ("StatusCode.RESOURCE_EXHAUSTED", "queue full", TritonFailure.OVERLOADED, Overloaded, 429, AT_CAPACITY),
        ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", TritonFailure.OVERLOADED, Overloaded, 429, AT_CAPACITY),
        ("StatusCode.INTERNAL", "Exceeds maximum queue size", TritonFailure.OVERLOADED, Overloaded, 429, AT_CAPACITY),
        # Triton 2.51's own words through an ensemble (queue full, queue timeout).
        ("StatusCode.UNAVAILABLE", "in ensemble 'txt2img', [request id: <id_unknown>] Exceeds maximum queue size", TritonFailure.OVERLOADED, Overloaded, 429, AT_CAPACITY),
        ("StatusCode.UNAVAILABLE", "in ensemble 'txt2img', Request timeout expired", TritonFailure.QUEUE_TIMEOUT, QueueTimeout, 503, "the request waited too long in the inference queue; retry later"),
        ("StatusCode.INVALID_ARGUMENT", "WIDTH must be ...", TritonFailure.INVALID, InvalidRequest, 400, "the model refused the request: WIDTH must be ..."),
        ("StatusCode.NOT_FOUND", "Request for unknown model", TritonFailure.UNLOADED, Unavailable, 503, MODEL_UNAVAILABLE),
        ("StatusCode.INTERNAL", "model 'txt2img' is not ready", TritonFailure.MODEL_NOT_READY, Unavailable, 503, MODEL_UNAVAILABLE),
        ("StatusCode.INTERNAL", "generation failed: boom", TritonFailure.ERROR, UpstreamError, 502, "inference failed (StatusCode.INTERNAL)"),
        ("StatusCode.UNKNOWN", "", TritonFailure.ERROR, UpstreamError, 502, "inference failed (StatusCode.UNKNOWN)"),
    ],
)
def test_grpc_failures_are_classified_once_and_map_to_http_never_500(
    status: str | None, message: str, failure: TritonFailure, error: type[GatewayError], http: int,
    words: str,
) -> None:
    exc = InferenceServerException(message, status=status)
    assert classify(exc) is failure
    mapped = failure.error(exc, model="txt2img", deadline_s=5, retry_after_s=7)
    assert type(mapped) is error and mapped.status == http and mapped.message == words
    assert mapped.retry_after == (7 if http in (429, 503) else None)


def test_each_failure_counts_under_the_outcome_of_its_http_error_and_fails_over_as_a_503() -> None:
    """The outcome label follows the error the client gets, and only a replica that is gone or
    stopping (a 503 that names no queue) sends the call to another."""
    outcome_of = {
        Unavailable: TritonOutcome.UNAVAILABLE,
        QueueTimeout: TritonOutcome.QUEUE_TIMEOUT,
        Overloaded: TritonOutcome.OVERLOADED,
        UpstreamTimeout: TritonOutcome.DEADLINE,
        InvalidRequest: TritonOutcome.INVALID,
        UpstreamError: TritonOutcome.ERROR,
    }
    exc = InferenceServerException("boom", status="StatusCode.INTERNAL")
    for failure in TritonFailure:
        mapped = failure.error(exc, model="txt2img", deadline_s=5, retry_after_s=7)
        assert failure.outcome is outcome_of[type(mapped)], failure
        if failure.failover is not None:
            assert type(mapped) is Unavailable, failure
    assert {f.failover for f in TritonFailure} == {None, *FailoverReason}


class LiveOnly(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A real gRPC server speaking Triton's protocol, answering liveness only, counting calls."""

    def __init__(self) -> None:
        self.calls = 0

    def ServerLive(self, request: Any, context: Any) -> Any:
        self.calls += 1
        return service_pb2.ServerLiveResponse(live=True)


def test_calls_take_turns_over_every_address_of_the_target() -> None:
    """Several Triton replicas behind one name: each gets calls, not just the first address."""
    port = free_port()
    replicas, servers = [], []
    for host in ("127.0.0.1", "127.0.0.2"):
        replica, server = LiveOnly(), grpc.server(ThreadPoolExecutor(2))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(replica, server)
        assert server.add_insecure_port(f"{host}:{port}") == port
        server.start()
        replicas.append(replica)
        servers.append(server)
    gateway = TritonGateway(
        f"ipv4:127.0.0.1:{port},127.0.0.2:{port}",  # what a DNS name with two records gives
        f"http://127.0.0.1:{free_port()}/metrics",
        model="txt2img",
        nsfw_model="txt2img_nsfw",
        probe_timeout_s=5,
        retry_after_s=1,
        http=urllib3.PoolManager(),
    )
    try:
        for _ in range(20):
            assert gateway.client.is_server_live(client_timeout=5)
    finally:
        gateway.close()
        for server in servers:
            server.stop(None)
    # Both take calls (the split is even once both connections are up, 10 and 10 here).
    calls = [r.calls for r in replicas]
    assert sum(calls) == 20 and min(calls) > 0, calls
