"""A tenant's quotas, counted in the Redis every gateway shares, so that N gateways enforce one
limit and not N: its request rate (`requests_per_minute`, `limits`' moving window) and its
generations in flight (`max_concurrent`, gateway.tenants.concurrency's leases).

The moving window counts every request of the last 60 s, so a burst at a minute's edge cannot
pass twice the rate as a fixed window would. Its entries carry the admitting gateway's clock: the
gateways' clocks must agree (NTP) to within what a window's accuracy may lose.

Every call raises redis' errors when Redis is away (bounded by GATEWAY_REDIS_TIMEOUT_S: the
client is the store's); whoever admits the request decides whether the quota then fails open.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from gateway.jobs.store import PREFIX as STORE_PREFIX
from gateway.settings import PREFIX, Settings, SettingsError
from gateway.tenants.concurrency import Concurrency, Lease
from gateway.tenants.tenant import Tenant

WINDOW_S = 60
# The policy's name in the RateLimit fields: one policy, the same for every tenant (its quota
# says the tenant's own number).
POLICY = "per-minute"
# What a call to Redis raises when Redis cannot count the request: down, hung, loading, refusing
# writes (out of memory, a replica).
REDIS_ERRORS = (redis.RedisError,)


@dataclass(frozen=True)
class Window:
    """A tenant's request rate after this request: what the RateLimit fields say."""

    quota: int  # requests_per_minute
    remaining: int  # requests the tenant may still make before `reset_s` passes
    reset_s: int  # whole seconds until the oldest counted request leaves the window
    admitted: bool

    def headers(self) -> dict[str, str]:
        """The fields of draft-ietf-httpapi-ratelimit-headers-11 (May 2026), structured-field
        lists: the policy (quota `q` over `w` seconds) and the service limit (`r` remaining,
        for the next `t` seconds)."""
        return {
            "RateLimit-Policy": f'"{POLICY}";q={self.quota};w={WINDOW_S}',
            "RateLimit": f'"{POLICY}";r={self.remaining};t={self.reset_s}',
        }


class Quotas:
    """Both quotas of every tenant, on the store's Redis client."""

    def __init__(self, client: redis.Redis, url: str) -> None:
        # The store's connection pool, and with it its bounds: each call connects and answers
        # within GATEWAY_REDIS_TIMEOUT_S, with no retry (`url` only tells redis from valkey).
        storage = RedisStorage(
            url, connection_pool=client.connection_pool, key_prefix=f"{STORE_PREFIX}rate"
        )
        self._limiter = MovingWindowRateLimiter(storage)
        self.concurrency = Concurrency(client)

    def hit(self, tenant: Tenant) -> Window | None:
        """Count one request of `tenant`: its window afterwards (`admitted` False: over its
        rate, and not counted), or None for a tenant without a rate limit."""
        if tenant.requests_per_minute == 0:
            return None
        item = RateLimitItemPerMinute(tenant.requests_per_minute, namespace="tenant")
        admitted = self._limiter.hit(item, tenant.name)
        # A second call: another gateway's request between the two can only lower `remaining`.
        stats = self._limiter.get_window_stats(item, tenant.name)
        # At least 1 s when refused: the oldest request leaves within the coming second at most.
        reset_s = max(0 if admitted else 1, math.ceil(stats.reset_time - time.time()))
        return Window(
            quota=tenant.requests_per_minute,
            remaining=max(stats.remaining, 0),
            reset_s=min(reset_s, WINDOW_S),
            admitted=admitted,
        )

    def acquire(self, tenant: Tenant, lease_s: float) -> Lease | None:
        """A lease on one generation of `tenant` (not counted without a max_concurrent), or
        None when it has max_concurrent in flight already."""
        return self.concurrency.acquire(tenant, lease_s)

    def release(self, lease: Lease, failed: Callable[[], None] = lambda: None) -> None:
        """Give the lease back; with Redis away it expires on its own (`failed` is told)."""
        self.concurrency.release(lease, failed)


def unenforceable(settings: Settings, tenants: tuple[Tenant, ...]) -> None:
    """Refuse a gateway whose tenants have quotas but which has no Redis to count them in: the
    limits would hold per process, N times over, and no one would notice."""
    if settings.redis_url is not None:
        return
    limited = [t.name for t in tenants if t.requests_per_minute or t.max_concurrent]
    if limited:
        raise SettingsError(
            f"tenant {limited[0]!r} has a quota (requests_per_minute or max_concurrent), which "
            f"every gateway counts in Redis: set {PREFIX}REDIS_URL, or make its quotas 0"
        )
