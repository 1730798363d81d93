"""Back-pressure: a bound on the `/generate` requests one process works on at once.

Past the bound a request is refused at once with 429 and Retry-After instead of waiting for a
thread: a client that retries later is better served than one whose request queues behind work
that may outlast its own timeout. Triton's queue policy bounds the inference queue behind it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from flask import Flask, g, request

from gateway.errors import Overloaded
from gateway.metrics import Metrics

GENERATIONS = "gateway.generate"
# /moderate's own bound, beside the generations' one: it bounds memory. Each image is decoded at
# full size once at most (up to 16 bytes a pixel, WebP; docs/security.md has the figures), so this
# caps what one process holds for images.
MODERATIONS = "gateway.moderate"


def limit_in_flight(app: Flask, *, limit: int, retry_after_s: int, metrics: Metrics) -> None:
    _bound(
        app, GENERATIONS, limit,
        lambda: Overloaded(f"the gateway is working on {limit} requests already; retry later",
                           retry_after=retry_after_s),
        started=metrics.generate_started, ended=metrics.generate_ended,
    )


def limit_moderations(app: Flask, *, limit: int, retry_after_s: int, metrics: Metrics) -> None:
    _bound(
        app, MODERATIONS, limit,
        lambda: Overloaded(f"the gateway is moderating {limit} images already; retry later",
                           retry_after=retry_after_s),
        started=metrics.moderation_started, ended=metrics.moderation_ended,
    )


def _bound(
    app: Flask,
    endpoint: str,
    limit: int,
    refusal: Callable[[], Overloaded],
    *,
    started: Callable[[], None],
    ended: Callable[[], None],
) -> None:
    """At most `limit` requests to `endpoint` at once in this process; the next is refused."""
    slots = threading.BoundedSemaphore(limit)
    held = f"slot:{endpoint}"

    @app.before_request
    def _acquire() -> None:
        if request.endpoint != endpoint:
            return
        if not slots.acquire(blocking=False):
            raise refusal()
        setattr(g, held, True)
        started()

    @app.teardown_request
    def _release(_error: BaseException | None) -> None:
        # Runs however the request ended, so a slot is never lost.
        if g.pop(held, False):
            ended()
            slots.release()
