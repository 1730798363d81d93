"""The tenants' quotas at the door of POST /generate and POST /jobs, after the API key.

Every request to either that carries a valid key counts against its tenant's
`requests_per_minute`, whatever happens to it next: a body that fails validation, a process
that is full, a generation that fails. That is what most APIs count, what a client can count on
its own side, and what keeps a client looping on a bad request from costing the gateways more
than its quota; the count is taken before the body is read. A synchronous /generate also holds a
lease on one of the tenant's `max_concurrent` generations until its answer has gone; a job takes
its own in the worker that runs it.

Every answer of a tenant with a rate limit carries the RateLimit-Policy and RateLimit fields
(gateway.tenants.quotas), a 429 also Retry-After; a tenant without one gets neither.

With Redis away, GATEWAY_QUOTA_FAIL_OPEN decides. True (the default): the request is admitted
uncounted, gateway_quota_unchecked_total counts it and a warning is logged at most once a
minute. An outage of the quota store then costs no one their images, and each process still
bounds its own work (GATEWAY_MAX_IN_FLIGHT, Triton's queue): quotas share capacity fairly, they
are not what keeps the service up. False: 503 with Retry-After, for deployments where a quota is
a contract (a paid tier) rather than fairness.
"""

from __future__ import annotations

import logging
import threading
import time

from flask import Flask, Response, g, request

from gateway.auth import api_tenant, is_api_client
from gateway.backpressure import GENERATIONS
from gateway.errors import ConcurrencyLimited, RateLimited, Unavailable
from gateway.logs import TENANT_ENVIRON
from gateway.metrics import Metrics
from gateway.tenants.quotas import REDIS_ERRORS, Quotas

log = logging.getLogger(__name__)

JOB_CREATION = "jobs.create"
# The endpoints a tenant's requests_per_minute counts, together.
RATED = frozenset({GENERATIONS, JOB_CREATION})
WARN_EVERY_S = 60.0


def admit_tenants(
    app: Flask,
    *,
    quotas: Quotas | None,
    metrics: Metrics,
    lease_s: float,
    fail_open: bool,
    retry_after_s: int,
) -> None:
    """Register the check; `quotas` None: no Redis, and then no tenant has a quota (the app
    factory refuses to start otherwise)."""
    warning = _AtMostEvery(WARN_EVERY_S)

    @app.before_request
    def _admit() -> None:
        if not is_api_client():
            return
        tenant = api_tenant()
        # For gunicorn's access line: every request of a known tenant says whose it is.
        request.environ[TENANT_ENVIRON] = tenant.name
        if request.endpoint not in RATED:
            return
        generation = request.endpoint == GENERATIONS
        if quotas is not None:
            try:
                window = g.quota_window = quotas.hit(tenant)
                if window is not None and not window.admitted:
                    metrics.tenant_request(tenant.name, "rate_limited")
                    raise RateLimited(
                        f"tenant {tenant.name!r} may make {window.quota} requests a minute "
                        f"(POST /generate and POST /jobs together); retry in {window.reset_s} s",
                        retry_after=window.reset_s,
                    )
                if generation:
                    lease = quotas.acquire(tenant, lease_s)
                    if lease is None:
                        metrics.tenant_request(tenant.name, "concurrency_limited")
                        raise ConcurrencyLimited(
                            f"tenant {tenant.name!r} may have {tenant.max_concurrent} generations "
                            "in flight at once (synchronous and jobs together); retry when one "
                            "has ended",
                            retry_after=retry_after_s,
                        )
                    g.quota_lease = lease
            except REDIS_ERRORS as exc:
                if not fail_open:
                    raise Unavailable(
                        "the tenant's quotas cannot be checked (the quota store did not "
                        "answer); retry later",
                        retry_after=retry_after_s,
                    ) from None
                metrics.quota_unchecked()
                if warning.due():
                    # The error's type only: its text may name the store's address.
                    log.warning(
                        "quota store unreachable (%s): admitting requests without counting them "
                        "(GATEWAY_QUOTA_FAIL_OPEN); at most one warning every %d s",
                        type(exc).__name__,
                        WARN_EVERY_S,
                    )
        metrics.tenant_request(tenant.name, "admitted")
        if generation:
            metrics.tenant_generation_started(tenant.name)
            g.tenant_generation = (tenant.name, time.perf_counter())

    @app.after_request
    def _fields(response: Response) -> Response:
        window = g.get("quota_window")
        if window is not None:
            response.headers.update(window.headers())
        if g.get("tenant_generation") is not None and response.status_code == 200:
            g.tenant_generation_ok = True
        return response

    @app.teardown_request
    def _release(_error: BaseException | None) -> None:
        # Runs however the request ended, so neither a lease nor the gauge is ever lost.
        lease = g.pop("quota_lease", None)
        if lease is not None and quotas is not None:
            quotas.release(lease, metrics.store_failed)
        generation = g.pop("tenant_generation", None)
        if generation is not None:
            name, started = generation
            ok = g.pop("tenant_generation_ok", False)
            metrics.tenant_generation_ended(name, time.perf_counter() - started if ok else None)


class _AtMostEvery:
    """Says yes at most once per `period_s`, whichever thread asks."""

    def __init__(self, period_s: float) -> None:
        self._period_s = period_s
        self._next = 0.0
        self._lock = threading.Lock()

    def due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                return False
            self._next = now + self._period_s
            return True

