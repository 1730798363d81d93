"""The gateway as it runs in production: gunicorn with gateway/gunicorn.conf.py (embedded/stack.py's
GatewayProcess), in a process of its own on a free port, with only the settings a test gives, its
output (the JSON logs) captured in a file."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from typing_extensions import Self

from embedded.process import free_port
from embedded.stack import GatewayProcess, StackError
from embedded.triton import PROJECT_ROOT


class GunicornGateway(GatewayProcess):
    """Ready once /healthz answers: some tests run it while Triton is down."""

    def __init__(self, log_path: Path, **settings: str) -> None:
        """`settings` are GATEWAY_* variables without the prefix, e.g. TRITON_URL="...". Without
        API keys the gateway serves everyone (ALLOW_ANONYMOUS), unless `settings` say otherwise."""
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        if not {"API_KEYS", "API_KEYS_FILE"} & settings.keys():
            env["GATEWAY_ALLOW_ANONYMOUS"] = "true"
        env.update({f"GATEWAY_{k}": v for k, v in settings.items()})
        env.update(GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(self.port))
        env["PYTHONPATH"] = str(PROJECT_ROOT)
        super().__init__(env, log_path)

    @property
    def ready_url(self) -> str:
        return f"{self.url}/healthz"

    def wait_ready(self, timeout: float | None = None) -> Self:
        try:
            return super().wait_ready(timeout)
        except StackError as exc:  # gunicorn's own words say why
            raise RuntimeError(f"{exc}:\n{self.output()}") from None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """Every output line, parsed: the gateway writes nothing but JSON lines."""
        return [json.loads(line) for line in self.output().splitlines() if line.strip()]

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)


def request(
    method: str, url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body or raw text) for one HTTP request; HTTP errors included."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw, got = resp.status, resp.read(), dict(resp.headers.items())
    except urllib.error.HTTPError as err:
        status, raw, got = err.code, err.read(), dict(err.headers.items())
    try:
        return status, got, json.loads(raw)
    except ValueError:
        return status, got, raw.decode(errors="replace")
