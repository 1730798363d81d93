"""gunicorn.conf.py under a real gunicorn: SIGTERM lets a request in flight finish its upload,
within the shutdown timeout and no longer."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway import Settings
from tests.gateway.faults import FaultServer, Respond
from tests.gateway.process import GunicornGateway, request

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


def wait_for(condition, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def accepts_connections(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_lets_a_request_in_flight_finish_its_upload(
    triton_settings: Settings, fault_server: FaultServer, tmp_path: Path
) -> None:
    fault_server.set_script(Respond(200, delay_s=4.0))  # the upload is still going when SIGTERM comes
    server = gateway(tmp_path, triton_settings, UPLOAD_TIMEOUT_S="10", TRITON_DEADLINE_S="30")
    with server, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            request, "POST", f"{server.url}/generate", {**BODY, "s3_prefix": f"{fault_server.url}/b/1.png"}
        )
        wait_for(lambda: len(fault_server.requests) == 1)
        assert server.process is not None
        stopping = time.monotonic()
        server.terminate()
        wait_for(lambda: not accepts_connections(server.port), timeout=5)  # no new work
        status, _, answer = pending.result(timeout=60)
        assert status == 200, answer
        assert server.process.wait(timeout=30) == 0
        assert time.monotonic() - stopping >= 3.0  # it did wait for the upload
    [upload] = fault_server.requests
    assert hashlib.md5(upload.body).hexdigest() == answer["data"]["image_hash"]


def test_a_request_past_the_shutdown_timeout_is_cut_off(
    triton_settings: Settings, fault_server: FaultServer, tmp_path: Path
) -> None:
    fault_server.set_script(Respond(200, delay_s=20.0))
    server = gateway(tmp_path, triton_settings, UPLOAD_TIMEOUT_S="30", SHUTDOWN_TIMEOUT_S="1")
    with server, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            request, "POST", f"{server.url}/generate", {**BODY, "s3_prefix": f"{fault_server.url}/b/1.png"}
        )
        wait_for(lambda: len(fault_server.requests) == 1)
        assert server.process is not None
        stopping = time.monotonic()
        server.terminate()
        assert server.process.wait(timeout=15) == 0
        assert time.monotonic() - stopping < 10  # bounded by the timeout, not by the upload
        with pytest.raises(OSError):  # the connection was dropped
            pending.result(timeout=30)


def test_the_master_loads_no_grpc_and_no_metrics_client_before_forking() -> None:
    # gRPC is not fork-safe once used, and prometheus_client fixes its multi-process mode at
    # import: gunicorn.conf.py, run by the master, must import neither.
    code = (
        "import runpy, sys; runpy.run_path('gateway/gunicorn.conf.py'); "
        "print(sorted(m for m in ('grpc', 'prometheus_client', 'tritonclient.grpc') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[2], timeout=60,
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
