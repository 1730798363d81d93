"""The deliver_webhook actor's work: one attempt of a finished job's webhook, and the next one
queued with its delay when the schedule says so.

Each attempt is a message of its own, delayed in the broker (Dramatiq's delay queue), so a worker
thread never sleeps through a backoff and a worker that stops loses no pending retry. The body
is the job object as it is when the attempt is sent (final, so the same every time); the
`webhook-id` is the job id with its final status, the same on every retry.
"""

from __future__ import annotations

import json
import logging

from gateway.jobs.queue import JobQueue
from gateway.jobs.store import JobStore
from gateway.jobs.webhooks import Webhooks
from gateway.schema import to_json
from gateway.services import Services, ssl_context

log = logging.getLogger(__name__)


def message_id(job_id: str, status: str) -> str:
    return f"msg_{job_id}_{status}"


def body_of(job: dict[str, object]) -> bytes:
    return json.dumps(job, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class WebhookDeliverer:
    def __init__(self, services: Services, store: JobStore, queue: JobQueue) -> None:
        self.store = store
        self.queue = queue
        self.webhooks = Webhooks(
            services.settings,
            metrics=services.metrics,
            ssl_context=ssl_context(services.settings.upload_ca_bundle),
        )

    def deliver(self, job_id: str, attempt: int) -> None:
        record = self.store.get(job_id)
        if record is None or record.webhook is None or not record.status.final:
            log.info("webhook of job %s not sent: the job is gone or not finished", job_id)
            return
        body = body_of(to_json(record.public()))
        sent = self.webhooks.send(
            job_id, record.webhook, message_id(job_id, record.status.value), body, number=attempt
        )
        if sent.retry_in is not None:
            self.queue.enqueue_delivery(job_id, attempt + 1, sent.retry_in)
