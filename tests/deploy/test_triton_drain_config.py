"""The container drains Triton on stop: the entrypoint runs tritonserver under the drain
supervisor (embedded/drain.py, copied into the image), and compose waits long enough for it.
The drain itself runs against real Tritons in tests/embedded/test_drain.py and
tests/gateway/triton/test_replicas.py."""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest
import yaml

from embedded.drain import http_url, restrictions, supervised_command
from tests.deploy.test_compose import DOCKER, ROOT, compose


@pytest.fixture(scope="module")
def triton_service() -> dict[str, Any]:
    resolved = compose("config")
    assert resolved.returncode == 0, resolved.stderr
    return yaml.safe_load(resolved.stdout)["services"]["triton"]


def _seconds(duration: str) -> float:
    """A compose duration (`160s`, `2m30s`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_the_entrypoint_execs_the_drain_supervisor_the_image_carries() -> None:
    entrypoint = (DOCKER / "triton-entrypoint.sh").read_text()
    [line] = [
        line for line in entrypoint.replace("\\\n", " ").splitlines() if line.startswith("exec ")
    ]
    words = shlex.split(line, posix=False)  # keeps "$here/drain.py" as written
    # drain.py beside the entrypoint ($here: the folder the entrypoint runs from).
    assert words[:3] == ["exec", "python3", '"$here/drain.py"'] and 'here=$(dirname "$0")' in entrypoint
    command = words[words.index("--") + 1 :]
    assert command[0] == "tritonserver"
    dockerfile = (DOCKER / "triton.Dockerfile").read_text()
    [copy] = [line for line in dockerfile.splitlines() if "triton-entrypoint.sh" in line and line.startswith("COPY")]
    assert "embedded/drain.py" in copy.split() and copy.split()[-1] == "/opt/imagegen/"
    assert (ROOT / "embedded" / "drain.py").exists()
    # The drain reaches Triton where the container's Triton listens: its own loopback, bound
    # after the arguments ("$@"), so that none moves it.
    assert command[-2:] == ['"$@"', "--http-address=127.0.0.1"]
    assert http_url(command) == "http://127.0.0.1:8000"
    # Explicit model control with every model loaded, as the drain needs; the key is fresh.
    supervised = supervised_command(command, "k" * 43)
    assert "--model-control-mode=explicit" in supervised and "--load-model=*" in supervised


def test_compose_waits_for_the_drain_and_triton_s_exit(triton_service: dict[str, Any]) -> None:
    env = triton_service["environment"]
    drain, exit_timeout = float(env["TRITON_DRAIN_TIMEOUT_S"]), float(env["TRITON_EXIT_TIMEOUT_S"])
    gateway = compose("config")
    deadline = float(yaml.safe_load(gateway.stdout)["services"]["gateway"]["environment"][
        "GATEWAY_TRITON_DEADLINE_S"
    ])
    # The drain outlasts the longest request a gateway lets Triton hold...
    assert drain > deadline
    # ...and Docker's SIGKILL comes only after the drain and Triton's own exit timeout.
    assert _seconds(triton_service["stop_grace_period"]) > drain + exit_timeout


def test_a_caller_s_own_model_control_is_kept() -> None:
    command = ["tritonserver", "--model-control-mode=explicit", "--load-model=upscaler",
               "--http-address=127.0.0.5", "--http-port", "9000"]
    supervised = supervised_command(command, "key")
    assert "--load-model=*" not in supervised  # Triton refuses * beside a named model
    assert [a for a in supervised if "restricted" in a] == restrictions("key")
    assert "--http-restricted-api=model-repository:imagegen-drain-key=key" in supervised
    assert http_url(command) == "http://127.0.0.5:9000"
