"""`make serve` then `make demo`: the real `python -m embedded.stack` (Triton, moto, gunicorn and
its front door, nginx) on free ports, the real `python -m embedded.demo` against the front door,
then SIGTERM stops everything."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from embedded.process import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_then_demo_then_sigterm(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("http", "grpc", "metrics", "s3", "gateway", "probes")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FRONT_"))}
    env.update(
        # The clients' port is the front door's; gunicorn takes a free one behind it.
        FRONT_PORT=str(ports["gateway"]),
        FRONT_PROBE_PORT=str(ports["probes"]),
        GATEWAY_MAX_STEPS="20",  # a GATEWAY_* variable from the environment is honoured
        PYTHONPATH=str(PROJECT_ROOT),
    )
    log = (tmp_path / "stack.out").open("wb")
    stack = subprocess.Popen(
        [
            sys.executable, "-m", "embedded.stack",
            "--triton-http-port", str(ports["http"]),
            "--triton-grpc-port", str(ports["grpc"]),
            "--triton-metrics-port", str(ports["metrics"]),
            "--s3-port", str(ports["s3"]),
            "--run-dir", str(tmp_path / "run"),
        ],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    gateway = f"http://127.0.0.1:{ports['gateway']}"
    probes = f"http://127.0.0.1:{ports['probes']}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and stack.poll() is None:
            if b"ready: try `make demo`" in (tmp_path / "stack.out").read_bytes():
                break
            time.sleep(0.5)
        output = (tmp_path / "stack.out").read_text(errors="replace")
        assert stack.poll() is None and "ready: try `make demo`" in output, output[-3000:]
        # No key given: the stack itself opted into anonymous access, on loopback, and says so.
        assert "access    ANYONE on this machine, no API key: GATEWAY_ALLOW_ANONYMOUS=true" in output
        assert _get(f"{probes}/readyz")[0] == 200
        # Probes and scrapes have their own port; the clients' one does not serve them.
        with urllib.request.urlopen(f"{probes}/metrics", timeout=5) as scrape:
            assert b"gateway_http_requests_total" in scrape.read()
        assert _get(f"{gateway}/metrics")[0] == 404

        demo = subprocess.run(
            [
                sys.executable, "-m", "embedded.demo",
                "--gateway", gateway,
                "--s3", f"http://127.0.0.1:{ports['s3']}",
                "--width", "128", "--height", "64", "--steps", "2",
            ],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            check=False,
            text=True,
            timeout=300,
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "OK: downloaded" in demo.stdout and '"s3_upload_status": 200' in demo.stdout

        # The default allowlist is the local S3 only: Triton's own HTTP port is refused.
        status, body = _post(
            f"{gateway}/generate",
            {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 2,
             "s3_prefix": f"http://127.0.0.1:{ports['http']}/v2/1.png"},
        )
        assert status == 400 and body["error"]["field"] == "s3_prefix"
        status, body = _post(
            f"{gateway}/generate", {"prompt": "p", "num_inference_steps": 21, "response_format": "b64_json"}
        )
        assert status == 400 and body["error"]["field"] == "num_inference_steps"

        stack.send_signal(signal.SIGTERM)
        assert stack.wait(timeout=90) == 0
        for name, port in ports.items():
            assert not _listening(port), f"{name} still listening on {port}"
    finally:
        if stack.poll() is None:  # a failed assertion: still stop the parts in order
            stack.send_signal(signal.SIGTERM)
            try:
                stack.wait(timeout=90)
            except subprocess.TimeoutExpired:
                stack.kill()
                stack.wait()
        log.close()


def test_only_a_stack_on_loopback_opts_into_anonymous_access(tmp_path: Path) -> None:
    from embedded.stack import LocalStack

    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    loopback = LocalStack(tmp_path / "a", host="127.0.0.1", environ=clean)
    assert loopback.gateway.env["GATEWAY_ALLOW_ANONYMOUS"] == "true"
    assert "ANYONE" in loopback.access()
    # Anywhere else the gateway refuses to start keyless, unless told.
    exposed = LocalStack(tmp_path / "b", host="0.0.0.0", environ=clean)
    assert "GATEWAY_ALLOW_ANONYMOUS" not in exposed.gateway.env
    keyed = LocalStack(tmp_path / "c", host="127.0.0.1",
                       environ={**clean, "GATEWAY_API_KEYS": "k" * 32})
    assert "GATEWAY_ALLOW_ANONYMOUS" not in keyed.gateway.env
    assert "with an API key" in keyed.access()
