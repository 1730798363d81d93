"""The drain supervisor (embedded/drain.py) as a process: exit codes, a child that is not
Triton, and the model-repository API it opens, which answers nobody but the supervisor.
Draining a real Triton under load: tests/gateway/triton/test_replicas.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from embedded.drain import KEY_HEADER
from embedded.process import free_port
from embedded.triton import TritonServer

DRAIN = Path(__file__).resolve().parents[2] / "embedded" / "drain.py"


def supervise(*command: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(DRAIN), "--drain-timeout=5", "--", *command],
        stderr=subprocess.PIPE, text=True,
    )


def test_the_child_s_exit_code_is_the_supervisor_s() -> None:
    done = supervise("sh", "-c", "exit 3")
    assert done.wait(timeout=30) == 3


def test_sigterm_reaches_a_child_that_has_no_triton_to_drain() -> None:
    # The supervisor appends Triton's flags to the command: `sh -c SCRIPT sh FLAGS...` takes
    # them as positional parameters and leaves them alone. Its HTTP port is one where nothing
    # listens (the default, 8000, may be someone's Triton).
    child = supervise(
        "sh", "-c", "trap 'kill $!; exit 7' TERM; sleep 60 & wait", "sh", f"--http-port={free_port()}"
    )
    time.sleep(1.0)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 7
    assert child.stderr is not None
    assert "cannot unload the ensembles" in child.stderr.read()


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
