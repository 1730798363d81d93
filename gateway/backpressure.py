"""Back-pressure: a bound on the `/generate` requests one process works on at once.

Past the bound a request is refused at once with 429 and Retry-After instead of waiting for a
thread: a client that retries later is better served than one whose request queues behind work
that may outlast its own timeout. Triton's queue policy bounds the inference queue behind it.
"""

from __future__ import annotations

import threading

from flask import Flask, g, request

from gateway.errors import Overloaded
from gateway.metrics import Metrics

LIMITED_ENDPOINTS = frozenset({"gateway.generate"})


def limit_in_flight(app: Flask, *, limit: int, retry_after_s: int, metrics: Metrics) -> None:
    slots = threading.BoundedSemaphore(limit)

    @app.before_request
    def _acquire() -> None:
        if request.endpoint not in LIMITED_ENDPOINTS:
            return
        if not slots.acquire(blocking=False):
            raise Overloaded(
                f"the gateway is working on {limit} requests already; retry later",
                retry_after=retry_after_s,
            )
        g.gateway_slot = True
        metrics.generate_started()

    @app.teardown_request
    def _release(_error: BaseException | None) -> None:
        # Runs however the request ended, so a slot is never lost.
        if g.pop("gateway_slot", False):
            metrics.generate_ended()
            slots.release()


# /moderate's own bound, beside the generations' one: it bounds memory. Each image is decoded at
# full size once at most (up to 16 bytes a pixel, WebP; docs/security.md has the figures), so this
# caps what one process holds for images.
MODERATIONS = "gateway.moderate"


def limit_moderations(app: Flask, *, limit: int, retry_after_s: int, metrics: Metrics) -> None:
    slots = threading.BoundedSemaphore(limit)

    @app.before_request
    def _acquire() -> None:
        if request.endpoint != MODERATIONS:
            return
        if not slots.acquire(blocking=False):
            raise Overloaded(
                f"the gateway is moderating {limit} images already; retry later",
                retry_after=retry_after_s,
            )
        g.moderation_slot = True
        metrics.moderation_started()

    @app.teardown_request
    def _release(_error: BaseException | None) -> None:
        if g.pop("moderation_slot", False):
            metrics.moderation_ended()
            slots.release()
