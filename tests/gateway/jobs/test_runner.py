"""What a worker does with one job (`JobRunner.run`), in the test's own thread: a failed
generation ends the job `failed` with the error /generate answers for the same body; a job that
may not run never reaches Triton; the cancel watcher finds a cancel it did not hear; a finished
job with a webhook has its delivery queued. Real Triton, S3, fault server and Redis."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient

from embedded.s3 import LocalS3
from embedded.triton import TritonServer
from gateway import Settings
from gateway.jobs.queue import WEBHOOKS, tenant_queue
from gateway.jobs.runner import CancelWatcher
from tests.gateway.faults import FaultServer
from tests.gateway.jobs.helpers import (
    WAIT_S,
    TritonCounters,
    body,
    job_of,
    queued_ids,
    runner,
    store,
)
from tests.models.helpers import diffusion_held, diffusion_idle

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def app(make_app: Callable[[Settings], Flask], triton_settings: Settings, redis_url: str) -> Flask:
    return make_app(triton_settings.replace(redis_url=redis_url))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def test_a_job_whose_upload_fails_ends_failed_with_generates_error_and_data(
    app: Flask, client: FlaskClient, fault_server: FaultServer
) -> None:
    fault_server.set_script(500)  # every attempt
    request = body(f"{fault_server.url}/b/1.png", seed=77, enable_nsfw_check=True)
    job_id = client.post("/jobs", json=request).json["id"]
    runner(app).run(job_id)
    job = job_of(client, job_id)
    attempts = len(fault_server.requests)

    generated = client.post("/generate", json=request)
    assert generated.status_code == 502, generated.json
    assert job["status"] == "failed"
    assert job["error"] == generated.json["error"]
    assert job["error"]["code"] == "upload_failed"
    assert job["data"] == generated.json["data"]  # the same image: the same hash and status
    assert job["data"]["s3_upload_status"] == 500
    assert attempts == len(fault_server.requests) - attempts == 4  # retried the same way


def test_a_job_past_its_deadline_ends_failed_with_generates_504_error(
    make_app: Callable[[Settings], Flask],
    triton_settings: Settings,
    redis_url: str,
    triton: TritonServer,
    s3: LocalS3,
) -> None:
    app = make_app(triton_settings.replace(
        redis_url=redis_url, job_deadline_s=0.5, triton_deadline_s=0.5
    ))
    client = app.test_client()
    request = body(s3.presign_put("runner/deadline/1.png"))
    job_id = client.post("/jobs", json=request).json["id"]
    # The model is held busy: the deadline passes before either generation can end.
    with diffusion_held(triton):
        runner(app).run(job_id)
        generated = client.post("/generate", json=request)
    diffusion_idle(triton)  # what Triton still held has stopped (timeout_ms)
    job = job_of(client, job_id)
    assert generated.status_code == 504, generated.json
    assert job["status"] == "failed"
    assert job["error"] == generated.json["error"]
    assert job["error"]["code"] == "deadline_exceeded"
    assert job["data"] is None and "data" not in generated.json


def test_a_job_that_may_not_run_never_reaches_triton(
    app: Flask, client: FlaskClient, s3: LocalS3, triton: TritonServer
) -> None:
    counters = TritonCounters(triton)
    canceled = client.post("/jobs", json=body(s3.presign_put("runner/never/1.png"))).json["id"]
    canceled_job = client.post(f"/jobs/{canceled}/cancel").json
    before = counters.now()
    runner(app).run(canceled)
    runner(app).run("job_" + "x" * 32)  # expired, or never was
    assert counters.now() == before
    assert job_of(client, canceled) == canceled_job


def test_a_job_run_again_after_its_worker_died_keeps_the_first_end(
    app: Flask, client: FlaskClient, s3: LocalS3
) -> None:
    job_id = client.post("/jobs", json=body(s3.presign_put("runner/twice/1.png"))).json["id"]
    # A first worker took it and died before finishing it: the record says running.
    assert store(app).jobs.start(job_id) is not None
    runner(app).run(job_id)
    first = job_of(client, job_id)
    assert first["status"] == "succeeded"
    assert store(app).jobs.get(job_id).attempts == 2  # type: ignore[union-attr]
    runner(app).run(job_id)  # the message delivered once more: the job is final, left as it is
    assert job_of(client, job_id) == first


def test_the_cancel_watcher_finds_a_cancel_it_did_not_hear(
    app: Flask, client: FlaskClient, s3: LocalS3
) -> None:
    """A cancel published before the worker watched the job (or while Redis was away) is found
    by the watcher's sweep of the records."""
    jobs = store(app).jobs
    url = s3.presign_put("runner/sweep/1.png")
    job_id, going_on = (client.post("/jobs", json=body(url)).json["id"] for _ in range(2))
    assert jobs.start(job_id) is not None and jobs.start(going_on) is not None
    assert client.post(f"/jobs/{job_id}/cancel").json["status"] == "running"
    watcher = CancelWatcher(jobs, sweep_s=0.2).start()
    try:
        other = watcher.watch(going_on)
        event = watcher.watch(job_id)
        assert event.wait(WAIT_S)
        time.sleep(1.0)  # five more sweeps: the job nobody canceled is left alone
        assert not other.is_set()
    finally:
        watcher.stop()


def test_a_finished_job_with_a_webhook_has_its_delivery_queued(
    make_app: Callable[[Settings], Flask],
    triton_settings: Settings,
    redis_url: str,
    s3: LocalS3,
) -> None:
    app = make_app(triton_settings.replace(redis_url=redis_url, webhook_secrets=(SECRET,)))
    client = app.test_client()
    request = body(s3.presign_put("runner/webhook/1.png"), webhook="https://hooks.example.com/x")
    with_hook = client.post("/jobs", json=request).json["id"]
    without = client.post("/jobs", json=body(s3.presign_put("runner/webhook/1.png"))).json["id"]
    broker = store(app).queue.broker
    runner(app).run(without)
    assert broker.do_qsize(WEBHOOKS) == 0
    runner(app).run(with_hook)
    assert job_of(client, with_hook)["status"] == "succeeded"
    assert broker.do_qsize(WEBHOOKS) == 1  # attempt 1, at once


def test_a_job_triton_has_no_room_for_waits_its_turn_again_until_its_deadline(
    make_app: Callable[[Settings], Flask],
    triton_settings: Settings,
    redis_url: str,
    closed_port: int,
    s3: LocalS3,
) -> None:
    # Triton away (a closed port): nothing is made, the job goes back to the queue, delayed.
    away = triton_settings.replace(
        redis_url=redis_url, triton_url=f"127.0.0.1:{closed_port}", retry_after_s=1
    )
    app = make_app(away)
    client = app.test_client()
    job_id = client.post("/jobs", json=body(s3.presign_put("runner/no-room/1.png"))).json["id"]
    broker = store(app).queue.broker
    delay_queue = f"{tenant_queue(job_of(client, job_id)['tenant'])}.DQ"  # its tenant's
    delayed = int(broker.do_qsize(delay_queue))
    runner(app).run(job_id)
    job = job_of(client, job_id)
    assert job["status"] == "queued" and job["started_at"] is None, job
    assert job_id in queued_ids(app)
    assert int(broker.do_qsize(delay_queue)) == delayed + 1  # sent again, in retry_after_s

    # Once another try could not end before the job's deadline, it fails with /generate's answer.
    late = make_app(away.replace(job_deadline_s=1.0))
    late_client = late.test_client()
    runner(late).run(job_id)
    failed = job_of(late_client, job_id)
    generated = late_client.post("/generate", json=body(s3.presign_put("runner/no-room/2.png")))
    assert failed["status"] == "failed", failed
    assert generated.status_code == 503
    assert failed["error"]["code"] == generated.json["error"]["code"] == "unavailable"
    assert job_id not in queued_ids(app)
