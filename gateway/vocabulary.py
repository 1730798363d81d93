"""The gateway's fixed vocabularies: how a Triton call, a replica, an upload, a deepfake check,
a call of NVIDIA's API, an NVCF asset upload and a webhook delivery attempt ended.

They label the metrics (`gateway.metrics`) and steer the code that produces them, so they live
below both: the clients and `gateway.metrics` import them, and this module imports nothing of
the gateway. The NSFW status words are the models' (`gateway.triton.contract`).
"""

from __future__ import annotations

import enum


class TritonOutcome(str, enum.Enum):
    """How one Triton call ended (the label of gateway_triton_requests_total)."""

    OK = "ok"
    UNAVAILABLE = "unavailable"
    OVERLOADED = "overloaded"  # the queue is full: Triton does not count it as a failure
    QUEUE_TIMEOUT = "queue_timeout"
    DEADLINE = "deadline"
    INVALID = "invalid"
    ERROR = "error"


class FailoverReason(str, enum.Enum):
    """Why a call was retried on another replica (the label of gateway_triton_retries_total)."""

    UNREACHABLE = "unreachable"  # connect failed, refused, reset, or the replica went away
    STOPPING = "stopping"  # the replica is draining or shutting down; it did no work


class ReplicaState(str, enum.Enum):
    """What this gateway knows of a replica (the label of gateway_triton_addresses)."""

    READY = "ready"  # Triton said it is ready at the last probe
    NOT_READY = "not_ready"  # not ready, unreachable, refused a call, or not asked yet


class UploadOutcome(str, enum.Enum):
    """How one PUT attempt ended (the label of gateway_upload_attempts_total)."""

    OK = "ok"
    HTTP_5XX = "http_5xx"
    HTTP_429 = "http_429"
    HTTP_4XX = "http_4xx"
    REDIRECT = "redirect"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    TLS_ERROR = "tls_error"
    ETAG_MISMATCH = "etag_mismatch"  # a 2xx whose ETag is an MD5, but not the bytes' MD5


class UploadVerdict(str, enum.Enum):
    """An upload after all its attempts (the `result` label of gateway_uploads_total)."""

    SUCCESS = "success"
    FAILURE = "failure"


class DeepfakeStatus(str, enum.Enum):
    """The check's outcome (`deepfake_status`); every one but OK and NO_FACE scores 1.0."""

    OK = "ok"
    NO_FACE = "no_face"
    CONTENT_FILTERED = "content_filtered"  # the API declined to judge the image
    TOO_LARGE = "too_large"  # not sent
    TIMEOUT = "timeout"  # the budget ran out
    ERROR = "error"


class ApiOutcome(str, enum.Enum):
    """How one call of an NVIDIA API ended (the label of gateway_deepfake_api_attempts_total)."""

    OK = "ok"
    HTTP_429 = "http_429"
    HTTP_5XX = "http_5xx"
    HTTP_4XX = "http_4xx"
    REDIRECT = "redirect"
    PENDING = "pending"  # NVCF's 202: still running, poll later (not followed up)
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    BAD_RESPONSE = "bad_response"  # an answer outside the documented shape


class AssetResult(str, enum.Enum):
    """How an NVCF asset upload ended (the label of gateway_deepfake_assets_total)."""

    OK = "ok"
    CREATE_FAILED = "create_failed"  # NVIDIA refused or failed to create the asset
    UPLOAD_FAILED = "upload_failed"  # the presigned URL refused or failed the bytes
    TIMEOUT = "timeout"  # the budget ran out on the way


class WebhookOutcome(str, enum.Enum):
    """What one webhook delivery attempt led to (the label of worker_webhook_deliveries_total):
    each attempt counts once, as a retry or as the end of its delivery."""

    DELIVERED = "delivered"  # a 2xx
    RETRY = "retry"  # a connection error, a timeout or any other status: tried again later
    GONE = "gone"  # 410: the receiver wants no more deliveries; never retried
    REFUSED = "refused"  # the URL is no longer allowed, or resolves where the gateway may not go
    EXHAUSTED = "exhausted"  # failed like a retry, with no retry left in the schedule


# The `method` label of gateway_http_requests_total: HTTP's own methods (RFC 9110, and PATCH);
# any other token a client sends, which gunicorn lets through, counts as OTHER_METHOD, so made-up
# methods cannot mint series.
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
OTHER_METHOD = "other"


class JobStatus(str, enum.Enum):
    """Where a job is (its object's `status`; the label of worker_jobs_total)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class IdempotencyOutcome(str, enum.Enum):
    """What an Idempotency-Key did to a request (the label of gateway_idempotency_total)."""

    STORED = "stored"  # a first request's answer was stored
    REPLAYED = "replayed"  # a repeat got the stored answer
    CONFLICT = "conflict"  # a repeat while the first was in flight: 409
    MISMATCH = "mismatch"  # the same key with another body: 422
