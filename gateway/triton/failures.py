"""What a failed Triton call means, read once from tritonclient's exception.

tritonclient turns every gRPC error into an `InferenceServerException` holding a status (the
gRPC code's name) and Triton's message. `classify` reads the two once, into one `TritonFailure`;
each kind carries all that follows from it: whether another replica may take the call (and
why), the outcome label of the metrics, and the HTTP error the client gets. (urllib3 keeps its
exceptions semantic the same way and maps them at the edge.)

Failed over (`gateway.triton.client` retries once on another ready replica): a call whose
replica never worked on it, or went away while it did. The replica was unreachable, refused or
reset the connection (gRPC `UNAVAILABLE` from the transport), or is stopping (Triton's "Server
is stopping"/"Server exiting", or the ensemble already unloaded by a drain: `NOT_FOUND` "has no
available versions"). That is safe because a generation has no side effect before the gateway
uploads it (and the retried call's image is uploaded under its own content hash). Never failed
over: a refusal by the model (`INVALID_ARGUMENT`: the same request fails anywhere), a model
error (it ran, and may fail again; the work is not doubled), a full queue or a queue timeout
(the replicas are saturated: a retry would add load exactly when the client should back off,
so the 429/503 and its Retry-After go back), and a deadline (no time left).
"""

from __future__ import annotations

import enum

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
from gateway.vocabulary import FailoverReason, TritonOutcome

# Triton 2.51's words (gRPC UNAVAILABLE all): a full queue, an expired queue wait, and a server
# that got SIGTERM ("Server exiting" to health calls, "Server is stopping" to inference).
_QUEUE_FULL = "Exceeds maximum queue size"
_QUEUE_TIMEOUT = "Request timeout expired"
_STOPPING = ("Server is stopping", "Server exiting", "has no available versions")

# The errors that tell the client to come back: they carry Retry-After.
_RETRY_LATER = (Overloaded, Unavailable)

_SERVER_UNAVAILABLE = "the inference server is unavailable; retry later"
_MODEL_UNAVAILABLE = "model {model} is not available; retry later"


@enum.unique
class TritonFailure(enum.Enum):
    """A failed Triton call: (outcome label, why it fails over or None, HTTP error, its
    message; `{model}`, `{deadline_s}`, `{status}` and `{message}` name the call)."""

    OVERLOADED = (
        TritonOutcome.OVERLOADED, None, Overloaded,
        "the inference server is at capacity; retry later",
    )
    # The queue policy's REJECT: the request waited past its queue timeout, never ran.
    QUEUE_TIMEOUT = (
        TritonOutcome.QUEUE_TIMEOUT, None, QueueTimeout,
        "the request waited too long in the inference queue; retry later",
    )
    # The ensemble is not served there (now): unloaded by a drain.
    UNLOADED = (TritonOutcome.UNAVAILABLE, FailoverReason.STOPPING, Unavailable, _MODEL_UNAVAILABLE)
    STOPPING = (TritonOutcome.UNAVAILABLE, FailoverReason.STOPPING, Unavailable, _SERVER_UNAVAILABLE)
    UNREACHABLE = (
        TritonOutcome.UNAVAILABLE, FailoverReason.UNREACHABLE, Unavailable, _SERVER_UNAVAILABLE
    )
    DEADLINE = (
        TritonOutcome.DEADLINE, None, UpstreamTimeout,
        "generation did not finish within {deadline_s:g}s",
    )
    INVALID = (
        TritonOutcome.INVALID, None, InvalidRequest, "the model refused the request: {message}"
    )
    MODEL_NOT_READY = (TritonOutcome.UNAVAILABLE, None, Unavailable, _MODEL_UNAVAILABLE)
    ERROR = (TritonOutcome.ERROR, None, UpstreamError, "inference failed ({status})")

    def __init__(
        self,
        outcome: TritonOutcome,
        failover: FailoverReason | None,
        error: type[GatewayError],
        message: str,
    ) -> None:
        self.outcome = outcome
        self.failover = failover  # None: the answer goes back, no other replica is asked
        self._error = error
        self._message = message

    def error(
        self, exc: InferenceServerException, *, model: str, deadline_s: float, retry_after_s: int
    ) -> GatewayError:
        """The HTTP error the client gets for `exc` (which this member classified)."""
        message = self._message.format(
            model=model,
            deadline_s=deadline_s,
            status=str(exc.status() or "error"),
            message=str(exc.message() or ""),
        )
        retry_after = retry_after_s if issubclass(self._error, _RETRY_LATER) else None
        return self._error(message, retry_after=retry_after)


def classify(exc: InferenceServerException) -> TritonFailure:
    """What `exc`, the failure of one Triton call, means (module docstring)."""
    status = str(exc.status() or "")
    message = str(exc.message() or "")
    # Triton rejects a full queue with UNAVAILABLE too; its message tells the two apart.
    if "RESOURCE_EXHAUSTED" in status or _QUEUE_FULL in message:
        return TritonFailure.OVERLOADED
    if _QUEUE_TIMEOUT in message:
        return TritonFailure.QUEUE_TIMEOUT
    if "NOT_FOUND" in status:
        return TritonFailure.UNLOADED
    if any(words in message for words in _STOPPING):
        return TritonFailure.STOPPING
    if "UNAVAILABLE" in status or not status and "connect" in message.lower():
        return TritonFailure.UNREACHABLE
    # The diffusion model's own stop on `timeout_ms` comes back as CANCELLED.
    if "DEADLINE_EXCEEDED" in status or "CANCELLED" in status and "timeout" in message:
        return TritonFailure.DEADLINE
    if "INVALID_ARGUMENT" in status:
        return TritonFailure.INVALID
    if "is not ready" in message or "unknown model" in message:
        return TritonFailure.MODEL_NOT_READY
    return TritonFailure.ERROR
