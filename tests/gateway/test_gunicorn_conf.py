"""gunicorn.conf.py under a real gunicorn: SIGTERM lets a request in flight finish its upload,
within the shutdown timeout and no longer (storage holds each upload until the test releases
it)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway import Settings
from tests.gateway.faults import FaultServer, held
from tests.gateway.process import GunicornGateway, request
from tests.models.helpers import wait_until

BODY = {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 1, "upscale": False}


def gateway(tmp_path: Path, settings: Settings, **extra: str) -> GunicornGateway:
    return GunicornGateway(
        tmp_path / "gateway.log",
        TRITON_URL=settings.triton_url,
        TRITON_METRICS_URL=settings.triton_metrics_url,
        UPLOAD_ALLOWED_HOSTS=",".join(settings.upload_allowed_hosts),
        UPLOAD_BACKOFF="0.05",
        **extra,
    )


def test_sigterm_lets_a_request_in_flight_finish_its_upload(
    triton_settings: Settings, fault_server: FaultServer, tmp_path: Path
) -> None:
    fault_server.set_script(held(200))  # the upload is still going when SIGTERM comes
    server = gateway(tmp_path, triton_settings, UPLOAD_TIMEOUT_S="120", TRITON_DEADLINE_S="30")
    with server, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            request, "POST", f"{server.url}/generate", {**BODY, "s3_prefix": f"{fault_server.url}/b/1.png"}
        )
        try:
            wait_until(lambda: len(fault_server.requests) == 1, "the upload started")
            assert server.process is not None
            server.terminate()
            # (its log is read as text: a line may be half written)
            wait_until(lambda: "Handling signal: term" in server.output(), "gunicorn took the SIGTERM")
            assert server.process.poll() is None and fault_server.unanswered == 1
        finally:
            fault_server.release()  # only now can the upload, and so the request, end
        status, _, answer = pending.result(timeout=60)
        assert status == 200, answer  # it did wait for the upload
        assert server.process.wait(timeout=60) == 0
    [upload] = fault_server.requests
    assert hashlib.md5(upload.body).hexdigest() == answer["data"]["image_hash"]


def test_a_request_past_the_shutdown_timeout_is_cut_off(
    triton_settings: Settings, fault_server: FaultServer, tmp_path: Path
) -> None:
    fault_server.set_script(held(200))  # released only once the gateway is gone
    server = gateway(tmp_path, triton_settings, UPLOAD_TIMEOUT_S="120", SHUTDOWN_TIMEOUT_S="1")
    with server, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            request, "POST", f"{server.url}/generate", {**BODY, "s3_prefix": f"{fault_server.url}/b/1.png"}
        )
        try:
            wait_until(lambda: len(fault_server.requests) == 1, "the upload started")
            assert server.process is not None
            server.terminate()
            # Gone while the upload is still held: bounded by the timeout, not by the upload.
            assert server.process.wait(timeout=120) == 0
            assert fault_server.unanswered == 1
        finally:
            fault_server.release()
        with pytest.raises(OSError):  # the connection was dropped
            pending.result(timeout=60)


def test_the_master_loads_no_grpc_and_no_metrics_client_before_forking() -> None:
    # gRPC is not fork-safe once used, and prometheus_client fixes its multi-process mode at
    # import: gunicorn.conf.py, run by the master, must import neither.
    code = (
        "import runpy, sys; runpy.run_path('gateway/gunicorn.conf.py'); "
        "print(sorted(m for m in ('grpc', 'prometheus_client', 'tritonclient.grpc') "
        "if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[2], timeout=60,
        env={**env, "GATEWAY_ALLOW_ANONYMOUS": "true"},
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_master_refuses_threads_that_leave_probes_no_room() -> None:
    # MAX_IN_FLIGHT requests may hold a thread each for minutes; the spare threads answer
    # probes meanwhile (gateway/settings.py, SPARE_THREADS), so gunicorn does not start without.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_ALLOW_ANONYMOUS"] = "true"
    code = "import runpy; runpy.run_path('gateway/gunicorn.conf.py')"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False,
        cwd=Path(__file__).resolve().parents[2], timeout=60,
        env={**env, "GATEWAY_THREADS": "7", "GATEWAY_MAX_IN_FLIGHT": "6"},
    )
    assert done.returncode != 0
    assert "GATEWAY_THREADS (7) must be at least GATEWAY_MAX_IN_FLIGHT (6) + 2" in done.stderr
    assert subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False,
        cwd=Path(__file__).resolve().parents[2], timeout=60,
        env={**env, "GATEWAY_THREADS": "8", "GATEWAY_MAX_IN_FLIGHT": "6"},
    ).returncode == 0
