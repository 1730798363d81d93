"""The job queue on a real Redis: a message carries the job id only, deliveries wait in the delay
queue, a worker runs what was sent, and a queue whose Redis is away is a bounded 503."""

from __future__ import annotations

import json
import threading
import time

import dramatiq
import pytest

from gateway.jobs.queue import JOBS, NAMESPACE, WEBHOOKS, JobQueue
from gateway.jobs.store import StoreUnavailable, connect
from tests.gateway.jobs.helpers import WAIT_S, poll

TIMEOUT_S = 0.5
SLACK_S = 5.0


@pytest.fixture
def queue(redis_url: str) -> JobQueue:
    return JobQueue(connect(redis_url, 2.0), requeue_s=60, retry_after_s=3)


def test_a_job_message_carries_the_job_id_only(queue: JobQueue) -> None:
    queue.enqueue("job_" + "a" * 32)
    assert queue.depth() == 1
    [message] = queue.broker.client.hvals(f"{NAMESPACE}:{JOBS}.msgs")
    sent = json.loads(message)
    assert (sent["actor_name"], sent["args"], sent["kwargs"]) == ("run_job", ["job_" + "a" * 32], {})


def test_a_delayed_delivery_waits_in_the_delay_queue(queue: JobQueue) -> None:
    sent_at = int(time.time() * 1000)  # Dramatiq counts whole milliseconds
    queue.enqueue_delivery("job_" + "b" * 32, 2, 30.0)
    queue.enqueue_delivery("job_" + "c" * 32, 1, 0.0)
    assert queue.depth() == 0  # none in the jobs queue
    client = queue.broker.client
    [later] = (json.loads(m) for m in client.hvals(f"{NAMESPACE}:{WEBHOOKS}.DQ.msgs"))
    [now] = (json.loads(m) for m in client.hvals(f"{NAMESPACE}:{WEBHOOKS}.msgs"))
    assert later["args"] == ["job_" + "b" * 32, 2]
    assert later["options"]["eta"] >= sent_at + 30_000
    assert now["args"] == ["job_" + "c" * 32, 1] and "eta" not in now["options"]


def test_a_worker_runs_each_sent_job_through_its_handler(queue: JobQueue) -> None:
    ran: list[str] = []
    lock = threading.Lock()

    def run(job_id: str) -> None:
        with lock:
            ran.append(job_id)

    queue.handlers.run_job = run
    ids = [f"job_{i:032d}" for i in range(5)]
    for job_id in ids:
        queue.enqueue(job_id)
    worker = dramatiq.Worker(queue.broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        poll(lambda: queue.depth() == 0, "the worker ran every job")
    finally:
        worker.stop(timeout=int(WAIT_S * 1000))
    assert sorted(ran) == ids  # each once


def test_a_sender_without_a_worker_cannot_run_jobs(queue: JobQueue) -> None:
    with pytest.raises(RuntimeError, match="worker"):
        queue.handlers.run_job("job_" + "d" * 32)


def test_a_queue_whose_redis_refuses_is_store_unavailable(closed_port: int) -> None:
    failures: list[None] = []
    queue = JobQueue(
        connect(f"redis://127.0.0.1:{closed_port}/0", TIMEOUT_S),
        requeue_s=60,
        retry_after_s=3,
        failed=lambda: failures.append(None),
    )
    for call in (lambda: queue.enqueue("job_" + "e" * 32), queue.depth,
                 lambda: queue.enqueue_delivery("job_" + "e" * 32, 1, 0.0)):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            call()
        assert time.monotonic() - started < TIMEOUT_S + SLACK_S
    assert len(failures) == 3
