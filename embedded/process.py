"""One child process of the local stack: start it, wait until a URL answers 200, stop it.

Triton, the local S3 and gunicorn differ only in their command, environment and readiness URL.
Each runs in a session of its own, so a terminal's Ctrl-C reaches only its owner (which stops
the parts in order) and stop() can reach whatever the process left behind (Triton's stubs).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from typing_extensions import Self

log = logging.getLogger(__name__)


class ProcessStartError(RuntimeError):
    """The process exited, or its readiness URL never answered."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ManagedProcess:
    """Subclasses give `command()`, `ready_url` and a `process` / `log_path` attribute pair."""

    name = "process"
    start_error: type[Exception] = ProcessStartError
    poll_interval_s = 0.2
    ready_timeout_s = 60.0
    stop_timeout_s = 30.0  # how long stop() waits after stop_signal before it kills
    stop_signal = signal.SIGTERM  # the process's graceful stop
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None
    log_path: Path | None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        return None  # the parent's

    @property
    def ready_url(self) -> str:
        raise NotImplementedError

    def start(self) -> Self:
        if self.process is not None:
            raise self.start_error(f"{self.name} already started")
        output = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.command(),
                env=self.environment(),
                cwd=self.cwd,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                start_new_session=True,
            )
        finally:
            if output:
                output.close()
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.ready_url, timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float | None = None) -> Self:
        timeout = self.ready_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise self.start_error(
                    f"{self.name} exited with {self.process.returncode}"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if self.is_ready():
                return self
            time.sleep(self.poll_interval_s)
        raise self.start_error(f"{self.name} not ready at {self.ready_url} after {timeout:.0f}s")

    def stop(self, timeout: float | None = None) -> int | None:
        """`stop_signal` and wait (a graceful stop), then SIGKILL whatever is left in its
        session."""
        proc, self.process = self.process, None
        if proc is None:
            return None
        timeout = self.stop_timeout_s if timeout is None else timeout
        if proc.poll() is None:
            proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return proc.wait()

    def launch(self) -> Self:
        """start() and wait_ready(); one that never gets ready is stopped, not left behind."""
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Self:
        return self.launch()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
