"""When a failed call is tried again, and after how long: a value object both the uploader and
the deepfake client take (the way urllib3's `Retry` is one), driving tenacity."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tenacity


def _retry_statuses() -> frozenset[int]:
    return frozenset({429, *range(500, 600)})


@dataclass(frozen=True)
class RetryPolicy:
    """Wait `backoff[i]` seconds before attempt i + 2: the spec's upload schedule is 1 s, 2 s, 4 s
    (4 attempts). Which answers are worth another attempt is the caller's to say (`retryable`);
    `retry_statuses` are the HTTP statuses that usually are."""

    backoff: tuple[float, ...] = (1.0, 2.0, 4.0)
    retry_statuses: frozenset[int] = field(default_factory=_retry_statuses)

    def __post_init__(self) -> None:
        if any(delay < 0 for delay in self.backoff):
            raise ValueError(f"backoff delays must be >= 0, got {self.backoff}")

    @property
    def max_attempts(self) -> int:
        return len(self.backoff) + 1

    def delay_after(self, attempt_number: int) -> float:
        return self.backoff[min(attempt_number, len(self.backoff)) - 1] if self.backoff else 0.0

    def retrying(
        self,
        retryable: Callable[[Any], bool],
        sleep: Callable[[float], None] = time.sleep,
        budget_s: float | None = None,
    ) -> tenacity.Retrying:
        """A tenacity loop over attempts whose results say themselves whether to go on; out of
        attempts (or of `budget_s`, counted from now, before a wait that would pass it), the last
        result is returned, never a RetryError."""
        stop: tenacity.stop.stop_base = tenacity.stop_after_attempt(self.max_attempts)
        if budget_s is not None:
            stop = stop | tenacity.stop_before_delay(max(0.0, budget_s))
        return tenacity.Retrying(
            stop=stop,
            wait=lambda state: self.delay_after(state.attempt_number),
            retry=tenacity.retry_if_result(retryable),
            retry_error_callback=lambda state: state.outcome.result(),  # type: ignore[union-attr]
            sleep=sleep,
        )
