"""A tenant's generations in flight, counted in Redis so that every gateway and job worker
enforces one `max_concurrent`, not one each.

Each generation holds a lease: a member of the tenant's sorted set whose score is the moment it
expires, on Redis's clock (every process reads the same one). Taking one is a single script:
expired leases leave, and a new one joins only while fewer than the limit remain. A process that
dies holding leases loses them when they expire (the longest its work may take), not never.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import redis

from gateway.jobs.store import PREFIX as STORE_PREFIX
from gateway.tenants.tenant import Tenant

# KEYS[1] the tenant's set; ARGV: limit, lease seconds, lease id. Returns 1 (taken) or 0 (full).
_ACQUIRE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
return 1
"""
# The leases not yet expired.
_COUNT = """
local now = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(now[1]) + tonumber(now[2]) / 1e6)
return redis.call('ZCARD', KEYS[1])
"""


def _key(tenant: str) -> str:
    return f"{STORE_PREFIX}tenant:{tenant}:in-flight"


@dataclass(frozen=True)
class Lease:
    """One generation's place in its tenant's count; `id` None: not counted (no limit, or
    Redis was away and the quota fails open)."""

    tenant: str
    id: str | None


class Concurrency:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._count = client.register_script(_COUNT)

    def acquire(self, tenant: Tenant, lease_s: float) -> Lease | None:
        """A lease for one more generation of `tenant`, or None when it has `max_concurrent`
        already. A tenant with no limit is not counted. Raises redis' ConnectionError and
        TimeoutError (the caller decides whether the quota fails open)."""
        if tenant.max_concurrent == 0:
            return Lease(tenant.name, None)
        lease_id = secrets.token_hex(12)
        taken = self._acquire(keys=[_key(tenant.name)], args=[tenant.max_concurrent, lease_s, lease_id])
        return Lease(tenant.name, lease_id) if taken == 1 else None

    def release(self, lease: Lease, failed: Callable[[], None] = lambda: None) -> None:
        """Give the lease back; with Redis away it expires on its own (`failed` counts it)."""
        if lease.id is None:
            return
        try:
            self._client.zrem(_key(lease.tenant), lease.id)
        except (redis.ConnectionError, redis.TimeoutError):
            failed()

    def count(self, tenant: str) -> int:
        """The leases of `tenant` in force now, across every process."""
        return int(self._count(keys=[_key(tenant)]))
