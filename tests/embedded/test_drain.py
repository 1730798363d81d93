"""The drain supervisor (embedded/drain.py) as a process: exit codes, a child that is not
Triton, a drain that runs out of time, and the model-repository API it opens, which answers
nobody but the supervisor.
Draining a real Triton under load: tests/gateway/triton/test_replicas.py."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from embedded.drain import KEY_HEADER
from embedded.process import free_port
from embedded.triton import TritonServer

DRAIN = Path(__file__).resolve().parents[2] / "embedded" / "drain.py"


def supervise(*command: str, drain_timeout_s: float = 5) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(DRAIN), f"--drain-timeout={drain_timeout_s:g}", "--", *command],
        stderr=subprocess.PIPE, text=True,
    )


def stand_in(ready: Path, http_port: int) -> tuple[str, ...]:
    """A child for the supervisor in Triton's place: it exits 7 on SIGTERM, and creates `ready`
    once its trap is set (the supervisor's own handlers are set before it starts the child).
    The supervisor appends Triton's flags to the command: `sh -c SCRIPT sh FLAGS...` takes them as
    positional parameters and leaves them alone; `--http-port` says where the drain calls."""
    script = f"trap 'kill $!; exit 7' TERM; : > {shlex.quote(str(ready))}; sleep 60 & wait"
    return ("sh", "-c", script, "sh", f"--http-port={http_port}")


def wait_until_exists(path: Path, child: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60  # stops a test that would hang, nothing more
    while not path.exists():
        assert child.poll() is None, f"the child exited with {child.returncode}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_the_child_s_exit_code_is_the_supervisor_s() -> None:
    done = supervise("sh", "-c", "exit 3")
    assert done.wait(timeout=30) == 3


def test_sigterm_reaches_a_child_that_has_no_triton_to_drain(tmp_path: Path) -> None:
    # Nothing listens on its HTTP port (the default, 8000, may be someone's Triton).
    ready = tmp_path / "ready"
    child = supervise(*stand_in(ready, free_port()))
    wait_until_exists(ready, child)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 7
    assert child.stderr is not None
    assert "cannot unload the ensembles" in child.stderr.read()


class StuckTriton:
    """Triton's HTTP API as the drain sees it, with an ensemble that never finishes unloading:
    its requests are still held when the drain timeout runs out."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []  # method, path, the drain key
        stuck = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stuck.calls.append((self.command, self.path, self.headers.get(KEY_HEADER)))
                unloading = any(path.endswith("/unload") for _, path, _ in stuck.calls)
                body: Any = {
                    "/v2/repository/index": [
                        {"name": "txt2img", "state": "UNLOADING" if unloading else "READY"},
                        {"name": "diffusion", "state": "READY"},
                    ],
                    "/v2/models/txt2img/config": {"platform": "ensemble"},
                    "/v2/models/diffusion/config": {"platform": "", "backend": "python"},
                    "/v2/repository/models/txt2img/unload": {},
                }[self.path]
                payload = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_drain_that_runs_out_of_time_stops_triton_anyway(tmp_path: Path) -> None:
    triton = StuckTriton()
    try:
        ready = tmp_path / "ready"
        child = supervise(*stand_in(ready, triton.port), drain_timeout_s=2)
        wait_until_exists(ready, child)
        signalled = time.monotonic()
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 7  # Triton got its SIGTERM...
        assert time.monotonic() - signalled >= 2  # ...once the drain timeout had run out
    finally:
        triton.stop()
    assert child.stderr is not None
    assert "stopping with requests still held after" in child.stderr.read()
    # The ensemble alone was unloaded, and the index read again until the time ran out.
    unloads = [path for method, path, _ in triton.calls if path.endswith("/unload")]
    assert unloads == ["/v2/repository/models/txt2img/unload"]
    after = triton.calls[[path for _, path, _ in triton.calls].index(unloads[0]) + 1:]
    assert len(after) >= 2 and {path for _, path, _ in after} == {"/v2/repository/index"}
    [key] = {key for _, _, key in triton.calls}  # every call carried the drain's one key
    assert key


def _call(url: str, method: str = "POST", headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=b"{}" if method == "POST" else None, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _state(triton: TritonServer, model: str) -> Any:
    with urllib.request.urlopen(f"{triton.http_url}/v2/models/{model}/ready", timeout=10) as resp:
        return resp.status


@pytest.mark.parametrize("headers", [{}, {KEY_HEADER: "not-the-key"}])
def test_nobody_else_can_use_the_model_repository_api(
    triton: TritonServer, headers: dict[str, str]
) -> None:
    base = f"{triton.http_url}/v2/repository"
    # Triton 2.51 answers a restricted API without the right header 403.
    assert _call(f"{base}/index", headers=headers) == 403
    assert _call(f"{base}/models/txt2img/unload", headers=headers) == 403
    assert _call(f"{base}/models/evil/load", headers=headers) == 403
    assert _state(triton, "txt2img") == 200  # still served
    # What the gateway uses stays open.
    assert _call(f"{triton.http_url}/v2/models/txt2img/config", "GET") == 200
    with urllib.request.urlopen(f"{triton.http_url}/v2/models/txt2img/config", timeout=10) as resp:
        assert json.loads(resp.read())["platform"] == "ensemble"
