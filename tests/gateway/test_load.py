"""The shortened load run of `python -m harness.load`: 32 concurrent clients against gunicorn,
the session's Triton and the local S3 behind a flaky storage front. Nothing may be lost: no 500,
every 200's object stored with the MD5 it claims, every failure a 502 with the final status."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedded.s3 import LocalS3
from gateway import Settings
from harness.flaky_storage import Faults, FlakyStorage
from harness.load import RssSampler, drive, object_reader, presigner, violations
from tests.gateway.process import GunicornGateway

CLIENTS = 32
REQUESTS = 3  # each; `python -m harness.load` sends 8 (256 in all) with the real backoff


@pytest.fixture
def flaky_s3(s3: LocalS3) -> Iterator[FlakyStorage]:
    # Some delays run past the gateway's 2 s upload timeout: timeouts are among the faults.
    storage = FlakyStorage(s3.url, Faults(delay_s=(0.2, 2.5)), seed=7).start()
    yield storage
    storage.stop()


def test_32_clients_through_a_flaky_storage_lose_nothing(
    triton_settings: Settings, s3: LocalS3, flaky_s3: FlakyStorage, tmp_path: Path
) -> None:
    gateway = GunicornGateway(
        tmp_path / "gateway.log",
        TRITON_URL=triton_settings.triton_url,
        TRITON_METRICS_URL=triton_settings.triton_metrics_url,
        UPLOAD_ALLOWED_HOSTS=f"http://{flaky_s3.hostport}",
        UPLOAD_BACKOFF="0.1,0.2,0.4",
        UPLOAD_TIMEOUT_S="2",
        THREADS=str(CLIENTS + 8),
        MAX_IN_FLIGHT=str(CLIENTS),
        # 32 clients keep Triton's queue full: on 2 CPU cores a request can wait there longer
        # than the model's 60 s default. This run is about storage faults, so the queue may hold
        # a request almost to the 120 s deadline (the queue timeout has its own test).
        TRITON_QUEUE_TIMEOUT_S="100",
        LOG_LEVEL="WARNING",
    )
    presign = presigner(s3, flaky_s3)
    with gateway:
        [worker] = gateway.worker_pids()
        drive(gateway.url, presign, clients=CLIENTS, requests=1, run_id="warm")
        before = gateway.rss_bytes()
        with RssSampler(gateway.rss_bytes) as rss:
            outcomes = drive(gateway.url, presign, clients=CLIENTS, requests=REQUESTS, run_id="short")
        after = gateway.rss_bytes()
        assert gateway.worker_pids() == [worker]

    assert len(outcomes) == CLIENTS * REQUESTS
    assert violations(outcomes, object_reader(s3)) == []
    statuses = {o.status for o in outcomes}
    assert 200 in statuses and statuses <= {200, 502}
    # Every kind of fault happened, so the run meant something.
    assert set(flaky_s3.actions) == {"forward", "unavailable", "reset_before", "reset_after", "delay"}
    mib = 1024 * 1024
    print(f"RSS before {before / mib:.1f} MiB, peak {rss.peak / mib:.1f} MiB, after {after / mib:.1f} MiB")
    assert after - before < 32 * mib, "the gateway's memory grew across the run"
    failed: list[Any] = [o.body["data"]["s3_upload_status"] for o in outcomes if o.status == 502]
    print(f"{len(outcomes)} requests, {len(failed)} failed uploads (final statuses {failed})")
