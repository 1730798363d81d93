"""An idle worker's consumers of gateway/jobs/queue.py wait in Redis for a message (no polling):
a fetch on an empty queue blocks until a message is sent, within the client's socket timeout,
and the delay queues never block."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis

from gateway.jobs import queue as queue_module
from gateway.jobs.queue import JOBS, NAMESPACE, WEBHOOKS, JobQueue
from gateway.jobs.store import connect

# Only a test that would hang reaches it; far below the idle wait these tests set.
LIMIT_S = 180.0
LONG_WAIT_S = 3600.0


def blocked_clients(url: str) -> int:
    return int(redis.Redis.from_url(url).info("clients")["blocked_clients"])


@contextmanager
def fetching(fetch: Callable[[], list[bytes]]) -> Iterator[tuple[threading.Thread, list[list[bytes]]]]:
    got: list[list[bytes]] = []
    thread = threading.Thread(target=lambda: got.append(fetch()), daemon=True)
    thread.start()
    yield thread, got
    thread.join(LIMIT_S)


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LIMIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def test_an_idle_fetch_returns_the_message_sent_while_it_waits(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "_IDLE_WAIT_S", LONG_WAIT_S)
    queue = JobQueue(connect(redis_url, 2 * LONG_WAIT_S), requeue_s=60, retry_after_s=3)
    with fetching(lambda: queue.broker.do_fetch(JOBS, 4)) as (thread, got):
        until(lambda: blocked_clients(redis_url) == 1, "the fetch waits in Redis")
        queue.enqueue("job_" + "a" * 32)
        thread.join(LIMIT_S)  # an hour, had the message not ended the wait
        assert not thread.is_alive()
    [[message]] = got
    assert json.loads(message)["args"] == ["job_" + "a" * 32]
    assert blocked_clients(redis_url) == 0
    assert queue.broker.client.llen(f"{NAMESPACE}:{JOBS}") == 0  # taken, once


def test_an_idle_wait_ends_within_the_socket_timeout(redis_url: str) -> None:
    # A wait as long as the socket timeout would read as a hung Redis (TimeoutError).
    queue = JobQueue(connect(redis_url, 0.2), requeue_s=60, retry_after_s=3)
    for _ in range(3):
        assert queue.broker.do_fetch(JOBS, 4) == []
    queue.enqueue("job_" + "b" * 32)
    [message] = queue.broker.do_fetch(JOBS, 4)
    assert json.loads(message)["args"] == ["job_" + "b" * 32]


def test_a_delay_queue_is_fetched_without_waiting(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "_IDLE_WAIT_S", LONG_WAIT_S)
    queue = JobQueue(connect(redis_url, 2 * LONG_WAIT_S), requeue_s=60, retry_after_s=3)
    with fetching(lambda: queue.broker.do_fetch(f"{WEBHOOKS}.DQ", 4)) as (thread, got):
        thread.join(LIMIT_S)
        assert not thread.is_alive()
    assert got == [[]]
