"""NVIDIA's hosted deepfake-image-detection API as a second moderation signal.

One POST per check: `{"input": ["data:image/jpeg;base64,…"], "return_image": false}` with a
bearer key; the answer is `{"data": [{"status", "bounding_boxes": [{"is_deepfake": p, …}]}]}`.
An image over the inline limit goes through NVCF's asset upload first (`gateway.nvidia.assets`)
and is referenced as `data:image/jpeg;asset_id,<id>`. The reference moderation block this
replaces read the first face only, reported "no face" and a failure alike as 0.0, had no timeout
and sent whatever it was given. Here:

- the score is the highest `is_deepfake` over all faces; no face is `no_face` with 0.0;
- anything short of a clean answer (a failure, the budget running out, CONTENT_FILTERED, an
  image over the configured maximum) scores 1.0, the NSFW check's fail-safe: a score nobody
  measured must not read as clean;
- one budget bounds the whole check, asset upload and retries on 429 and 5xx with backoff
  included, and the caller never waits longer than that budget;
- the key travels in the Authorization header only: never in a log line, metric or message.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
import math
import ssl
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

import urllib3

from gateway.errors import InvalidRequest
from gateway.metrics import NULL_METRICS, Recorder
from gateway.nvidia.api import INLINE_MAX_BYTES, NvidiaApi, Reply
from gateway.nvidia.assets import AssetFailed, NvcfAssets
from gateway.retry import RetryPolicy
from gateway.settings import PREFIX
from gateway.upload.egress import Resolve, system_resolve
from gateway.vocabulary import ApiOutcome, AssetResult, DeepfakeStatus

log = logging.getLogger(__name__)

# Within the default 10 s budget: 4 attempts, the last starting 3.5 s after the first.
DEFAULT_POLICY = RetryPolicy(backoff=(0.5, 1.0, 2.0))


# How the two response fields are documented, on /generate and /moderate alike.
SCORE_DOC = (
    "Highest is_deepfake over all faces (NVIDIA's deepfake detection); 0.0 with no_face; 1.0 "
    "with every other status but ok. Present only when enable_deepfake_check is true."
)
STATUS_DOC = (
    "too_large: not sent (over GATEWAY_DEEPFAKE_MAX_IMAGE_BYTES); timeout: past "
    "GATEWAY_DEEPFAKE_BUDGET_S, asset upload included. Present only when enable_deepfake_check "
    "is true."
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


class PendingCheck:
    """A check running beside the upload; `result()` waits no longer than the budget allows."""

    def __init__(
        self,
        future: Future[DeepfakeResult],
        started: float,
        deadline: float,
        metrics: Recorder,
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
        self._metrics.deepfake_checked(result.status, time.monotonic() - self._started)
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
        metrics: Recorder = NULL_METRICS,
        sleep: Callable[[float], None] = time.sleep,
        assets_url: str | None = None,
        inline_max_bytes: int = INLINE_MAX_BYTES,
        ssl_context: ssl.SSLContext | None = None,
        resolve: Resolve = system_resolve,
    ) -> None:
        """`assets_url` None: images over `inline_max_bytes` are not sent (too_large)."""
        self.url = url
        self.budget_s = budget_s
        self.max_image_bytes = max_image_bytes
        self.inline_max_bytes = inline_max_bytes
        self.executor = executor
        self.metrics = metrics
        self.api = NvidiaApi(api_key=api_key, http=http, policy=policy, sleep=sleep)
        self.assets = (
            None
            if assets_url is None
            else NvcfAssets(
                url=assets_url,
                api=self.api,
                policy=policy,
                ssl_context=ssl_context,
                resolve=resolve,
                sleep=sleep,
            )
        )

    def __repr__(self) -> str:  # the key stays out
        return f"DeepfakeClient(url={self.url!r}, budget_s={self.budget_s})"

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.api.http.clear()

    def start(self, image: bytes, mime: str = "image/jpeg") -> PendingCheck:
        """Start checking `image` (its bytes exactly as stored or received) in the background."""
        started = time.monotonic()
        deadline = started + self.budget_s
        future = self.executor.submit(self._check, image, mime, deadline)
        return PendingCheck(future, started, deadline, self.metrics)

    def _check(self, image: bytes, mime: str, deadline: float) -> DeepfakeResult:
        try:
            if len(image) > self.max_image_bytes:
                log.warning(
                    "deepfake check skipped: the image is %d bytes, the most sent is %d",
                    len(image),
                    self.max_image_bytes,
                )
                return DeepfakeResult.failed(DeepfakeStatus.TOO_LARGE)
            if len(image) <= self.inline_max_bytes:
                inline = f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"
                return self._detect(inline, {}, deadline)
            if self.assets is None:
                log.warning("deepfake check skipped: %d bytes is over the inline limit", len(image))
                return DeepfakeResult.failed(DeepfakeStatus.TOO_LARGE)
            return self._detect_asset(self.assets, image, mime, deadline)
        except Exception:
            # A bug here must cost the check (fail-safe), never the upload or the response.
            log.exception("deepfake check failed")
            return DeepfakeResult.failed(DeepfakeStatus.ERROR)

    def _detect_asset(
        self, assets: NvcfAssets, image: bytes, mime: str, deadline: float
    ) -> DeepfakeResult:
        try:
            asset = assets.upload(image, mime, deadline)
        except AssetFailed as failed:
            log.warning("deepfake check: NVCF asset upload failed: %s", failed)
            self._count_asset(failed.result)
            timed_out = failed.result is AssetResult.TIMEOUT
            return DeepfakeResult.failed(
                DeepfakeStatus.TIMEOUT if timed_out else DeepfakeStatus.ERROR
            )
        self._count_asset(AssetResult.OK)
        try:
            return self._detect(asset.data_url, asset.headers, deadline)
        finally:
            # Not waited for: the answer is in, and NVCF deletes the asset after 24 h anyway.
            self.executor.submit(assets.delete, asset)

    def _detect(self, reference: str, headers: dict[str, str], deadline: float) -> DeepfakeResult:
        reply = self.api.call(
            "POST",
            self.url,
            body={"input": [reference], "return_image": False},
            headers=headers,
            deadline=deadline,
            on_attempt=self._attempted,
        )
        if reply.outcome is ApiOutcome.OK and reply.status == 200:
            result = _interpret(reply.body)
            if result is not None:
                return result
        if reply.outcome is ApiOutcome.TIMEOUT:
            return DeepfakeResult.failed(DeepfakeStatus.TIMEOUT)
        return DeepfakeResult.failed(DeepfakeStatus.ERROR)

    def _attempted(self, reply: Reply) -> None:
        outcome = reply.outcome
        if outcome is ApiOutcome.OK and (reply.status != 200 or _interpret(reply.body) is None):
            outcome = ApiOutcome.BAD_RESPONSE  # a 2xx, but not an answer (not retried)
        self.metrics.deepfake_api_called(outcome)
        if outcome is not ApiOutcome.OK:
            log.warning(
                "deepfake API attempt %d: %s%s",
                reply.number,
                reply.describe(),
                "; retrying" if reply.retryable else "",
            )

    def _count_asset(self, result: AssetResult) -> None:
        self.metrics.deepfake_asset_sent(result)


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
