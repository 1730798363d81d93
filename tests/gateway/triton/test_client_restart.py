"""Triton crashes in the middle of a run and comes back: the requests in flight get 503 JSON
with Retry-After, and the same gateway process serves again once Triton is back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedded.s3 import LocalS3
from embedded.triton import DEFAULT_REPOSITORY, TritonServer
from harness.load import (
    Outcome,
    answered,
    crash_and_restart,
    drive,
    object_reader,
    violations,
    wait_until,
)
from tests.gateway.process import GunicornGateway

CLIENTS = 6


@pytest.fixture
def own_triton(demo_models: Path, tmp_path: Path) -> Iterator[TritonServer]:
    """A Triton of this test's own: the session's must not go down under the other tests."""
    server = TritonServer.on_free_ports(DEFAULT_REPOSITORY, tmp_path / "triton")
    yield server
    server.stop()


def test_a_triton_crash_mid_run_is_503_then_the_gateway_recovers(
    own_triton: TritonServer, s3: LocalS3, tmp_path: Path
) -> None:
    gateway = GunicornGateway(
        tmp_path / "gateway.log",
        TRITON_URL=own_triton.grpc_url,
        TRITON_METRICS_URL=own_triton.metrics_url,
        UPLOAD_ALLOWED_HOSTS=f"http://{s3.hostport}",
        RETRY_AFTER_S="1",
        LOG_LEVEL="WARNING",
    )
    outcomes: list[Outcome] = []
    stop = threading.Event()
    with gateway:
        [worker] = gateway.worker_pids()
        traffic = threading.Thread(
            target=drive,
            args=(gateway.url, s3.presign_put),
            kwargs={"clients": CLIENTS, "requests": 10_000, "until": stop, "outcomes": outcomes,
                    "run_id": "restart"},
        )
        traffic.start()
        try:
            wait_until(lambda: answered(outcomes, status=200) >= CLIENTS, 120, "traffic")
            crashed = time.monotonic()
            outage = crash_and_restart(own_triton)
            wait_until(
                lambda: answered(outcomes, status=200, after=outage.ready) >= CLIENTS, 120, "recovery"
            )
        finally:
            stop.set()
            traffic.join()
        assert gateway.worker_pids() == [worker]  # recovered without a restart of its own

    assert violations(outcomes, object_reader(s3), allow_503=True) == []
    in_flight = [o for o in outcomes if o.started < crashed < o.finished]
    assert in_flight and {o.status for o in in_flight} <= {200, 503}
    assert 503 in {o.status for o in in_flight}
    # Answered while Triton was surely down: before a readiness probe still found it not ready.
    during = [o for o in outcomes if crashed < o.started and o.finished < outage.last_seen_down]
    # and each 503 unavailable JSON with Retry-After (violations() above)
    assert during and all(o.status == 503 for o in during), [(o.status, o.body) for o in during]
    print(
        f"Triton down {outage.down_s:.1f}s; {len(in_flight)} requests in flight at the crash "
        f"({sum(o.status == 503 for o in in_flight)} got 503), {len(during)} more 503s while down, "
        f"{answered(outcomes, status=200, after=outage.ready)} 200s after"
    )
