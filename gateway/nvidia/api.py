"""One call of an NVIDIA hosted API: JSON with the bearer key, bounded in time and in the size of
the answer, never following a redirect, and retried on 429, 5xx and lost connections by the
caller's `RetryPolicy` only while a deadline allows.

The key goes in the Authorization header only: never in a log line, metric or message.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3

from gateway.retry import RetryPolicy
from gateway.vocabulary import ApiOutcome

log = logging.getLogger(__name__)

USER_AGENT = "imagegen-gateway/0.1"
# NVIDIA's hosted models take an image inline only while its base64 is under this many
# characters; larger ones go through the asset upload (gateway.nvidia.assets).
INLINE_LIMIT_CHARS = 180_000
# The largest image whose base64 (4 characters per 3 bytes, padded) stays under that: 134997.
INLINE_MAX_BYTES = (INLINE_LIMIT_CHARS - 1) // 4 * 3
# The answers are a few hundred bytes (return_image false, asset records); a flood is not one.
MAX_RESPONSE_BYTES = 1 << 20


@dataclass(frozen=True)
class Reply:
    number: int  # 1 for the first attempt
    outcome: ApiOutcome
    status: int | None = None
    body: bytes = b""
    retryable: bool = False

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):
            return None

    def describe(self) -> str:
        return self.outcome.value if self.status is None else f"HTTP {self.status}"


class NvidiaApi:
    def __init__(
        self,
        *,
        api_key: str,
        http: urllib3.PoolManager,
        policy: RetryPolicy,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._api_key = api_key
        self.http = http
        self.policy = policy
        self._sleep = sleep

    def __repr__(self) -> str:  # the key stays out
        return f"NvidiaApi(policy={self.policy!r})"

    def call(
        self,
        method: str,
        url: str,
        *,
        deadline: float,
        body: Any = None,
        headers: dict[str, str] | None = None,
        on_attempt: Callable[[Reply], None] | None = None,
    ) -> Reply:
        """`method url` with `body` as JSON, retried while the policy and `deadline` allow;
        the last reply. A 2xx other than 202 is OK here: the caller judges its body."""
        attempts: list[Reply] = []

        def attempt() -> Reply:
            reply = self._attempt(method, url, body, headers or {}, deadline, len(attempts) + 1)
            attempts.append(reply)
            if on_attempt is not None:
                on_attempt(reply)
            return reply

        # Never start a retry that could not finish inside the deadline.
        retrying = self.policy.retrying(
            lambda reply: reply.retryable, self._sleep, budget_s=deadline - time.monotonic()
        )
        return retrying(attempt)  # type: ignore[no-any-return]

    def _attempt(
        self,
        method: str,
        url: str,
        body: Any,
        headers: dict[str, str],
        deadline: float,
        number: int,
    ) -> Reply:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Reply(number, ApiOutcome.TIMEOUT)
        try:
            response = self.http.request(
                method,
                url,
                body=None if body is None else json.dumps(body).encode("ascii"),
                headers={
                    "Authorization": f"Bearer {self._api_key}",
                    "Accept": "application/json",
                    "User-Agent": USER_AGENT,
                    **({"Content-Type": "application/json"} if body is not None else {}),
                    **headers,
                },
                timeout=urllib3.Timeout(total=remaining),
                retries=False,
                redirect=False,
                preload_content=False,
            )
            try:
                raw = response.read(MAX_RESPONSE_BYTES + 1)
                if len(raw) > MAX_RESPONSE_BYTES:
                    response.close()  # a half-read connection must not go back to the pool
            finally:
                response.release_conn()
        except urllib3.exceptions.NewConnectionError:
            return Reply(number, ApiOutcome.CONNECTION_ERROR, retryable=True)
        except (TimeoutError, urllib3.exceptions.TimeoutError):
            return Reply(number, ApiOutcome.TIMEOUT, retryable=True)
        except (OSError, urllib3.exceptions.HTTPError):
            return Reply(number, ApiOutcome.CONNECTION_ERROR, retryable=True)

        status = response.status
        if len(raw) > MAX_RESPONSE_BYTES:
            return Reply(number, ApiOutcome.BAD_RESPONSE, status)
        if status == 202:
            # NVCF's "not done yet, poll with NVCF-REQID": not followed up here, so no answer.
            return Reply(number, ApiOutcome.PENDING, status, raw)
        if 200 <= status < 300:
            return Reply(number, ApiOutcome.OK, status, raw)
        if 300 <= status < 400:
            # The key must not follow a redirect to a host nobody configured.
            return Reply(number, ApiOutcome.REDIRECT, status, raw)
        if status == 429:
            outcome = ApiOutcome.HTTP_429
        else:
            outcome = ApiOutcome.HTTP_5XX if status >= 500 else ApiOutcome.HTTP_4XX
        return Reply(number, outcome, status, raw, status in self.policy.retry_statuses)
