"""The Triton wrapper's pure parts: the NSFW fail-safe, and calls taking turns over the
addresses of the target. (What a failed call means: test_failures.py.)
(The calls themselves run against the real Triton in test_views/test_generate.py.)"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import urllib3
from tritonclient.grpc import service_pb2, service_pb2_grpc

from embedded.process import free_port
from gateway.triton.client import TritonGateway
from gateway.triton.contract import read_nsfw


class Outputs:
    """What an InferResult offers the gateway: named arrays, None when absent."""

    def __init__(self, **arrays: np.ndarray) -> None:
        self.arrays = arrays

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.arrays.get(name)


def outputs(score: float | None, status: bytes | None) -> Outputs:
    arrays = {}
    if score is not None:
        arrays["NSFW_SCORE"] = np.array([[score]], dtype=np.float32)
    if status is not None:
        arrays["NSFW_STATUS"] = np.array([[status]], dtype=np.object_)
    return Outputs(**arrays)


@pytest.mark.parametrize(
    ("score", "status", "expected"),
    [
        (0.05, b"ok", (pytest.approx(0.05), "ok")),
        (1.0, b"timeout", (1.0, "timeout")),
        (0.2, b"timeout", (1.0, "timeout")),  # whatever the model sent, a timeout scores 1.0
        (0.2, b"error", (1.0, "error")),
        (None, b"ok", (1.0, "error")),  # score missing
        (0.2, None, (1.0, "error")),  # status missing
        (0.2, b"weird", (1.0, "error")),
        (float("nan"), b"ok", (1.0, "error")),
        (1.5, b"ok", (1.0, "error")),
    ],
)
def test_nsfw_fail_safe(score: float | None, status: bytes | None, expected: tuple) -> None:
    reading = read_nsfw(outputs(score, status))  # type: ignore[arg-type]
    assert (reading.score, reading.status) == expected


class LiveOnly(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A real gRPC server speaking Triton's protocol, answering liveness only, counting calls."""

    def __init__(self) -> None:
        self.calls = 0

    def ServerLive(self, request: Any, context: Any) -> Any:
        self.calls += 1
        return service_pb2.ServerLiveResponse(live=True)


def test_calls_take_turns_over_every_address_of_the_target() -> None:
    """Several Triton replicas behind one name: each gets calls, not just the first address."""
    port = free_port()
    replicas, servers = [], []
    for host in ("127.0.0.1", "127.0.0.2"):
        replica, server = LiveOnly(), grpc.server(ThreadPoolExecutor(2))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(replica, server)
        assert server.add_insecure_port(f"{host}:{port}") == port
        server.start()
        replicas.append(replica)
        servers.append(server)
    gateway = TritonGateway(
        f"ipv4:127.0.0.1:{port},127.0.0.2:{port}",  # what a DNS name with two records gives
        f"http://127.0.0.1:{free_port()}/metrics",
        model="txt2img",
        nsfw_model="txt2img_nsfw",
        probe_timeout_s=5,
        retry_after_s=1,
        http=urllib3.PoolManager(),
    )
    try:
        for _ in range(20):
            assert gateway.client.is_server_live(client_timeout=5)
    finally:
        gateway.close()
        for server in servers:
            server.stop(None)
    # Both take calls (the split is even once both connections are up, 10 and 10 here).
    calls = [r.calls for r in replicas]
    assert sum(calls) == 20 and min(calls) > 0, calls
