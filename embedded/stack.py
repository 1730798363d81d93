"""The whole service on loopback: embedded Triton, a local S3 (moto) and the gateway (gunicorn).

`python -m embedded.stack` (what `make serve` runs) starts the three, waits until each is ready,
prints where they are, and stops them together on Ctrl-C or SIGTERM, or when one of them dies.
`GATEWAY_*` variables from the environment reach the gateway; without
`GATEWAY_UPLOAD_ALLOWED_HOSTS` it may upload to the local S3 only.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from embedded.process import ManagedProcess, ProcessStartError
from embedded.s3 import MotoS3Server
from embedded.triton import DEFAULT_REPOSITORY, PROJECT_ROOT, TritonServer

log = logging.getLogger("embedded.stack")

RUN_DIR = PROJECT_ROOT / ".run"
GUNICORN_CONF = PROJECT_ROOT / "gateway" / "gunicorn.conf.py"


class Shutdown(Exception):
    """A stop signal arrived."""


class StackError(ProcessStartError):
    """A part did not start, or died."""


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def gateway_environment(
    base: dict[str, str], *, host: str, grpc_port: int, metrics_port: int, s3_port: int
) -> dict[str, str]:
    """The gateway's environment: the caller's `GATEWAY_*` win over the stack's defaults."""
    env = dict(base)
    env.setdefault("GATEWAY_TRITON_URL", f"{host}:{grpc_port}")
    env.setdefault("GATEWAY_TRITON_METRICS_URL", f"http://{host}:{metrics_port}/metrics")
    env.setdefault(
        "GATEWAY_UPLOAD_ALLOWED_HOSTS", f"http://127.0.0.1:{s3_port},http://localhost:{s3_port}"
    )
    env.setdefault("GATEWAY_HOST", host)
    env.setdefault("GATEWAY_PORT", "8080")
    # Keep the project importable however the stack was launched.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    return env


class GatewayProcess(ManagedProcess):
    """gunicorn serving the gateway; ready when its /readyz says so (Triton and models up)."""

    name = "the gateway (gunicorn)"
    start_error = StackError
    cwd = PROJECT_ROOT

    def __init__(self, env: dict[str, str], log_path: Path | None = None) -> None:
        self.env = env
        self.log_path = log_path
        self.url = f"http://{env['GATEWAY_HOST']}:{env['GATEWAY_PORT']}"
        self.process = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "gunicorn",
            "--config", str(GUNICORN_CONF),
            "gateway:create_app()",
        ]

    def environment(self) -> dict[str, str]:
        return self.env

    @property
    def ready_url(self) -> str:
        return f"{self.url}/readyz"


def _raise_shutdown(signum: int, _frame: FrameType | None) -> None:
    raise Shutdown(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--triton-http-port", type=int, default=_env_int("TRITON_HTTP_PORT", 8000))
    parser.add_argument("--triton-grpc-port", type=int, default=_env_int("TRITON_GRPC_PORT", 8001))
    parser.add_argument(
        "--triton-metrics-port", type=int, default=_env_int("TRITON_METRICS_PORT", 8002)
    )
    parser.add_argument("--s3-port", type=int, default=_env_int("S3_PORT", 9000))
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="logs and Triton's workdir")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    env = gateway_environment(
        dict(os.environ),
        host=args.host,
        grpc_port=args.triton_grpc_port,
        metrics_port=args.triton_metrics_port,
        s3_port=args.s3_port,
    )
    # Check the gateway's settings before spending a minute on Triton.
    from gateway.settings import Settings, SettingsError

    try:
        Settings.from_env(env)
    except SettingsError as exc:
        print(f"embedded.stack: {exc}", file=sys.stderr)
        return 2

    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    triton = TritonServer(
        repository=args.model_repository,
        host=args.host,
        http_port=args.triton_http_port,
        grpc_port=args.triton_grpc_port,
        metrics_port=args.triton_metrics_port,
        workdir=run_dir / "triton",
        log_path=run_dir / "triton.log",
    )
    s3 = MotoS3Server(host=args.host, port=args.s3_port, log_path=run_dir / "s3.log")
    gateway = GatewayProcess(env)

    signal.signal(signal.SIGTERM, _raise_shutdown)
    signal.signal(signal.SIGINT, _raise_shutdown)
    code = 0
    try:
        log.info("starting Triton (log: %s) and S3 (log: %s)", triton.log_path, s3.log_path)
        (run_dir / "triton").mkdir(parents=True, exist_ok=True)
        triton.start()
        s3.start()
        s3.wait_ready(timeout=60)
        log.info("S3 ready at %s", s3.url)
        triton.wait_ready(timeout=args.ready_timeout)
        log.info("Triton ready at %s (gRPC %s)", triton.http_url, triton.grpc_url)
        gateway.start()
        gateway.wait_ready(timeout=120)
        print(
            "\n".join(
                [
                    "",
                    f"gateway   {gateway.url}  (POST /generate, /readyz, /metrics, /openapi.json)",
                    f"triton    {triton.http_url}  gRPC {triton.grpc_url}  metrics {triton.metrics_url}",
                    f"s3 (moto) {s3.url}  (any bucket; credentials: anything)",
                    f"uploads allowed to: {env['GATEWAY_UPLOAD_ALLOWED_HOSTS']}",
                    f"logs      {run_dir}",
                    "ready: try `make demo`; Ctrl-C stops everything",
                    "",
                ]
            ),
            flush=True,
        )
        while True:
            for name, proc in (
                ("triton", triton.process),
                ("s3", s3.process),
                ("gateway", gateway.process),
            ):
                if proc is None or proc.poll() is not None:
                    raise StackError(f"{name} exited unexpectedly")
            time.sleep(0.5)
    except Shutdown as stop:
        log.info("%s: stopping", stop)
    except Exception as exc:  # noqa: BLE001 - any failure ends in the same orderly stop
        log.error("%s", exc)
        code = 1
    finally:
        # A second Ctrl-C must not interrupt the stop half-way and leave orphans.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        gateway.stop()
        triton.stop()
        s3.stop()
        log.info("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
