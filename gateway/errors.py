"""The gateway's exceptions and the handlers that turn every failure into one JSON shape.

`{"error": {"code", "message", "field"?}}`: clients branch on `code`, show `message`, and
`field` names the request field at fault. An `UploadFailed` also carries the `data` block, so a
client whose upload failed still learns the hash, the score and the storage's status.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, jsonify
from gunicorn.http.errors import NoMoreData, ParseException
from werkzeug.exceptions import HTTPException

from gateway.schema import described, to_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorDetail:
    code: str = described(
        "What went wrong, for programs: invalid_request, unauthorized, not_found, "
        "method_not_allowed, payload_too_large, unsupported_media_type, overloaded, "
        "rate_limited (the tenant's requests_per_minute), concurrency_limited (the tenant's "
        "max_concurrent), idempotency_key_in_use, idempotency_key_mismatch, canceled (a job's "
        "error), upload_failed, upstream_error, unavailable, deadline_exceeded, internal_error; "
        "from the front door in front of the gateway also uri_too_long, headers_too_large, "
        "too_many_connections."
    )
    message: str = described("What went wrong, for people.")
    field: str | None = described("The request field at fault.", omit_none=True)


@dataclass(frozen=True)
class ErrorBody:
    """Every error answer."""

    error: ErrorDetail = described("The error.")
    # The use case's own data type (S3Data); the OpenAPI document names it.
    data: Any = described(
        "With upload_failed only: the data block of the response (hash, score, last storage "
        "status).",
        omit_none=True,
    )


class GatewayError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        retry_after: int | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after
        self.data = data

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(self.code, self.message, self.field)
        return to_json(ErrorBody(detail, self.data))  # type: ignore[no-any-return]


class InvalidRequest(GatewayError):
    status, code = 400, "invalid_request"


class Unauthorized(GatewayError):
    """No API key, or not one of the configured keys."""

    status, code = 401, "unauthorized"


class PayloadTooLarge(GatewayError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(GatewayError):
    status, code = 415, "unsupported_media_type"


class Overloaded(GatewayError):
    """Triton's queue, or this process's in-flight bound, is full: retry a little later."""

    status, code = 429, "overloaded"


class RateLimited(Overloaded):
    """The tenant made its requests_per_minute in the last 60 s (every gateway's count)."""

    code = "rate_limited"


class ConcurrencyLimited(Overloaded):
    """The tenant has max_concurrent generations in flight already (every gateway's and job
    worker's)."""

    code = "concurrency_limited"


class Unavailable(GatewayError):
    """Triton (or the model) cannot be reached or is not ready."""

    status, code = 503, "unavailable"


class QueueTimeout(Unavailable):
    """The request waited past Triton's queue timeout and never ran."""


class UpstreamError(GatewayError):
    status, code = 502, "upstream_error"


class UpstreamTimeout(GatewayError):
    status, code = 504, "deadline_exceeded"


class UploadFailed(GatewayError):
    status, code = 502, "upload_failed"


class NotFound(GatewayError):
    status, code = 404, "not_found"


class Canceled(GatewayError):
    """A job's generation was canceled by its owner (the job ends `canceled`)."""

    status, code = 409, "canceled"


# Werkzeug's own errors (unknown route, wrong method, body over MAX_CONTENT_LENGTH...) get codes
# in the same vocabulary as ours.
_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(error: GatewayError) -> Response:
    response = jsonify(error.body())
    response.status_code = error.status
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthorized):
        response.headers["WWW-Authenticate"] = 'Bearer realm="imagegen"'
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(GatewayError)
    def _gateway_error(error: GatewayError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        # Werkzeug's descriptions are fixed texts, never echoes of the request.
        code = _HTTP_CODES.get(status, f"http_{status}")
        detail = ErrorDetail(code, error.description or error.name, None)
        response = jsonify(to_json(ErrorBody(detail, None)))
        response.status_code = status
        if status == 405 and error.get_headers():
            allow = dict(error.get_headers()).get("Allow")
            if allow:
                response.headers["Allow"] = allow
        return response

    @app.errorhandler(ParseException)
    @app.errorhandler(NoMoreData)
    def _unreadable_body(_error: Exception) -> Response:
        # gunicorn parses a chunked body only as the view reads it, so a client's broken
        # framing (a chunk size that is not hex, a missing CRLF, a body cut short) surfaces here.
        return error_response(
            InvalidRequest("the request body is malformed: its chunked encoding cannot be read")
        )

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        # A bug, not something the client did; details go to the log, not to the client.
        log.exception("unhandled error")
        detail = ErrorDetail("internal_error", "internal error", None)
        response = jsonify(to_json(ErrorBody(detail, None)))
        response.status_code = 500
        return response
