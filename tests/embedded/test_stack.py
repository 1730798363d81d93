"""`make serve` then `make demo`: the real `python -m embedded.stack` (Triton, moto, gunicorn and
its front door, nginx) on free ports, the real `python -m embedded.demo` against the front door,
the stack's Triton (a single one: no drain, so no drain key and no model-repository API), then
SIGTERM, which lets a generation in flight finish and stops everything.

The tests that share the stack run in the order written; the SIGTERM one stops it."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from embedded.drain import KEY_HEADER, restrictions
from embedded.process import free_port
from embedded.triton import TritonServer
from tests.embedded.triton_api import (
    REFUSED_GRPC,
    REFUSED_HTTP,
    REGISTER_BODY,
    REGISTER_PATH,
    grpc_refusal,
    http_status,
    register_over_grpc,
)
from tests.models.helpers import HOLD_ENV, diffusion_held, diffusion_pending, wait_until

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


def descendants(pid: int) -> list[int]:
    """Every process under `pid`, from /proc's parent links."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    env: dict[str, str]
    output: Path

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def probes(self) -> str:
        return f"http://127.0.0.1:{self.ports['probes']}"

    @property
    def triton(self) -> TritonServer:
        """The stack's Triton, for the helpers that read its ports (not started here)."""
        return TritonServer(http_port=self.ports["http"], grpc_port=self.ports["grpc"],
                            metrics_port=self.ports["metrics"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def served(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp_path = tmp_path_factory.mktemp("stack")
    names = ("http", "grpc", "metrics", "s3", "gateway", "probes", "redis", "worker_metrics")
    ports = {name: free_port() for name in names}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FRONT_"))}
    env.update(
        # The clients' port is the front door's; gunicorn takes a free one behind it.
        FRONT_PORT=str(ports["gateway"]),
        FRONT_PROBE_PORT=str(ports["probes"]),
        GATEWAY_MAX_STEPS="20",  # a GATEWAY_* variable from the environment is honoured
        PYTHONPATH=str(PROJECT_ROOT),
    )
    # The diffusion model's test hook (tests/models/helpers.py), which reaches Triton through
    # the stack's environment: the stop test holds the model with it.
    env[HOLD_ENV] = "1"
    output = tmp_path / "stack.out"
    with output.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "embedded.stack",
                "--triton-http-port", str(ports["http"]),
                "--triton-grpc-port", str(ports["grpc"]),
                "--triton-metrics-port", str(ports["metrics"]),
                "--s3-port", str(ports["s3"]),
                "--redis-port", str(ports["redis"]),
                "--worker-metrics-port", str(ports["worker_metrics"]),
                "--run-dir", str(tmp_path / "run"),
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    stack = Served(process, ports, env, output)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if b"ready: try `make demo`" in output.read_bytes():
                break
            time.sleep(0.5)
        text = output.read_text(errors="replace")
        assert process.poll() is None and "ready: try `make demo`" in text, text[-3000:]
        yield stack
    finally:
        stack.stop()  # a failed assertion: still stop the parts in order


def test_serve_then_demo(served: Served) -> None:
    output = served.output.read_text(errors="replace")
    # No key given: the stack itself opted into anonymous access, on loopback, and says so.
    assert "access    ANYONE on this machine, no API key: GATEWAY_ALLOW_ANONYMOUS=true" in output
    assert _get(f"{served.probes}/readyz")[0] == 200
    # Probes and scrapes have their own port; the clients' one does not serve them.
    with urllib.request.urlopen(f"{served.probes}/metrics", timeout=5) as scrape:
        assert b"gateway_http_requests_total" in scrape.read()
    assert _get(f"{served.gateway}/metrics")[0] == 404

    demo = subprocess.run(
        [
            sys.executable, "-m", "embedded.demo",
            "--gateway", served.gateway,
            "--s3", f"http://127.0.0.1:{served.ports['s3']}",
            "--width", "128", "--height", "64", "--steps", "2",
        ],
        cwd=PROJECT_ROOT,
        env=served.env,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "OK: downloaded" in demo.stdout and '"s3_upload_status": 200' in demo.stdout
    # The same request as a job, run by the stack's worker, its object checked the same way.
    assert demo.stdout.count("OK: downloaded") == 2 and '"status": "succeeded"' in demo.stdout
    assert f"redis     redis://127.0.0.1:{served.ports['redis']}/0" in output

    # The default allowlist is the local S3 only: Triton's own HTTP port is refused.
    status, body = _post(
        f"{served.gateway}/generate",
        {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 2,
         "s3_prefix": f"http://127.0.0.1:{served.ports['http']}/v2/1.png"},
    )
    assert status == 400 and body["error"]["field"] == "s3_prefix"
    status, body = _post(
        f"{served.gateway}/generate",
        {"prompt": "p", "num_inference_steps": 21, "response_format": "b64_json"},
    )
    assert status == 400 and body["error"]["field"] == "num_inference_steps"


def test_no_process_of_the_stack_holds_a_drain_key(served: Served) -> None:
    seen: dict[int, list[bytes]] = {}
    environs: dict[int, bytes] = {}
    for pid in descendants(served.process.pid):
        try:
            seen[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environs[pid] = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone meanwhile (a short-lived helper)
            seen.pop(pid, None)
    key = KEY_HEADER.encode()
    assert [args for pid, args in seen.items() if key in b"\0".join(args) + environs[pid]] == []
    assert [args for args in seen.values() if any(a.endswith(b"drain.py") for a in args)] == []
    # The walk reached Triton, which runs alone (no supervisor), and its backend stubs.
    [triton] = [pid for pid, args in seen.items() if args[0].endswith(b"/tritonserver")]
    assert b"--model-control-mode=none" in seen[triton]
    assert {a.encode() for a in restrictions(None)} <= set(seen[triton])
    assert "triton_python_b" in [_comm(pid) for pid in descendants(triton)]  # cut to 15


def test_the_stack_s_triton_has_no_model_repository_api(served: Served) -> None:
    triton = served.triton
    repository = f"{triton.http_url}/v2/repository"
    # A load that would run code: a `file:` override holding a model.py.
    code = b"import os\nos.system('id')\n"
    load = json.dumps({"parameters": {
        "config": '{"backend": "python"}', "file:1/model.py": base64.b64encode(code).decode(),
    }}).encode()
    http = {
        "index": http_status(f"{repository}/index"),
        "index, with a guessed drain key": http_status(f"{repository}/index",
                                                       headers={KEY_HEADER: "guess"}),
        "load": http_status(f"{repository}/models/upscaler/load", body=load),
        "unload": http_status(f"{repository}/models/txt2img/unload"),
        "register system shared memory": http_status(triton.http_url + REGISTER_PATH,
                                                     body=REGISTER_BODY),
    }
    assert http == dict.fromkeys(http, REFUSED_HTTP)
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        grpc = {
            "index": grpc_refusal(client.get_model_repository_index),
            "load": grpc_refusal(lambda: client.load_model(
                "upscaler", config='{"backend": "python"}', files={"file:1/model.py": code})),
            "unload": grpc_refusal(lambda: client.unload_model("txt2img")),
            "register system shared memory": register_over_grpc(triton.grpc_url),
        }
        assert grpc == dict.fromkeys(grpc, REFUSED_GRPC)
        # Nothing was unloaded, and what the gateway uses answers.
        assert client.is_server_ready() and client.is_model_ready("txt2img")
        assert client.get_model_config("txt2img").config.platform == "ensemble"


def test_sigterm_lets_a_generation_in_flight_finish_then_stops_everything(served: Served) -> None:
    # The gateway, the only client of the stack's Triton, stops before it: a generation the
    # front door has taken finishes, with no drain. The generation waits in the diffusion
    # queue behind a held one until the stop has begun, however fast the machine.
    triton = served.triton
    with ThreadPoolExecutor(1) as pool:
        with diffusion_held(triton):
            queued = diffusion_pending(triton)
            generation = pool.submit(_post, f"{served.gateway}/generate", {
                "prompt": "p", "width": 64, "height": 64, "num_inference_steps": 2,
                "response_format": "b64_json",
            })
            wait_until(lambda: diffusion_pending(triton) > queued, "the generation is queued")
            served.process.send_signal(signal.SIGTERM)
            # nginx's graceful stop closes its listeners first: the stop has begun.
            wait_until(lambda: not _listening(served.ports["gateway"]), "the front door stops")
            assert not generation.done()
        status, body = generation.result(timeout=120)
    assert status == 200, body
    assert base64.b64decode(body["data"]["b64_json"])[:2] == b"\xff\xd8"  # a JPEG
    assert served.process.wait(timeout=90) == 0
    for name, port in served.ports.items():
        assert not _listening(port), f"{name} still listening on {port}"


def test_the_stack_builds_its_triton_without_the_drain(tmp_path: Path) -> None:
    from embedded.stack import LocalStack

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FRONT_"))}
    command = LocalStack(tmp_path, environ=clean).triton.command()
    assert Path(command[0]).name == "tritonserver"  # no supervisor in front
    assert not any(KEY_HEADER in arg or arg.endswith("drain.py") for arg in command)
    assert command[-len(restrictions(None)):] == restrictions(None)


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
