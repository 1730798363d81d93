"""POST /jobs, GET /jobs/{id}, POST /jobs/{id}/cancel and `Prefer: wait`, in-process: the Flask
test client on the session's Triton, the local S3 and a real Redis, jobs run by a Dramatiq worker
in this process (tests/gateway/jobs/helpers.py). A job is compared with what /generate answers for
the same body; cancels are checked against Triton's own counters; a job that must not end in
time is held in the diffusion model or left without a worker, never raced."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from embedded.s3 import LocalS3
from embedded.triton import TritonServer
from gateway import Settings
from gateway.jobs.job import new_job_id
from tests.gateway.jobs.helpers import (
    SHAPE,
    TritonCounters,
    body,
    final_job,
    job_of,
    poll,
    queue_size,
    queued_ids,
    records,
    runner,
    store,
    worker_running,
)
from tests.gateway.test_metrics import value
from tests.models.helpers import diffusion_held, diffusion_idle, diffusion_steps

JOB_FIELDS = ["id", "tenant", "status", "created_at", "started_at", "completed_at", "data", "error", "urls"]
JOB_ID = re.compile(r"job_[A-Za-z0-9_-]{32}")
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def jobs_settings(triton_settings: Settings, redis_url: str) -> Settings:
    return triton_settings.replace(redis_url=redis_url)


@pytest.fixture
def app(make_app: Callable[[Settings], Flask], jobs_settings: Settings) -> Flask:
    return make_app(jobs_settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def moment(stamp: str) -> float:
    assert RFC3339_UTC.fullmatch(stamp), stamp
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def metric_value(client: FlaskClient, name: str, **labels: str) -> float | None:
    return value(client.get("/metrics").get_data(as_text=True), name, **labels)


# -- POST /jobs and GET /jobs/{id} -----------------------------------------------------------------


def test_a_job_is_accepted_queued_then_ends_with_what_generate_answers(
    app: Flask, client: FlaskClient, s3: LocalS3
) -> None:
    request = body(s3.presign_put("jobs/accepted/1.png"), seed=1234)
    before = time.time()
    response = client.post("/jobs", json=request)
    after = time.time()

    assert response.status_code == 202, response.json
    job = response.json
    assert list(job) == JOB_FIELDS
    assert JOB_ID.fullmatch(job["id"]), job["id"]
    job_id = job["id"]
    assert response.headers["Location"] == f"/jobs/{job_id}"
    # Milliseconds, truncated: within the request's own time.
    assert before - 0.001 <= moment(job["created_at"]) <= after
    assert job["status"] == "queued"
    assert (job["started_at"], job["completed_at"], job["data"], job["error"]) == (None,) * 4
    assert job["urls"] == {"get": f"/jobs/{job_id}", "cancel": f"/jobs/{job_id}/cancel"}
    assert job_of(client, job_id) == job
    assert queued_ids(app) == {job_id} and queue_size(app) == 1
    assert metric_value(client, "gateway_jobs_created_total") == 1
    assert metric_value(client, "gateway_jobs_queued") == 1

    with worker_running(app) as worker:
        final = final_job(client, job_id)
        worker.drained()

    assert final["status"] == "succeeded", final
    assert final["error"] is None
    assert (final["id"], final["created_at"], final["urls"]) == (job_id, job["created_at"], job["urls"])
    created, started, completed = (moment(final[k]) for k in ("created_at", "started_at", "completed_at"))
    assert created <= started <= completed
    assert queued_ids(app) == set() and queue_size(app) == 0

    # The same body on /generate: the same data block, key for key and value for value (the
    # seed fixes the image, so the hash too).
    generated = client.post("/generate", json=request)
    assert generated.status_code == 200, generated.json
    assert list(final["data"]) == list(generated.json["data"])
    assert final["data"] == generated.json["data"]
    image_hash = final["data"]["image_hash"]
    assert final["data"]["s3_upload_status"] == 200
    stored = s3.get(f"jobs/accepted/{image_hash}.jpg")
    assert hashlib.md5(stored).hexdigest() == image_hash


def refused_bodies(s3_url: str) -> list[tuple[dict[str, Any], str]]:
    return [
        (body(s3_url, width=63), "width"),
        (body(s3_url, num_inference_steps="many"), "num_inference_steps"),
        ({**SHAPE, "response_format": "b64_json"}, "response_format"),
        (body(s3_url, webhook="http://hooks.example.com/imagegen"), "webhook"),  # https only
        (body(s3_url, webhook="not a url"), "webhook"),
        (body(s3_url, webhook=["https://hooks.example.com/imagegen"]), "webhook"),
    ]


@pytest.mark.parametrize("case", range(len(refused_bodies(""))))
def test_a_refused_job_queues_nothing(
    make_app: Callable[[Settings], Flask], jobs_settings: Settings, s3: LocalS3, case: int
) -> None:
    app = make_app(jobs_settings.replace(webhook_secrets=(SECRET,)))
    client = app.test_client()
    request, field = refused_bodies(s3.presign_put("jobs/refused/1.png"))[case]
    response = client.post("/jobs", json=request)
    assert response.status_code == 400, response.json
    assert response.json["error"]["code"] == "invalid_request"
    assert response.json["error"]["field"] == field
    assert queued_ids(app) == set() and queue_size(app) == 0 and records(app) == []
    assert metric_value(client, "gateway_jobs_created_total") == 0


def test_a_webhook_without_a_configured_secret_is_refused_and_nothing_is_queued(
    app: Flask, client: FlaskClient, s3: LocalS3
) -> None:
    request = body(s3.presign_put("jobs/refused/1.png"), webhook="https://hooks.example.com/x")
    response = client.post("/jobs", json=request)
    assert response.status_code == 400, response.json
    assert response.json["error"]["field"] == "webhook"
    assert "GATEWAY_WEBHOOK_SECRETS" in response.json["error"]["message"]
    assert queued_ids(app) == set() and queue_size(app) == 0 and records(app) == []


def test_a_job_of_another_key_an_unknown_id_and_a_malformed_id_are_the_same_404(
    make_app: Callable[[Settings], Flask], jobs_settings: Settings, s3: LocalS3
) -> None:
    app = make_app(jobs_settings.replace(api_keys=("key-a", "key-b")))
    client = app.test_client()
    owner = {"Authorization": "Bearer key-a"}
    other = {"Authorization": "Bearer key-b"}
    created = client.post("/jobs", json=body(s3.presign_put("jobs/owned/1.png")), headers=owner)
    assert created.status_code == 202, created.json
    job_id = created.json["id"]
    assert client.get(f"/jobs/{job_id}", headers=owner).json == created.json

    answers = [
        client.get(f"/jobs/{job_id}", headers=other),
        client.post(f"/jobs/{job_id}/cancel", headers=other),
        client.get(f"/jobs/{new_job_id()}", headers=owner),
        client.post(f"/jobs/{new_job_id()}/cancel", headers=owner),
        client.get("/jobs/nope", headers=owner),
        client.get(f"/jobs/{job_id}x", headers=owner),
        client.get(f"/jobs/{job_id[:-1]}!", headers=owner),
        client.post("/jobs/job_/cancel", headers=owner),
    ]
    assert [a.status_code for a in answers] == [404] * len(answers)
    assert all(a.json == answers[0].json for a in answers), [a.json for a in answers]
    assert answers[0].json["error"]["code"] == "not_found"
    # The other key's cancel changed nothing; no key at all is a 401, not a 404.
    assert client.get(f"/jobs/{job_id}", headers=owner).json == created.json
    assert client.get(f"/jobs/{job_id}").status_code == 401


def test_a_finished_job_expires_after_the_ttl_and_not_before_it_ends(
    make_app: Callable[[Settings], Flask], jobs_settings: Settings, s3: LocalS3
) -> None:
    app = make_app(jobs_settings.replace(job_ttl_s=60))  # the setting's minimum
    client = app.test_client()
    job_id = client.post("/jobs", json=body(s3.presign_put("jobs/ttl/1.png"))).json["id"]
    redis_client = store(app).jobs.client
    key = f"imagegen:job:{job_id}"
    assert redis_client.ttl(key) == -1  # queued: no expiry
    runner(app).run(job_id)
    assert job_of(client, job_id)["status"] == "succeeded"
    assert 0 < redis_client.ttl(key) <= 60

    canceled = client.post("/jobs", json=body(s3.presign_put("jobs/ttl/1.png"))).json["id"]
    assert client.post(f"/jobs/{canceled}/cancel").json["status"] == "canceled"
    assert 0 < redis_client.ttl(f"imagegen:job:{canceled}") <= 60


# -- cancel ------------------------------------------------------------------------------------


def test_a_queued_job_is_canceled_at_once_and_never_reaches_triton(
    app: Flask, client: FlaskClient, s3: LocalS3, triton: TritonServer
) -> None:
    counters = TritonCounters(triton)
    job = client.post("/jobs", json=body(s3.presign_put("jobs/canceled/1.png"))).json
    before = counters.now()

    response = client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 200, response.json
    canceled = response.json
    assert canceled["status"] == "canceled"
    assert canceled["error"] == {"code": "canceled", "message": "the job was canceled"}
    assert canceled["started_at"] is None and canceled["data"] is None
    assert moment(canceled["created_at"]) <= moment(canceled["completed_at"])
    assert job_of(client, job["id"]) == canceled
    assert queued_ids(app) == set()  # no longer counted as waiting
    assert queue_size(app) == 1  # its message is still in Dramatiq's queue...

    with worker_running(app) as worker:
        worker.drained()  # ...and a worker takes it and drops it
    assert counters.now() == before  # Triton saw nothing: no request, no step
    assert job_of(client, job["id"]) == canceled
    # A final job is answered as it is.
    again = client.post(f"/jobs/{job['id']}/cancel")
    assert (again.status_code, again.json) == (200, canceled)


def test_a_running_job_is_canceled_inside_triton(
    app: Flask, client: FlaskClient, s3: LocalS3, triton: TritonServer
) -> None:
    """The job's generation waits in the diffusion model's queue behind a held one; its cancel
    reaches Triton: once the model is free again, the job's steps never run."""
    counters = TritonCounters(triton)
    with worker_running(app), diffusion_held(triton):
        waiting = counters.in_queue()
        job_id = client.post("/jobs", json=body(s3.presign_put("jobs/running/1.png"))).json["id"]
        poll(lambda: job_of(client, job_id)["status"] == "running"
             and counters.in_queue() > waiting, "the job's generation waits in Triton")

        response = client.post(f"/jobs/{job_id}/cancel")
        assert response.status_code == 200, response.json
        assert response.json["status"] == "running"  # as it is now: asked to stop
        steps = diffusion_steps(triton)
        final = final_job(client, job_id)
        assert diffusion_steps(triton) == steps
        time.sleep(0.5)
        assert diffusion_steps(triton) == steps
    assert final["status"] == "canceled", final
    assert final["error"] == {"code": "canceled", "message": "the job was canceled"}
    assert final["data"] is None and final["started_at"] is not None
    # The held generation is stopped; one step sent now runs after anything still queued there:
    # only that step is counted, none of the job's.
    diffusion_idle(triton)
    assert diffusion_steps(triton) == steps + 1
    assert metric_value(client, "worker_jobs_total", status="canceled") == 1
    assert metric_value(client, "worker_jobs_running") == 0


def test_a_finished_job_is_answered_unchanged_by_cancel(
    app: Flask, client: FlaskClient, s3: LocalS3
) -> None:
    job_id = client.post("/jobs", json=body(s3.presign_put("jobs/finished/1.png"))).json["id"]
    runner(app).run(job_id)
    finished = job_of(client, job_id)
    assert finished["status"] == "succeeded"
    response = client.post(f"/jobs/{job_id}/cancel")
    assert (response.status_code, response.json) == (200, finished)
    assert job_of(client, job_id) == finished


# -- Prefer: wait ------------------------------------------------------------------------------


def test_prefer_wait_answers_200_with_the_finished_job(
    make_app: Callable[[Settings], Flask], jobs_settings: Settings, s3: LocalS3
) -> None:
    app = make_app(jobs_settings.replace(job_max_wait_s=600))
    client = app.test_client()
    with worker_running(app):
        response = client.post(
            "/jobs", json=body(s3.presign_put("jobs/wait/1.png")), headers={"Prefer": "wait=600"}
        )
    assert response.status_code == 200, response.json
    assert response.json["status"] == "succeeded"
    assert response.headers["Preference-Applied"] == "wait=600"
    assert response.headers["Location"] == f"/jobs/{response.json['id']}"
    assert response.json == job_of(client, response.json["id"])


def test_prefer_wait_answers_202_when_the_job_is_still_running(
    app: Flask, client: FlaskClient, s3: LocalS3, triton: TritonServer
) -> None:
    with worker_running(app), diffusion_held(triton):
        started = time.monotonic()
        response = client.post(
            "/jobs",
            json=body(s3.presign_put("jobs/wait/1.png")),
            headers={"Prefer": "respond-async, wait=1"},
        )
        waited = time.monotonic() - started
        assert response.status_code == 202, response.json
        assert response.headers["Preference-Applied"] == "wait=1"
        assert response.json["status"] in ("queued", "running")
        assert waited >= 1.0
        client.post(f"/jobs/{response.json['id']}/cancel")
        assert final_job(client, response.json["id"])["status"] == "canceled"


@pytest.mark.parametrize(
    ("prefer", "max_wait_s", "applied"),
    [("wait=100", 1, "wait=1"), ("WAIT = 5", 1, "wait=1"), ("wait=100", 0, None),
     ("respond-async", 60, None), ("handling=lenient", 60, None)],
)
def test_prefer_wait_is_clipped_to_the_setting_and_only_waits_when_asked(
    make_app: Callable[[Settings], Flask],
    jobs_settings: Settings,
    s3: LocalS3,
    prefer: str,
    max_wait_s: float,
    applied: str | None,
) -> None:
    """No worker runs: the job stays queued, so every answer is a 202."""
    app = make_app(jobs_settings.replace(job_max_wait_s=max_wait_s))
    client = app.test_client()
    started = time.monotonic()
    response = client.post(
        "/jobs", json=body(s3.presign_put("jobs/wait/1.png")), headers={"Prefer": prefer}
    )
    waited = time.monotonic() - started
    assert response.status_code == 202, response.json
    assert response.json["status"] == "queued"
    assert response.headers.get("Preference-Applied") == applied
    if applied is not None:
        assert 1.0 <= waited < 60  # held for the applied second, not the 100 asked for
