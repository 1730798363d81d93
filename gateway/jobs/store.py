"""The shared store on Redis: job records, the set of queued jobs, and the signals between
gateways and workers (a job finished; cancel a running job).

Every call is bounded by GATEWAY_REDIS_TIMEOUT_S (connect and each command, no retries): a
store that is down or hung becomes `StoreUnavailable` (503 with Retry-After) within that time,
never a thread stuck for as long as Redis likes.

Keys, all under `imagegen:`:
- `job:{id}`: the record (JSON). No expiry while it may still run; GATEWAY_JOB_TTL_S once final.
- `jobs:queued`: sorted set, id -> created_at: the queue's depth and its oldest job's age.
- `jobs:queued:{tenant}`: the same, of one tenant's jobs (its depth).
- channel `job-done:{id}`: published when the job ends (`Prefer: wait` listens).
- channel `job-cancel`: the id of a running job to cancel (every worker listens).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.errors import Unavailable
from gateway.jobs.job import JobRecord
from gateway.metrics import QueueReading
from gateway.vocabulary import JobStatus

log = logging.getLogger(__name__)

PREFIX = "imagegen:"
QUEUED = PREFIX + "jobs:queued"
CANCEL_CHANNEL = PREFIX + "job-cancel"
# A new job's record expires unless it is confirmed (its message queued) within this time. A
# create that Redis applies after the gateway gave up on it (its reply came later than
# GATEWAY_REDIS_TIMEOUT_S: the client got a 503 and no message was queued) would otherwise leave
# a job no worker ever runs, queued for ever in the depth and age the autoscaler and alerts read.
UNCONFIRMED_S = 60


class StoreUnavailable(Unavailable):
    """Redis did not answer within GATEWAY_REDIS_TIMEOUT_S, or refused the connection."""


def connect(
    url: str,
    timeout_s: float,
    *,
    max_connections: int | None = None,
    wait_for_replies: bool = False,
) -> redis.Redis:
    """A client whose every call ends within `timeout_s` (one try: redis-py retries three times
    by default, which would triple the bound). With `wait_for_replies`, only connecting is
    bounded: a command waits for its reply however long Redis takes (a job worker's consumers,
    gateway.jobs.worker), and TCP keepalive notices a peer that is gone."""
    return redis.Redis.from_url(
        url,
        socket_timeout=None if wait_for_replies else timeout_s,
        socket_connect_timeout=timeout_s,
        socket_keepalive=wait_for_replies,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        max_connections=max_connections,
    )


def nothing() -> None:
    pass


@contextmanager
def bounded(
    retry_after_s: int, what: str, failed: Callable[[], None] = nothing
) -> Iterator[None]:
    """Redis failures as the gateway's own 503 (`failed` counts them)."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        failed()
        log.warning("store unavailable during %s: %s", what, type(exc).__name__)
        raise StoreUnavailable(
            "the job store is unavailable; retry later", retry_after=retry_after_s
        ) from None


def tenant_queued(tenant: str) -> str:
    return f"{QUEUED}:{tenant}"


def _job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def done_channel(job_id: str) -> str:
    return f"{PREFIX}job-done:{job_id}"


class JobStore:
    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_s: int,
        retry_after_s: int,
        failed: Callable[[], None] = nothing,
    ) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.retry_after_s = retry_after_s
        self.failed = failed

    # -- reads ---------------------------------------------------------------------------

    def get(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        """The job, or None when there is none (or it belongs to another owner: a job of
        another key is indistinguishable from no job)."""
        with bounded(self.retry_after_s, "get", self.failed):
            raw = self.client.get(_job_key(job_id))
        if raw is None:
            return None
        record = JobRecord.from_store(json.loads(raw))
        if owner is not None and record.owner != owner:
            return None
        return record

    def queue_depth(self) -> tuple[int, float | None]:
        """(jobs queued, age in seconds of the oldest one or None)."""
        with bounded(self.retry_after_s, "queue depth", self.failed):
            count, oldest = self._live(QUEUED)
        age = max(0.0, time.time() - oldest) if oldest is not None else None
        return count, age

    def tenant_depths(self, tenants: Iterable[str]) -> dict[str, int]:
        """Jobs queued now of each of `tenants`."""
        with bounded(self.retry_after_s, "tenant queue depth", self.failed):
            return {tenant: self._live(tenant_queued(tenant))[0] for tenant in tenants}

    def _live(self, key: str) -> tuple[int, float | None]:
        """(members of a queued set, the oldest one's score), less those whose record expired
        unconfirmed (UNCONFIRMED_S): no job waits there."""
        while True:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.zcard(key)
                pipe.zrange(key, 0, 0, withscores=True)
                count, oldest = pipe.execute()
            if not oldest or self.client.exists(_job_key(oldest[0][0].decode())):
                return int(count), oldest[0][1] if oldest else None
            self.client.zrem(key, oldest[0][0])

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    # -- writes --------------------------------------------------------------------------

    def create(self, record: JobRecord, *, unconfirmed_s: int | None = None) -> None:
        """Store a queued job; with `unconfirmed_s`, its record expires unless `confirm`ed."""
        with bounded(self.retry_after_s, "create", self.failed), self.client.pipeline(transaction=True) as pipe:
            pipe.set(_job_key(record.id), json.dumps(record.to_store()), nx=True, ex=unconfirmed_s)
            pipe.zadd(QUEUED, {record.id: record.created_at})
            pipe.zadd(tenant_queued(record.tenant), {record.id: record.created_at})
            created, *_ = pipe.execute()
        if not created:  # 192 random bits: never, but never silently either
            raise RuntimeError(f"job id collision: {record.id}")

    def confirm(self, job_id: str) -> None:
        """Its message is queued: the record of a job created with `unconfirmed_s` no longer
        expires until the job ends (starting it has the same effect)."""
        with bounded(self.retry_after_s, "confirm", self.failed):
            self.client.persist(_job_key(job_id))

    def forget(self, record: JobRecord) -> None:
        """Undo `create` when the job could not be queued."""
        with bounded(self.retry_after_s, "forget", self.failed), self.client.pipeline(transaction=True) as pipe:
            pipe.delete(_job_key(record.id))
            pipe.zrem(QUEUED, record.id)
            pipe.zrem(tenant_queued(record.tenant), record.id)
            pipe.execute()

    def start(self, job_id: str) -> JobRecord | None:
        """queued (or running, when its worker died) -> running; None when it must not run:
        unknown, expired, canceled or already finished."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.status.final or record.cancel_requested:
                return None
            return record.with_(
                status=JobStatus.RUNNING, started_at=time.time(), attempts=record.attempts + 1
            )

        return self._update(job_id, change, dequeued=True)

    def requeue(self, job_id: str) -> JobRecord | None:
        """running -> queued again (Triton had no room for it; it is sent again later); None
        when it is no longer running (canceled meanwhile, or finished by another run)."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.status is not JobStatus.RUNNING or record.cancel_requested:
                return None
            return record.with_(status=JobStatus.QUEUED, started_at=None)

        requeued = self._update(job_id, change, dequeued=False)
        if requeued is not None:
            with bounded(self.retry_after_s, "requeue", self.failed), self.client.pipeline(transaction=True) as pipe:
                pipe.zadd(QUEUED, {job_id: requeued.created_at})
                pipe.zadd(tenant_queued(requeued.tenant), {job_id: requeued.created_at})
                pipe.execute()
        return requeued

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        data: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> JobRecord | None:
        """running -> a final status, once: the first to finish wins (a job run twice after a
        worker died ends with whichever run ended first); None when it was final already."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.status.final:
                return None
            return record.with_(status=status, completed_at=time.time(), data=data, error=error)

        return self._update(job_id, change, dequeued=True)

    def cancel(self, job_id: str, owner: str) -> JobRecord | None:
        """Cancel: a queued job becomes canceled at once (it will never run); a running one is
        marked and its worker told (it ends canceled when Triton has stopped); a finished one is
        left as it is. Returns the job as it is now, or None when there is none."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.owner != owner or record.status.final:
                return None
            if record.status is JobStatus.QUEUED:
                return record.with_(
                    status=JobStatus.CANCELED,
                    completed_at=time.time(),
                    cancel_requested=True,
                    error=_canceled_error(),
                )
            return record.with_(cancel_requested=True)

        changed = self._update(job_id, change, dequeued=False)
        if changed is not None and changed.status is JobStatus.RUNNING:
            with bounded(self.retry_after_s, "cancel", self.failed):
                self.client.publish(CANCEL_CHANNEL, job_id)
        return changed if changed is not None else self.get(job_id, owner)

    def _update(
        self,
        job_id: str,
        change: Callable[[JobRecord], JobRecord | None],
        *,
        dequeued: bool,
    ) -> JobRecord | None:
        key = _job_key(job_id)
        result: list[JobRecord | None] = [None]
        tenant: list[str | None] = [None]

        def transaction(pipe: redis.client.Pipeline) -> None:
            raw = pipe.get(key)
            result[0] = None
            if raw is None:
                return
            old = JobRecord.from_store(json.loads(raw))
            tenant[0] = old.tenant
            new = change(old)
            if new is None:
                return
            pipe.multi()
            if new.status.final:
                pipe.set(key, json.dumps(new.to_store()), ex=self.ttl_s)
                pipe.publish(done_channel(job_id), new.status.value)
            else:
                pipe.set(key, json.dumps(new.to_store()))
            if new.status is not JobStatus.QUEUED:
                pipe.zrem(QUEUED, job_id)
                pipe.zrem(tenant_queued(new.tenant), job_id)
            result[0] = new

        with bounded(self.retry_after_s, "update", self.failed):
            self.client.transaction(transaction, key)
        if result[0] is None and dequeued:
            # Whatever it was, it is no longer waiting to run.
            with bounded(self.retry_after_s, "dequeue", self.failed), self.client.pipeline(transaction=False) as pipe:
                pipe.zrem(QUEUED, job_id)
                if tenant[0] is not None:
                    pipe.zrem(tenant_queued(tenant[0]), job_id)
                pipe.execute()
        return result[0]

    # -- waiting -------------------------------------------------------------------------

    def wait_final(self, job_id: str, owner: str, timeout_s: float) -> JobRecord | None:
        """The job once final, or as it is after `timeout_s` (Prefer: wait)."""
        deadline = time.monotonic() + timeout_s
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            with bounded(self.retry_after_s, "wait", self.failed):
                pubsub.subscribe(done_channel(job_id))
            while True:
                # Read after subscribing: an end published before then is in the record.
                record = self.get(job_id, owner)
                left = deadline - time.monotonic()
                if record is None or record.status.final or left <= 0:
                    return record
                try:
                    # Short reads: each is bounded by the socket timeout anyway.
                    pubsub.get_message(timeout=min(left, 1.0))
                except (redis.ConnectionError, redis.TimeoutError):
                    return record
        finally:
            try:
                pubsub.close()
            except (redis.ConnectionError, redis.TimeoutError):
                pass


def _canceled_error() -> dict[str, Any]:
    return {"code": "canceled", "message": "the job was canceled"}


class QueueGauge:
    """The queue's depth and oldest age for /metrics, and the depth of each of `tenants` (those
    of the tenants file: they bound the labels), read at most once per `max_age_s` per process
    (scrapes of several Prometheus servers cost one read)."""

    def __init__(
        self, store: JobStore, max_age_s: float = 1.0, tenants: Iterable[str] = ()
    ) -> None:
        self.store = store
        self.max_age_s = max_age_s
        self.tenants = tuple(tenants)
        self._lock = threading.Lock()
        self._reading = QueueReading(None, None)
        self._read_at = -float("inf")

    def current(self) -> QueueReading:
        with self._lock:
            if time.monotonic() - self._read_at >= self.max_age_s:
                try:
                    depths = self.store.tenant_depths(self.tenants)
                    self._reading = QueueReading(
                        *self.store.queue_depth(), by_tenant=tuple(depths.items())
                    )
                except StoreUnavailable:
                    self._reading = QueueReading(None, None)
                self._read_at = time.monotonic()
            return self._reading
