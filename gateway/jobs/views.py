"""The job endpoints: POST /jobs, GET /jobs/{id}, POST /jobs/{id}/cancel.

Each parses the request, calls the store or the queue, and serialises the job object.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from gateway.auth import api_owner, api_tenant
from gateway.bodies import read_body
from gateway.errors import InvalidRequest, NotFound
from gateway.fields import parse_body
from gateway.generate import MAX_URL_CHARS, ResponseFormat, UploadTo, check_inputs
from gateway.idempotency import HEADER, fingerprint, parse_key, run_once
from gateway.jobs.job import ID_PATTERN, JobRecord, new_job_id
from gateway.jobs.store import UNCONFIRMED_S
from gateway.jobs.webhooks import FIELD as WEBHOOK
from gateway.jobs.webhooks import check_webhook_url
from gateway.schema import to_json
from gateway.services import Services
from gateway.vocabulary import JobStatus

bp = Blueprint("jobs", __name__)

# RFC 7240: `Prefer: wait=N` (among other preferences, in any case, with optional spaces).
_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d{1,6})\"?(?=$|[,;\s])", re.IGNORECASE)


class _Waiters:
    """At most GATEWAY_MAX_IN_FLIGHT requests of a process hold their thread waiting for a
    job; past that, a `Prefer: wait` is not applied (the answer is 202 at once): a preference
    may be ignored, a thread that every waiter took would not come back."""

    def __init__(self, limit: int) -> None:
        self.slots = threading.BoundedSemaphore(limit)


def services() -> Services:
    return current_app.extensions["gateway"]


def _waiters() -> _Waiters:
    return current_app.extensions.setdefault(
        "gateway_job_waiters", _Waiters(services().settings.max_in_flight)
    )


def _job_response(record: JobRecord, status: int, **headers: str) -> Response:
    response = jsonify(to_json(record.public()))
    response.status_code = status
    response.headers.update(headers)
    return response


def requested_wait(header: str | None) -> int | None:
    """The seconds a `Prefer: wait=N` asks for, or None."""
    match = _WAIT.search(header or "")
    return int(match.group(1)) if match else None


@bp.post("/jobs", endpoint="create")
def create_job() -> Any:
    svc = services()
    settings = svc.settings
    payload = parse_body(read_body(settings.max_body_bytes), request.content_type)
    webhook = payload.pop(WEBHOOK, None) if isinstance(payload, dict) else None
    # Validated exactly as /generate is, before anything is stored or queued.
    req = check_inputs(payload, settings, svc.limits.current())
    if not isinstance(req.output, UploadTo):
        raise InvalidRequest(
            f'jobs deliver to storage: response_format must be "{ResponseFormat.S3.value}" '
            "(an image inline would sit in the job store for the job's whole TTL)",
            field="response_format",
        )
    if webhook is not None:
        if not isinstance(webhook, str) or len(webhook) > MAX_URL_CHARS:
            raise InvalidRequest(
                f"webhook must be a string of at most {MAX_URL_CHARS} characters (an https URL)",
                field=WEBHOOK,
            )
        check_webhook_url(webhook, settings)
    key = parse_key(request.headers.get(HEADER))
    store = svc.require_store()
    owner = api_owner()
    tenant = api_tenant().name

    def create() -> tuple[int, Any, dict[str, str]]:
        record = JobRecord(
            id=new_job_id(),
            owner=owner,
            tenant=tenant,
            status=JobStatus.QUEUED,
            created_at=time.time(),
            request=payload,
            webhook=webhook,
        )
        store.jobs.create(record, unconfirmed_s=UNCONFIRMED_S)
        try:
            store.queue.enqueue(record.id, tenant=tenant)
            store.jobs.confirm(record.id)
        except BaseException:
            store.jobs.forget(record)
            raise
        svc.metrics.job_created()
        return 202, to_json(record.public()), {"Location": record.public().urls.get}

    if key is None:
        status, body, headers = create()
    else:
        stored = {**payload, WEBHOOK: webhook}
        status, body, headers = run_once(
            store.idempotency, (owner, request.path), key, fingerprint(stored), create,
            counted=svc.metrics.idempotency,
        )
    wait = requested_wait(request.headers.get("Prefer"))
    if status == 202 and wait is not None:
        return _waited(store, owner, body["id"], min(wait, settings.job_max_wait_s), headers)
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers)
    return response


def _waited(store: Any, owner: str, job_id: str, wait_s: float, headers: dict[str, str]) -> Any:
    """Hold the answer up to `wait_s` for the job to end: 200 with it if it did, else 202."""
    waiters = _waiters()
    if wait_s <= 0 or not waiters.slots.acquire(blocking=False):
        record = store.jobs.get(job_id, owner)
        if record is None:
            raise NotFound("no such job")
        return _job_response(record, 202, **headers)
    try:
        record = store.jobs.wait_final(job_id, owner, wait_s)
    finally:
        waiters.slots.release()
    if record is None:
        raise NotFound("no such job")
    applied = {"Preference-Applied": f"wait={int(wait_s)}"}
    return _job_response(record, 200 if record.status.final else 202, **headers, **applied)


def _checked_id(job_id: str) -> str:
    if not re.fullmatch(ID_PATTERN, job_id):
        raise NotFound("no such job")  # the same answer as an unknown id: nothing to learn
    return job_id


@bp.get("/jobs/<job_id>", endpoint="get")
def get_job(job_id: str) -> Any:
    store = services().require_store()
    record = store.jobs.get(_checked_id(job_id), api_owner())
    if record is None:
        raise NotFound("no such job")
    return _job_response(record, 200)


@bp.post("/jobs/<job_id>/cancel", endpoint="cancel")
def cancel_job(job_id: str) -> Any:
    store = services().require_store()
    record = store.jobs.cancel(_checked_id(job_id), api_owner())
    if record is None:
        raise NotFound("no such job")
    return _job_response(record, 200)
