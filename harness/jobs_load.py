"""The jobs' load run: a backlog queued with no worker running, then workers started; every job
must end `succeeded`, none lost.

    .venv/bin/python -m harness.jobs_load                          # 1,000 jobs, 2 workers
    .venv/bin/python -m harness.jobs_load --jobs 200 --workers 1

Starts its own local stack (embedded/stack.py: Triton with the demo models, moto, Redis, the
gateway under gunicorn behind its front door) without job workers, and a webhook receiver on
loopback. `--clients` clients POST /jobs through the front door, each job its own seed, its own
presigned key and a webhook, until `--jobs` are queued; then `--workers` workers
(`python -m gateway.jobs.worker`, GATEWAY_WORKER_THREADS threads each) start on the backlog.
Each request is harness.load's (64x64, NSFW on) with `--steps` denoising steps (default 1).

Then it checks what must hold: every POST answered 202; every job reads `succeeded` through
GET /jobs/{id} and in the store (one record per job, nothing left in the queued set or in the
broker's queue); every job's webhook arrived, signed with the service's secret and carrying
`succeeded`; every job's object is in S3 with the MD5 it claims; the workers counted each job
once (worker_jobs_total). It prints Redis's used_memory (INFO memory) and the gateway's RSS
before the backlog, with it queued, and after the workers ran it. Exit status 1 on a violation.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import redis
import urllib3
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks import Webhook, WebhookVerificationError

from embedded.process import free_port
from embedded.redis import JobWorker
from embedded.stack import LocalStack
from gateway.jobs.queue import NAMESPACE, tenant_queue
from gateway.jobs.store import PREFIX, QUEUED
from gateway.tenants.tenant import ANONYMOUS
from harness.httpserver import BackgroundHTTPServer
from harness.load import object_reader, request_body

# Receivers verify with this; generated once for the run, as an operator would.
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"harness webhook secret, 32 bytes").decode()
# Dramatiq's list of waiting message ids for the local stack's jobs: every request there is the
# anonymous tenant's (no key), whose jobs wait in that tenant's queue.
BROKER_QUEUE = f"{NAMESPACE}:{tenant_queue(ANONYMOUS)}"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Delivery:
    """A webhook as it arrived: when (perf_counter and wall clock), the job object it carried,
    and whether its signature verified."""

    arrived: float  # time.perf_counter()
    arrived_at: float  # time.time()
    job: dict[str, Any]
    verified: bool


def seconds_of(stamp: str) -> float:
    """An RFC 3339 time of a job object as seconds since the epoch."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


@dataclass
class Deliveries:
    """Webhook deliveries as they arrive, by job id (the first of each; `repeats` counts the
    others)."""

    arrived: dict[str, Delivery] = field(default_factory=dict)
    repeats: int = 0
    condition: threading.Condition = field(default_factory=threading.Condition)

    def record(self, delivery: Delivery) -> None:
        with self.condition:
            if delivery.job["id"] in self.arrived:
                self.repeats += 1
            self.arrived.setdefault(delivery.job["id"], delivery)
            self.condition.notify_all()

    def wait(self, job_id: str, timeout_s: float) -> Delivery:
        with self.condition:
            if not self.condition.wait_for(lambda: job_id in self.arrived, timeout_s):
                raise TimeoutError(f"no webhook for {job_id} within {timeout_s:g}s")
            return self.arrived[job_id]

    def wait_count(self, count: int, timeout_s: float) -> bool:
        with self.condition:
            return self.condition.wait_for(lambda: len(self.arrived) >= count, timeout_s)


class WebhookReceiver(BackgroundHTTPServer):
    """A receiver on loopback that answers 204 to every delivery and notes its arrival; with a
    secret it verifies each signature (Standard Webhooks, the reference library)."""

    def __init__(self, deliveries: Deliveries, secret: str | None = None,
                 host: str = "127.0.0.1") -> None:
        self.host = host
        self.deliveries = deliveries
        verifier = Webhook(secret) if secret else None

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                arrived, arrived_at = time.perf_counter(), time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()
                verified = False
                if verifier is not None:
                    try:
                        verifier.verify(body, dict(self.headers.items()))
                        verified = True
                    except WebhookVerificationError:
                        pass
                deliveries.record(Delivery(arrived, arrived_at, json.loads(body), verified))

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._listen(Handler)

    @property
    def hook_url(self) -> str:
        return f"{self.url}/hook"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def jobs_stack(run_dir: Path, receiver: WebhookReceiver, secret: str,
               gateway_settings: dict[str, str] | None = None) -> LocalStack:
    """The local stack without job workers (the caller starts them, `start_workers`), its
    webhooks allowed to `receiver` only."""
    return LocalStack(
        run_dir,
        workers=0,
        gateway_settings={
            "WEBHOOK_SECRETS": secret,
            "WEBHOOK_ALLOWED_HOSTS": f"http://{receiver.hostport}",
            **(gateway_settings or {}),
        },
    )


def start_workers(stack: LocalStack, count: int) -> list[JobWorker]:
    """`count` job workers with the gateway's settings, started and ready; the stack stops
    them with itself."""
    workers = [
        JobWorker(stack.gateway.env, free_port(), stack.run_dir / f"worker-{len(stack.workers) + i}.log")
        for i in range(count)
    ]
    stack.workers.extend(workers)
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.wait_ready()
    return workers


@dataclass(frozen=True)
class Reading:
    """Redis's used_memory and the gateway's RSS at one moment."""

    redis_bytes: int
    gateway_rss: int

    @classmethod
    def now(cls, store: redis.Redis, stack: LocalStack) -> Reading:
        return cls(int(store.info("memory")["used_memory"]), stack.gateway.rss_bytes())


def submit_all(url: str, bodies: list[bytes], clients: int) -> list[tuple[int, Any]]:
    """POST /jobs each body, `clients` at a time over keep-alive connections: (status, answer)
    in the bodies' order."""
    parts = urlsplit(url)
    pool = urllib3.HTTPConnectionPool(parts.hostname, parts.port, maxsize=clients, block=True,
                                      retries=False, timeout=urllib3.Timeout(total=60))

    def submit(body: bytes) -> tuple[int, Any]:
        try:
            response = pool.request("POST", "/jobs", body=body,
                                    headers={"Content-Type": "application/json"})
        except urllib3.exceptions.HTTPError as exc:
            return 0, f"{type(exc).__name__}: {exc}"
        try:
            return response.status, json.loads(response.data)
        except ValueError:
            return response.status, response.data.decode(errors="replace")

    try:
        with ThreadPoolExecutor(clients) as executor:
            return list(executor.map(submit, bodies))
    finally:
        pool.close()


def read_jobs(url: str, ids: list[str], clients: int) -> dict[str, tuple[int, Any]]:
    """GET /jobs/{id} for each id: (status, answer)."""
    http = urllib3.PoolManager(maxsize=clients, retries=False, timeout=urllib3.Timeout(total=60))

    def read(job_id: str) -> tuple[int, Any]:
        response = http.request("GET", f"{url}/jobs/{job_id}")
        return response.status, json.loads(response.data)

    with ThreadPoolExecutor(clients) as executor:
        return dict(zip(ids, executor.map(read, ids)))


def stored_jobs(store: redis.Redis) -> dict[str, dict[str, Any]]:
    """Every job record in the store, by id."""
    keys = list(store.scan_iter(f"{PREFIX}job:*", count=1000))
    records = store.mget(keys) if keys else []
    return {
        json.loads(raw)["id"]: json.loads(raw) for raw in records if raw is not None
    }


def worker_counts(workers: list[JobWorker]) -> Counter[str]:
    """worker_jobs_total by status, summed over the workers."""
    counts: Counter[str] = Counter()
    for worker in workers:
        with urllib.request.urlopen(worker.ready_url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "worker_jobs":
                for sample in family.samples:
                    if sample.name == "worker_jobs_total":
                        counts[sample.labels["status"]] += int(sample.value)
    return counts


def violations(
    ids: list[str],
    answers: list[tuple[int, Any]],
    read: dict[str, tuple[int, Any]],
    stored: dict[str, dict[str, Any]],
    deliveries: Deliveries,
    get_object: Callable[[str], bytes | None],
    prefixes: list[str],
    leftover: dict[str, int],
    counted: Counter[str],
) -> list[str]:
    """What the run must never show; empty when everything held."""
    found = [f"POST /jobs {i}: {status} {answer}" for i, (status, answer) in enumerate(answers)
             if status != 202]
    for job_id, prefix in zip(ids, prefixes):
        status, job = read.get(job_id, (0, None))
        if status != 200 or job.get("status") != "succeeded":
            found.append(f"{job_id}: GET answered {status} {job}")
            continue
        data = job["data"]
        stored_object = get_object(f"{prefix}/{data['image_hash']}.jpg")
        if stored_object is None:
            found.append(f"{job_id}: succeeded but no object in S3")
        elif hashlib.md5(stored_object).hexdigest() != data["image_hash"]:
            found.append(f"{job_id}: the stored object's MD5 is not image_hash")
        record = stored.get(job_id)
        if record is None or record["status"] != "succeeded":
            found.append(f"{job_id}: in the store as {record and record['status']}")
        delivery = deliveries.arrived.get(job_id)
        if delivery is None:
            found.append(f"{job_id}: no webhook")
        elif not delivery.verified or delivery.job["status"] != "succeeded":
            found.append(f"{job_id}: webhook verified={delivery.verified}, "
                         f"status {delivery.job['status']}")
    if extra := set(stored) - set(ids):
        found.append(f"{len(extra)} records in the store that no POST created")
    found += [f"{what}: {count} left" for what, count in leftover.items() if count]
    if counted != Counter({"succeeded": len(ids)}):
        found.append(f"the workers counted {dict(counted)}, expected {len(ids)} succeeded")
    return found


@dataclass
class Run:
    jobs: int
    workers: int
    clients: int
    submitted_s: float = 0.0
    ran_s: float = 0.0
    readings: dict[str, Reading] = field(default_factory=dict)
    queue_wait: list[float] = field(default_factory=list)  # created -> started, seconds

    def lines(self) -> list[str]:
        before = self.readings["before"]
        waits = sorted(self.queue_wait)

        def mib(value: int) -> str:
            return f"{value / MIB:.1f} MiB"

        lines = [
            (f"submitted: {self.jobs} jobs in {self.submitted_s:.1f}s by {self.clients} clients "
            f"({self.jobs / self.submitted_s:.0f}/s), no worker running"),
            (f"ran: {self.workers} workers took the backlog in {self.ran_s:.1f}s "
            f"({self.jobs / self.ran_s:.1f} jobs/s, to the last webhook)"),
        ]
        if waits:
            lines.append(f"time queued (created to started): median {waits[len(waits) // 2]:.1f}s,"
                         f" longest {waits[-1]:.1f}s")
        for name, reading in self.readings.items():
            grown = reading.redis_bytes - before.redis_bytes
            lines.append(
                f"{name + ':':<8} Redis used_memory {mib(reading.redis_bytes)} "
                f"({grown / self.jobs:+.0f} B per job), gateway RSS {mib(reading.gateway_rss)}"
            )
        return lines


def run(args: argparse.Namespace, run_dir: Path) -> tuple[Run, list[str]]:
    report = Run(args.jobs, args.workers, args.clients)
    deliveries = Deliveries()
    with WebhookReceiver(deliveries, WEBHOOK_SECRET) as receiver, \
            jobs_stack(run_dir, receiver, WEBHOOK_SECRET) as stack:
        s3 = stack.bucket("jobs-load")
        store = redis.Redis.from_url(stack.redis.url)
        prefixes = [f"load/{i}" for i in range(args.jobs)]
        bodies = [
            json.dumps({**request_body(0, i, s3.presign_put(f"{prefix}/1.jpg")),
                        "num_inference_steps": args.steps, "webhook": receiver.hook_url}).encode()
            for i, prefix in enumerate(prefixes)
        ]
        report.readings["before"] = Reading.now(store, stack)
        started = time.perf_counter()
        answers = submit_all(stack.url, bodies, args.clients)
        report.submitted_s = time.perf_counter() - started
        report.readings["queued"] = Reading.now(store, stack)
        ids = [answer["id"] for status, answer in answers if status == 202]
        print(f"queued: {store.zcard(QUEUED)} in the store's queued set, "
              f"{store.llen(BROKER_QUEUE)} in the broker's queue", flush=True)

        started = time.perf_counter()
        workers = start_workers(stack, args.workers)
        if not deliveries.wait_count(len(ids), args.timeout):
            print(f"timed out: {len(deliveries.arrived)} of {len(ids)} webhooks after "
                  f"{args.timeout:g}s", flush=True)
        report.ran_s = time.perf_counter() - started

        read = read_jobs(stack.url, ids, args.clients)
        stored = stored_jobs(store)
        report.queue_wait = [
            seconds_of(job["started_at"]) - seconds_of(job["created_at"])
            for status, job in read.values() if status == 200 and job.get("started_at")
        ]
        leftover = {"the store's queued set": store.zcard(QUEUED),
                    "the broker's queue": store.llen(BROKER_QUEUE)}
        counted = worker_counts(workers)
        found = violations(ids, answers, read, stored, deliveries, object_reader(s3),
                           prefixes, leftover, counted)
        if deliveries.repeats:
            print(f"webhooks delivered more than once: {deliveries.repeats}")
        report.readings["after"] = Reading.now(store, stack)
        store.close()
    return report, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16, help="submitting the backlog")
    parser.add_argument("--steps", type=int, default=1, help="of each 64x64 generation")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="for the workers to finish the backlog (seconds)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="logs and Triton's workdir (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.run_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            report, found = run(args, Path(tmp))
    else:
        report, found = run(args, args.run_dir)
    print("\n".join(report.lines()))
    for line in found[:50]:
        print(f"VIOLATION: {line}")
    if found:
        print(f"{len(found)} violations")
        return 1
    print(f"all {args.jobs} jobs succeeded, none lost")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
