"""The job queue: Dramatiq's Redis broker and the two actors, `run_job` and `deliver_webhook`.

Why Dramatiq (docs/jobs.md has the comparison): a worker is one process with a pool of threads,
so one worker holds `GATEWAY_WORKER_THREADS` generations at once and queued jobs of one shape
share a denoising pass; its Redis broker acknowledges a message only after the actor returns, and
puts back the messages of a worker whose heartbeat stopped (a SIGKILLed worker's jobs run again);
a stopping worker finishes the messages it holds. Messages carry the job id only: the record in
the store (gateway.jobs.store) is the job.

Gateways only send; workers (gateway.jobs.worker) consume with the same broker settings, and
give the actors their handlers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import dramatiq
import redis
from dramatiq.broker import Consumer
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import q_name

from gateway.jobs.store import bounded, nothing

# Queues in Redis (Dramatiq prefixes them with its namespace).
NAMESPACE = "imagegen-queue"
JOBS = "jobs"
WEBHOOKS = "webhooks"
# Dramatiq looks for dead workers on this share of its commands (per million). Its default,
# 1,000, takes minutes to notice one on a quiet queue; the scan is cheap (one sorted-set range).
_MAINTENANCE_CHANCE = 50_000
# An idle worker waits in Redis for a message instead of polling for one. Dramatiq's Redis broker
# polls, backing off to one fetch a second: a job on an idle worker waited about half a second
# to start, and its webhook as long again; polling every 20 ms instead cost an idle worker a
# tenth of a core and Redis a few percent (docs/benchmarks.md). _IDLE_WAIT_S is the longest
# single wait (at most half the client's socket timeout, so that a wait never reads as a hung
# Redis); after a wait that saw nothing, the consumer fetches again within _REFETCH_MS.
_IDLE_WAIT_S = 1.0
_REFETCH_MS = 20


class _Broker(RedisBroker):
    """Dramatiq's Redis broker whose consumers of `jobs` and `webhooks` wait for a message in
    Redis when their queue is empty. The delay queues keep Dramatiq's polling: what they hold is
    due seconds later."""

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        if q_name(queue_name) == queue_name:  # not a delay queue
            timeout = min(timeout, _REFETCH_MS)
        return super().consume(queue_name, prefetch, timeout)

    def do_fetch(self, queue_name: str, prefetch: int) -> list[bytes]:
        fetch = self._dispatch("fetch")  # what RedisBroker itself answers for `do_fetch`
        messages: list[bytes] = fetch(queue_name, prefetch)
        if messages or q_name(queue_name) != queue_name:
            return messages
        # The queue is a list of message ids. Moving its last item to its own end changes
        # nothing, and the blocking form returns as soon as there is one to move.
        key = f"{self.namespace}:{queue_name}"
        socket_s = self.client.connection_pool.connection_kwargs.get("socket_timeout")
        wait_s = min(_IDLE_WAIT_S, socket_s / 2) if socket_s else _IDLE_WAIT_S
        self.client.blmove(key, key, wait_s, "RIGHT", "RIGHT")
        return list(fetch(queue_name, prefetch))


def _unset(*_args: object) -> None:
    raise RuntimeError("this process only sends jobs; a worker runs them")


@dataclass
class Handlers:
    """What the actors do in a worker process: run a job; deliver a job's webhook (attempt n)."""

    run_job: Callable[[str], None] = _unset
    deliver_webhook: Callable[[str, int], None] = _unset


class JobQueue:
    def __init__(
        self,
        client: redis.Redis,
        *,
        requeue_s: float,
        retry_after_s: int,
        failed: Callable[[], None] = nothing,
    ) -> None:
        self.retry_after_s = retry_after_s
        self.failed = failed
        # No middleware: retries, time limits and results are the job's own business (its
        # record, its deadline in Triton); Dramatiq's defaults would run a failed job again.
        self.broker = _Broker(
            client=client,
            namespace=NAMESPACE,
            middleware=[],
            heartbeat_timeout=int(requeue_s * 1000),
            maintenance_chance=_MAINTENANCE_CHANCE,
        )
        self.handlers = Handlers()
        self.run_job = dramatiq.actor(
            lambda job_id: self.handlers.run_job(job_id),
            actor_name="run_job", queue_name=JOBS, broker=self.broker,
        )
        self.deliver_webhook = dramatiq.actor(
            lambda job_id, attempt: self.handlers.deliver_webhook(job_id, attempt),
            actor_name="deliver_webhook", queue_name=WEBHOOKS, broker=self.broker,
        )

    def enqueue(self, job_id: str, delay_s: float = 0.0) -> None:
        with bounded(self.retry_after_s, "enqueue", self.failed):
            self.run_job.send_with_options(args=(job_id,), delay=int(delay_s * 1000) or None)

    def enqueue_delivery(self, job_id: str, attempt: int, delay_s: float) -> None:
        with bounded(self.retry_after_s, "enqueue delivery", self.failed):
            self.deliver_webhook.send_with_options(
                args=(job_id, attempt), delay=int(delay_s * 1000) or None
            )

    def depth(self) -> int:
        """Messages waiting in the jobs queue (Dramatiq's own count)."""
        with bounded(self.retry_after_s, "queue size", self.failed):
            return int(self.broker.do_qsize(JOBS))

    def heartbeat(self, stop: threading.Event, every_s: float) -> None:
        """Keep this worker alive in the broker's eyes while all its threads are busy: its
        consumers only talk to Redis (and so beat) when they fetch, and a worker whose jobs
        outlast GATEWAY_WORKER_REQUEUE_S would otherwise have them taken up again elsewhere."""
        while not stop.wait(every_s):
            try:
                self.broker.do_qsize(JOBS)
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # Redis is away; the consumers reconnect, and so does this
