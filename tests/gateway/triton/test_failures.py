"""What a failed Triton call means (gateway/triton/failures.py): whether another replica may
take it, its outcome label and the HTTP error, from Triton's own words (as measured with
tritonserver 2.51) and gRPC's."""

from __future__ import annotations

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
from gateway.triton.failures import TritonFailure, classify
from gateway.vocabulary import FailoverReason, TritonOutcome

STOPPING = "in ensemble 'txt2img', [request id: <id_unknown>] Server is stopping, scheduler for model has stopped accepting new inference requests"
UNLOADED = "Request for unknown model: 'txt2img' has no available versions"
REFUSED = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.2:8001: Failed to connect to remote host: Connection refused"
GOAWAY = "Stream removed (Socket closed (GOAWAY received; Error code: 0; Debug Text: ))"


@pytest.mark.parametrize(
    ("status", "message", "reason"),
    [
        ("StatusCode.UNAVAILABLE", REFUSED, FailoverReason.UNREACHABLE),
        ("StatusCode.UNAVAILABLE", "Socket closed", FailoverReason.UNREACHABLE),
        ("StatusCode.UNAVAILABLE", GOAWAY, FailoverReason.UNREACHABLE),
        ("StatusCode.UNAVAILABLE", STOPPING, FailoverReason.STOPPING),
        ("StatusCode.UNAVAILABLE", "Server exiting", FailoverReason.STOPPING),
        ("StatusCode.NOT_FOUND", UNLOADED, FailoverReason.STOPPING),
        # Never: the queue (load, not a lost replica), the model, the deadline.
        ("StatusCode.UNAVAILABLE", "in ensemble 'txt2img', [request id: <id_unknown>] Exceeds maximum queue size", None),
        ("StatusCode.UNAVAILABLE", "in ensemble 'txt2img', Request timeout expired", None),
        ("StatusCode.RESOURCE_EXHAUSTED", "queue full", None),
        ("StatusCode.INVALID_ARGUMENT", "in ensemble 'txt2img', WIDTH must be a multiple of 8 in 64..2048, got 60", None),
        ("StatusCode.INTERNAL", "generation failed: boom", None),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", None),
        ("StatusCode.CANCELLED", "generation timeout after 3 of 100 steps", None),
    ],
)
def test_which_failures_are_retried(status: str, message: str, reason: FailoverReason | None) -> None:
    assert classify(InferenceServerException(message, status=status)).failover is reason


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
