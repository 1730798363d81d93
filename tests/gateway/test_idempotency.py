"""`Idempotency-Key` on POST /generate and POST /jobs, in-process: the Flask test client on the
session's Triton, the local S3, the fault server and a real Redis. A replay is checked against
Triton's own request counter; a repeat in flight is made with the diffusion model held; the key's
scope (API key, path), what is stored and what is released, the 503 of a gateway without a store,
and `gateway_idempotency_total`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from embedded.process import free_port
from embedded.s3 import LocalS3
from embedded.triton import TritonServer
from gateway import Settings
from gateway.errors import InvalidRequest
from gateway.idempotency import fingerprint, parse_key
from tests.gateway.faults import FaultServer
from tests.gateway.jobs.helpers import (
    SHAPE,
    TritonCounters,
    body,
    final_job,
    in_thread,
    poll,
    queue_size,
    records,
    store,
    worker_running,
)
from tests.gateway.test_metrics import value
from tests.models.helpers import diffusion_held

KEY_A = {"Authorization": "Bearer key-a"}
KEY_B = {"Authorization": "Bearer key-b"}
OUTCOMES = ("stored", "replayed", "conflict", "mismatch")


@pytest.fixture
def settings(triton_settings: Settings, redis_url: str) -> Settings:
    return triton_settings.replace(redis_url=redis_url, api_keys=("key-a", "key-b"))


@pytest.fixture
def app(make_app: Callable[[Settings], Flask], settings: Settings) -> Flask:
    return make_app(settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def keyed(key: str, auth: dict[str, str] = KEY_A, **more: str) -> dict[str, str]:
    return {**auth, "Idempotency-Key": key, **more}


def outcomes(client: FlaskClient) -> dict[str, float | None]:
    text = client.get("/metrics").get_data(as_text=True)
    return {o: value(text, "gateway_idempotency_total", outcome=o) for o in OUTCOMES}


def counted(**moved: int) -> dict[str, float]:
    return {o: float(moved.get(o, 0)) for o in OUTCOMES}


def idempotency_records(app: Flask) -> list[bytes]:
    return list(store(app).jobs.client.scan_iter(match="imagegen:idempotency:*"))


def inline(**fields: Any) -> dict[str, Any]:
    """A /generate body answered inline (no upload to clean up)."""
    return {**SHAPE, "response_format": "b64_json", **fields}


# -- /generate ---------------------------------------------------------------------------------


def test_a_replay_after_completion_is_the_stored_answer_and_triton_runs_once(
    app: Flask, client: FlaskClient, s3: LocalS3, triton: TritonServer
) -> None:
    counters = TritonCounters(triton)
    start = counters.requests()
    request = body(s3.presign_put("idempotency/replay/1.png"), seed=5)
    first = client.post("/generate", json=request, headers=keyed("replay-1"))
    assert first.status_code == 200, first.json
    assert "Idempotent-Replayed" not in first.headers
    before = counters.now(at_least_requests=start + 1)

    # The same fields in another order and spacing: the same request.
    reordered = json.dumps(dict(reversed(list(request.items()))), indent=2)
    replays = [
        client.post("/generate", json=request, headers=keyed("replay-1")),
        client.post("/generate", data=reordered, content_type="application/json",
                    headers=keyed('"replay-1"')),  # the draft's quoted form: the same key
    ]
    for replay in replays:
        assert replay.status_code == 200, replay.json
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert replay.json == first.json
    assert counters.now() == before  # no generation
    assert outcomes(client) == counted(stored=1, replayed=2)
    [record] = idempotency_records(app)
    assert 0 < store(app).jobs.client.ttl(record) <= app.extensions["gateway"].settings.idempotency_ttl_s


def test_a_repeat_while_the_first_is_in_flight_is_409_with_retry_after(
    app: Flask, client: FlaskClient, triton: TritonServer
) -> None:
    counters = TritonCounters(triton)
    request = inline(seed=6)
    with diffusion_held(triton):
        waiting = counters.in_queue()
        first_client = app.test_client()
        thread, out = in_thread(
            lambda: first_client.post("/generate", json=request, headers=keyed("in-flight"))
        )
        poll(lambda: counters.in_queue() > waiting, "the first request waits in Triton")
        repeat = client.post("/generate", json=request, headers=keyed("in-flight"))
        other_body = client.post("/generate", json=inline(seed=7), headers=keyed("in-flight"))
    thread.join()
    [first] = out
    assert repeat.status_code == 409, repeat.json
    assert repeat.json["error"]["code"] == "idempotency_key_in_use"
    assert repeat.json["error"]["field"] == "Idempotency-Key"
    assert repeat.headers["Retry-After"] == str(app.extensions["gateway"].settings.retry_after_s)
    assert other_body.status_code == 422, other_body.json  # another body: refused either way
    assert first.status_code == 200, first.json
    after = client.post("/generate", json=request, headers=keyed("in-flight"))
    assert (after.status_code, after.json) == (200, first.json)
    assert after.headers["Idempotent-Replayed"] == "true"
    assert outcomes(client) == counted(stored=1, replayed=1, conflict=1, mismatch=1)


def test_the_same_key_with_another_body_is_422_and_runs_nothing(
    client: FlaskClient, triton: TritonServer
) -> None:
    counters = TritonCounters(triton)
    start = counters.requests()
    first = client.post("/generate", json=inline(seed=8), headers=keyed("mismatch"))
    assert first.status_code == 200, first.json
    before = counters.now(at_least_requests=start + 1)
    for other in (inline(seed=9), inline(seed=8, prompt="another prompt"), inline()):
        response = client.post("/generate", json=other, headers=keyed("mismatch"))
        assert response.status_code == 422, response.json
        assert response.json["error"]["code"] == "idempotency_key_mismatch"
        assert response.json["error"]["field"] == "Idempotency-Key"
    assert counters.now() == before
    assert outcomes(client) == counted(stored=1, mismatch=3)


MALFORMED = [
    "",
    '""',
    "k" * 256,
    '"' + "k" * 256 + '"',
    "clé",
    '"clé"',
    '"unclosed',
    'unopened"',
    '"in"side"',
    '"bad\\escape"',
    "two words",
    "semi;colon",
]


@pytest.mark.parametrize("path", ["/generate", "/jobs"])
@pytest.mark.parametrize("key", MALFORMED)
def test_a_malformed_key_is_400_naming_the_header_and_stores_nothing(
    app: Flask, client: FlaskClient, s3: LocalS3, path: str, key: str
) -> None:
    request = body(s3.presign_put("idempotency/malformed/1.png"))
    response = client.post(path, json=request, headers=keyed(key))
    assert response.status_code == 400, response.json
    assert response.json["error"]["field"] == "Idempotency-Key"
    assert "Idempotency-Key" in response.json["error"]["message"]
    assert idempotency_records(app) == [] and records(app) == []


@pytest.mark.parametrize("key", ["k" * 255, '"' + "k" * 255 + '"', '"with \\"quotes\\" inside"',
                                 "8e03978e-40d5-43e8-bc93-6894a57f9324", "a:b/c+d=e~f.g_h"])
def test_well_formed_keys_are_taken(key: str) -> None:
    assert parse_key(key)
    with pytest.raises(InvalidRequest):
        parse_key(key + "\x7f")


def test_the_fingerprint_is_the_bodys_meaning() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": "1"})
    assert fingerprint({"a": "café"}) != fingerprint({"a": "cafe"})


@pytest.mark.parametrize("path", ["/generate", "/jobs"])
def test_a_request_refused_by_validation_stores_nothing(
    app: Flask, client: FlaskClient, s3: LocalS3, path: str
) -> None:
    url = s3.presign_put("idempotency/invalid/1.png")
    refused = client.post(path, json=body(url, width=63), headers=keyed("after-a-400"))
    assert refused.status_code == 400, refused.json
    assert refused.json["error"]["field"] == "width"
    assert idempotency_records(app) == []
    valid = client.post(path, json=body(url), headers=keyed("after-a-400"))
    assert valid.status_code == (200 if path == "/generate" else 202), valid.json
    assert "Idempotent-Replayed" not in valid.headers
    assert outcomes(client) == counted(stored=1)


def test_a_key_is_scoped_to_the_api_key_and_the_path(
    app: Flask, client: FlaskClient, s3: LocalS3, triton: TritonServer
) -> None:
    counters = TritonCounters(triton)
    request = body(s3.presign_put("idempotency/scope/1.png"), seed=10)
    start = counters.requests()
    first = client.post("/generate", json=request, headers=keyed("shared"))
    assert first.status_code == 200, first.json
    before = counters.now(at_least_requests=start + 1)

    other_owner = client.post("/generate", json=request, headers=keyed("shared", KEY_B))
    assert other_owner.status_code == 200, other_owner.json
    assert "Idempotent-Replayed" not in other_owner.headers
    counters.now(at_least_requests=before[0] + before[1] + 1)  # it ran again
    # On /jobs the same key and owner is another key: a job is made (not a 422 for the body
    # /generate stored, not its replay).
    job = client.post("/jobs", json=request, headers=keyed("shared"))
    assert job.status_code == 202, job.json
    assert "Idempotent-Replayed" not in job.headers
    again = client.post("/generate", json=request, headers=keyed("shared"))
    assert again.headers["Idempotent-Replayed"] == "true" and again.json == first.json
    assert outcomes(client) == counted(stored=3, replayed=1)


def test_a_failed_upload_is_stored_and_replayed(
    client: FlaskClient, fault_server: FaultServer
) -> None:
    fault_server.set_script(503)
    request = body(f"{fault_server.url}/b/1.png", seed=11)
    first = client.post("/generate", json=request, headers=keyed("upload-failed"))
    assert first.status_code == 502, first.json
    assert first.json["error"]["code"] == "upload_failed"
    sent = len(fault_server.requests)
    replay = client.post("/generate", json=request, headers=keyed("upload-failed"))
    assert (replay.status_code, replay.json) == (502, first.json)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert len(fault_server.requests) == sent  # nothing generated or uploaded again
    assert outcomes(client) == counted(stored=1, replayed=1)


def test_a_failure_that_made_nothing_releases_the_key(
    make_app: Callable[[Settings], Flask], settings: Settings, triton: TritonServer
) -> None:
    """A gateway whose Triton is away answers 503 and releases the key; the client's retry, on
    a gateway sharing the store whose Triton works, runs."""
    away = make_app(settings.replace(triton_url=f"127.0.0.1:{free_port()}")).test_client()
    working = make_app(settings).test_client()
    request = inline(seed=12)
    failed = away.post("/generate", json=request, headers=keyed("released"))
    assert failed.status_code == 503, failed.json
    assert failed.json["error"]["code"] == "unavailable"
    again = away.post("/generate", json=request, headers=keyed("released"))
    assert again.status_code == 503 and "Idempotent-Replayed" not in again.headers

    counters = TritonCounters(triton)
    start = counters.requests()
    retried = working.post("/generate", json=request, headers=keyed("released"))
    assert retried.status_code == 200, retried.json
    assert "Idempotent-Replayed" not in retried.headers
    counters.now(at_least_requests=start + 1)
    assert outcomes(away) == counted()
    assert outcomes(working) == counted(stored=1)


def test_a_gateway_without_a_store_refuses_keyed_requests_only(
    make_app: Callable[[Settings], Flask], triton_settings: Settings, s3: LocalS3,
    triton: TritonServer,
) -> None:
    client = make_app(triton_settings).test_client()
    counters = TritonCounters(triton)
    before = counters.now()
    refused = client.post("/generate", json=inline(seed=13), headers={"Idempotency-Key": "k"})
    assert refused.status_code == 503, refused.json
    assert refused.json["error"]["code"] == "unavailable"
    assert "GATEWAY_REDIS_URL" in refused.json["error"]["message"]
    assert counters.now() == before  # refused before Triton
    assert client.post("/generate", json=inline(seed=13)).status_code == 200
    job = client.post("/jobs", json=body(s3.presign_put("idempotency/nostore/1.png")))
    assert job.status_code == 503 and "GATEWAY_REDIS_URL" in job.json["error"]["message"]


# -- /jobs -------------------------------------------------------------------------------------


def test_a_job_replayed_after_it_ran_is_the_same_job_and_runs_once(
    app: Flask, client: FlaskClient, s3: LocalS3, triton: TritonServer
) -> None:
    counters = TritonCounters(triton)
    request = body(s3.presign_put("idempotency/job/1.png"), seed=14)
    start = counters.requests()
    with worker_running(app) as worker:
        first = client.post("/jobs", json=request, headers=keyed("job-1"))
        assert first.status_code == 202, first.json
        finished = final_job(client, first.json["id"], **KEY_A)
        assert finished["status"] == "succeeded"
        worker.drained()
        before = counters.now(at_least_requests=start + 1)
        replay = client.post("/jobs", json=request, headers=keyed("job-1"))
        worker.drained()
        assert counters.now() == before
    assert replay.status_code == 202, replay.json
    assert replay.json == first.json  # the answer as stored: the job as it was accepted
    assert replay.headers["Location"] == first.headers["Location"]
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert len(records(app)) == 1 and queue_size(app) == 0
    value_text = client.get("/metrics").get_data(as_text=True)
    assert value(value_text, "gateway_jobs_created_total") == 1

    # With Prefer: wait the replay reads the job as it is now.
    waited = client.post("/jobs", json=request, headers=keyed("job-1", Prefer="wait=5"))
    assert (waited.status_code, waited.json) == (200, finished)
    assert waited.headers["Idempotent-Replayed"] == "true"
    mismatch = client.post("/jobs", json={**request, "seed": 15}, headers=keyed("job-1"))
    assert mismatch.status_code == 422, mismatch.json
    # An explicit null webhook is no webhook: the same request.
    same = client.post("/jobs", json={**request, "webhook": None}, headers=keyed("job-1"))
    assert (same.status_code, same.json) == (202, first.json)
    assert same.headers["Idempotent-Replayed"] == "true"
    assert outcomes(client) == counted(stored=1, replayed=3, mismatch=1)
