"""Load with faults: concurrent clients against the real stack, a flaky storage before the local S3.

    .venv/bin/python -m harness.load                       # 32 clients × 8 requests each
    .venv/bin/python -m harness.load --restart-triton-after 100   # the same, Triton crashing
    .venv/bin/python -m harness.load --replicas 3 --stop-replica sigkill   # one of 3 crashing
    .venv/bin/python -m harness.load --replicas 3 --stop-replica sigterm   # one of 3 draining
    .venv/bin/python -m harness.load --slow-headers 1000 --slow-bodies 200  # slowloris beside it

Starts its own local stack (embedded/stack.py: Triton with the demo models, moto, the gateway
under gunicorn behind its front door, nginx) with the flaky proxy (harness/flaky_storage.py)
before the local S3, all on free loopback ports; the clients call the front door. Every client sends its requests one after the other (64×64, 2 steps, NSFW on,
each to its own presigned key). Then it checks what must hold: no 500; every 200's object
exists in S3 and its MD5 is `image_hash`; every failure is a 502 `upload_failed` carrying the
final storage status (503s are allowed only around a Triton restart); and it prints the
gateway's RSS before, at peak and after. Exit status 1 on a violation.

With `--slow-headers N --slow-bodies M` (harness/slow_clients.py) that many slow connections
trickle their headers or their bodies into the front door from other loopback addresses for the
whole run; each must then be closed by nginx within its timeout, none may be answered.

With `--replicas N` it starts N Tritons behind one target (harness/replicas.py), can stop the
first one mid-run, and reports each replica's share of the Triton calls with their outcomes and
the gateway's retries on another replica; a stopped replica must cost no failed request.
tests/gateway/test_load.py runs a shortened version in `make test`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3
from prometheus_client.parser import text_string_to_metric_families
from typing_extensions import Self

from embedded.front_door import FrontDoorSettings
from embedded.s3 import LocalS3
from embedded.stack import LocalStack
from embedded.triton import TritonServer
from harness.flaky_storage import FlakyStorage
from harness.replicas import ReplicaGroup, kill, terminate
from harness.slow_clients import Connection, SlowClients, raise_open_files, summary


@dataclass(frozen=True)
class Outcome:
    client: int
    index: int
    status: int
    body: Any
    started: float  # time.monotonic()
    finished: float
    prefix: str  # the S3 key prefix the request uploaded under
    retry_after: str | None = None

    @property
    def seconds(self) -> float:
        return self.finished - self.started


@dataclass
class Report:
    outcomes: list[Outcome]
    elapsed_s: float
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    storage_actions: Counter[str] = field(default_factory=Counter)

    def statuses(self) -> Counter[int]:
        return Counter(o.status for o in self.outcomes)

    def lines(self) -> list[str]:
        ok = sorted(o.seconds for o in self.outcomes if o.status == 200)

        def pct(q: float) -> str:
            return f"{ok[min(len(ok) - 1, int(q * len(ok)))]:.2f}s" if ok else "-"

        final = Counter(
            str(o.body.get("data", {}).get("s3_upload_status"))
            for o in self.outcomes
            if o.status == 502 and isinstance(o.body, dict)
        )
        mib = 1024 * 1024
        rate = len(self.outcomes) / self.elapsed_s
        rss = (self.rss_before / mib, self.rss_peak / mib, self.rss_after / mib)
        return [
            f"requests: {len(self.outcomes)} in {self.elapsed_s:.1f}s ({rate:.1f}/s)",
            f"statuses: {dict(sorted(self.statuses().items()))}",
            f"502 final storage statuses: {dict(sorted(final.items()))}",
            f"latency of 200s: p50 {pct(0.5)}, p95 {pct(0.95)}, max {pct(1.0)}",
            f"storage actions: {dict(sorted(self.storage_actions.items()))}",
            "gateway RSS: before {:.1f} MiB, peak {:.1f} MiB, after {:.1f} MiB".format(*rss),
        ]


def request_body(client: int, index: int, s3_prefix: str) -> dict[str, Any]:
    return {
        "prompt": f"load test, client {client}, request {index}",
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        "upscale": False,
        "enable_nsfw_check": True,
        "seed": client * 100_000 + index,
        "s3_prefix": s3_prefix,
    }


def drive(
    gateway_url: str,
    presign: Callable[[str], str],
    *,
    clients: int,
    requests: int,
    headers: dict[str, str] | None = None,
    until: threading.Event | None = None,
    outcomes: list[Outcome] | None = None,
    run_id: str = "load",
) -> list[Outcome]:
    """`clients` threads, each sending up to `requests` requests one after the other (fewer if
    `until` is set first); answers go to `outcomes` as they come, for a caller watching from
    another thread. Like a well-behaved client, each waits Retry-After after a 429 or 503."""
    http = urllib3.PoolManager(maxsize=clients, retries=False, timeout=urllib3.Timeout(total=300))
    outcomes = [] if outcomes is None else outcomes
    lock = threading.Lock()
    stop = until or threading.Event()

    def client(number: int) -> None:
        for index in range(requests):
            if stop.is_set():
                return
            prefix = f"{run_id}/{number}/{index}"
            body = request_body(number, index, presign(f"{prefix}/1.png"))
            started = time.monotonic()
            try:
                response = http.request(
                    "POST",
                    f"{gateway_url}/generate",
                    json=body,
                    # A fresh connection each time: a kept-alive one that the server closes just
                    # as it is reused would fail the request before it reaches the gateway.
                    headers={**(headers or {}), "Connection": "close"},
                )
            except urllib3.exceptions.HTTPError as exc:  # no answer at all: status 0
                status, answer, retry_after = 0, f"{type(exc).__name__}: {exc}", None
            else:
                status, retry_after = response.status, response.headers.get("Retry-After")
                try:
                    answer = json.loads(response.data)
                except ValueError:
                    answer = response.data.decode(errors="replace")
            outcome = Outcome(
                number, index, status, answer, started, time.monotonic(), prefix, retry_after
            )
            with lock:
                outcomes.append(outcome)
            if status in (429, 503):
                stop.wait(float(retry_after or 1))

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client, n) for n in range(clients)]:
            future.result()
    return outcomes


def answered(outcomes: list[Outcome], *, status: int | None = None, after: float = 0.0) -> int:
    """How many answers (with that status, finished after `after`) have come back so far."""
    return sum(
        1 for o in list(outcomes) if (status is None or o.status == status) and o.finished > after
    )


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def object_reader(s3: LocalS3) -> Callable[[str], bytes | None]:
    """An S3 object's bytes by key, read from the local S3 itself (not through the proxy)."""
    client = s3.client()

    def get_object(key: str) -> bytes | None:
        try:
            return client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None

    return get_object


def presigner(s3: LocalS3, front: FlakyStorage | None = None) -> Callable[[str], str]:
    """Presigned PUT URLs for the local S3, pointed at the flaky front when there is one."""
    if front is None:
        return s3.presign_put
    return lambda key: s3.presign_put(key).replace(s3.url, front.url, 1)


def violations(
    outcomes: list[Outcome], get_object: Callable[[str], bytes | None], *, allow_503: bool = False
) -> list[str]:
    """What the run must never show; empty when everything held."""
    found: list[str] = []
    for o in outcomes:
        where = f"client {o.client} request {o.index}"
        if not isinstance(o.body, dict):
            found.append(f"{where}: {o.status} without a JSON body")
            continue
        if o.status == 200:
            data = o.body["data"]
            stored = get_object(f"{o.prefix}/{data['image_hash']}.jpg")
            if stored is None:
                found.append(f"{where}: 200 but no object in S3")
            elif hashlib.md5(stored).hexdigest() != data["image_hash"]:
                found.append(f"{where}: the stored object's MD5 is not image_hash")
        elif o.status == 502:
            error, data = o.body.get("error", {}), o.body.get("data")
            if error.get("code") != "upload_failed" or data is None or "s3_upload_status" not in data:
                found.append(f"{where}: 502 without upload_failed and the final status: {o.body}")
        elif o.status == 503 and allow_503:
            if o.body.get("error", {}).get("code") != "unavailable" or not o.retry_after:
                found.append(f"{where}: 503 without 'unavailable' and Retry-After: {o.body}")
        else:
            found.append(f"{where}: unexpected {o.status}: {o.body}")
    return found


class RssSampler:
    """Peak resident memory of a process, sampled every `every_s` seconds."""

    def __init__(self, read: Callable[[], int], every_s: float = 0.5) -> None:
        self.read = read
        self.peak = read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


@dataclass(frozen=True)
class Outage:
    """A crashed Triton's way back, in time.monotonic()."""

    killed: float
    # When the last readiness probe that failed was sent: Triton served nothing before it. Past
    # it, the gateway may be served before the restart has seen Triton ready itself.
    last_seen_down: float
    ready: float

    @property
    def down_s(self) -> float:
        return self.ready - self.killed


def crash_and_restart(server: TritonServer, timeout: float = 300.0) -> Outage:
    """SIGKILL Triton and its backend stubs (a crash, not a drain), then start it again on the
    same ports and wait until it is ready."""
    killed = last_seen_down = time.monotonic()
    kill(server)
    server.start()
    deadline = killed + timeout
    while True:
        probed = time.monotonic()
        if server.is_ready():
            return Outage(killed, last_seen_down, time.monotonic())
        last_seen_down = probed
        if probed > deadline or (server.process is not None and server.process.poll() is not None):
            server.wait_ready(timeout=1)  # raises, naming the exit status or the log
        time.sleep(server.poll_interval_s)


def gateway_calls(gateway_url: str) -> tuple[Counter[tuple[str, str]], Counter[str]]:
    """The gateway's Triton calls by (address, outcome), and its retries by reason."""
    with urllib.request.urlopen(f"{gateway_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    calls: Counter[tuple[str, str]] = Counter()
    retries: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_triton_address_calls_total":
                calls[(sample.labels["address"], sample.labels["outcome"])] += int(sample.value)
            elif sample.name == "gateway_triton_retries_total":
                retries[sample.labels["reason"]] += int(sample.value)
    return calls, retries


def replica_lines(
    calls: Counter[tuple[str, str]], retries: Counter[str], addresses: list[str]
) -> list[str]:
    """Each replica's share of the run's Triton calls and how they ended; the retries."""
    total = sum(calls.values()) or 1
    lines = []
    for address in addresses:
        mine = {outcome: n for (a, outcome), n in calls.items() if a == address and n}
        count = sum(mine.values())
        ended = ", ".join(f"{n} {outcome}" for outcome, n in sorted(mine.items())) or "none"
        lines.append(f"  {address}: {count} calls ({100 * count / total:.0f}%): {ended}")
    lines.append(f"retries on another replica: {dict(sorted(retries.items()))}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8, help="per client")
    parser.add_argument("--seed", type=int, default=1, help="of the flaky storage's faults")
    parser.add_argument("--backoff", default="1,2,4", help="GATEWAY_UPLOAD_BACKOFF")
    parser.add_argument("--upload-timeout", default="3", help="GATEWAY_UPLOAD_TIMEOUT_S")
    parser.add_argument(
        "--storage-faults", choices=("on", "off"), default="on",
        help="off: upload straight to the local S3, so any failure left is Triton's",
    )
    parser.add_argument(
        "--restart-triton-after", type=int, default=0, metavar="N",
        help="crash and restart Triton once N answers have come back (0: never; one replica)",
    )
    parser.add_argument(
        "--replicas", type=int, default=1,
        help="Tritons behind one GATEWAY_TRITON_URL (1: one Triton on free ports)",
    )
    parser.add_argument(
        "--addressing", choices=("hosts", "ports"), default="hosts",
        help="hosts: 127.0.0.2, .3, ... on the same ports, one name served by a loopback DNS "
        "server; ports: 127.0.0.1 with ports of their own, an ipv4: list",
    )
    parser.add_argument(
        "--stop-replica", choices=("sigterm", "sigkill"),
        help="stop the first replica mid-run: SIGTERM (it drains) or SIGKILL (it crashes)",
    )
    parser.add_argument(
        "--stop-after", type=int, default=0, metavar="N",
        help="stop it once N answers have come back (default: a third of the run)",
    )
    parser.add_argument(
        "--slow-headers", type=int, default=0, metavar="N",
        help="slow connections trickling their headers into the front door meanwhile",
    )
    parser.add_argument(
        "--slow-bodies", type=int, default=0, metavar="N",
        help="slow connections trickling a declared 100 kB body into the front door meanwhile",
    )
    args = parser.parse_args(argv)
    if args.restart_triton_after and args.replicas != 1:
        parser.error("--restart-triton-after is for one replica; use --stop-replica")
    if args.stop_replica and args.replicas < 2:
        parser.error("--stop-replica needs --replicas 2 or more")
    stop_after = args.stop_after or args.clients * args.requests // 3

    workdir = Path(tempfile.mkdtemp(prefix="imagegen-load-"))
    print(f"logs in {workdir}", flush=True)
    settings = {
        "UPLOAD_BACKOFF": args.backoff,
        "UPLOAD_TIMEOUT_S": args.upload_timeout,
        "THREADS": str(args.clients + 8),
        "MAX_IN_FLIGHT": str(args.clients),
        # 32 clients keep Triton's queue full: on 2 CPU cores a request can wait there longer
        # than the model's 60 s default. This run is about storage faults, so the queue may hold
        # a request almost to the 120 s deadline (the queue timeout has its own test).
        "TRITON_QUEUE_TIMEOUT_S": "100",
        "LOG_LEVEL": "WARNING",
    }
    # Every client calls from 127.0.0.1: room for all of them under the per-address cap.
    front_door = {"CONNECTIONS_PER_ADDRESS": str(args.clients + 8)}
    group = None
    if args.replicas > 1:
        group = ReplicaGroup.launch(args.replicas, workdir, addressing=args.addressing)
        settings["TRITON_URL"] = group.target
        print(f"{args.replicas} replicas behind {group.target}", flush=True)
    extra: list[str] = []
    try:
        stack = LocalStack(
            workdir,
            triton=group.replicas[0] if group else None,
            front=(
                (lambda upstream: FlakyStorage(upstream, seed=args.seed))
                if args.storage_faults == "on"
                else None
            ),
            # Only the run's settings: a developer's GATEWAY_* (API keys, say) would change it.
            environ={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
            gateway_settings=settings,
            front_door_settings=front_door,
        )
        storage = stack.front if isinstance(stack.front, FlakyStorage) else None
        with stack:
            s3, gateway = stack.bucket(), stack.gateway
            presign, get_object = presigner(s3, storage), object_reader(s3)
            pid = gateway.worker_pids()
            drive(stack.url, presign, clients=args.clients, requests=1, run_id="warmup")
            if storage:
                storage.actions.clear()
            calls_before, retries_before = gateway_calls(stack.probe_url)
            slow = None
            if args.slow_headers or args.slow_bodies:
                raise_open_files(args.slow_headers + args.slow_bodies + 1024)
                slow = SlowClients(stack.url, args.slow_headers, args.slow_bodies).start()
            rss_before = gateway.rss_bytes()
            outcomes: list[Outcome] = []
            started = time.monotonic()
            with RssSampler(gateway.rss_bytes) as rss:
                traffic = threading.Thread(
                    target=drive,
                    args=(stack.url, presign),
                    kwargs={"clients": args.clients, "requests": args.requests, "outcomes": outcomes},
                )
                traffic.start()
                if args.restart_triton_after:
                    wait_until(
                        lambda: answered(outcomes) >= args.restart_triton_after, 3600, "answers"
                    )
                    down_s = crash_and_restart(stack.triton).down_s
                    print(f"Triton crashed and back after {down_s:.1f}s", flush=True)
                if group and args.stop_replica:
                    wait_until(lambda: answered(outcomes) >= stop_after, 3600, "answers")
                    extra.append(stop_replica(group, args.stop_replica, answered(outcomes)))
                    print(extra[-1], flush=True)
                traffic.join()
            slow_connections: list[Connection] = []
            if slow is not None:
                held_at_once = dict(slow.peak)
                timeouts = stack.front_door.settings
                slow_connections = slow.stop(
                    timeout_s=max(timeouts.header_timeout_s, timeouts.body_timeout_s) + 30
                )
            calls, retries = gateway_calls(stack.probe_url)
            report = Report(
                outcomes, time.monotonic() - started, rss_before, rss.peak, gateway.rss_bytes(),
                storage.actions if storage else Counter(),
            )
            found = violations(outcomes, get_object, allow_503=bool(args.restart_triton_after))
            if gateway.worker_pids() != pid:
                found.append("the gateway's worker was restarted")
            if slow is not None:
                extra.append(f"slow connections held at once: {held_at_once}")
                extra.extend(summary(slow_connections))
                found.extend(slow_violations(slow_connections, stack.front_door.settings))
    finally:
        if group:
            group.stop()
    print("\n".join(report.lines()))
    if extra and not group:
        print("\n".join(extra))
    if group:
        print(f"replicas: {args.replicas} ({args.addressing}), Triton calls of the run:")
        print("\n".join(extra))
        addresses = [group.address(i) for i in range(args.replicas)]
        print("\n".join(replica_lines(calls - calls_before, retries - retries_before, addresses)))
    print("\n".join(found[:20]) if found else "OK: no violation")
    return 1 if found else 0


# How far from its timeout a slow connection may be seen closed (this process notes a connect
# or a close late while it also drives the load).
SLOW_CLOSE_SLACK_S = 3.0


def slow_violations(connections: list[Connection], front: FrontDoorSettings) -> list[str]:
    """Slow connections the front door did not close in time, or answered."""
    found = []
    for c in connections:
        limit = front.header_timeout_s if c.kind == "header" else front.body_timeout_s
        since = c.held_s if c.kind == "header" else c.quiet_s
        if not c.by_server or since is None:
            found.append(f"a slow {c.kind} connection from {c.source} was never closed")
        elif since > limit + SLOW_CLOSE_SLACK_S:
            found.append(f"a slow {c.kind} connection from {c.source} closed after {since:.1f}s")
        elif c.answer:
            found.append(f"a slow {c.kind} connection got an answer: {c.answer[:80]!r}")
    return found


def stop_replica(group: ReplicaGroup, how: str, answers: int) -> str:
    """Stop the first replica the way it is asked; what happened, for the report."""
    victim = group.replicas[0]
    address = group.address(0)
    started = time.monotonic()
    if how == "sigkill":
        kill(victim)
        return f"{address} killed (SIGKILL) after {answers} answers"
    code = terminate(victim, victim.stop_timeout_s)
    took = time.monotonic() - started
    return f"{address} got SIGTERM after {answers} answers, drained and exited {code} in {took:.1f}s"


if __name__ == "__main__":
    sys.exit(main())
