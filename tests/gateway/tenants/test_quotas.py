"""A tenant's quotas against a real Redis: the moving window's count and the numbers the
RateLimit fields carry, one count for every Quotas object (every gateway), and the concurrency
leases."""

from __future__ import annotations

import math
import time

import pytest
import redis

from gateway.jobs.store import connect
from gateway.tenants.quotas import POLICY, WINDOW_S, Quotas, Window
from gateway.tenants.tenant import Tenant

LIMITED = Tenant("storefront", requests_per_minute=3, max_concurrent=2)
OTHER = Tenant("catalog", requests_per_minute=3)
FREE = Tenant("free")


def quotas(url: str) -> Quotas:
    return Quotas(connect(url, 2.0), url)


def test_a_tenant_gets_its_rate_across_gateways_then_is_refused_until_the_oldest_leaves(
    redis_url: str,
) -> None:
    # Two objects, two connection pools: what two gateways share is Redis alone.
    a, b = quotas(redis_url), quotas(redis_url)
    first_sent = time.time()
    windows = [q.hit(LIMITED) for q in (a, b, a, b, a)]
    first_answered_by = time.time()
    assert all(w is not None for w in windows)
    assert [w.admitted for w in windows] == [True, True, True, False, False]  # type: ignore[union-attr]
    assert [w.remaining for w in windows] == [2, 1, 0, 0, 0]  # type: ignore[union-attr]
    refused = windows[-1]
    assert refused is not None
    # The oldest request left the window 60 s after it was counted, which happened between
    # these two readings of the clock.
    now = time.time()
    assert math.floor(first_sent + WINDOW_S - now) <= refused.reset_s
    assert refused.reset_s <= math.ceil(first_answered_by + WINDOW_S - first_sent)
    assert 1 <= refused.reset_s <= WINDOW_S
    # Another tenant's count is its own.
    other = b.hit(OTHER)
    assert other == Window(quota=3, remaining=2, reset_s=other.reset_s, admitted=True)  # type: ignore[union-attr]


def test_the_fields_are_the_drafts_structured_lists() -> None:
    window = Window(quota=6, remaining=0, reset_s=42, admitted=False)
    assert window.headers() == {
        "RateLimit-Policy": f'"{POLICY}";q=6;w=60',
        "RateLimit": f'"{POLICY}";r=0;t=42',
    }


def test_a_tenant_without_a_rate_is_not_counted(redis_url: str) -> None:
    q = quotas(redis_url)
    assert q.hit(FREE) is None
    assert redis.Redis.from_url(redis_url).keys("*") == []


def test_leases_bound_a_tenants_generations_across_gateways(redis_url: str) -> None:
    a, b = quotas(redis_url), quotas(redis_url)
    first, second = a.acquire(LIMITED, 60), b.acquire(LIMITED, 60)
    assert first is not None and second is not None
    assert a.acquire(LIMITED, 60) is None
    assert b.concurrency.count(LIMITED.name) == 2
    b.release(first)  # given back by another gateway than took it: the lease is Redis's
    third = a.acquire(LIMITED, 60)
    assert third is not None
    unlimited = a.acquire(FREE, 60)
    assert unlimited is not None and unlimited.id is None


def test_redis_away_raises_redis_own_error() -> None:
    """What the door decides on (gateway.tenants.admission, tested there)."""
    dead = "redis://127.0.0.1:1/0"
    q = Quotas(connect(dead, 1.0), dead)
    with pytest.raises(redis.ConnectionError):
        q.hit(LIMITED)
    with pytest.raises(redis.ConnectionError):
        q.acquire(LIMITED, 60)
