"""The job queue: Dramatiq's Redis broker and the two actors, `run_job` and `deliver_webhook`.

Why Dramatiq (docs/jobs.md has the comparison): a worker is one process with a pool of threads,
so one worker holds `GATEWAY_WORKER_THREADS` generations at once and queued jobs of one shape
share a denoising pass; its Redis broker acknowledges a message only after the actor returns, and
puts back the messages of a worker whose heartbeat stopped (a SIGKILLed worker's jobs run again);
a stopping worker finishes the messages it holds. Messages carry the job id only: the record in
the store (gateway.jobs.store) is the job.

Each tenant's jobs have their own queue, `jobs.<tenant>`; a worker consumes the queue of every
tenant in the tenants file and hands the messages it fetched to its threads in turns, one tenant
after another (`Turns`; docs/jobs.md, "Fair queues"). The plain `jobs` queue holds the jobs sent
before tenants (or by a sender that names none); workers drain it like a tenant's.

Gateways only send; workers (gateway.jobs.worker) consume with the same broker settings, and
give the actors their handlers.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from queue import PriorityQueue
from typing import Any

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


def tenant_queue(tenant: str) -> str:
    """The queue of a tenant's jobs (tenant names are [a-z0-9-], valid in a Dramatiq name)."""
    return f"{JOBS}.{tenant}"


class Turns(PriorityQueue):  # type: ignore[type-arg]  # Dramatiq's work queue of _WorkQueueItem
    """A worker's work queue that hands its threads the messages its consumers fetched one queue
    after another (round robin), instead of Dramatiq's order of arrival: a tenant whose flood was
    fetched first does not go first. It also says how many more messages a queue's consumer may
    fetch (`room`): none while one of that queue's messages still waits here, else as many as
    there are idle threads (at least one). So a worker holds at most its threads' worth of
    messages plus one waiting per queue, and a tenant's next message waits behind at most one
    message of each other tenant."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        super().__init__()
        self._taken = threading.Condition(self.mutex)  # the queue's own lock, once it has one

    def _init(self, maxsize: int) -> None:
        self._by_queue: dict[str, deque[Any]] = {}
        self._turns: deque[str] = deque()  # the queues with a message waiting, next first

    def _qsize(self) -> int:
        return sum(len(waiting) for waiting in self._by_queue.values())

    def _put(self, item: Any) -> None:
        name = item.message.queue_name
        waiting = self._by_queue.setdefault(name, deque())
        if not waiting:
            self._turns.append(name)
        waiting.append(item)

    def _get(self) -> Any:
        name = self._turns.popleft()
        waiting = self._by_queue[name]
        item = waiting.popleft()
        if waiting:
            self._turns.append(name)
        self._taken.notify_all()
        return item

    def room(self, queue_name: str, wanted: int, wait_s: float) -> int:
        """How many messages `queue_name`'s consumer may fetch now, waiting up to `wait_s` for
        that queue's waiting message to be taken (0 if it still waits)."""
        with self._taken:
            if not self._taken.wait_for(lambda: not self._by_queue.get(queue_name), wait_s):
                return 0
            # unfinished_tasks: messages waiting here plus those a thread runs.
            return min(wanted, max(1, self.threads - self.unfinished_tasks))


class _Broker(RedisBroker):
    """Dramatiq's Redis broker whose consumers of the job and webhook queues wait for a message
    in Redis when their queue is empty. The delay queues keep Dramatiq's polling: what they hold
    is due seconds later. In a worker (`turns` set), a consumer fetches only what `Turns.room`
    allows."""

    turns: Turns | None = None

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        if q_name(queue_name) == queue_name:  # not a delay queue
            timeout = min(timeout, _REFETCH_MS)
        return super().consume(queue_name, prefetch, timeout)

    def do_fetch(self, queue_name: str, prefetch: int) -> list[bytes]:
        fetch = self._dispatch("fetch")  # what RedisBroker itself answers for `do_fetch`
        delayed = q_name(queue_name) != queue_name
        socket_s = self.client.connection_pool.connection_kwargs.get("socket_timeout")
        wait_s = min(_IDLE_WAIT_S, socket_s / 2) if socket_s else _IDLE_WAIT_S
        if self.turns is not None and not delayed:
            # The consumer waits here, not in Redis, while its queue's turn has not come.
            prefetch = self.turns.room(queue_name, prefetch, wait_s)
            if prefetch == 0:
                return []
        messages: list[bytes] = fetch(queue_name, prefetch)
        if messages or delayed:
            return messages
        # The queue is a list of message ids. Moving its last item to its own end changes
        # nothing, and the blocking form returns as soon as there is one to move.
        key = f"{self.namespace}:{queue_name}"
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

    def enqueue(self, job_id: str, delay_s: float = 0.0, *, tenant: str | None = None) -> None:
        """Send a job to its tenant's queue (with no tenant, to the plain `jobs` queue); with
        `delay_s`, it joins the back of that queue then."""
        message = self.run_job.message_with_options(args=(job_id,))
        if tenant is not None:
            message = message.copy(queue_name=tenant_queue(tenant))
        with bounded(self.retry_after_s, "enqueue", self.failed):
            self.broker.enqueue(message, delay=int(delay_s * 1000) or None)

    def enqueue_delivery(self, job_id: str, attempt: int, delay_s: float) -> None:
        with bounded(self.retry_after_s, "enqueue delivery", self.failed):
            self.deliver_webhook.send_with_options(
                args=(job_id, attempt), delay=int(delay_s * 1000) or None
            )

    def depth(self, tenant: str | None = None) -> int:
        """Messages in a tenant's queue (or the plain `jobs` queue), waiting or taken and not yet
        acknowledged (Dramatiq's own count)."""
        with bounded(self.retry_after_s, "queue size", self.failed):
            return int(self.broker.do_qsize(JOBS if tenant is None else tenant_queue(tenant)))

    def worker(self, tenants: Iterable[str], threads: int, **options: Any) -> dramatiq.Worker:
        """A Dramatiq worker of `threads` threads on the queues of `tenants`, the plain `jobs`
        queue and `webhooks`, whose threads take the fetched messages in turns (`Turns`).
        `options` go to dramatiq.Worker (worker_timeout)."""
        for tenant in tenants:
            self.broker.declare_queue(tenant_queue(tenant))
        worker = dramatiq.Worker(self.broker, worker_threads=threads, **options)
        # A queue may hold as many as the threads (one tenant alone uses them all); `Turns`
        # keeps the worker as a whole to what it can run plus one waiting message per queue.
        worker.queue_prefetch = threads
        worker.work_queue = self.broker.turns = Turns(threads)
        return worker

    def heartbeat(self, stop: threading.Event, every_s: float) -> None:
        """Keep this worker alive in the broker's eyes while all its threads are busy: its
        consumers only talk to Redis (and so beat) when they fetch, and a worker whose jobs
        outlast GATEWAY_WORKER_REQUEUE_S would otherwise have them taken up again elsewhere."""
        while not stop.wait(every_s):
            try:
                self.broker.do_qsize(JOBS)
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # Redis is away; the consumers reconnect, and so does this
