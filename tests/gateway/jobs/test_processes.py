"""The jobs feature across real processes: two gateways (gunicorn) and job workers
(`python -m gateway.jobs.worker`) on one real Redis of this module's own (it is stopped, frozen
and restarted here), the session's Triton (its diffusion test hook holds a job mid-run), the local
S3 and a webhook receiver on loopback verifying with `standardwebhooks`, the reference library.

What holds across processes: a job made on one gateway is read and canceled on the other, an
Idempotency-Key's stored answer is replayed by either gateway without Triton running again,
webhook retries keep one `webhook-id`, a worker SIGKILLed mid-job has its job taken up again, a
SIGTERMed one finishes what it runs and leaves the rest to another, queued jobs survive a Redis
restart (AOF), and a store that is down or frozen costs /jobs and Idempotency-Key a bounded 503
while /generate goes on. The last test checks that no job made here was lost.

The processes are shared by the module's tests, which run in the order written; each starts the
workers it needs. Nothing waits on the machine's speed: jobs are held in the model where a test
needs one mid-run, and every wait polls for a condition with a generous limit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import redis
from standardwebhooks import Webhook

from embedded.process import ManagedProcess, free_port
from embedded.redis import PERSISTENCE, JobWorker, RedisServer
from embedded.s3 import LocalS3
from embedded.triton import PROJECT_ROOT, TritonServer
from gateway.jobs.queue import JOBS, NAMESPACE, tenant_queue
from gateway.jobs.store import QUEUED, UNCONFIRMED_S
from gateway.tenants.tenant import DEFAULT
from tests.gateway.faults import FaultServer
from tests.gateway.jobs.helpers import SHAPE, WAIT_S
from tests.gateway.process import GunicornGateway, request
from tests.models.helpers import DIFFUSION, diffusion_held, diffusion_pending, metric, settled

API_KEY = "jobs-processes-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
REDIS_TIMEOUT_S = 1.0
# An answer that depends on a store that is down or frozen comes within the store's bound; this
# is a guard against a request that waits for Redis, not a measure of the machine's speed.
STORE_ANSWER_LIMIT_S = 3 * REDIS_TIMEOUT_S + 2
WORKER_THREADS = 2
FINAL = {"succeeded", "failed", "canceled"}


def poll(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def diffusion_requests(triton: TritonServer) -> float:
    """Triton's own count of the diffusion model's successful requests."""
    return metric(triton.metrics_url, "nv_inference_request_success", model=DIFFUSION)


def s3_key(s3_url: str, bucket: str) -> str:
    path = urllib.parse.urlsplit(s3_url).path
    assert path.startswith(f"/{bucket}/"), s3_url
    return urllib.parse.unquote(path[len(bucket) + 2:])


@dataclass
class Cluster:
    triton: TritonServer
    s3: LocalS3
    redis: RedisServer
    receiver: FaultServer
    gateways: tuple[GunicornGateway, GunicornGateway]
    settings: dict[str, str]
    run_dir: Path
    workers: list[JobWorker] = field(default_factory=list)
    # Every job made here and how it must end: the last test checks them all.
    expected: dict[str, str] = field(default_factory=dict)

    # -- processes -------------------------------------------------------------------------

    def worker(self) -> JobWorker:
        env = {f"GATEWAY_{k}": v for k, v in self.settings.items()}
        env["PYTHONPATH"] = str(PROJECT_ROOT)
        index = len(self.workers)
        worker = JobWorker(env, free_port(), self.run_dir / f"worker-{index}.log")
        worker.cwd = PROJECT_ROOT
        self.workers.append(worker)
        return worker

    def live_workers(self) -> list[JobWorker]:
        return [w for w in self.workers if w.process is not None and w.process.poll() is None]

    def ensure_workers(self, count: int) -> list[JobWorker]:
        """`count` workers running (started together, each waited for)."""
        started = [self.worker().start() for _ in range(count - len(self.live_workers()))]
        for worker in started:
            worker.wait_ready(timeout=WAIT_S)
        live = self.live_workers()
        assert len(live) == count
        return live

    def stop_workers(self) -> None:
        """SIGTERM to every worker, all at once; each must exit 0."""
        live = self.live_workers()
        assert stopped_together(live) == [0] * len(live), "a worker exited badly: see its log"

    @cached_property
    def store(self) -> redis.Redis:
        """The test's own view of Redis (its pool reconnects after a restart)."""
        return redis.Redis.from_url(self.redis.url, socket_timeout=10)

    def attempts(self, job_id: str) -> int:
        """How many times workers took the job up (the store's record; not public)."""
        raw = self.store.get(f"imagegen:job:{job_id}")
        assert raw is not None
        return int(json.loads(raw)["attempts"])

    def unknown_jobs(self) -> set[str]:
        """Records in the store of jobs no client was given: creates that Redis applied after
        the gateway had answered 503."""
        keys = self.store.keys("imagegen:job:*")
        return {key.decode().removeprefix("imagegen:job:") for key in keys} - set(self.expected)

    def queued_ids(self) -> set[str]:
        return {member.decode() for member in self.store.zrange(QUEUED, 0, -1)}

    # -- calls -----------------------------------------------------------------------------

    def call(
        self,
        gateway: GunicornGateway,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 120.0,
    ) -> tuple[int, dict[str, str], Any]:
        return request(method, gateway.url + path, body, {**AUTH, **(headers or {})}, timeout)

    def job_body(self, **extra: Any) -> dict[str, Any]:
        prefix = self.s3.presign_put(f"jobs/{uuid.uuid4().hex}/1.png")
        return {**SHAPE, "response_format": "s3", "s3_prefix": prefix, **extra}

    def create(
        self, gateway: GunicornGateway, expect: str = "succeeded", **extra: Any
    ) -> dict[str, Any]:
        status, headers, job = self.call(gateway, "POST", "/jobs", self.job_body(**extra))
        assert status == 202, job
        assert headers["Location"] == f"/jobs/{job['id']}"
        assert job["status"] == "queued"
        self.expected[job["id"]] = expect
        return job

    def get(self, gateway: GunicornGateway, job_id: str) -> dict[str, Any]:
        status, _, job = self.call(gateway, "GET", f"/jobs/{job_id}", timeout=30)
        assert status == 200, job
        return job

    def wait_for(
        self,
        job_id: str,
        done: Callable[[dict[str, Any]], bool],
        what: str,
        gateway: GunicornGateway | None = None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while not done(job := self.get(gateway or self.gateways[1], job_id)):
            assert time.monotonic() < deadline, f"timed out waiting until job {job_id} {what}: {job}"
            time.sleep(0.2)
        return job

    def finished(self, job_id: str, gateway: GunicornGateway | None = None) -> dict[str, Any]:
        return self.wait_for(job_id, lambda job: job["status"] in FINAL, "ends", gateway)

    def assert_stored(self, job: dict[str, Any]) -> None:
        """A succeeded job's image is in S3 under the name its hash gives, with that MD5."""
        data = job["data"]
        assert data["s3_upload_status"] == 200
        stored = self.s3.get(s3_key(data["s3_url"], self.s3.bucket))
        assert hashlib.md5(stored).hexdigest() == data["image_hash"]


def stopped_together(processes: Sequence[ManagedProcess]) -> list[int | None]:
    """Each process's graceful stop, in parallel (each waits for its own exit)."""
    with ThreadPoolExecutor(max(1, len(processes))) as pool:
        return list(pool.map(lambda process: process.stop(), processes))


def worker_metric(worker: JobWorker, name: str, **labels: str) -> float:
    return metric(worker.ready_url, name, **labels)


@pytest.fixture(scope="module")
def cluster(
    triton: TritonServer, s3: LocalS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    run_dir = tmp_path_factory.mktemp("jobs-processes")
    store = RedisServer.on_free_port(run_dir / "redis")
    store.launch()
    receiver = FaultServer().start()
    settings = {
        "TRITON_URL": triton.grpc_url,
        "TRITON_METRICS_URL": triton.metrics_url,
        # A held job's generation waits in the model's queue as long as a test holds it.
        "TRITON_QUEUE_TIMEOUT_S": "300",
        "UPLOAD_ALLOWED_HOSTS": f"http://{s3.hostport}",
        "API_KEYS": API_KEY,
        "REDIS_URL": store.url,
        "REDIS_TIMEOUT_S": str(REDIS_TIMEOUT_S),
        "READY_CACHE_S": "0",
        "WORKER_REQUEUE_S": "2",
        "WORKER_THREADS": str(WORKER_THREADS),
        "WEBHOOK_SECRETS": SECRET,
        "WEBHOOK_ALLOWED_HOSTS": f"http://{receiver.hostport}",
        "WEBHOOK_BACKOFF": "0.2,0.2",
    }
    gateways = (
        GunicornGateway(run_dir / "gateway-a.log", **settings),
        GunicornGateway(run_dir / "gateway-b.log", **settings),
    )
    cluster = Cluster(triton, s3, store, receiver, gateways, settings, run_dir)
    try:
        for gateway in gateways:
            gateway.start()
        for gateway in gateways:
            gateway.wait_ready(timeout=WAIT_S)
        cluster.ensure_workers(2)
        yield cluster
    finally:
        stopped_together([*cluster.workers, *gateways])
        receiver.stop()
        store.resume()  # never leave a frozen Redis behind
        store.stop()


# -- two gateways, one store ---------------------------------------------------------------------


def test_a_job_made_on_one_gateway_is_read_and_canceled_on_the_other(cluster: Cluster) -> None:
    a, b = cluster.gateways
    cluster.ensure_workers(2)
    triton = cluster.triton
    with diffusion_held(triton):
        waiting = diffusion_pending(triton)
        job = cluster.create(a, expect="canceled")
        running = cluster.wait_for(job["id"], lambda j: j["status"] == "running", "runs", b)
        # Its generation waits in the model behind the held one: it is mid-run.
        poll(lambda: diffusion_pending(triton) > waiting, "the job's generation is in Triton")
        assert running["started_at"] is not None and running["completed_at"] is None
        assert cluster.get(a, job["id"]) == cluster.get(b, job["id"])
        status, _, answered = cluster.call(b, "POST", f"/jobs/{job['id']}/cancel")
        # The job as it is now: running, its cancel requested; the worker stops it in Triton.
        assert status == 200 and answered["status"] == "running", answered
        canceled = cluster.finished(job["id"], a)
    assert canceled["status"] == "canceled", canceled
    assert canceled["error"]["code"] == "canceled" and canceled["data"] is None
    assert canceled["urls"] == {"get": f"/jobs/{job['id']}", "cancel": f"/jobs/{job['id']}/cancel"}
    # The hold released, nothing brings it back: canceled stays canceled on both gateways.
    assert cluster.get(b, job["id"]) == cluster.get(a, job["id"]) == canceled
    # Canceling a final job changes nothing.
    status, _, again = cluster.call(a, "POST", f"/jobs/{job['id']}/cancel")
    assert status == 200 and again == canceled


def test_an_idempotency_key_used_on_one_gateway_is_replayed_by_the_other(cluster: Cluster) -> None:
    a, b = cluster.gateways
    cluster.ensure_workers(2)
    triton = cluster.triton
    key = {"Idempotency-Key": f'"{uuid.uuid4()}"'}
    body = {**SHAPE, "response_format": "s3", "s3_prefix": cluster.s3.presign_put("idem/1.png")}
    before = diffusion_requests(triton)
    status, headers, first = cluster.call(a, "POST", "/generate", body, key)
    assert status == 200, first
    assert "Idempotent-Replayed" not in headers
    cluster.assert_stored({"data": first["data"]})
    # The first request reached the model (Triton records it after answering: wait for it).
    ran = settled(lambda: diffusion_requests(triton), ready=lambda n: n > before)
    status, headers, replayed = cluster.call(b, "POST", "/generate", body, key)
    assert status == 200 and headers["Idempotent-Replayed"] == "true"
    assert replayed == first
    assert settled(lambda: diffusion_requests(triton), quiet_s=2.0) == ran  # no second run

    # POST /jobs: the replay names the same job, and no second one exists.
    jobs_before = len(cluster.store.keys("imagegen:job:*"))
    job_key = {"Idempotency-Key": f"jobs-{uuid.uuid4().hex}"}
    job_body = cluster.job_body()
    status, headers, made = cluster.call(a, "POST", "/jobs", job_body, job_key)
    assert status == 202 and "Idempotent-Replayed" not in headers, made
    cluster.expected[made["id"]] = "succeeded"
    status, headers, again = cluster.call(b, "POST", "/jobs", job_body, job_key)
    assert status == 202 and headers["Idempotent-Replayed"] == "true", again
    assert again == made and headers["Location"] == f"/jobs/{made['id']}"
    assert len(cluster.store.keys("imagegen:job:*")) == jobs_before + 1
    # Another body under the same key: refused, on either gateway.
    status, _, mismatch = cluster.call(b, "POST", "/jobs", cluster.job_body(), job_key)
    assert status == 422 and mismatch["error"]["code"] == "idempotency_key_mismatch"
    done = cluster.finished(made["id"], a)
    assert done["status"] == "succeeded" and done["error"] is None
    cluster.assert_stored(done)


# -- webhooks ------------------------------------------------------------------------------------


def test_a_webhook_is_retried_under_one_id_until_the_receiver_takes_it(cluster: Cluster) -> None:
    a, b = cluster.gateways
    workers = cluster.ensure_workers(2)
    receiver = cluster.receiver
    receiver.set_script(500, 500, 200)
    receiver.requests.clear()
    delivered = sum(
        worker_metric(w, "worker_webhook_deliveries_total", outcome="delivered") for w in workers
    )
    job = cluster.create(a, webhook=f"{receiver.url}/hooks/imagegen?token=t0k3n")
    done = cluster.finished(job["id"], b)
    assert done["status"] == "succeeded", done
    cluster.assert_stored(done)
    # Counted once the worker has its answer: after the 200, no further attempt is scheduled.
    poll(
        lambda: sum(
            worker_metric(w, "worker_webhook_deliveries_total", outcome="delivered")
            for w in workers
        ) == delivered + 1,
        "a worker counts the delivery",
    )
    assert [r.target for r in receiver.requests] == ["/hooks/imagegen?token=t0k3n"] * 3
    ids = {r.headers["webhook-id"] for r in receiver.requests}
    assert ids == {f"msg_{job['id']}_succeeded"}
    # Every attempt verifies with the reference library; each is the finished job's object.
    objects = [Webhook(SECRET).verify(r.body, r.headers) for r in receiver.requests]
    assert objects == [done] * 3
    assert json.loads(receiver.requests[2].body) == cluster.get(a, job["id"])
    # Each retry waited at least its delay (0.2 s) after the failure before it.
    assert all(gap >= 0.15 for gap in receiver.gaps()), receiver.gaps()


# -- the store down or frozen --------------------------------------------------------------------


def timed(call: Callable[[], tuple[int, dict[str, str], Any]]) -> tuple[int, dict[str, str], Any]:
    started = time.monotonic()
    answer = call()
    elapsed = time.monotonic() - started
    assert elapsed < STORE_ANSWER_LIMIT_S, f"answered after {elapsed:.1f}s: {answer}"
    return answer


@pytest.mark.parametrize("outage", ["stopped", "frozen"])
def test_without_its_store_a_gateway_still_generates_and_refuses_the_rest_in_time(
    cluster: Cluster, outage: str
) -> None:
    a, b = cluster.gateways
    cluster.ensure_workers(2)
    # Queued as the store goes away: the workers' next fetch of it may reach Redis only then,
    # and be carried out only once Redis goes on. It must run all the same.
    earlier = cluster.create(a)
    key = {"Idempotency-Key": f"outage-{uuid.uuid4().hex}"}
    plain = {**SHAPE, "response_format": "b64_json"}
    if outage == "stopped":
        cluster.redis.stop()
    else:
        cluster.redis.pause()
    try:
        status, _, generated = cluster.call(a, "POST", "/generate", plain)
        assert status == 200 and generated["data"]["b64_json"], generated
        status, _, refused = timed(lambda: cluster.call(b, "POST", "/generate", plain, key))
        assert status == 503 and refused["error"]["code"] == "unavailable", refused
        status, headers, refused = timed(lambda: cluster.call(a, "POST", "/jobs", cluster.job_body()))
        assert status == 503, refused
        assert int(headers["Retry-After"]) >= 0
        status, _, refused = timed(lambda: cluster.call(b, "GET", f"/jobs/{earlier['id']}"))
        assert status == 503, refused
        status, _, ready = timed(lambda: cluster.call(a, "GET", "/readyz"))
        assert status == 200 and ready["status"] == "ready" and ready["store"] == "down", ready
    finally:
        if outage == "stopped":
            cluster.redis.launch()
        else:
            cluster.redis.resume()
    # A POST /jobs that a frozen Redis applied once resumed, after the gateway had answered 503,
    # left a record no worker will run (no message was queued): it expires on its own.
    client = cluster.store
    for job_id in cluster.unknown_jobs():
        assert 0 < client.ttl(f"imagegen:job:{job_id}") <= UNCONFIRMED_S
    # Everything works again, on both gateways, with the same workers.
    for gateway in (a, b):
        status, _, ready = cluster.call(gateway, "GET", "/readyz")
        assert status == 200 and ready["store"] == "up", ready
    assert cluster.get(b, earlier["id"])["id"] == earlier["id"]
    # A keyed request runs again. A store that was down stored nothing: the client's retry with
    # its key is taken. A frozen one may still apply the claim it had received before it froze
    # (the gateway had given up on it): that key then answers 409 until its in-flight record
    # expires, so a new key is used there.
    if outage == "frozen":
        key = {"Idempotency-Key": f"after-{uuid.uuid4().hex}"}
    status, headers, job = cluster.call(b, "POST", "/jobs", cluster.job_body(), key)
    assert status == 202 and "Idempotent-Replayed" not in headers, job
    cluster.expected[job["id"]] = "succeeded"
    for made in (earlier, job):
        done = cluster.finished(made["id"], a)
        assert done["status"] == "succeeded", done
        cluster.assert_stored(done)


def test_queued_jobs_survive_a_redis_restart_and_run_afterwards(cluster: Cluster) -> None:
    a, b = cluster.gateways
    # The containers' persistence, which this Redis runs with: an append-only file.
    assert "appendonly yes" in PERSISTENCE
    cluster.stop_workers()
    jobs = [cluster.create(gateway) for gateway in (a, b, a)]
    ids = {job["id"] for job in jobs}
    client = cluster.store
    assert ids <= cluster.queued_ids()
    # Dramatiq's messages, in the queue of the keys' tenant (`default`)
    assert client.llen(f"{NAMESPACE}:{tenant_queue(DEFAULT)}") == 3
    for job_id in ids:  # confirmed: they wait as long as it takes
        assert client.ttl(f"imagegen:job:{job_id}") == -1
    cluster.redis.stop()  # SIGTERM: Redis writes its AOF out and exits
    cluster.redis.launch()  # same port, same directory
    for job in jobs:  # the records...
        assert cluster.get(b, job["id"])["status"] == "queued"
    assert client.llen(f"{NAMESPACE}:{tenant_queue(DEFAULT)}") == 3  # ...and the messages
    cluster.ensure_workers(1)
    for job in jobs:
        done = cluster.finished(job["id"], a)
        assert done["status"] == "succeeded" and done["error"] is None
        assert cluster.attempts(job["id"]) == 1
        cluster.assert_stored(done)
    assert not ids & cluster.queued_ids()


# -- workers that die or stop --------------------------------------------------------------------


def test_a_job_whose_worker_is_killed_mid_run_is_taken_up_again(cluster: Cluster) -> None:
    a, b = cluster.gateways
    workers = cluster.ensure_workers(2)
    triton = cluster.triton
    with diffusion_held(triton):
        waiting = diffusion_pending(triton)
        job = cluster.create(a)
        first = cluster.wait_for(job["id"], lambda j: j["status"] == "running", "runs", b)
        poll(lambda: diffusion_pending(triton) > waiting, "the job's generation is in Triton")
        holders: list[JobWorker] = []

        def one_holds() -> bool:
            holders[:] = [w for w in workers if worker_metric(w, "worker_jobs_running") == 1]
            return len(holders) == 1

        poll(one_holds, "one worker counts the job as running")
        [victim] = holders
        [survivor] = [w for w in workers if w is not victim]
        victim.kill()
        # Once the victim's heartbeat is 2 s old, the survivor takes the job up again, while the
        # model is still held: the job is running a second time before anything could finish it.
        poll(lambda: cluster.attempts(job["id"]) == 2, "the job is taken up again")
        poll(lambda: worker_metric(survivor, "worker_jobs_running") == 1, "the survivor runs it")
        again = cluster.get(b, job["id"])
        assert again["status"] == "running" and again["started_at"] > first["started_at"]
    done = cluster.finished(job["id"], a)
    assert done["status"] == "succeeded", done
    assert cluster.attempts(job["id"]) == 2
    cluster.assert_stored(done)
    assert worker_metric(survivor, "worker_jobs_total", status="succeeded") >= 1


def test_a_stopped_worker_finishes_its_jobs_and_leaves_the_queued_ones_to_another(
    cluster: Cluster,
) -> None:
    a, b = cluster.gateways
    workers = cluster.ensure_workers(2)
    triton = cluster.triton
    succeeded = {id(w): worker_metric(w, "worker_jobs_total", status="succeeded") for w in workers}
    with diffusion_held(triton):
        waiting = diffusion_pending(triton)
        jobs = [cluster.create(a if n % 2 else b) for n in range(3 * WORKER_THREADS)]
        # Each worker runs as many as it has threads (and fetches no more); the rest wait.
        poll(
            lambda: [worker_metric(w, "worker_jobs_running") for w in workers]
            == [WORKER_THREADS] * 2,
            "both workers run all they can",
        )
        poll(
            lambda: diffusion_pending(triton) >= waiting + 2 * WORKER_THREADS,
            "the running jobs' generations are in Triton",
        )
        statuses = [cluster.get(b, job["id"])["status"] for job in jobs]
        assert sorted(statuses) == ["queued"] * WORKER_THREADS + ["running"] * 2 * WORKER_THREADS
        running = {job["id"] for job, s in zip(jobs, statuses, strict=True) if s == "running"}
        queued = {job["id"] for job, s in zip(jobs, statuses, strict=True) if s == "queued"}
        victim, survivor = workers
        assert victim.process is not None and victim.log_path is not None
        victim.process.send_signal(signal.SIGTERM)
        poll(
            lambda: "signal SIGTERM" in victim.log_path.read_text(errors="replace"),
            "the worker has taken the signal",
        )
        assert victim.process.poll() is None  # it still holds its jobs
    # Released: the stopping worker finishes what it ran, and exits 0.
    assert victim.process.wait(timeout=WAIT_S) == 0
    log = victim.log_path.read_text(errors="replace")
    by_victim = {job_id for job_id in running if f"job {job_id} (tenant default) succeeded" in log}
    assert len(by_victim) == WORKER_THREADS, log[-3000:]
    for job in jobs:
        done = cluster.finished(job["id"], a)
        assert done["status"] == "succeeded", done
        assert cluster.attempts(job["id"]) == 1  # none ran twice, none was lost
        cluster.assert_stored(done)
    # The jobs that were still queued ran on the other worker, not on the stopping one.
    assert not any(job_id in log for job_id in queued)
    assert worker_metric(survivor, "worker_jobs_total", status="succeeded") == (
        succeeded[id(survivor)] + WORKER_THREADS + len(queued)
    )
    victim.stop()


# -- no job lost ---------------------------------------------------------------------------------


def test_every_job_made_here_ended_as_it_should(cluster: Cluster) -> None:
    a, _ = cluster.gateways
    assert len(cluster.expected) >= 15
    ended = {job_id: cluster.finished(job_id, a) for job_id in cluster.expected}
    assert {job_id: job["status"] for job_id, job in ended.items()} == cluster.expected
    for job in ended.values():
        if job["status"] == "succeeded":
            cluster.assert_stored(job)
    client = cluster.store
    for queue in (JOBS, tenant_queue(DEFAULT)):
        assert client.llen(f"{NAMESPACE}:{queue}") == 0  # no message left behind
    # Records of creates that Redis applied after a 503 expire unconfirmed...
    poll(lambda: not cluster.unknown_jobs(), "unconfirmed records expire", UNCONFIRMED_S + 30)
    # ...and the queue's depth that the gateways report (the autoscaler's and the alerts')
    # drops them: nothing waits.
    for gateway in cluster.gateways:
        status, _, text = cluster.call(gateway, "GET", "/metrics")
        assert status == 200
        queued = re.search(r"^gateway_jobs_queued (\S+)$", text, re.MULTILINE)
        assert queued is not None and float(queued.group(1)) == 0, text
    assert client.zcard(QUEUED) == 0
