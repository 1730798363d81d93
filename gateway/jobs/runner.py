"""What a worker does with one job: take it, generate exactly as `/generate` would, record how it
ended, and have its webhook delivered.

    runner.run(job_id)   # from the run_job actor, on one of the worker's threads

A job is run by the same use case as `/generate` (`check_inputs`, then `generate`), with the job
deadline and a cancel event the `CancelWatcher` sets when its owner cancels it. The store's
transitions decide what may happen: a job canceled while queued is never started (Triton never
sees it), and the first run to finish a job wins (a job taken up again after its worker died
may run twice; its object is named by its content, so the second upload is harmless).

Before it starts, a job takes a lease on its tenant's `max_concurrent` (gateway.tenants.
concurrency, shared with the gateways' /generate); a tenant at its limit has the job wait again
at the back of its queue, without starting it (no attempt, no thread held). A job whose tenant
is no longer in the tenants file runs as the `default` tenant: its limit, queue and metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from gateway.errors import Canceled, GatewayError, Overloaded, Unavailable, UploadFailed
from gateway.generate import check_inputs, generate
from gateway.jobs.job import JobStatus
from gateway.jobs.queue import JobQueue
from gateway.jobs.store import CANCEL_CHANNEL, JobStore, StoreUnavailable
from gateway.schema import to_json
from gateway.services import Services
from gateway.tenants.concurrency import Concurrency, Lease
from gateway.tenants.tenant import DEFAULT, Tenant, Tenants
from gateway.triton.contract import Priority

log = logging.getLogger(__name__)

# A worker that cannot reach the store keeps trying this long before it gives the message back.
_STORE_PATIENCE_S = 60.0
_store_retry = retry(
    retry=retry_if_exception_type(StoreUnavailable),
    wait=wait_exponential(multiplier=0.25, max=5),
    stop=stop_after_delay(_STORE_PATIENCE_S),
    reraise=True,
)
# A job whose tenant is at its max_concurrent is sent again this much later: a lease frees when
# one of the tenant's generations ends (seconds), and each look costs a fetch and a Redis script.
AT_LIMIT_DELAY_S = 1.0


class CancelWatcher:
    """One listener per worker process on the store's cancel channel: sets the event of a job
    this worker runs when its owner cancels it. A message missed while Redis was away is made
    up for by a sweep of the records of the jobs it runs every `sweep_s`."""

    def __init__(self, store: JobStore, *, sweep_s: float = 2.0) -> None:
        self.store = store
        self.sweep_s = sweep_s
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="cancel-watcher", daemon=True)

    def start(self) -> CancelWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def watch(self, job_id: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events[job_id] = event
        return event

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._events.pop(job_id, None)

    def _set(self, job_id: str) -> None:
        with self._lock:
            event = self._events.get(job_id)
        if event is not None:
            event.set()

    def _listen(self) -> None:
        swept = time.monotonic()
        while not self._stop.is_set():
            pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CANCEL_CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message.get("type") == "message":
                        self._set(message["data"].decode("ascii", "replace"))
                    if time.monotonic() - swept >= self.sweep_s:
                        swept = time.monotonic()
                        self._sweep()
            except (redis.ConnectionError, redis.TimeoutError, StoreUnavailable):
                self._stop.wait(1.0)  # Redis is away: try again, and sweep when it is back
            finally:
                try:
                    pubsub.close()
                except (redis.ConnectionError, redis.TimeoutError):
                    pass

    def _sweep(self) -> None:
        with self._lock:
            running = list(self._events)
        for job_id in running:
            record = self.store.get(job_id)
            if record is not None and record.cancel_requested:
                self._set(job_id)


class JobRunner:
    def __init__(
        self,
        services: Services,
        store: JobStore,
        queue: JobQueue,
        watcher: CancelWatcher,
        tenants: Tenants | None = None,
    ) -> None:
        self.services = services
        self.store = store
        self.queue = queue
        self.watcher = watcher
        settings = services.settings
        self.tenants = tenants if tenants is not None else Tenants.from_settings(settings)
        # Who runs a job of a tenant no longer in the file (see the module's docstring).
        self.fallback = self.tenants.by_name.get(DEFAULT) or Tenant.from_defaults(DEFAULT, settings)
        self.concurrency = Concurrency(store.client)
        self.lease_s = settings.job_deadline_s + settings.longest_request_s
        services.metrics.track_tenant_jobs(self.queue_tenants)

    @property
    def queue_tenants(self) -> list[str]:
        """The tenants whose queues a worker consumes: the file's, and the fallback's."""
        return list(dict.fromkeys([*(t.name for t in self.tenants.all), self.fallback.name]))

    def tenant(self, name: str) -> Tenant:
        return self.tenants.by_name.get(name, self.fallback)

    def run(self, job_id: str) -> None:
        queued = _store_retry(self.store.get)(job_id)
        if queued is None or queued.status.final or queued.cancel_requested:
            log.info("job %s not run: canceled, finished or expired before it started", job_id)
            return
        tenant = self.tenant(queued.tenant)
        lease = self._lease(tenant)
        if lease is None:
            # Not started, so not an attempt; its message is acknowledged, this thread is free.
            _store_retry(self.queue.enqueue)(job_id, AT_LIMIT_DELAY_S, tenant=tenant.name)
            log.info("job %s (tenant %s) waits: the tenant runs its max_concurrent (%d)",
                     job_id, tenant.name, tenant.max_concurrent)
            return
        try:
            self._run(job_id, tenant)
        finally:
            self.concurrency.release(lease, self.services.metrics.store_failed)

    def _lease(self, tenant: Tenant) -> Lease | None:
        try:
            return self.concurrency.acquire(tenant, self.lease_s)
        except (redis.ConnectionError, redis.TimeoutError):
            # Fails open, as the gateways' quota does: the store's own calls wait for Redis.
            self.services.metrics.store_failed()
            return Lease(tenant.name, None)

    def _run(self, job_id: str, tenant: Tenant) -> None:
        metrics, settings = self.services.metrics, self.services.settings
        record = _store_retry(self.store.start)(job_id)
        if record is None:
            log.info("job %s not run: canceled, finished or expired before it started", job_id)
            return
        cancel = self.watcher.watch(job_id)
        started = time.perf_counter()
        metrics.job_started()
        try:
            if record.cancel_requested:  # canceled between the start and the watch
                cancel.set()
            status, data, error = self._generate(record.request, cancel)
        except _NoRoom as busy:
            # Triton was full or away and made nothing: the job waits its turn again rather than
            # fail, as long as it is younger than its deadline.
            if time.time() - record.created_at + busy.delay_s < settings.job_deadline_s:
                if _store_retry(self.store.requeue)(job_id) is not None:
                    _store_retry(self.queue.enqueue)(job_id, busy.delay_s, tenant=tenant.name)
                    log.info("job %s (tenant %s) queued again in %gs: %s",
                             job_id, tenant.name, busy.delay_s, busy.reason)
                return
            status, data, error = JobStatus.FAILED, busy.error.data, _error(busy.error)
        finally:
            self.watcher.forget(job_id)
            metrics.job_ended()
        final = _store_retry(self.store.finish)(job_id, status, data=data, error=error)
        seconds = time.perf_counter() - started
        if final is None:
            log.info("job %s ran again after its worker died; the first run's end stands", job_id)
            return
        metrics.job_finished(status, seconds)
        metrics.tenant_job_finished(tenant.name, status, seconds)
        log.info("job %s (tenant %s) %s after %.2fs (attempt %d)",
                 job_id, tenant.name, status.value, seconds, final.attempts)
        if final.webhook is not None and settings.webhook_secrets:
            _store_retry(self.queue.enqueue_delivery)(job_id, 1, 0.0)

    def _generate(
        self, request: dict[str, Any], cancel: threading.Event
    ) -> tuple[JobStatus, dict[str, Any] | None, dict[str, Any] | None]:
        svc = self.services
        try:
            req = check_inputs(request, svc.settings, svc.limits.current())
            # Nobody waits on a job in person: it queues behind every interactive /generate.
            result = generate(
                svc, req, deadline_s=svc.settings.job_deadline_s, cancel=cancel,
                priority=Priority.BATCH,
            )
        except Canceled as exc:
            return JobStatus.CANCELED, None, _error(exc)
        except (Overloaded, Unavailable) as exc:  # queue full, queue timeout, Triton away
            raise _NoRoom(exc, svc.settings.retry_after_s) from None
        except GatewayError as exc:
            return JobStatus.FAILED, exc.data, _error(exc)
        except Exception:  # a bug: the job fails with the same 500 body /generate would send
            log.exception("job failed unexpectedly")
            return JobStatus.FAILED, None, {"code": "internal_error", "message": "internal error"}
        data = to_json(result.data)
        if result.upload is not None and not result.upload.ok:
            return JobStatus.FAILED, data, _error(UploadFailed(result.upload.describe()))
        return JobStatus.SUCCEEDED, data, None


class _NoRoom(Exception):
    """Triton refused the generation before making anything (429/503): worth another try."""

    def __init__(self, error: GatewayError, delay_s: float) -> None:
        super().__init__(error.message)
        self.error = error
        self.reason = error.message
        self.delay_s = float(error.retry_after or delay_s or 1)


def _error(exc: GatewayError) -> dict[str, Any]:
    detail: dict[str, Any] = exc.body()["error"]
    return detail
