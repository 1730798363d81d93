"""The probes' own listener (gateway/probes.py) under a real gunicorn: /healthz, /readyz and
/metrics are answered from threads of their own while every request thread is held, nothing else
is served there, and the workers share the port."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from embedded.process import free_port
from gateway import Settings
from tests.gateway.faults import FaultServer, held
from tests.gateway.process import GunicornGateway, request
from tests.models.helpers import wait_until

BODY = {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 1, "upscale": False,
        "enable_nsfw_check": False}


def answered_within(url: str, seconds: float) -> int | None:
    """The status, or None when no answer came within `seconds`."""
    try:
        with urllib.request.urlopen(url, timeout=seconds) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def test_probes_are_answered_while_every_request_thread_is_held(
    triton_settings: Settings, fault_server: FaultServer, tmp_path: Path
) -> None:
    probes = free_port()
    fault_server.set_script(held(200))  # each upload waits for the test's release
    gateway = GunicornGateway(
        tmp_path / "gateway.log",
        TRITON_URL=triton_settings.triton_url,
        TRITON_METRICS_URL=triton_settings.triton_metrics_url,
        UPLOAD_ALLOWED_HOSTS=f"http://{fault_server.hostport}",
        UPLOAD_TIMEOUT_S="120",
        THREADS="4", MAX_IN_FLIGHT="2", PROBE_PORT=str(probes),
    )
    body = {**BODY, "s3_prefix": f"{fault_server.url}/b/1.png"}
    with gateway, ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(request, "POST", f"{gateway.url}/generate", body) for _ in range(2)]
        # The two spare threads: taken by connections that send half a request (what the
        # front door keeps from gunicorn; here nothing does).
        halves = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(2)]
        try:
            wait_until(lambda: fault_server.unanswered == 2, "both generations upload")
            for half in halves:
                half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            # Every request thread is held: gunicorn's own port answers nothing...
            assert answered_within(f"{gateway.url}/healthz", 2.0) is None
            # ...and the probe port everything it serves.
            for path in ("/healthz", "/readyz", "/metrics"):
                assert answered_within(f"http://127.0.0.1:{probes}{path}", 1.0) == 200, path
        finally:
            for half in halves:
                half.close()
            fault_server.release()
        assert [f.result(timeout=120)[0] for f in busy] == [200, 200]


def test_the_probe_port_serves_probes_only_and_every_worker_shares_it(
    triton_settings: Settings, tmp_path: Path
) -> None:
    probes = free_port()
    gateway = GunicornGateway(
        tmp_path / "gateway.log",
        TRITON_URL=triton_settings.triton_url,
        TRITON_METRICS_URL=triton_settings.triton_metrics_url,
        WORKERS="2", METRICS_DIR=str(tmp_path / "metrics"), PROBE_PORT=str(probes),
    )
    with gateway:
        base = f"http://127.0.0.1:{probes}"
        wait_until(lambda: len(gateway.worker_pids()) == 2, "both workers are up")
        status, headers, body = request("POST", f"{base}/generate", BODY)
        assert status == 404 and headers["Content-Type"] == "application/json"
        assert body["error"]["code"] == "not_found"
        assert request("GET", f"{base}/openapi.json")[0] == 404
        status, _, ready = request("GET", f"{base}/readyz")
        assert status == 200 and ready["status"] == "ready"
        # Both workers listen: neither failed to bind the shared port.
        assert "Address already in use" not in gateway.output()
        assert json.dumps(request("GET", f"{base}/healthz")[2]) == '{"status": "ok"}'
