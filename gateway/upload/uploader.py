"""PUT the JPEG to the presigned URL, with the spec's retry schedule.

Each attempt opens its own connection and writes the request line itself: urllib3's pools
re-encode the target (upper-casing `%2b`, for one) and a signature covers the exact bytes.
The connection goes to an address `gateway.upload.egress` checked, never to a fresh DNS answer,
while the Host header, TLS SNI and certificate check stay bound to the URL's host name. Redirects
are never followed (the allowlist vetted this host, not the one a 3xx names).

Each attempt has a deadline, and all of them together a budget. Socket timeouts bound one read
or write each, so storage that trickles a byte at a time would hold the attempt (a thread and
an in-flight slot) for as long as it liked: a timer (`gateway.upload.egress.Deadline`, which
webhook deliveries share) shuts the attempt's socket down when its time is up, which ends any
read, write or TLS handshake at once; at most one timer per upload in flight.
"""

from __future__ import annotations

import http.client
import logging
import re
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import urllib3
from urllib3.connection import HTTPConnection

from gateway.metrics import NULL_METRICS, Recorder
from gateway.retry import RetryPolicy
from gateway.upload.egress import Deadline, PinnedUrl, connect
from gateway.vocabulary import UploadOutcome, UploadVerdict

log = logging.getLogger(__name__)

_USER_AGENT = "imagegen-gateway/0.1"
_MD5_ETAG = re.compile(r'(?:W/)?"?([0-9a-fA-F]{32})"?')
_S3_ERROR_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")
_MAX_ERROR_BODY = 4096


@dataclass(frozen=True)
class Attempt:
    number: int
    outcome: UploadOutcome
    status: int | None = None
    error_code: str | None = None  # S3's <Code>, e.g. SignatureDoesNotMatch
    retryable: bool = False

    @property
    def ok(self) -> bool:
        return self.outcome is UploadOutcome.OK

    def describe(self) -> str:
        if self.status is None:
            return self.outcome.value.replace("_", " ")
        text = f"HTTP {self.status}"
        if self.error_code:
            text += f" {self.error_code}"
        if self.outcome is UploadOutcome.ETAG_MISMATCH:
            text += " with an ETag that is not the MD5 of the bytes sent"
        return text


@dataclass(frozen=True)
class UploadResult:
    attempts: tuple[Attempt, ...]

    @property
    def ok(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].ok

    @property
    def status(self) -> int | None:
        """The last HTTP status storage answered with; None when no response ever came."""
        statuses = [a.status for a in self.attempts if a.status is not None]
        return statuses[-1] if statuses else None

    @property
    def verdict(self) -> UploadVerdict:
        return UploadVerdict.SUCCESS if self.ok else UploadVerdict.FAILURE

    @property
    def status_class(self) -> str:
        """`2xx`..`5xx` for the last status, `none` when storage never answered (for metrics)."""
        status = self.status
        return f"{status // 100}xx" if status is not None else "none"

    def describe(self) -> str:
        last = self.attempts[-1]
        tries = len(self.attempts)
        return f"upload failed after {tries} attempt{'s' if tries > 1 else ''}: {last.describe()}"


class Uploader:
    def __init__(
        self,
        *,
        policy: RetryPolicy,
        timeout_s: float,
        budget_s: float | None = None,
        headers: Sequence[tuple[str, str]] = (),
        ssl_context: ssl.SSLContext | None = None,
        metrics: Recorder = NULL_METRICS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`timeout_s` is each attempt's deadline, connect to response; `budget_s`, when given,
        bounds all attempts and the waits between them."""
        self.policy = policy
        self.timeout_s = timeout_s
        self.budget_s = budget_s
        self.headers = {"User-Agent": _USER_AGENT, **dict(headers)}
        self.ssl_context = ssl_context
        self.metrics = metrics
        self._sleep = sleep

    def put(
        self, target: PinnedUrl, body: bytes, md5_hex: str, budget_s: float | None = None
    ) -> UploadResult:
        """PUT `body`, retried per the policy, never past `budget_s` (default: the uploader's
        budget) from now; storage's ETag, when an MD5, must be `md5_hex`."""
        if not isinstance(target, PinnedUrl):  # a caller past the type checker connects nowhere
            raise TypeError("the upload target has no checked address: pin() it first")
        attempts: list[Attempt] = []
        budget_s = self.budget_s if budget_s is None else budget_s
        ends = None if budget_s is None else time.monotonic() + budget_s

        def attempt() -> Attempt:
            seconds = self.timeout_s if ends is None else min(self.timeout_s, ends - time.monotonic())
            result = self._attempt(target, body, md5_hex, len(attempts) + 1, seconds)
            attempts.append(result)
            self.metrics.upload_attempted(result.outcome, retry=result.number > 1)
            if not result.ok:
                # Host and path only: the query string carries the signature.
                log.warning(
                    "upload attempt %d/%d to %s: %s%s",
                    result.number,
                    self.policy.max_attempts,
                    target.redacted,
                    result.describe(),
                    f"; retrying in {self.policy.delay_after(result.number):g}s"
                    if result.retryable and result.number < self.policy.max_attempts
                    else "",
                )
            return result

        self.policy.retrying(lambda attempt: attempt.retryable, self._sleep, budget_s)(attempt)
        outcome = UploadResult(tuple(attempts))
        self.metrics.upload_finished(outcome.verdict, outcome.status_class)
        return outcome

    def _attempt(
        self, target: PinnedUrl, body: bytes, md5_hex: str, number: int, seconds: float
    ) -> Attempt:
        if seconds <= 0:  # the budget is spent: no attempt is started that could not finish
            return Attempt(number, UploadOutcome.TIMEOUT)
        with Deadline(seconds) as deadline:
            result = self._request(target, body, md5_hex, number, deadline)
            if deadline.expired:
                # Whatever the shut socket made of the answer (an error, or headers cut short
                # that http.client takes for complete ones), it was the deadline.
                return Attempt(number, UploadOutcome.TIMEOUT, retryable=True)
        return result

    def _request(
        self, target: PinnedUrl, body: bytes, md5_hex: str, number: int, deadline: Deadline
    ) -> Attempt:
        conn: HTTPConnection | None = None
        try:
            conn = connect(target, deadline, self.ssl_context)
            conn.request(
                "PUT",
                target.request_target,
                body=body,
                headers={"Host": target.host_header, **self.headers},
                preload_content=False,
                decode_content=False,
            )
            response = conn.getresponse()
            status = response.status
            # Bounded: only the error code is wanted, and a hostile server may stream forever.
            head = response.read(_MAX_ERROR_BODY) if status >= 300 else b""
            etag = response.headers.get("ETag")
        except ssl.SSLCertVerificationError:
            return Attempt(number, UploadOutcome.TLS_ERROR)
        except (TimeoutError, urllib3.exceptions.TimeoutError) as exc:
            if isinstance(exc, urllib3.exceptions.NewConnectionError):
                return Attempt(number, UploadOutcome.CONNECTION_ERROR, retryable=True)
            return Attempt(number, UploadOutcome.TIMEOUT, retryable=True)
        except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError):
            return Attempt(number, UploadOutcome.CONNECTION_ERROR, retryable=True)
        finally:
            if conn is not None:
                conn.close()

        code_match = _S3_ERROR_CODE.search(head)
        error_code = code_match.group(1).decode() if code_match else None
        if 200 <= status < 300:
            etag_md5 = _MD5_ETAG.fullmatch(etag.strip()) if etag else None
            if etag_md5 and etag_md5.group(1).lower() != md5_hex:
                return Attempt(number, UploadOutcome.ETAG_MISMATCH, status, retryable=True)
            return Attempt(number, UploadOutcome.OK, status)
        if 300 <= status < 400:
            return Attempt(number, UploadOutcome.REDIRECT, status, error_code)
        if status in self.policy.retry_statuses:
            return Attempt(number, _status_outcome(status), status, error_code, retryable=True)
        return Attempt(number, _status_outcome(status), status, error_code)


def _status_outcome(status: int) -> UploadOutcome:
    if status == 429:
        return UploadOutcome.HTTP_429
    return UploadOutcome.HTTP_5XX if status >= 500 else UploadOutcome.HTTP_4XX
