"""Several Triton replicas behind one name: discovery, failover and drain, against real Tritons,
the gateway under gunicorn, the local S3, and a DNS server on loopback that the tests control.

Replica A is the session's Triton (127.0.0.1); replica B is started here on 127.0.0.2 with the
same ports, so that one name resolves to both (a DNS answer carries addresses, not ports). B is
the one the tests kill and stop; A keeps serving the rest of the suite. What each replica did is
read from Triton's own statistics, not from the gateway's account of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import pytest
import tritonclient.grpc as grpcclient
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from embedded.s3 import LocalS3
from embedded.triton import DEFAULT_REPOSITORY, TritonServer
from gateway import Settings
from gateway.errors import InvalidRequest
from gateway.triton import contract
from harness.dnsserver import LoopbackDns
from harness.load import (
    Outcome,
    answered,
    drive,
    gateway_calls,
    object_reader,
    violations,
    wait_until,
)
from harness.replicas import ReplicaGroup, kill, restart, terminate
from tests.gateway.process import GunicornGateway, request

CLIENTS = 6
BOUND_S = 30.0  # a replica added behind the name takes calls, and a removed one none, within this
MODEL = "txt2img_nsfw"  # what harness.load's requests call


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDns]:
    server = LoopbackDns().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def group(
    triton: TritonServer, dns: LoopbackDns, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReplicaGroup]:
    workdir = tmp_path_factory.mktemp("replica-b")
    b = TritonServer(
        repository=DEFAULT_REPOSITORY, host="127.0.0.2", http_port=triton.http_port,
        grpc_port=triton.grpc_port, metrics_port=triton.metrics_port, workdir=workdir,
        log_path=workdir / "triton.log",
    )
    b.launch()
    replicas = ReplicaGroup([triton, b], dns)
    replicas.publish([0, 1])
    yield replicas
    b.stop()  # A is the session's


@pytest.fixture(scope="module")
def gateway(group: ReplicaGroup, s3: LocalS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornGateway]:
    # GATEWAY_TRITON_REFRESH_S keeps its default: the bound is checked with what ships.
    server = GunicornGateway(
        tmp_path_factory.mktemp("replica-gateway") / "gateway.log",
        TRITON_URL=group.target,
        TRITON_METRICS_URL=group.replicas[0].metrics_url,
        UPLOAD_ALLOWED_HOSTS=f"http://{s3.hostport}",
        THREADS=str(CLIENTS + 4),
        MAX_IN_FLIGHT=str(CLIENTS),
        RETRY_AFTER_S="1",
    )
    with server:
        yield server


@pytest.fixture
def both(group: ReplicaGroup, gateway: GunicornGateway) -> ReplicaGroup:
    """Both replicas up, behind the name, and ready in the gateway's eyes."""
    b = group.replicas[1]
    if b.process is None:  # a test before stopped it
        print(f"replica B back after {restart(b):.1f}s")
    group.publish([0, 1])
    addresses = [group.address(0), group.address(1)]
    wait_until(lambda: ready_replicas(gateway) == addresses, 60, "both replicas ready")
    return group


def ready_replicas(gateway: GunicornGateway) -> list[str]:
    _, _, body = request("GET", f"{gateway.url}/readyz", timeout=30)
    return [r["address"] for r in body["triton"]["replicas"] if r["ready"] and r["models_ready"]]


def listed_replicas(gateway: GunicornGateway) -> list[str]:
    _, _, body = request("GET", f"{gateway.url}/readyz", timeout=30)
    return [r["address"] for r in body["triton"]["replicas"]]


def served(replica: TritonServer, model: str = MODEL) -> tuple[int, int]:
    """(successes, failures) of `model` on that replica, from Triton's own statistics."""
    client = grpcclient.InferenceServerClient(replica.grpc_url)
    try:
        stats = client.get_inference_statistics(model, as_json=True, client_timeout=10)
    finally:
        client.close()
    inference = stats["model_stats"][0]["inference_stats"]
    return int(inference["success"].get("count", 0)), int(inference["fail"].get("count", 0))


def pending(replica: TritonServer, model: str = "diffusion") -> int:
    """Requests waiting in the model's queue on that replica (Triton's gauge)."""
    import urllib.request

    with urllib.request.urlopen(replica.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nv_inference_pending_request_count" and sample.labels["model"] == model:
                return int(sample.value)
    return 0


class Traffic:
    """CLIENTS clients sending requests one after the other until stopped."""

    def __init__(self, gateway: GunicornGateway, s3: LocalS3, run_id: str, clients: int = CLIENTS) -> None:
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.clients = clients
        self.thread = threading.Thread(
            target=drive,
            args=(gateway.url, s3.presign_put),
            kwargs={"clients": clients, "requests": 10_000, "until": self.stop,
                    "outcomes": self.outcomes, "run_id": run_id},
        )

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def ok_after(self, moment: float, count: int, timeout: float = 180.0) -> None:
        wait_until(lambda: answered(self.outcomes, status=200, after=moment) >= count, timeout, "200s")

    def every_client_started_after(self, moment: float, timeout: float = 180.0) -> None:
        """Each client sent a request after `moment`: every request before it has finished."""
        wait_until(
            lambda: {o.client for o in list(self.outcomes) if o.started > moment} == set(range(self.clients)),
            timeout, "a request of every client",
        )


def test_an_added_replica_takes_calls_within_the_bound_and_a_removed_one_none(
    both: ReplicaGroup, gateway: GunicornGateway, s3: LocalS3
) -> None:
    a, b = both.replicas
    both.publish([0])
    wait_until(lambda: listed_replicas(gateway) == [both.address(0)], BOUND_S, "B gone from the name")
    with Traffic(gateway, s3, "discovery", clients=2) as traffic:
        traffic.every_client_started_after(time.monotonic())
        b_before = served(b)
        traffic.ok_after(time.monotonic(), 3)
        assert served(b) == b_before  # not behind the name: no call

        both.publish([0, 1])
        added = time.monotonic()
        # In the set the gateway picks from (the next call goes to the replica with the fewest
        # in flight: B, with none), within the bound...
        addresses = [both.address(0), both.address(1)]
        wait_until(lambda: ready_replicas(gateway) == addresses, BOUND_S, "B taking calls")
        took_added = time.monotonic() - added
        # ...and B serves calls (a generation takes seconds on a busy 2-core machine).
        wait_until(lambda: served(b)[0] > b_before[0], 120, "a call done on the added replica")
        first_done = time.monotonic() - added

        both.publish([1])
        removed = time.monotonic()
        wait_until(lambda: listed_replicas(gateway) == [both.address(1)], BOUND_S, "A dropped")
        took_removed = time.monotonic() - removed
        noticed = time.monotonic()
        traffic.every_client_started_after(noticed)  # the calls A held have finished
        a_after = served(a)
        traffic.ok_after(time.monotonic(), 4)
        assert served(a) == a_after  # removed from the name: no new call
    statuses = {o.status for o in traffic.outcomes}
    assert statuses == {200}, [o.body for o in traffic.outcomes if o.status != 200][:3]
    assert violations(traffic.outcomes, object_reader(s3)) == []
    print(f"added replica taking calls after {took_added:.1f}s (first one done after "
          f"{first_done:.1f}s); the removed one dropped after {took_removed:.1f}s; "
          f"{len(traffic.outcomes)} requests, all 200")


def test_a_call_the_model_refuses_is_not_retried(
    both: ReplicaGroup, make_app: Callable[[Settings], Flask]
) -> None:
    settings = Settings(
        triton_url=both.target, triton_metrics_url=both.replicas[0].metrics_url, probe_timeout_s=5.0
    )
    services = make_app(settings).extensions["gateway"]
    ensemble, model = contract.Model.TXT2IMG.value, "diffusion"
    before = [(served(r, ensemble), sum(served(r, model))) for r in both.replicas]
    refused = contract.Generation(prompt="a width that is not a multiple of 8", width=60, height=64, steps=1)
    for _ in range(4):
        with pytest.raises(InvalidRequest):
            services.triton.generate(refused, nsfw=False, deadline_s=60)
    after = [(served(r, ensemble), sum(served(r, model))) for r in both.replicas]
    # What reached the model on each replica. (Triton 2.51 counts a refused call as one
    # request of `diffusion`, which answered it with the error, and as two failures of the
    # ensemble.)
    reached = [now[1] - then[1] for now, then in zip(after, before, strict=True)]
    # Four calls, four requests in all: none went to a second replica. Taking turns, each
    # replica refused some.
    assert sum(reached) == 4 and min(reached) > 0, reached
    assert [now[0][0] - then[0][0] for now, then in zip(after, before, strict=True)] == [0, 0]
    assert all(now[0][1] > then[0][1] for now, then in zip(after, before, strict=True))
    text = services.metrics.render().decode()
    retries = [s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "gateway_triton_retries_total"]
    assert retries and sum(retries) == 0


def test_sigkill_of_a_replica_under_load_fails_no_request(
    both: ReplicaGroup, gateway: GunicornGateway, s3: LocalS3
) -> None:
    b = both.replicas[1]
    _, retries_before = gateway_calls(gateway.url)
    with Traffic(gateway, s3, "sigkill") as traffic:
        traffic.ok_after(0, CLIENTS)
        wait_until(lambda: pending(b) > 0, 60, "calls waiting on B")
        killed = time.monotonic()
        kill(b)
        traffic.ok_after(killed, CLIENTS)
    _, retries = gateway_calls(gateway.url)
    outcomes = traffic.outcomes
    assert {o.status for o in outcomes} == {200}, [o.body for o in outcomes if o.status != 200][:3]
    assert violations(outcomes, object_reader(s3)) == []  # every object there, with its MD5
    # The kill did hit calls in flight on B: they were retried on A.
    assert retries["unreachable"] > retries_before["unreachable"]
    in_flight = [o for o in outcomes if o.started < killed < o.finished]
    print(f"{len(outcomes)} requests, all 200; {len(in_flight)} in flight at the kill; "
          f"{retries['unreachable'] - retries_before['unreachable']} retried on A")


def test_sigterm_of_a_replica_under_load_drains_it_and_fails_no_request(
    both: ReplicaGroup, gateway: GunicornGateway, s3: LocalS3
) -> None:
    b = both.replicas[1]
    b_address = both.address(1)
    log_path = Path(str(b.log_path))
    with Traffic(gateway, s3, "sigterm") as traffic:
        traffic.ok_after(0, CLIENTS)
        wait_until(lambda: pending(b) > 0, 60, "calls waiting on B")
        calls, _ = gateway_calls(gateway.url)
        held_before = calls[(b_address, "ok")]
        signalled = time.monotonic()
        code = terminate(b, b.stop_timeout_s)
        stopped = time.monotonic()
        calls, _ = gateway_calls(gateway.url)
        finished_on_b = calls[(b_address, "ok")] - held_before
        traffic.ok_after(stopped, CLIENTS)
    outcomes = traffic.outcomes
    assert code == 0
    assert {o.status for o in outcomes} == {200}, [o.body for o in outcomes if o.status != 200][:3]
    assert violations(outcomes, object_reader(s3)) == []
    # B finished the calls it held when the signal came (some were waiting in its queue: with
    # Triton's own SIGTERM they would have failed at their next ensemble step).
    assert finished_on_b > 0
    assert "drained in" in log_path.read_text()
    print(f"B drained and stopped in {stopped - signalled:.1f}s, finishing {finished_on_b} calls; "
          f"{len(outcomes)} requests, all 200")
