"""In-process jobs for the gateway tests: a Flask app on the session's Triton, the local S3 and a
real Redis; a Dramatiq worker in this process running the app's jobs with the real `JobRunner`;
Triton's own counters, read once they have settled."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from flask import Flask
from flask.testing import FlaskClient

from embedded.triton import TritonServer
from gateway.jobs.runner import CancelWatcher, JobRunner
from gateway.jobs.store import QUEUED
from gateway.services import Services, Store
from tests.models.helpers import DIFFUSION, diffusion_pending, diffusion_steps, metric, settled

# Long enough for any wait here on a loaded machine; only a test that would hang reaches it.
WAIT_S = 180.0
FINAL = ("succeeded", "failed", "canceled")
# The shape every job here asks for: the smallest image, one step.
SHAPE: dict[str, Any] = {
    "prompt": "a lighthouse at dusk",
    "width": 64,
    "height": 64,
    "num_inference_steps": 1,
    "upscale": False,
    "enable_nsfw_check": False,
}


def poll(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    """Polls until `condition` holds; the limit only stops a test that would hang."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def body(url: str, **fields: Any) -> dict[str, Any]:
    """A /generate (and /jobs) body uploading to `url`."""
    return {**SHAPE, "response_format": "s3", "s3_prefix": url, **fields}


def services(app: Flask) -> Services:
    svc: Services = app.extensions["gateway"]
    return svc


def store(app: Flask) -> Store:
    return services(app).require_store()


def job_of(client: FlaskClient, job_id: str, **headers: str) -> dict[str, Any]:
    response = client.get(f"/jobs/{job_id}", headers=headers)
    assert response.status_code == 200, response.json
    job: dict[str, Any] = response.json
    return job


def final_job(client: FlaskClient, job_id: str, **headers: str) -> dict[str, Any]:
    """The job once it has ended (read through GET /jobs/{id})."""
    seen: list[dict[str, Any]] = []

    def ended() -> bool:
        seen.append(job_of(client, job_id, **headers))
        return seen[-1]["status"] in FINAL

    poll(ended, f"job {job_id} ended")
    return seen[-1]


def queued_ids(app: Flask) -> set[str]:
    """The store's set of queued jobs."""
    raw = store(app).jobs.client.zrange(QUEUED, 0, -1)
    return {item.decode() for item in raw}


def records(app: Flask) -> list[str]:
    """Every job record in the store."""
    client: redis.Redis = store(app).jobs.client
    return sorted(key.decode() for key in client.scan_iter(match="imagegen:job:*"))


def queue_size(app: Flask) -> int:
    """Dramatiq's count of the job queues (the plain one and each tenant's): messages waiting
    plus those taken and not yet acknowledged (so 0 means every job sent was run to its end)."""
    queue = store(app).queue
    tenants = [t.name for t in app.extensions["gateway_tenants"].all]
    return queue.depth() + sum(queue.depth(tenant) for tenant in tenants)


def runner(app: Flask) -> JobRunner:
    """A `JobRunner` on the app's services, to run a job in the test's own thread (where the
    queue is not the point); its cancel watcher is not listening."""
    jobs = store(app)
    return JobRunner(services(app), jobs.jobs, jobs.queue, CancelWatcher(jobs.jobs))


class InProcessWorker:
    """`python -m gateway.jobs.worker`'s wiring (gateway/jobs/worker.py) on an app's own
    services: a Dramatiq worker on the app's broker whose `run_job` is a `JobRunner`."""

    def __init__(self, app: Flask, threads: int = 2) -> None:
        svc = services(app)
        jobs = store(app)
        self.watcher = CancelWatcher(jobs.jobs)
        self.runner = JobRunner(svc, jobs.jobs, jobs.queue, self.watcher)
        jobs.queue.handlers.run_job = self.runner.run
        # A short fetch timeout: a stopping worker notices within 0.1 s.
        self.worker = jobs.queue.worker(self.runner.queue_tenants, threads, worker_timeout=100)
        self.app = app

    def start(self) -> InProcessWorker:
        self.watcher.start()
        self.worker.start()
        return self

    def stop(self) -> None:
        self.worker.stop(timeout=int(WAIT_S * 1000))
        self.watcher.stop()

    def drained(self) -> None:
        """Returns once every job sent has been run and acknowledged."""
        poll(lambda: queue_size(self.app) == 0, "the worker ran every queued job")


@contextmanager
def worker_running(app: Flask, threads: int = 2) -> Iterator[InProcessWorker]:
    worker = InProcessWorker(app, threads).start()
    try:
        yield worker
    finally:
        worker.stop()


class TritonCounters:
    """Triton's own counts of the diffusion model's work: requests it answered (any outcome)
    and denoising steps it ran. Triton records a request after answering it, so a reading is
    taken once the counts have stopped moving (`settled`)."""

    def __init__(self, triton: TritonServer) -> None:
        self.triton = triton

    def read(self) -> tuple[float, float, float]:
        url = self.triton.metrics_url
        return (
            metric(url, "nv_inference_request_success", model=DIFFUSION),
            metric(url, "nv_inference_request_failure", model=DIFFUSION),
            diffusion_steps(self.triton),
        )

    def now(self, at_least_requests: float = 0) -> tuple[float, float, float]:
        """The counts once they include `at_least_requests` answered requests and have stopped
        moving."""
        return settled(self.read, ready=lambda counts: counts[0] + counts[1] >= at_least_requests)

    def requests(self) -> float:
        success, failure, _ = self.now()
        return success + failure

    def in_queue(self) -> float:
        return diffusion_pending(self.triton)


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """`call` on a thread of its own; its result (or exception) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the test, which asserts on it
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out
