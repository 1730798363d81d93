"""Which replica takes a call, and which failures are retried on another, against real gRPC
servers speaking Triton's protocol with scripted answers (Triton's own words, as measured with
tritonserver 2.51): the failures a real Triton gives on demand only with a crash or a drain,
which tests/gateway/triton/test_replicas.py does against real Tritons."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import urllib3
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc

from embedded.process import free_port
from gateway import Settings
from gateway.errors import GatewayError, InvalidRequest, Overloaded, Unavailable, UpstreamError
from gateway.metrics import MAX_TRITON_ADDRESSES, NULL_METRICS, OTHER_ADDRESS, Metrics, Recorder
from gateway.triton import TritonGateway
from gateway.triton.replicas import NoReplica, ReplicaSet
from gateway.triton.target import parse_target
from gateway.vocabulary import TritonOutcome
from harness.dnsserver import LoopbackDns
from harness.load import wait_until
from tests.gateway.triton.test_failures import STOPPING, UNLOADED


class Scripted(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A replica: ready or not, and what it answers ModelInfer with (an error, or an NSFW
    reading); it counts what it is asked."""

    def __init__(self) -> None:
        self.ready = True
        self.failure: tuple[grpc.StatusCode, str] | None = None
        self.infers = 0
        self.hold = threading.Event()
        self.hold.set()

    def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.ready)

    def ModelReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ModelReadyResponse(ready=self.ready)

    def ModelInfer(self, request: Any, context: Any) -> Any:
        self.infers += 1
        self.hold.wait(10)
        if self.failure is not None:
            context.abort(*self.failure)
        score = service_pb2.ModelInferResponse.InferOutputTensor(name="NSFW_SCORE", datatype="FP32", shape=[1, 1])
        status = service_pb2.ModelInferResponse.InferOutputTensor(name="NSFW_STATUS", datatype="BYTES", shape=[1, 1])
        word = b"ok"
        return service_pb2.ModelInferResponse(
            model_name=request.model_name,
            outputs=[score, status],
            raw_output_contents=[np.array([0.25], dtype=np.float32).tobytes(),
                                 len(word).to_bytes(4, "little") + word],
        )


class Replicas:
    def __init__(self, hosts: tuple[str, ...]) -> None:
        self.port = free_port()
        self.scripts = {host: Scripted() for host in hosts}
        self.servers = []
        for host, script in self.scripts.items():
            server = grpc.server(ThreadPoolExecutor(4))
            service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(script, server)
            assert server.add_insecure_port(f"{host}:{self.port}") == self.port
            server.start()
            self.servers.append(server)

    def __getitem__(self, host: str) -> Scripted:
        return self.scripts[host]

    def address(self, host: str) -> str:
        return f"{host}:{self.port}"

    def stop(self) -> None:
        for server in self.servers:
            server.stop(None)


@pytest.fixture
def replicas() -> Iterator[Replicas]:
    group = Replicas(("127.0.0.2", "127.0.0.3"))
    yield group
    group.stop()


def gateway_for(replicas: Replicas, metrics: Recorder = NULL_METRICS, **kwargs: Any) -> TritonGateway:
    return TritonGateway(
        "ipv4:" + ",".join(replicas.address(h) for h in replicas.scripts),
        f"http://127.0.0.1:{free_port()}/metrics",
        model="txt2img", nsfw_model="txt2img_nsfw", probe_timeout_s=2, retry_after_s=1,
        http=urllib3.PoolManager(), metrics=metrics, **kwargs,
    )


def classify(gateway: TritonGateway, deadline_s: float = 10.0) -> Any:
    return gateway.classify(np.zeros((8, 8, 3), dtype=np.uint8), deadline_s)


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    text = metrics.render().decode()
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.parametrize(
    ("first", "second", "error", "infers"),
    [
        # The replica that failed did no work or went away: once more on the other.
        ((grpc.StatusCode.UNAVAILABLE, STOPPING), None, None, (1, 1)),
        ((grpc.StatusCode.NOT_FOUND, UNLOADED), None, None, (1, 1)),
        ((grpc.StatusCode.UNAVAILABLE, "Socket closed"), None, None, (1, 1)),
        # Once only: both gone is a 503.
        ((grpc.StatusCode.UNAVAILABLE, "Socket closed"), (grpc.StatusCode.UNAVAILABLE, "Socket closed"), Unavailable, (1, 1)),
        # The second answer stands, whatever it is.
        ((grpc.StatusCode.UNAVAILABLE, STOPPING), (grpc.StatusCode.INVALID_ARGUMENT, "bad"), InvalidRequest, (1, 1)),
        # Never retried.
        ((grpc.StatusCode.INVALID_ARGUMENT, "WIDTH must be a multiple of 8"), None, InvalidRequest, (1, 0)),
        ((grpc.StatusCode.INTERNAL, "generation failed: boom"), None, UpstreamError, (1, 0)),
        ((grpc.StatusCode.UNAVAILABLE, "Exceeds maximum queue size"), None, Overloaded, (1, 0)),
    ],
)
def test_failover(
    replicas: Replicas, first: tuple[grpc.StatusCode, str], second: tuple[grpc.StatusCode, str] | None,
    error: type[GatewayError] | None, infers: tuple[int, int],
) -> None:
    metrics = Metrics()
    gateway = gateway_for(replicas, metrics)
    try:
        # Calls take turns: the first goes to the first address.
        a, b = replicas["127.0.0.2"], replicas["127.0.0.3"]
        a.failure, b.failure = first, second
        if error is None:
            assert classify(gateway).status == "ok"
        else:
            with pytest.raises(error):
                classify(gateway)
        assert (a.infers, b.infers) == infers
        retried = infers[1]
        assert counter(metrics, "gateway_triton_retries_total") == retried
        assert counter(metrics, "gateway_triton_address_calls_total") == sum(infers)
        assert counter(metrics, "gateway_triton_requests_total") == 1  # one call of the gateway
    finally:
        gateway.close()


def test_no_retry_when_the_deadline_is_nearly_spent(replicas: Replicas) -> None:
    gateway = gateway_for(replicas)
    try:
        a, b = replicas["127.0.0.2"], replicas["127.0.0.3"]
        a.failure = (grpc.StatusCode.UNAVAILABLE, STOPPING)
        with pytest.raises(Unavailable):
            classify(gateway, deadline_s=0.9)
        assert (a.infers, b.infers) == (1, 0)
    finally:
        gateway.close()


def test_calls_go_to_ready_replicas_with_the_fewest_in_flight(replicas: Replicas) -> None:
    a, b = replicas["127.0.0.2"], replicas["127.0.0.3"]
    gateway = gateway_for(replicas, refresh_s=0.2)
    try:
        a.hold.clear()  # A holds the first call...
        slow = threading.Thread(target=classify, args=(gateway,))
        slow.start()
        wait_until(lambda: a.infers == 1, 10, "a call on A")
        for _ in range(3):  # ...so the next ones go to B, which has none in flight
            classify(gateway)
        assert (a.infers, b.infers) == (1, 3)
        a.hold.set()
        slow.join()
        b.ready = False  # draining: no new call, once the refresher has seen it
        wait_until(lambda: not any(r.ready for r in gateway.replicas.replicas() if r.address == replicas.address("127.0.0.3")), 10, "B not ready")
        for _ in range(4):
            classify(gateway)
        assert (a.infers, b.infers) == (5, 3)
        a.ready = False  # none ready: a first call goes out all the same, a retry does not
        wait_until(lambda: not any(r.ready for r in gateway.replicas.replicas()), 10, "none ready")
        with pytest.raises(NoReplica):
            gateway.replicas.acquire(ready_only=True)
        assert classify(gateway).status == "ok"
    finally:
        gateway.close()


def test_the_set_follows_the_name_and_a_removed_replica_finishes_its_calls(replicas: Replicas) -> None:
    dns = LoopbackDns().start()
    a_address, b_address = replicas.address("127.0.0.2"), replicas.address("127.0.0.3")
    metrics = Metrics()
    dns.set("triton.test", ["127.0.0.2"])
    replica_set = ReplicaSet(
        parse_target(dns.target("triton.test", replicas.port)),
        refresh_s=0.2, probe_timeout_s=2, channel_args=(), metrics=metrics,
    )
    try:
        assert [r.address for r in replica_set.replicas()] == [a_address]
        held = replica_set.acquire()  # a call on A, in flight across its removal
        dns.set("triton.test", ["127.0.0.3", "127.0.0.2"])
        wait_until(lambda: [r.address for r in replica_set.replicas()] == [a_address, b_address], 10, "B added")
        wait_until(lambda: all(r.ready for r in replica_set.replicas()), 10, "B ready")
        dns.set("triton.test", ["127.0.0.3"])
        wait_until(lambda: [r.address for r in replica_set.replicas()] == [b_address], 10, "A removed")
        for _ in range(3):  # no new call to A
            replica = replica_set.acquire()
            assert replica.address == b_address
            replica_set.release(replica)
        assert held.client.is_server_live(client_timeout=5)  # its channel still open
        replica_set.release(held)  # the last call done: A's client closed
        with pytest.raises(ValueError):
            held.client.is_server_live(client_timeout=5)

        def gauge() -> dict[str, float]:
            text = metrics.render().decode()
            return {s.labels["state"]: s.value for f in text_string_to_metric_families(text)
                    for s in f.samples if s.name == "gateway_triton_addresses"}

        # The gauge is set at the end of a refresh, after its probes: the list can change first.
        wait_until(lambda: gauge() == {"ready": 1, "not_ready": 0}, 10, "the gauge counts B alone")
        dns.remove("triton.test")  # NXDOMAIN: no replica
        wait_until(lambda: replica_set.replicas() == [], 10, "the set emptied")
        with pytest.raises(NoReplica):
            replica_set.acquire()
    finally:
        replica_set.close()
        dns.stop()


def test_per_address_series_stay_bounded() -> None:
    metrics = Metrics()
    for i in range(MAX_TRITON_ADDRESSES + 5):
        metrics.triton_address_called(f"10.0.0.{i}:8001", TritonOutcome.OK)
    text = metrics.render().decode()
    addresses = {s.labels["address"] for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "gateway_triton_address_calls_total"}
    assert len(addresses) == MAX_TRITON_ADDRESSES + 1 and OTHER_ADDRESS in addresses
    assert counter(metrics, "gateway_triton_address_calls_total", address=OTHER_ADDRESS) == 5
    # An address that left the name frees its place (single-process mode).
    metrics.forget_triton_address("10.0.0.0:8001")
    metrics.triton_address_called("10.9.9.9:8001", TritonOutcome.OK)
    assert counter(metrics, "gateway_triton_address_calls_total", address="10.9.9.9:8001") == 1
    assert counter(metrics, "gateway_triton_address_calls_total", address="10.0.0.0:8001") == 0


def test_nothing_starts_before_the_first_use() -> None:
    gateway = TritonGateway(
        "dns://127.0.0.1:1/nowhere.test:8001", "http://127.0.0.1:1/metrics", model="txt2img",
        nsfw_model="txt2img_nsfw", probe_timeout_s=0.2, retry_after_s=1, http=urllib3.PoolManager(),
    )
    # No thread and no resolution yet (a failed one leaves its problem), however long that took.
    assert gateway.replicas._thread is None and gateway.replicas.problem is None
    with pytest.raises(Unavailable):  # the resolver cannot answer, and no replica is known
        classify(gateway)
    assert gateway.replicas.problem is not None  # the first use did resolve, and failed
    gateway.close()


def test_readyz_is_ready_while_one_replica_is_and_lists_each(
    replicas: Replicas, make_app: Callable[[Settings], Flask]
) -> None:
    settings = Settings(
        triton_url="ipv4:" + ",".join(replicas.address(h) for h in replicas.scripts),
        triton_metrics_url=f"http://127.0.0.1:{free_port()}/metrics",
        probe_timeout_s=2.0,
        ready_cache_s=0.0,  # each call asks the replicas again
    )
    client = make_app(settings).test_client()
    a, b = replicas["127.0.0.2"], replicas["127.0.0.3"]
    b.ready = False  # draining
    response = client.get("/readyz")
    assert response.status_code == 200, response.json
    listed = {r["address"]: (r["live"], r["ready"], r["models_ready"]) for r in response.json["triton"]["replicas"]}
    assert listed == {
        replicas.address("127.0.0.2"): (True, True, True),
        replicas.address("127.0.0.3"): (True, False, False),
    }
    assert response.json["triton"]["ready"] is True
    a.ready = False
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json["status"] == "not_ready"
    assert not any(r["ready"] for r in response.json["triton"]["replicas"])
