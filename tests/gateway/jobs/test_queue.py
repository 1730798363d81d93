"""The job queue on a real Redis: a message carries the job id only, deliveries wait in the delay
queue, a worker runs what was sent, and a queue whose Redis is away is a bounded 503."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import dramatiq
import pytest

from gateway.jobs.queue import JOBS, NAMESPACE, WEBHOOKS, JobQueue, Turns
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


def test_a_workers_threads_take_fetched_messages_one_queue_after_another() -> None:
    @dataclass(frozen=True)
    class Fetched:  # what Dramatiq's consumers put: an item whose message names its queue
        message: SimpleNamespace

    def fetched(queue_name: str, n: int) -> Fetched:
        return Fetched(SimpleNamespace(queue_name=queue_name, n=n))

    turns = Turns(threads=4)
    for n in range(3):
        turns.put(fetched("jobs.a", n))
    turns.put(fetched("jobs.b", 0))
    # a's flood was fetched first; b's job still comes second, not fourth.
    order = [(m.queue_name, m.n) for m in (turns.get_nowait().message for _ in range(4))]
    assert order == [("jobs.a", 0), ("jobs.b", 0), ("jobs.a", 1), ("jobs.a", 2)]


def test_a_queue_fetches_again_only_once_its_waiting_message_is_taken() -> None:
    turns = Turns(threads=4)
    item = SimpleNamespace(message=SimpleNamespace(queue_name="jobs.a"))
    assert turns.room("jobs.a", 4, 0.0) == 4  # idle: as many as there are threads
    turns.put(item)
    assert turns.room("jobs.a", 4, 0.0) == 0  # one waits: not its turn to fetch
    assert turns.room("jobs.b", 4, 0.0) == 3  # another queue may: 3 threads idle
    turns.get_nowait()  # a thread takes it (and runs it)
    assert turns.room("jobs.a", 4, 0.0) == 3
    for _ in range(4):
        turns.put(SimpleNamespace(message=SimpleNamespace(queue_name="jobs.b")))
    turns.get_nowait()
    # Every thread busy or spoken for: a queue with none waiting may still fetch one, for its turn.
    assert turns.room("jobs.a", 4, 0.0) == 1
