"""A local S3-compatible server: moto in server mode, on loopback.

moto keeps objects in memory and does not check signatures, which makes it stand in for the
spec's storage front: it accepts a PUT to a renamed key under a presigned URL.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from embedded.process import ManagedProcess, ProcessStartError


class S3StartError(ProcessStartError):
    """The server exited or never answered."""


@dataclass
class MotoS3Server(ManagedProcess):
    """One `moto.server` process; usable as a context manager that waits until it answers."""

    name = "moto server"
    start_error = S3StartError

    host: str = "127.0.0.1"
    port: int = 9000
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    @property
    def ready_url(self) -> str:
        return f"{self.url}/moto-api/"


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
