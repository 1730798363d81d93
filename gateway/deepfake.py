"""NVIDIA's hosted deepfake-image-detection API as a second moderation signal.

One POST per check: `{"input": ["data:image/jpeg;base64,…"], "return_image": false}` with a
bearer key; the answer is `{"data": [{"status", "bounding_boxes": [{"is_deepfake": p, …}]}]}`.
The reference moderation block this replaces read the first face only, reported "no face" and a
failure alike as 0.0, had no timeout and sent whatever it was given. Here:

- the score is the highest `is_deepfake` over all faces; no face is `no_face` with 0.0;
- anything short of a clean answer (a failure, the budget running out, CONTENT_FILTERED, an
  image too large to send inline) scores 1.0, the NSFW check's fail-safe: a score nobody
  measured must not read as clean;
- one budget bounds the whole check, retries on 429 and 5xx with backoff included, and the
  caller never waits longer than that budget;
- the key travels in the Authorization header only: never in a log line, metric or message.
"""

from __future__ import annotations

import base64
import concurrent.futures
import enum
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import urllib3

from gateway.errors import InvalidRequest
from gateway.retry import RetryPolicy
from gateway.settings import PREFIX

if TYPE_CHECKING:  # metrics imports this module for its label words
    from gateway.metrics import Metrics

log = logging.getLogger(__name__)



class DeepfakeStatus(str, enum.Enum):
    """The check's outcome (`deepfake_status`); every one but OK and NO_FACE scores 1.0."""

    OK = "ok"
    NO_FACE = "no_face"
    CONTENT_FILTERED = "content_filtered"  # the API declined to judge the image
    TOO_LARGE = "too_large"  # not sent
    TIMEOUT = "timeout"  # the budget ran out
    ERROR = "error"


class DeepfakeAttemptOutcome(str, enum.Enum):
    """How one call of the API ended (the label of gateway_deepfake_api_attempts_total)."""

    OK = "ok"
    HTTP_429 = "http_429"
    HTTP_5XX = "http_5xx"
    HTTP_4XX = "http_4xx"
    REDIRECT = "redirect"
    PENDING = "pending"  # NVCF's 202: still running, poll later (not followed up)
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    BAD_RESPONSE = "bad_response"  # a 2xx outside the documented shape

# Within the default 10 s budget: 4 attempts, the last starting 3.5 s after the first.
DEFAULT_POLICY = RetryPolicy(backoff=(0.5, 1.0, 2.0))
_USER_AGENT = "imagegen-gateway/0.1"
# With return_image false the answer is a few hundred bytes; a flood is not an answer.
_MAX_RESPONSE_BYTES = 1 << 20


# How the two response fields are documented, on /generate and /moderate alike.
SCORE_DOC = (
    "Highest is_deepfake over all faces (NVIDIA's deepfake detection); 0.0 with no_face; 1.0 "
    "with every other status but ok. Present only when enable_deepfake_check is true."
)
STATUS_DOC = (
    "too_large: not sent (over GATEWAY_DEEPFAKE_MAX_IMAGE_BYTES); timeout: past "
    "GATEWAY_DEEPFAKE_BUDGET_S. Present only when enable_deepfake_check is true."
)


def deepfake_unavailable() -> InvalidRequest:
    """What a request asking for the check gets from a gateway without an API key."""
    return InvalidRequest(
        "enable_deepfake_check is not available: this gateway has no NVIDIA API key "
        f"({PREFIX}NVIDIA_API_KEY)",
        field="enable_deepfake_check",
    )


@dataclass(frozen=True)
class DeepfakeResult:
    score: float  # probability that the image is a deepfake, 1.0 when not measured
    status: DeepfakeStatus

    @classmethod
    def failed(cls, status: DeepfakeStatus) -> DeepfakeResult:
        return cls(1.0, status)


@dataclass(frozen=True)
class _Attempt:
    number: int
    outcome: DeepfakeAttemptOutcome
    result: DeepfakeResult
    http_status: int | None = None
    retryable: bool = False


_Out = DeepfakeAttemptOutcome


def _failed(
    number: int,
    outcome: DeepfakeAttemptOutcome,
    status: DeepfakeStatus,
    http_status: int | None = None,
    retryable: bool = False,
) -> _Attempt:
    return _Attempt(number, outcome, DeepfakeResult.failed(status), http_status, retryable)


class PendingCheck:
    """A check running beside the upload; `result()` waits no longer than the budget allows."""

    def __init__(
        self,
        future: Future[DeepfakeResult],
        started: float,
        deadline: float,
        metrics: Metrics | None,
    ) -> None:
        self._future = future
        self._started = started
        self._deadline = deadline
        self._metrics = metrics

    def result(self) -> DeepfakeResult:
        try:
            result = self._future.result(timeout=max(0.0, self._deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            # The worker stops on the same deadline; the client is not kept waiting for it.
            self._future.cancel()
            result = DeepfakeResult.failed(DeepfakeStatus.TIMEOUT)
        if self._metrics:
            self._metrics.deepfake_checks.labels(result.status.value).inc()
            self._metrics.moderation_latency.labels("deepfake").observe(
                time.monotonic() - self._started
            )
        return result


class DeepfakeClient:
    def __init__(
        self,
        *,
        url: str,
        api_key: str,
        budget_s: float,
        max_image_bytes: int,
        http: urllib3.PoolManager,
        executor: Executor,
        policy: RetryPolicy = DEFAULT_POLICY,
        metrics: Metrics | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url
        self._api_key = api_key
        self.budget_s = budget_s
        self.max_image_bytes = max_image_bytes
        self.http = http
        self.executor = executor
        self.policy = policy
        self.metrics = metrics
        self._sleep = sleep

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.http.clear()

    def start(self, image: bytes, mime: str = "image/jpeg") -> PendingCheck:
        """Start checking `image` (its bytes exactly as stored or received) in the background."""
        started = time.monotonic()
        deadline = started + self.budget_s
        future = self.executor.submit(self._check, image, mime, deadline)
        return PendingCheck(future, started, deadline, self.metrics)

    def _check(self, image: bytes, mime: str, deadline: float) -> DeepfakeResult:
        if len(image) > self.max_image_bytes:
            log.warning(
                "deepfake check skipped: the image is %d bytes, the API takes at most %d inline",
                len(image),
                self.max_image_bytes,
            )
            return DeepfakeResult.failed(DeepfakeStatus.TOO_LARGE)
        data_url = f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"
        body = json.dumps({"input": [data_url], "return_image": False}).encode("ascii")
        attempts: list[_Attempt] = []

        def attempt() -> _Attempt:
            result = self._attempt(body, deadline, len(attempts) + 1)
            attempts.append(result)
            if self.metrics:
                self.metrics.deepfake_attempts.labels(result.outcome.value).inc()
            if result.outcome is not DeepfakeAttemptOutcome.OK:
                log.warning(
                    "deepfake API attempt %d: %s%s",
                    result.number,
                    result.outcome.value
                    if result.http_status is None
                    else f"HTTP {result.http_status}",
                    "; retrying" if result.retryable else "",
                )
            return result

        # Never start a retry that could not finish inside the budget.
        retrying = self.policy.retrying(
            lambda attempt: attempt.retryable, self._sleep, budget_s=deadline - time.monotonic()
        )
        try:
            return retrying(attempt).result
        except Exception:
            # A bug here must cost the check (fail-safe), never the upload or the response.
            log.exception("deepfake check failed")
            return DeepfakeResult.failed(DeepfakeStatus.ERROR)

    def _attempt(self, body: bytes, deadline: float, number: int) -> _Attempt:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return _failed(number, _Out.TIMEOUT, DeepfakeStatus.TIMEOUT)
        try:
            response = self.http.request(
                "POST",
                self.url,
                body=body,
                headers={
                    "Authorization": f"Bearer {self._api_key}",
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                    "User-Agent": _USER_AGENT,
                },
                timeout=urllib3.Timeout(total=remaining),
                retries=False,
                redirect=False,
                preload_content=False,
            )
            try:
                raw = response.read(_MAX_RESPONSE_BYTES + 1)
                if len(raw) > _MAX_RESPONSE_BYTES:
                    response.close()  # a half-read connection must not go back to the pool
            finally:
                response.release_conn()
        except urllib3.exceptions.NewConnectionError:
            return _failed(number, _Out.CONNECTION_ERROR, DeepfakeStatus.ERROR, retryable=True)
        except (TimeoutError, urllib3.exceptions.TimeoutError):
            return _failed(number, _Out.TIMEOUT, DeepfakeStatus.TIMEOUT, retryable=True)
        except (OSError, urllib3.exceptions.HTTPError):
            return _failed(number, _Out.CONNECTION_ERROR, DeepfakeStatus.ERROR, retryable=True)

        status = response.status
        if status == 200:
            result = None if len(raw) > _MAX_RESPONSE_BYTES else _interpret(raw)
            if result is None:
                return _failed(number, _Out.BAD_RESPONSE, DeepfakeStatus.ERROR, status)
            return _Attempt(number, _Out.OK, result, status)
        if status == 202:
            # NVCF's "not done yet, poll with NVCF-REQID": not followed up here, so no answer.
            return _failed(number, _Out.PENDING, DeepfakeStatus.ERROR, status)
        if status < 300:
            return _failed(number, _Out.BAD_RESPONSE, DeepfakeStatus.ERROR, status)
        if 300 <= status < 400:
            # The key must not follow a redirect to a host nobody configured.
            return _failed(number, _Out.REDIRECT, DeepfakeStatus.ERROR, status)
        retryable = status in self.policy.retry_statuses
        if status == 429:
            outcome = _Out.HTTP_429
        else:
            outcome = _Out.HTTP_5XX if status >= 500 else _Out.HTTP_4XX
        return _failed(number, outcome, DeepfakeStatus.ERROR, status, retryable)


def _interpret(raw: bytes) -> DeepfakeResult | None:
    """The result in a 200 answer; None when the answer is not in the documented shape."""
    try:
        doc: Any = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    items = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        return None
    item = items[0]  # one input, one answer
    status = item.get("status")
    if status == "CONTENT_FILTERED":
        return DeepfakeResult.failed(DeepfakeStatus.CONTENT_FILTERED)
    if status != "SUCCESS":
        return DeepfakeResult.failed(DeepfakeStatus.ERROR)
    boxes = item.get("bounding_boxes")
    if not isinstance(boxes, list):
        return None  # a missing list is not evidence of "no face"
    scores = [box.get("is_deepfake") if isinstance(box, dict) else None for box in boxes]
    if not all(_is_probability(score) for score in scores):
        return None
    if not scores:
        return DeepfakeResult(0.0, DeepfakeStatus.NO_FACE)
    return DeepfakeResult(float(max(scores)), DeepfakeStatus.OK)


def _is_probability(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0.0 <= value <= 1.0
    )
