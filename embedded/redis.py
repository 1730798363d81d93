"""A local Redis (Debian's `redis-server`) for `make serve` and the tests, and a job worker.

The Redis runs from a config file written into its own directory (nothing on its command line
but that file's path), bound to loopback, with the persistence the containers ship: an
append-only file fsynced every second, so a restart keeps the queue (at most about a second of
acknowledged writes is lost on a crash).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import redis

from embedded.process import ManagedProcess, ProcessStartError, free_port

# The containers' shipped persistence (deploy/): the same here.
PERSISTENCE = (
    "appendonly yes",
    "appendfsync everysec",
    'save ""',
)


class RedisStartError(ProcessStartError):
    """redis-server is missing, exited, or never answered."""


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if found is None:
        raise RedisStartError(
            "redis-server not found: `make serve` and `make test` install Debian's redis-server "
            "as root (sh deploy/install-tools.sh redis-server); without root, install it "
            "yourself (docs/getting-started.md)"
        )
    return found


@dataclass
class RedisServer(ManagedProcess):
    """One redis-server on loopback, its data (and the AOF) in `workdir`."""

    name = "redis-server"
    start_error = RedisStartError
    stop_timeout_s = 10.0

    workdir: Path
    host: str = "127.0.0.1"
    port: int = 6379
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "redis.log"

    @classmethod
    def on_free_port(cls, workdir: Path) -> RedisServer:
        return cls(workdir=workdir, port=free_port())

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        config = self.workdir / "redis.conf"
        config.write_text(
            "\n".join(
                (
                    f"bind {self.host}",
                    f"port {self.port}",
                    f"dir {self.workdir}",
                    "protected-mode yes",
                    "daemonize no",
                    *PERSISTENCE,
                )
            )
            + "\n"
        )
        return [redis_server_binary(), str(config)]

    @property
    def ready_url(self) -> str:
        return self.url

    def is_ready(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def pause(self) -> None:
        """SIGSTOP: Redis hangs, connections stay open (the tests' frozen store)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)


@dataclass
class JobWorker(ManagedProcess):
    """One `python -m gateway.jobs.worker` with these GATEWAY_* settings; ready when its
    metrics port answers."""

    name = "job worker"
    ready_timeout_s = 60.0

    env: dict[str, str]
    metrics_port: int
    log_path: Path | None = None
    stop_timeout_s: float = 60.0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "gateway.jobs.worker"]

    def environment(self) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        return {
            **inherited,
            **self.env,
            "GATEWAY_WORKER_METRICS_PORT": str(self.metrics_port),
            "GATEWAY_HOST": "127.0.0.1",
        }

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def kill(self) -> None:
        """SIGKILL, no goodbye: its jobs stay taken until the broker sees it dead."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
