"""Jobs against the real local stack: submissions, a job's overhead, throughput against /generate.

The stack is Triton, moto S3, Redis, the gateway behind its front door and a job worker; three
figures from one run:

    python -m benchmarks.jobs [--seconds 10] [--pairs 30] [--smoke]

- `jobs_submit_per_s`: POST /jobs from CLIENTS keep-alive clients for `--seconds`, with no
  worker running: the front door, the gateway and Redis alone (the jobs pile up, then are
  dropped with the database before a worker starts);
- `jobs_overhead_p50_ms`: one client, one request at a time: a job (from just before its POST
  to its webhook's arrival at a receiver in this process) and a synchronous /generate of the
  same body, taking turns; the p50 of the pairs' differences: what queueing, the worker and the
  webhook add to a generation. Printed beside it: the same difference of each call's time
  outside Triton (its wall time minus what the diffusion model's and the classifier's
  statistics say Triton spent on it), which generation noise does not reach, and where the
  job's time went by its own timestamps (queued, running, webhook);
- `jobs_throughput_ratio`: images/s of CLIENTS clients each submitting a job and waiting for its
  webhook, over images/s of CLIENTS clients calling /generate, same body: the median of ROUNDS
  rounds' ratios, the sides taking turns in each (THROUGHPUT_SECONDS times `--seconds` per side
  in all).

Every request is the same small generation (benchmarks.service's concurrency shape, 64x64 and
1 step) with its NSFW check and its upload to the local S3 (jobs deliver to storage only, so
/generate uploads too). The gateway runs with room for CLIENTS
synchronous generations (GATEWAY_MAX_IN_FLIGHT and GATEWAY_THREADS raised as in
benchmarks.service) and GATEWAY_WORKERS processes, two as the Kubernetes base runs it (one
process is one core's worth of Python: `--gateway-workers 1` for the local stack's default); one
job worker with GATEWAY_WORKER_THREADS threads runs the jobs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import redis
import tritonclient.grpc as grpcclient
import urllib3

from benchmarks.report import Timings, print_summary, print_table
from benchmarks.service import burst, triton_seconds
from gateway.settings import SPARE_THREADS
from gateway.triton import contract
from harness.jobs_load import (
    WEBHOOK_SECRET,
    Deliveries,
    Delivery,
    WebhookReceiver,
    jobs_stack,
    seconds_of,
    start_workers,
)

CLIENTS = 16
# Rounds of the throughput measurement, each side taking a turn in each. Another tenant's burst
# can stall a generation for seconds here, so the figure is the median of the rounds' ratios
# (as in benchmarks.batching), the pooled one beside it.
ROUNDS = 6
THROUGHPUT_SECONDS = 3  # per side, in units of --seconds
PAIRS = 30
SECONDS = 10.0
BUCKET = "bench"
GATEWAY_WORKERS = 2  # deploy/kubernetes/base/gateway/gateway.env's
# benchmarks.service's concurrency shape: the service's own work shows beside the generation,
# whose noise stays small, and 16 clients go through many requests each in a slice.
SHAPE = (64, 64, 1)  # width, height, steps
WAIT_S = 300.0  # the longest any one job may take before the run counts as broken


class Client:
    """One keep-alive HTTP connection to the gateway's front door."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.pool = urllib3.HTTPConnectionPool(
            parts.hostname, parts.port, maxsize=1, block=True, retries=False,
            timeout=urllib3.Timeout(connect=10, read=WAIT_S),
        )

    def post(self, path: str, body: bytes, expect: int) -> dict[str, Any]:
        response = self.pool.request(
            "POST", path, body=body, headers={"Content-Type": "application/json"}
        )
        if response.status != expect:
            raise RuntimeError(f"POST {path} answered {response.status}: {response.data[:300]!r}")
        answer: dict[str, Any] = json.loads(response.data)
        return answer

    def close(self) -> None:
        self.pool.close()


@dataclass(frozen=True)
class Bodies:
    generate: bytes  # POST /generate
    job: bytes  # POST /jobs: the same, with the webhook


def bodies(s3_prefix: str, webhook: str, shape: tuple[int, int, int]) -> Bodies:
    width, height, steps = shape
    request = {
        "prompt": "a quiet harbour at dawn",
        "width": width,
        "height": height,
        "num_inference_steps": steps,
        "seed": 1234,
        "upscale": False,
        "enable_nsfw_check": True,
        "response_format": "s3",
        "s3_prefix": s3_prefix,
    }
    return Bodies(json.dumps(request).encode(), json.dumps({**request, "webhook": webhook}).encode())


def generate_call(client: Client, body: Bodies) -> Callable[[], None]:
    def call() -> None:
        client.post("/generate", body.generate, 200)

    return call


def job_call(
    client: Client, body: Bodies, deliveries: Deliveries
) -> Callable[[], tuple[float, Delivery]]:
    """Submit a job and wait for its webhook: seconds from just before the POST to the
    delivery's arrival, and the delivery."""

    def call() -> tuple[float, Delivery]:
        submitted = time.perf_counter()
        job = client.post("/jobs", body.job, 202)
        delivery = deliveries.wait(job["id"], WAIT_S)
        if delivery.job["status"] != "succeeded":
            raise RuntimeError(f"job {job['id']} ended {delivery.job['status']}: {delivery.job}")
        return delivery.arrived - submitted, delivery

    return call


@contextmanager
def clients(url: str, count: int = CLIENTS) -> Iterator[list[Client]]:
    opened = [Client(url) for _ in range(count)]
    try:
        yield opened
    finally:
        for client in opened:
            client.close()


def submit_rate(url: str, body: Bodies, seconds: float) -> tuple[int, float]:
    """Jobs accepted (202) per second by CLIENTS clients, no worker taking any."""
    with clients(url) as pool:
        for client in pool:  # warm-up: each connection opened once
            client.post("/jobs", body.generate, 202)
        return burst([lambda c=c: c.post("/jobs", body.generate, 202) for c in pool], seconds)


# Where a job's time beyond its generation goes, from its own timestamps (milliseconds, the
# store's clock and the receiver's: one machine).
PARTS = {
    "queued (created to started)": ("created_at", "started_at"),
    "running (started to completed)": ("started_at", "completed_at"),
    "webhook (completed to arrival)": ("completed_at", None),
}


def overhead(url: str, body: Bodies, deliveries: Deliveries, pairs: int,
             inside: Callable[[], float]) -> dict[str, Timings]:
    """A job and a /generate of one body, one after the other, `pairs` times, the order
    swapped each time. `delta` holds each pair's job time minus its /generate time; `outside`
    the same difference of each call's time minus what `inside()` (a clock of the time Triton
    spent on the models) says Triton spent on it, which generation noise does not reach;
    PARTS the job's phases."""
    names = ("generate", "job", "delta", "outside", *PARTS)
    timings = {name: Timings() for name in names}
    with clients(url, 1) as [client]:
        sync, job = generate_call(client, body), job_call(client, body, deliveries)
        sync()  # warm-up
        job()

        def timed_sync() -> tuple[float, float]:
            before = inside()
            started = time.perf_counter()
            sync()
            wall = time.perf_counter() - started
            return wall, wall - (inside() - before)

        def timed_job() -> tuple[float, float, Delivery]:
            before = inside()
            wall, delivery = job()
            return wall, wall - (inside() - before), delivery

        for index in range(pairs):
            if index % 2:
                (job_s, job_out, delivery), (sync_s, sync_out) = timed_job(), timed_sync()
            else:
                (sync_s, sync_out), (job_s, job_out, delivery) = timed_sync(), timed_job()
            timings["generate"].add(sync_s)
            timings["job"].add(job_s)
            timings["delta"].add(job_s - sync_s)
            timings["outside"].add(job_out - sync_out)
            for name, (start, end) in PARTS.items():
                ended = delivery.arrived_at if end is None else seconds_of(delivery.job[end])
                timings[name].add(ended - seconds_of(delivery.job[start]))
    return timings


@dataclass
class Rounds:
    """Images per second of each side, round by round."""

    rates: dict[str, list[float]]
    totals: dict[str, tuple[int, float]]  # images, seconds

    def ratios(self) -> list[float]:
        return [jobs / sync for jobs, sync in zip(self.rates["jobs"], self.rates["generate"])]

    def pooled(self, side: str) -> float:
        images, seconds = self.totals[side]
        return images / seconds


def throughput(url: str, body: Bodies, deliveries: Deliveries, seconds: float,
               rounds: int) -> Rounds:
    """Images per second of CLIENTS clients on each side, the sides taking turns in `rounds`
    rounds of `seconds / rounds` each, which goes first changing every round."""
    sides = ("generate", "jobs")
    rates: dict[str, list[float]] = {side: [] for side in sides}
    totals = {side: [0, 0.0] for side in sides}
    for index in range(rounds):
        for side in sides if index % 2 == 0 else sides[::-1]:
            # Fresh connections each slice: one idle through the other side's turn would meet
            # the gateway's keep-alive timeout and be reset mid-request.
            with clients(url) as pool:
                calls: list[Callable[[], Any]] = [
                    generate_call(c, body) if side == "generate" else job_call(c, body, deliveries)
                    for c in pool
                ]
                done, elapsed = burst(calls, seconds / rounds)
            rates[side].append(done / elapsed)
            totals[side][0] += done
            totals[side][1] += elapsed
    return Rounds(rates, {side: (int(n), t) for side, (n, t) in totals.items()})


def run(seconds: float, pairs: int, smoke: bool, gateway_workers: int = GATEWAY_WORKERS,
        shape: tuple[int, int, int] = SHAPE) -> dict[str, float]:
    from benchmarks.batching import cpu

    rounds = 2 if smoke else ROUNDS
    deliveries = Deliveries()
    # The receiver only times deliveries here: the load run (harness.jobs_load) verifies them.
    with tempfile.TemporaryDirectory() as tmp, WebhookReceiver(deliveries) as receiver, \
            jobs_stack(Path(tmp), receiver, WEBHOOK_SECRET, {
                # Room for every synchronous client, as in benchmarks.service.
                "THREADS": str(CLIENTS + SPARE_THREADS), "MAX_IN_FLIGHT": str(CLIENTS),
                "WORKERS": str(gateway_workers),
            }) as stack:
        body = bodies(stack.bucket(BUCKET).presign_put("bench/1.jpg"), receiver.hook_url, shape)
        print(f"CPU: {cpu()}")
        print(f"Shape: {shape[0]}x{shape[1]}, {shape[2]} steps, NSFW check on, uploaded to the "
              f"local S3; {CLIENTS} clients through the front door; gateway "
              f"GATEWAY_WORKERS={gateway_workers}, GATEWAY_MAX_IN_FLIGHT={CLIENTS}, "
              f"GATEWAY_THREADS={CLIENTS + SPARE_THREADS}",
              flush=True)

        accepted, elapsed = submit_rate(stack.url, body, seconds)
        submit_per_s = accepted / elapsed
        print(f"Submit: {accepted} jobs accepted in {elapsed:.1f}s by {CLIENTS} clients, no "
              f"worker: {submit_per_s:.0f}/s", flush=True)
        # The jobs queued above would run once a worker starts: drop them.
        with redis.Redis.from_url(stack.redis.url) as store:
            store.flushdb()

        start_workers(stack, 1)
        # A job calls the diffusion model and the classifier itself, /generate through their
        # ensemble: the two models' own statistics count both alike.
        triton = grpcclient.InferenceServerClient(stack.triton.grpc_url)
        models = (contract.Model.DIFFUSION.value, contract.Model.CLASSIFIER.value)
        timings = overhead(stack.url, body, deliveries, pairs,
                           lambda: sum(triton_seconds(triton, model) for model in models))
        triton.close()
        print(f"Latency, {pairs} pairs, one client, a job and a /generate taking turns:")
        labels = {"generate": "/generate", "job": "job, POST to its webhook",
                  "delta": "job minus /generate (pairs)",
                  "outside": "the same, outside Triton (pairs)"}
        print_table(["call", "p50 ms", "p90 ms"],
                    [(labels.get(name, f"  job {name}"), t.p50_ms, t.p90_ms)
                     for name, t in timings.items()])

        measured = throughput(stack.url, body, deliveries, THROUGHPUT_SECONDS * seconds, rounds)
        ratios = measured.ratios()
        print(f"Throughput, {CLIENTS} clients x {THROUGHPUT_SECONDS * seconds:g}s per side in "
              f"{rounds} rounds: /generate {measured.pooled('generate'):.1f} images/s, jobs "
              f"{measured.pooled('jobs'):.1f} images/s (pooled ratio "
              f"{measured.pooled('jobs') / measured.pooled('generate'):.3f}); jobs over /generate "
              f"round by round: {', '.join(f'{r:.2f}' for r in ratios)}", flush=True)
    return {
        "jobs_submit_per_s": submit_per_s,
        "jobs_overhead_p50_ms": timings["delta"].p50_ms,
        "jobs_throughput_ratio": float(np.median(ratios)),
    }


def shape_of(text: str) -> tuple[int, int, int]:
    width, height, steps = (int(part) for part in text.split("x"))
    return width, height, steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=SECONDS,
                        help="of submissions; three times that per side of the throughput test")
    parser.add_argument("--pairs", type=int, default=PAIRS)
    parser.add_argument("--gateway-workers", type=int, default=GATEWAY_WORKERS,
                        help="gunicorn worker processes (GATEWAY_WORKERS)")
    parser.add_argument("--shape", type=shape_of, default="x".join(map(str, SHAPE)),
                        metavar="WxHxSTEPS",
                        help="of every request (default %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="3 pairs, 2 s, two rounds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.pairs = 2.0, 3
    figures = run(args.seconds, args.pairs, args.smoke, args.gateway_workers, args.shape)
    print()
    print_summary(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
