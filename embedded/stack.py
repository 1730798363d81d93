"""The whole service on loopback: embedded Triton, a local S3 (moto), Redis, the gateway
(gunicorn) with its front door (nginx), and a job worker.

`LocalStack` starts them, each once the one before can serve it, and stops them together;
`make serve`, the service benchmark and the load run (harness/load.py) all run it. Clients reach
the gateway through the front door (embedded/front_door.py), as in compose and Kubernetes:
`stack.url` for clients, `stack.probe_url` for /healthz, /readyz and /metrics; gunicorn listens
on loopback behind it (`stack.gateway.url`).
`python -m embedded.stack` (what `make serve` runs) starts one on the usual ports, prints where
the parts are, and stops them on Ctrl-C or SIGTERM, or when one of them dies. `GATEWAY_*`
variables from the environment reach the gateway, `FRONT_*` ones the front door; without
`GATEWAY_UPLOAD_ALLOWED_HOSTS` the gateway may upload to the local S3 only.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Protocol

from typing_extensions import Self

from embedded.front_door import FrontDoor, FrontDoorSettings
from embedded.process import ManagedProcess, ProcessStartError, free_port
from embedded.redis import JobWorker, RedisServer
from embedded.s3 import BUCKET, LocalS3, MotoS3Server
from embedded.triton import DEFAULT_REPOSITORY, PROJECT_ROOT, TritonServer

log = logging.getLogger("embedded.stack")

RUN_DIR = PROJECT_ROOT / ".run"
GUNICORN_CONF = PROJECT_ROOT / "gateway" / "gunicorn.conf.py"
S3_READY_TIMEOUT_S = 60.0
GATEWAY_READY_TIMEOUT_S = 120.0
FRONT_DOOR_READY_TIMEOUT_S = 30.0
REDIS_READY_TIMEOUT_S = 30.0


class Shutdown(Exception):
    """A stop signal arrived."""


class StackError(ProcessStartError):
    """A part did not start, or died."""


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


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

    def worker_pids(self) -> list[int]:
        """gunicorn's workers: the master's children."""
        if self.process is None:
            raise StackError(f"{self.name} is not running")
        pid = self.process.pid
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def rss_bytes(self) -> int:
        """Resident memory of the (single) worker."""
        [pid] = self.worker_pids()
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise StackError(f"no VmRSS in /proc/{pid}/status")


@dataclass(frozen=True)
class Ports:
    triton_http: int
    triton_grpc: int
    triton_metrics: int
    s3: int
    gateway: int  # gunicorn, behind the front door
    gateway_probes: int  # gunicorn's probe listener (GATEWAY_PROBE_PORT), behind it too
    front: int  # the front door's, for clients
    probes: int  # the front door's, for probes and scrapes
    redis: int  # the jobs' store and queue
    worker_metrics: int  # the job worker's /metrics

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> Ports:
        return cls(*(free_port(host) for _ in fields(cls)))


class Front(Protocol):
    """A server the gateway uploads through on its way to the local S3 (the load run's flaky
    storage): listening once built, serving once started."""

    @property
    def hostport(self) -> str: ...

    def start(self) -> Any: ...

    def stop(self) -> None: ...


class LocalStack:
    """Triton, the local S3, the gateway under gunicorn and its front door on loopback: started
    in that order, each waited for, and stopped together (front door first); a context manager.

    Logs and Triton's workdir go under `run_dir`. `ports` None takes free ones. A given `triton`
    is one the caller runs (the load run's replicas): the gateway calls it, the stack neither
    starts nor stops it. `front(s3_url)` builds a server before the local S3 that the gateway
    may upload through instead. The gateway's environment is `environ` (default: this
    process's) with the stack's defaults for what it does not set, then `gateway_settings`
    (`GATEWAY_*` names without the prefix) over both; the front door's likewise, with
    `front_door_settings` (`FRONT_*` names without the prefix).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        host: str = "127.0.0.1",
        ports: Ports | None = None,
        repository: Path = DEFAULT_REPOSITORY,
        triton_env: Mapping[str, str] | None = None,
        triton_ready_timeout_s: float = TritonServer.ready_timeout_s,
        triton: TritonServer | None = None,
        front: Callable[[str], Front] | None = None,
        environ: Mapping[str, str] | None = None,
        gateway_settings: Mapping[str, str] | None = None,
        gateway_log: bool = True,
        front_door_settings: Mapping[str, str] | None = None,
        workers: int = 1,
    ) -> None:
        self.run_dir = run_dir
        self.ports = ports or Ports.free(host)
        self.owns_triton = triton is None
        self.triton = triton or TritonServer(
            repository=repository,
            host=host,
            http_port=self.ports.triton_http,
            grpc_port=self.ports.triton_grpc,
            metrics_port=self.ports.triton_metrics,
            workdir=run_dir / "triton",
            log_path=run_dir / "triton.log",
            env=dict(triton_env or {}),
            # The only replica, and the gateway stops before it: no drain, so no drain key.
            drain=False,
        )
        self.triton_ready_timeout_s = triton_ready_timeout_s
        self.s3 = MotoS3Server(host=host, port=self.ports.s3, log_path=run_dir / "s3.log")
        self.redis = RedisServer(workdir=run_dir / "redis", host="127.0.0.1", port=self.ports.redis)
        self.front = front(self.s3.url) if front else None
        self._front_serving = False
        env = dict(os.environ if environ is None else environ)
        env.setdefault("GATEWAY_TRITON_URL", self.triton.grpc_url)
        env.setdefault("GATEWAY_TRITON_METRICS_URL", self.triton.metrics_url)
        env.setdefault(
            "GATEWAY_UPLOAD_ALLOWED_HOSTS",
            f"http://{self.front.hostport}"
            if self.front
            else f"http://127.0.0.1:{self.s3.port}",
        )
        env.setdefault("GATEWAY_HOST", host)
        env.setdefault("GATEWAY_PORT", str(self.ports.gateway))
        env.setdefault("GATEWAY_PROBE_PORT", str(self.ports.gateway_probes))
        env.setdefault("GATEWAY_REDIS_URL", self.redis.url)
        env.update({f"GATEWAY_{name}": value for name, value in (gateway_settings or {}).items()})
        # A keyless gateway refuses to start unless told that anonymous access is meant. A stack
        # on loopback says so itself (main() prints it); one on any other address does not.
        if not {"GATEWAY_API_KEYS", "GATEWAY_API_KEYS_FILE"} & env.keys() and _is_loopback(host):
            env.setdefault("GATEWAY_ALLOW_ANONYMOUS", "true")
        # Keep the project importable however the stack was launched.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p
        )
        self.gateway = GatewayProcess(env, run_dir / "gateway.log" if gateway_log else None)
        # The first worker serves its metrics on the stack's port, any others on free ones.
        self.workers = [
            JobWorker(
                env,
                self.ports.worker_metrics if index == 0 else free_port(),
                run_dir / f"worker-{index}.log" if gateway_log else None,
            )
            for index in range(workers)
        ]
        self.front_door = FrontDoor(
            self._front_door_settings(env, host, front_door_settings or {}),
            run_dir / "front-door",
            run_dir / "front-door.log" if gateway_log else None,
        )

    def _front_door_settings(
        self, env: Mapping[str, str], host: str, overrides: Mapping[str, str]
    ) -> FrontDoorSettings:
        """Raises the gateway's SettingsError or the front door's error, naming the variable."""
        from gateway.settings import Settings

        front = {k: v for k, v in env.items() if k.startswith("FRONT_")}
        gateway_host = env["GATEWAY_HOST"]
        if ":" in gateway_host:
            gateway_host = f"[{gateway_host}]"
        front.setdefault("FRONT_HOST", host)
        front.setdefault("FRONT_PORT", str(self.ports.front))
        front.setdefault("FRONT_PROBE_PORT", str(self.ports.probes))
        front.setdefault("FRONT_UPSTREAM", f"{gateway_host}:{env['GATEWAY_PORT']}")
        front.setdefault("FRONT_PROBE_UPSTREAM", f"{gateway_host}:{env['GATEWAY_PROBE_PORT']}")
        front.update({f"FRONT_{name}": value for name, value in overrides.items()})
        return FrontDoorSettings.from_env(front, Settings.from_env(env))

    @property
    def url(self) -> str:
        """Where clients call the gateway: the front door's port."""
        return self.front_door.url

    @property
    def probe_url(self) -> str:
        """/healthz, /readyz and /metrics: the front door's probe port."""
        return self.front_door.probe_url

    def access(self) -> str:
        """Who may call the gateway, as `make serve` prints it."""
        env = self.gateway.env
        if env.get("GATEWAY_API_KEYS") or env.get("GATEWAY_API_KEYS_FILE"):
            return "access    with an API key (GATEWAY_API_KEYS / GATEWAY_API_KEYS_FILE)"
        return ("access    ANYONE on this machine, no API key: GATEWAY_ALLOW_ANONYMOUS="
                f"{env.get('GATEWAY_ALLOW_ANONYMOUS', '')} (set GATEWAY_API_KEYS to require one)")

    @property
    def upload_allowed_hosts(self) -> str:
        return self.gateway.env["GATEWAY_UPLOAD_ALLOWED_HOSTS"]

    def check_settings(self) -> None:
        """Raises the gateway's SettingsError: worth knowing before a minute spent on Triton."""
        from gateway.settings import Settings

        Settings.from_env(self.gateway.env)

    def start(self) -> Self:
        """Start and wait for every part; on failure what started is left to stop()."""
        self.check_settings()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.owns_triton:
            log.info(
                "starting Triton (log: %s) and S3 (log: %s)", self.triton.log_path, self.s3.log_path
            )
            Path(self.triton.workdir).mkdir(parents=True, exist_ok=True)
            self.triton.start()
        self.s3.start()
        self.redis.start()
        self.s3.wait_ready(timeout=S3_READY_TIMEOUT_S)
        log.info("S3 ready at %s", self.s3.url)
        self.redis.wait_ready(timeout=REDIS_READY_TIMEOUT_S)
        log.info("Redis ready at %s (data: %s)", self.redis.url, self.redis.workdir)
        if self.front:
            self.front.start()
            self._front_serving = True
        if self.owns_triton:
            self.triton.wait_ready(timeout=self.triton_ready_timeout_s)
            log.info("Triton ready at %s (gRPC %s)", self.triton.http_url, self.triton.grpc_url)
        self.gateway.start()
        for worker in self.workers:
            worker.start()
        self.gateway.wait_ready(timeout=GATEWAY_READY_TIMEOUT_S)
        for worker in self.workers:
            worker.wait_ready()
        self.front_door.start()
        self.front_door.wait_ready(timeout=FRONT_DOOR_READY_TIMEOUT_S)
        return self

    def exited(self) -> str | None:
        """The first part whose process is gone, or None while all run."""
        parts: dict[str, ManagedProcess] = {
            "triton": self.triton,
            "s3": self.s3,
            "redis": self.redis,
            "gateway": self.gateway,
            "front door": self.front_door,
            **{f"job worker {i}": worker for i, worker in enumerate(self.workers)},
        }
        if not self.owns_triton:
            del parts["triton"]
        for name, part in parts.items():
            if part.process is None or part.process.poll() is not None:
                return name
        return None

    def stop(self) -> None:
        """Stop whatever runs, front door first; safe to call again."""
        self.front_door.stop()
        self.gateway.stop()
        for worker in self.workers:
            worker.stop()
        if self.owns_triton:
            self.triton.stop()
        if self.front and self._front_serving:
            self._front_serving = False
            self.front.stop()
        self.s3.stop()
        self.redis.stop()

    def bucket(self, name: str = BUCKET) -> LocalS3:
        """A bucket of the local S3, created."""
        return LocalS3(self.s3, name).create()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


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
    parser.add_argument("--redis-port", type=int, default=_env_int("REDIS_PORT", 6379))
    parser.add_argument(
        "--worker-metrics-port", type=int, default=_env_int("WORKER_METRICS_PORT", 8082)
    )
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="logs and Triton's workdir")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from embedded.front_door import FrontDoorError
    from gateway.settings import SettingsError

    try:
        stack = LocalStack(
            args.run_dir,
            host=args.host,
            # The clients' and the probes' ports are the front door's defaults, or FRONT_PORT's
            # and FRONT_PROBE_PORT's, as any other setting of the environment; gunicorn takes
            # free ones behind it unless GATEWAY_PORT and GATEWAY_PROBE_PORT name them.
            ports=Ports(args.triton_http_port, args.triton_grpc_port, args.triton_metrics_port,
                        args.s3_port, gateway=free_port(args.host),
                        gateway_probes=free_port(args.host), front=FrontDoorSettings.port,
                        probes=FrontDoorSettings.probe_port, redis=args.redis_port,
                        worker_metrics=args.worker_metrics_port),
            repository=args.model_repository,
            triton_ready_timeout_s=args.ready_timeout,
            gateway_log=False,  # the gateway's and the front door's lines go to the terminal
        )
    except (SettingsError, FrontDoorError) as exc:
        print(f"embedded.stack: {exc}", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _raise_shutdown)
    signal.signal(signal.SIGINT, _raise_shutdown)
    code = 0
    try:
        stack.start()
        triton, s3, gateway = stack.triton, stack.s3, stack.gateway
        print(
            "\n".join(
                [
                    "",
                    f"gateway   {stack.url}  (POST /generate, /jobs, /moderate; /openapi.json, /docs)",
                    f"probes    {stack.probe_url}  (/healthz, /readyz, /metrics)",
                    f"gunicorn  {gateway.url}  (behind the front door, nginx)",
                    f"triton    {triton.http_url}  gRPC {triton.grpc_url}  metrics {triton.metrics_url}",
                    f"s3 (moto) {s3.url}  (any bucket; credentials: anything)",
                    f"redis     {stack.redis.url}  (jobs, their queue, Idempotency-Key records)",
                    (f"worker    {len(stack.workers)} job worker(s), metrics "
                    f"{stack.workers[0].ready_url if stack.workers else '-'}"),
                    f"uploads allowed to: {stack.upload_allowed_hosts}",
                    stack.access(),
                    f"logs      {stack.run_dir}",
                    "ready: try `make demo`; Ctrl-C stops everything",
                    "",
                ]
            ),
            flush=True,
        )
        while (gone := stack.exited()) is None:
            time.sleep(0.5)
        raise StackError(f"{gone} exited unexpectedly")
    except Shutdown as stop:
        log.info("%s: stopping", stop)
    except Exception as exc:  # noqa: BLE001 - any failure ends in the same orderly stop
        log.error("%s", exc)
        code = 1
    finally:
        # A second Ctrl-C must not interrupt the stop half-way and leave orphans.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        log.info("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
