"""A local S3-compatible server: moto in server mode, on loopback.

moto keeps objects in memory and does not check signatures, which makes it stand in for the
spec's storage front: it accepts a PUT to a renamed key under a presigned URL.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


class S3StartError(RuntimeError):
    """The server exited or never answered."""


@dataclass
class MotoS3Server:
    """One `moto.server` process; usable as a context manager that waits until it answers."""

    host: str = "127.0.0.1"
    port: int = 9000
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    def start(self) -> MotoS3Server:
        if self.process is not None:
            raise S3StartError("already started")
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.command(),
                stdout=output,
                stderr=subprocess.STDOUT,
                # Its own session: a terminal's Ctrl-C reaches the owner, which stops us in order.
                start_new_session=True,
            )
        finally:
            if self.log_path:
                output.close()  # type: ignore[union-attr]
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 60.0) -> MotoS3Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise S3StartError(
                    f"moto server exited with {self.process.returncode}"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if self.is_ready():
                return self
            time.sleep(0.2)
        raise S3StartError(f"moto server not answering on {self.url} after {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> int | None:
        proc, self.process = self.process, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("moto server did not stop in %.0fs; killing it", timeout)
                proc.kill()
        return proc.wait()

    def __enter__(self) -> MotoS3Server:  # noqa: PYI034 - same shape as TritonServer
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    with MotoS3Server(host=args.host, port=args.port) as server:
        print(f"S3 (moto) on {server.url}; Ctrl-C stops it", flush=True)
        try:
            assert server.process is not None
            return server.process.wait()
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
