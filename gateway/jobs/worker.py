"""The job worker: `python -m gateway.jobs.worker`, one process of GATEWAY_WORKER_THREADS threads
that run jobs from the store's queue and deliver their webhooks.

It reads the same GATEWAY_* settings as the gateway (Triton, uploads, the store, webhooks, the
tenants file: it consumes the queue of each tenant there, in turns), and serves its metrics on
GATEWAY_WORKER_METRICS_PORT. SIGTERM (or SIGINT): it takes no more jobs,
gives back the ones it fetched but has not started, and finishes the ones it runs (within the job
deadline plus the uploads' time), then exits 0.
"""

from __future__ import annotations

import logging
import logging.config
import os
import signal
import sys
import threading
from types import FrameType

from prometheus_client import start_http_server

from gateway.jobs.delivery import WebhookDeliverer
from gateway.jobs.queue import JobQueue
from gateway.jobs.runner import CancelWatcher, JobRunner
from gateway.jobs.store import connect
from gateway.logs import logging_config
from gateway.metrics import Metrics
from gateway.services import Services
from gateway.settings import PREFIX, Settings, SettingsError
from gateway.tenants.tenant import Tenants

log = logging.getLogger("gateway.jobs.worker")


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings.from_env(os.environ)
        if settings.redis_url is None:
            raise SettingsError(f"the job worker needs {PREFIX}REDIS_URL")
        tenants = Tenants.from_settings(settings)
    except SettingsError as exc:
        print(f"gateway.jobs.worker: {exc}", file=sys.stderr)
        return 2
    logging.config.dictConfig(logging_config(settings.log_level))
    metrics = Metrics()
    services = Services.build(settings, metrics)
    store = services.require_store()
    # Unlike the gateways' broker client, the consumers' waits for Redis's replies: a fetch it
    # gave up on (Redis slow or frozen past GATEWAY_REDIS_TIMEOUT_S) is still carried out once
    # Redis goes on, and the messages it took would sit with this live worker, never run.
    queue = JobQueue(
        connect(settings.redis_url, settings.redis_timeout_s, wait_for_replies=True),
        requeue_s=settings.worker_requeue_s,
        retry_after_s=settings.retry_after_s,
        failed=metrics.store_failed,
    )
    watcher = CancelWatcher(store.jobs).start()
    runner = JobRunner(services, store.jobs, queue, watcher, tenants)
    queue.handlers.run_job = runner.run
    queue.handlers.deliver_webhook = WebhookDeliverer(services, store.jobs, queue).deliver

    if settings.worker_metrics_port is not None:
        start_http_server(settings.worker_metrics_port, addr=settings.host, registry=metrics.registry)

    stopping = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: finishing the jobs this worker holds", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    # Fetch little more than it can run (one waiting message per queue, for its turn): a job
    # waiting in one worker's memory is a job another worker could be running, and a SIGKILL
    # would delay it by GATEWAY_WORKER_REQUEUE_S.
    worker = queue.worker(runner.queue_tenants, settings.worker_threads)
    heartbeat = threading.Thread(
        target=queue.heartbeat,
        args=(stopping, settings.worker_requeue_s / 4),
        name="heartbeat",
        daemon=True,
    )
    worker.start()
    heartbeat.start()
    log.info(
        "worker started: %d threads, the queues of tenants %s, metrics on %s",
        settings.worker_threads,
        ", ".join(runner.queue_tenants),
        settings.worker_metrics_port or "no port",
    )
    stopping.wait()
    grace_s = settings.job_deadline_s + settings.longest_request_s
    worker.stop(timeout=int(grace_s * 1000))
    watcher.stop()
    services.close()
    log.info("worker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
