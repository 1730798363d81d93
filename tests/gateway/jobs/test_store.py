"""The job store on a real Redis: the transitions a record may make, expiry once final, the
cancel signal, `wait_final`, the queue gauge, and every call bounded when Redis is away."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from embedded.redis import RedisServer
from gateway.jobs.job import JobRecord, new_job_id
from gateway.jobs.store import (
    CANCEL_CHANNEL,
    QUEUED,
    JobStore,
    QueueGauge,
    StoreUnavailable,
    connect,
)
from gateway.metrics import QueueReading
from gateway.vocabulary import JobStatus
from tests.gateway.jobs.helpers import WAIT_S, in_thread

OWNER = "owner-digest"
TTL_S = 60
TIMEOUT_S = 0.5
# A bounded call ends within its timeout; the slack covers a loaded machine's scheduling only.
SLACK_S = 5.0


@pytest.fixture
def jobs(redis_url: str) -> JobStore:
    return JobStore(connect(redis_url, 2.0), ttl_s=TTL_S, retry_after_s=3)


def queued(jobs: JobStore, created_at: float | None = None, **fields: object) -> JobRecord:
    record = JobRecord(
        id=new_job_id(),
        owner=OWNER,
        status=JobStatus.QUEUED,
        created_at=time.time() if created_at is None else created_at,
        request={"prompt": "a lighthouse"},
        **fields,  # type: ignore[arg-type]
    )
    jobs.create(record)
    return record


def raw(jobs: JobStore, job_id: str) -> dict[str, object]:
    data = jobs.client.get(f"imagegen:job:{job_id}")
    assert data is not None
    return json.loads(data)  # type: ignore[no-any-return]


def ttl(jobs: JobStore, job_id: str) -> int:
    return int(jobs.client.ttl(f"imagegen:job:{job_id}"))


def in_queue(jobs: JobStore) -> set[str]:
    return {item.decode() for item in jobs.client.zrange(QUEUED, 0, -1)}


def test_a_created_job_is_queued_with_no_expiry_and_read_by_its_owner_only(jobs: JobStore) -> None:
    record = queued(jobs)
    assert jobs.get(record.id, OWNER) == record
    assert jobs.get(record.id) == record
    assert jobs.get(record.id, "someone-else") is None
    assert jobs.get(new_job_id(), OWNER) is None
    assert in_queue(jobs) == {record.id}
    assert ttl(jobs, record.id) == -1
    with pytest.raises(RuntimeError, match="collision"):
        jobs.create(record)


def test_start_takes_a_queued_or_running_job_and_counts_attempts(jobs: JobStore) -> None:
    record = queued(jobs)
    started = jobs.start(record.id)
    assert started is not None
    assert started.status is JobStatus.RUNNING and started.attempts == 1
    assert started.started_at is not None and started.started_at >= record.created_at
    assert in_queue(jobs) == set() and ttl(jobs, record.id) == -1
    again = jobs.start(record.id)  # its worker died: another takes it up
    assert again is not None and again.attempts == 2 and again.status is JobStatus.RUNNING
    assert jobs.get(record.id) == again


def test_start_refuses_a_job_asked_to_stop_a_final_one_and_an_unknown_one(jobs: JobStore) -> None:
    asked = queued(jobs, cancel_requested=True)
    assert jobs.start(asked.id) is None
    assert jobs.get(asked.id) == asked  # unchanged...
    assert asked.id not in in_queue(jobs)  # ...but no longer waiting to run

    running = queued(jobs)
    jobs.start(running.id)
    assert jobs.cancel(running.id, OWNER).cancel_requested  # type: ignore[union-attr]
    assert jobs.start(running.id) is None

    done = queued(jobs)
    jobs.start(done.id)
    jobs.finish(done.id, JobStatus.SUCCEEDED, data={"image_hash": "0" * 32})
    final = jobs.get(done.id)
    assert jobs.start(done.id) is None
    assert jobs.get(done.id) == final
    assert jobs.start(new_job_id()) is None


def test_finish_happens_once_and_sets_the_ttl(jobs: JobStore) -> None:
    record = queued(jobs)
    jobs.start(record.id)
    finished = jobs.finish(record.id, JobStatus.FAILED, error={"code": "upstream_error", "message": "x"})
    assert finished is not None
    assert finished.status is JobStatus.FAILED and finished.completed_at is not None
    assert finished.error == {"code": "upstream_error", "message": "x"} and finished.data is None
    assert 0 < ttl(jobs, record.id) <= TTL_S
    stored = raw(jobs, record.id)

    second = jobs.finish(record.id, JobStatus.SUCCEEDED, data={"image_hash": "1" * 32})
    assert second is None
    assert raw(jobs, record.id) == stored
    assert jobs.finish(new_job_id(), JobStatus.SUCCEEDED) is None


def test_cancel_ends_a_queued_job_at_once(jobs: JobStore) -> None:
    record = queued(jobs)
    canceled = jobs.cancel(record.id, OWNER)
    assert canceled is not None
    assert canceled.status is JobStatus.CANCELED and canceled.cancel_requested
    assert canceled.error == {"code": "canceled", "message": "the job was canceled"}
    assert canceled.completed_at is not None and canceled.started_at is None
    assert in_queue(jobs) == set() and 0 < ttl(jobs, record.id) <= TTL_S
    assert jobs.cancel(record.id, OWNER) == canceled  # final: as it is


def test_cancel_of_a_running_job_marks_it_and_tells_the_workers(jobs: JobStore) -> None:
    record = queued(jobs)
    jobs.start(record.id)
    pubsub = jobs.client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CANCEL_CHANNEL)
    try:
        marked = jobs.cancel(record.id, OWNER)
        assert marked is not None
        assert marked.status is JobStatus.RUNNING and marked.cancel_requested
        message = None
        deadline = time.monotonic() + WAIT_S
        while message is None and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1.0)
        assert message is not None and message["data"] == record.id.encode()
    finally:
        pubsub.close()
    assert ttl(jobs, record.id) == -1  # it may still run: no expiry yet
    ended = jobs.finish(record.id, JobStatus.CANCELED, error={"code": "canceled", "message": "m"})
    assert ended is not None and ended.status is JobStatus.CANCELED


def test_cancel_by_another_owner_or_of_an_unknown_job_is_none_and_changes_nothing(
    jobs: JobStore,
) -> None:
    record = queued(jobs)
    assert jobs.cancel(record.id, "someone-else") is None
    assert jobs.get(record.id) == record and in_queue(jobs) == {record.id}
    assert jobs.cancel(new_job_id(), OWNER) is None


def test_forget_undoes_create(jobs: JobStore) -> None:
    record = queued(jobs)
    jobs.forget(record)
    assert jobs.get(record.id) is None and in_queue(jobs) == set()


def test_wait_final_returns_when_the_job_ends(jobs: JobStore) -> None:
    record = queued(jobs)
    jobs.start(record.id)
    started = time.monotonic()
    thread, out = in_thread(lambda: jobs.wait_final(record.id, OWNER, WAIT_S))
    # Whether the end comes before or after the waiter subscribes, it sees it.
    jobs.finish(record.id, JobStatus.SUCCEEDED, data={"image_hash": "2" * 32})
    thread.join(WAIT_S)
    [waited] = out
    assert isinstance(waited, JobRecord) and waited.status is JobStatus.SUCCEEDED
    assert time.monotonic() - started < WAIT_S / 2  # at the end, not at the timeout


def test_wait_final_returns_the_job_as_it_is_after_its_timeout(jobs: JobStore) -> None:
    record = queued(jobs)
    started = time.monotonic()
    waited = jobs.wait_final(record.id, OWNER, 1.0)
    elapsed = time.monotonic() - started
    assert waited == record
    assert 1.0 <= elapsed < 1.0 + SLACK_S
    assert jobs.wait_final(new_job_id(), OWNER, WAIT_S) is None  # no such job: at once
    assert jobs.wait_final(record.id, "someone-else", WAIT_S) is None


def test_the_queue_gauge_reads_depth_and_the_oldest_age(jobs: JobStore) -> None:
    gauge = QueueGauge(jobs, max_age_s=0)
    assert gauge.current() == QueueReading(0, None)
    now = time.time()
    oldest = queued(jobs, created_at=now - 30)
    queued(jobs, created_at=now - 10)
    reading = gauge.current()
    assert reading.queued == 2
    assert reading.oldest_age_s is not None and 30 <= reading.oldest_age_s < 30 + SLACK_S
    jobs.start(oldest.id)
    reading = gauge.current()
    assert reading.queued == 1
    assert reading.oldest_age_s is not None and 10 <= reading.oldest_age_s < 10 + SLACK_S


def test_the_queue_gauge_reads_redis_once_per_max_age(jobs: JobStore) -> None:
    gauge = QueueGauge(jobs, max_age_s=3600)
    assert gauge.current().queued == 0
    queued(jobs)
    assert gauge.current().queued == 0  # the reading of this hour


class Refused(JobStore):
    """A store on a port nothing listens on, counting the failures it reports."""

    def __init__(self, port: int) -> None:
        self.failures = 0
        super().__init__(
            connect(f"redis://127.0.0.1:{port}/0", TIMEOUT_S),
            ttl_s=TTL_S,
            retry_after_s=7,
            failed=self.count,
        )

    def count(self) -> None:
        self.failures += 1


@pytest.fixture
def refused(closed_port: int) -> Refused:
    return Refused(closed_port)


@pytest.fixture
def frozen(redis_server: RedisServer, redis_url: str) -> Iterator[JobStore]:
    """A store whose Redis is stopped (SIGSTOP): it accepts connections and never answers."""
    store = JobStore(connect(redis_url, TIMEOUT_S), ttl_s=TTL_S, retry_after_s=7)
    redis_server.pause()
    try:
        yield store
    finally:
        redis_server.resume()


CALLS = {
    "get": lambda s: s.get(new_job_id(), OWNER),
    "create": lambda s: s.create(
        JobRecord(new_job_id(), OWNER, JobStatus.QUEUED, time.time(), {})
    ),
    "start": lambda s: s.start(new_job_id()),
    "finish": lambda s: s.finish(new_job_id(), JobStatus.SUCCEEDED),
    "cancel": lambda s: s.cancel(new_job_id(), OWNER),
    "queue_depth": lambda s: s.queue_depth(),
    "wait_final": lambda s: s.wait_final(new_job_id(), OWNER, 30),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_a_refused_connection_is_store_unavailable(refused: Refused, call: str) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        CALLS[call](refused)
    assert time.monotonic() - started < TIMEOUT_S + SLACK_S
    assert (caught.value.status, caught.value.retry_after) == (503, 7)
    assert refused.failures == 1
    assert not refused.ping()
    assert QueueGauge(refused).current() == QueueReading(None, None)


@pytest.mark.parametrize("call", ["get", "create", "finish", "queue_depth"])
def test_a_frozen_redis_is_store_unavailable_within_the_timeout(frozen: JobStore, call: str) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        CALLS[call](frozen)
    assert time.monotonic() - started < TIMEOUT_S + SLACK_S


def test_the_store_answers_again_once_redis_is_back(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = JobStore(connect(redis_url, TIMEOUT_S), ttl_s=TTL_S, retry_after_s=7)
    redis_server.pause()
    try:
        with pytest.raises(StoreUnavailable):
            store.get(new_job_id())
    finally:
        redis_server.resume()
    assert store.ping()
    record = queued(store)
    assert store.get(record.id) == record
