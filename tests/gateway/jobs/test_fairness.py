"""Fair queues across tenants, with a real worker process (`python -m gateway.jobs.worker`) on
the session's Triton and a real Redis: each tenant's jobs go to its own queue; a tenant's flood
does not delay another tenant's job by more than the work already running; a tenant's running
jobs never exceed its max_concurrent. The model is held while jobs are queued, so what runs
when is decided by the worker, not by the machine's speed (tests/models/helpers.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from embedded.process import free_port
from embedded.redis import JobWorker
from embedded.s3 import LocalS3
from embedded.triton import PROJECT_ROOT, TritonServer
from gateway import Settings
from gateway.jobs.queue import JOBS, NAMESPACE, tenant_queue
from gateway.jobs.store import tenant_queued
from gateway.tenants.concurrency import Concurrency
from tests.gateway.jobs.helpers import WAIT_S, body, final_job, poll
from tests.gateway.tenants.helpers import tenant_entry
from tests.gateway.test_metrics import value
from tests.models.helpers import DIFFUSION, diffusion_held, diffusion_pending, metric, model_config

MAX_BATCH = model_config(DIFFUSION).max_batch_size
# As many threads as a batch: a flood fills every thread and the model's whole next pass.
THREADS = MAX_BATCH
CAP = 2
KEYS = {name: f"fairness-{name}-{uuid.uuid4().hex}" for name in ("alpha", "beta", "capped")}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@dataclass
class Stack:
    app: Flask
    client: FlaskClient
    worker: JobWorker
    redis: redis.Redis
    s3: LocalS3
    triton: TritonServer

    def submit(self, tenant: str, index: int) -> str:
        url = self.s3.presign_put(f"fairness/{tenant}/{index}.png")
        response = self.client.post("/jobs", json=body(url), headers=auth(tenant))
        assert response.status_code == 202, response.json
        job_id: str = response.json["id"]
        return job_id

    def record(self, job_id: str) -> dict[str, Any]:
        raw = self.redis.get(f"imagegen:job:{job_id}")
        assert raw is not None
        stored: dict[str, Any] = json.loads(raw)
        return stored

    def running(self, ids: list[str]) -> list[str]:
        return [i for i in ids if self.record(i)["status"] == "running"]

    def log(self) -> str:
        assert self.worker.log_path is not None
        return self.worker.log_path.read_text(errors="replace")

    def queue_length(self, queue: str) -> int:
        """Messages waiting in a Dramatiq queue's list (fetched ones have left it)."""
        return int(self.redis.llen(f"{NAMESPACE}:{queue}"))


@pytest.fixture
def tenants_file(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text("".join(
        tenant_entry(name, key, max_concurrent=CAP if name == "capped" else 0)
        for name, key in KEYS.items()
    ))
    return path


def settings_env(triton: TritonServer, s3: LocalS3, redis_url: str, tenants: Path) -> dict[str, str]:
    return {
        "GATEWAY_TRITON_URL": triton.grpc_url,
        "GATEWAY_TRITON_METRICS_URL": triton.metrics_url,
        # A held job's generation waits in the model's queue as long as a test holds it.
        "GATEWAY_TRITON_QUEUE_TIMEOUT_S": "300",
        "GATEWAY_UPLOAD_ALLOWED_HOSTS": f"http://{s3.hostport}",
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_TENANTS_FILE": str(tenants),
        "GATEWAY_WORKER_THREADS": str(THREADS),
    }


@pytest.fixture
def stack(
    make_app: Callable[[Settings], Flask],
    triton: TritonServer,
    s3: LocalS3,
    redis_url: str,
    tenants_file: Path,
    tmp_path: Path,
) -> Iterator[Stack]:
    env = settings_env(triton, s3, redis_url, tenants_file)
    app = make_app(Settings.from_env(env))
    worker = JobWorker({**env, "PYTHONPATH": str(PROJECT_ROOT)}, free_port(), tmp_path / "worker.log")
    worker.cwd = PROJECT_ROOT
    worker.start()
    try:
        worker.wait_ready(timeout=WAIT_S)
        yield Stack(app, app.test_client(), worker, redis.Redis.from_url(redis_url), s3, triton)
    finally:
        assert worker.stop() == 0


def started(job: dict[str, Any]) -> float:
    return datetime.fromisoformat(job["started_at"].replace("Z", "+00:00")).timestamp()


def test_a_tenants_job_goes_to_its_own_queue_and_names_its_tenant(
    make_app: Callable[[Settings], Flask],
    triton: TritonServer,
    s3: LocalS3,
    redis_url: str,
    tenants_file: Path,
) -> None:
    app = make_app(Settings.from_env(settings_env(triton, s3, redis_url, tenants_file)))
    client = app.test_client()
    url = s3.presign_put("fairness/routing/1.png")
    created = client.post("/jobs", json=body(url), headers=auth("beta"))
    assert created.status_code == 202, created.json
    job_id = created.json["id"]
    assert created.json["tenant"] == "beta"
    assert client.get(f"/jobs/{job_id}", headers=auth("beta")).json["tenant"] == "beta"
    store = redis.Redis.from_url(redis_url)
    raw = store.get(f"imagegen:job:{job_id}")
    assert raw is not None and json.loads(raw)["tenant"] == "beta"
    assert KEYS["beta"].encode() not in raw  # the owner is the key's digest, never the key
    # No worker runs here: the message waits in beta's queue, the tenant's depth counts it.
    assert store.llen(f"{NAMESPACE}:{tenant_queue('beta')}") == 1
    assert store.llen(f"{NAMESPACE}:{JOBS}") == store.llen(f"{NAMESPACE}:{tenant_queue('alpha')}") == 0
    assert store.zrange(tenant_queued("beta"), 0, -1) == [job_id.encode()]
    text = client.get("/metrics").get_data(as_text=True)
    assert value(text, "gateway_tenant_jobs_queued", tenant="beta") == 1
    assert value(text, "gateway_tenant_jobs_queued", tenant="alpha") == 0
    assert value(text, "gateway_tenant_jobs_queued", tenant="capped") == 0
    # Canceled while queued: it leaves its tenant's depth too.
    assert client.post(f"/jobs/{job_id}/cancel", headers=auth("beta")).json["status"] == "canceled"
    assert store.zcard(tenant_queued("beta")) == 0


def test_one_tenants_flood_delays_another_tenants_job_by_at_most_one_batch(stack: Stack) -> None:
    with diffusion_held(stack.triton):
        flood = [stack.submit("alpha", i) for i in range(40)]
        # Every thread runs one of alpha's jobs (waiting in the held model): nothing else can
        # start until the model lets them go.
        poll(lambda: len(stack.running(flood)) == THREADS, f"{THREADS} of alpha's jobs run")
        poll(lambda: diffusion_pending(stack.triton) >= THREADS, "the model holds them")
        ahead = set(stack.running(flood))
        lone = stack.submit("beta", 0)
        # The worker has fetched beta's job (it waits there for a thread, its turn next).
        poll(lambda: stack.queue_length(tenant_queue("beta")) == 0, "the worker took beta's job")
    beta = final_job(stack.client, lone, **auth("beta"))
    alphas = [final_job(stack.client, i, **auth("alpha")) for i in flood]
    assert beta["status"] == "succeeded", beta
    assert all(job["status"] == "succeeded" for job in alphas)
    # Alpha's jobs that started after beta's was queued, and before beta's started.
    overtook = [job for job in alphas if job["id"] not in ahead and started(job) < started(beta)]
    assert len(overtook) <= MAX_BATCH, (len(overtook), MAX_BATCH)
    assert beta["tenant"] == "beta" and {job["tenant"] for job in alphas} == {"alpha"}


def test_a_tenants_running_jobs_never_exceed_its_max_concurrent(stack: Stack) -> None:
    assert THREADS > CAP + 2  # threads to spare: only the tenant's limit holds its jobs back
    concurrency = Concurrency(stack.redis)
    with diffusion_held(stack.triton):
        ids = [stack.submit("capped", i) for i in range(5)]
        poll(lambda: len(stack.running(ids)) == CAP, f"{CAP} of the jobs run")
        # The others were taken up and sent back, unstarted, each at least once.
        waiting = [i for i in ids if i not in stack.running(ids)]
        poll(lambda: all(f"job {i} (tenant capped) waits" in stack.log() for i in waiting),
             "the worker sent back the jobs over the limit")
        assert len(stack.running(ids)) == CAP
        assert concurrency.count("capped") == CAP
        poll(lambda: diffusion_pending(stack.triton) == CAP, "the model holds those two")
        for job_id in waiting:
            record = stack.record(job_id)
            assert (record["status"], record["attempts"], record["started_at"]) == ("queued", 0, None)
    jobs = [final_job(stack.client, i, **auth("capped")) for i in ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * 5
    # Never more than CAP at once: each start came while fewer than CAP others were running.
    spans = [(stack.record(i)["started_at"], stack.record(i)["completed_at"]) for i in ids]
    for begin, _ in spans:
        assert sum(1 for b, e in spans if b <= begin < e) <= CAP
    assert all(stack.record(i)["attempts"] == 1 for i in ids)  # a wait is not an attempt
    poll(lambda: concurrency.count("capped") == 0, "every lease was given back")
    url = stack.worker.ready_url
    assert metric(url, "worker_tenant_jobs_total", tenant="capped", status="succeeded") == 5
    assert metric(url, "worker_tenant_jobs_total", tenant="alpha", status="succeeded") == 0
    assert metric(url, "worker_tenant_job_seconds_count", tenant="capped") == 5
    log = stack.log()
    assert "tenant capped" in log and not any(key in log for key in KEYS.values())
