"""Run the tritonserver binary shipped in the nvidia-pytriton wheel on our own repository.

The wheel carries Triton 2.51.0 (NGC 24.10) with the Python backend, but not laid out the way
`--backend-directory` expects, so we assemble a backend folder with the stub built for the running
Python. The stub takes its site-packages from the first `python3` on PATH (it ignores PYTHONPATH),
so this interpreter's `bin/` goes first on PATH.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from dataclasses import dataclass, field
from pathlib import Path

from embedded.drain import DEFAULT_DRAIN_TIMEOUT_S, undrained_command
from embedded.process import ManagedProcess, ProcessStartError, free_port

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPOSITORY = PROJECT_ROOT / "model_repository"
DEFAULT_WORKDIR = PROJECT_ROOT / ".run" / "triton"


# Python 3.11's sysconfig fills its variables on first use without a lock: a second thread can
# read them half-filled, without LIBDIR (seen here: one of two replicas started at once loaded
# the system's libpython and failed on `import ssl`).
_SYSCONFIG_LOCK = threading.Lock()


class TritonStartError(ProcessStartError):
    """The server exited or never became ready."""


def _pytriton_dist() -> tuple[Path, Path]:
    import pytriton  # imported lazily: only the launcher needs the wheel

    package = Path(pytriton.__file__).resolve().parent
    return package / "tritonserver", package.parent / "nvidia_pytriton.libs"


def prepare_backends(workdir: Path) -> Path:
    """Lay out `<workdir>/backends/python` with the stub for this interpreter; returns backends/."""
    server_dir, _ = _pytriton_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonStartError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    target = workdir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in [*(server_dir / "backends" / "python").glob("*.*"), stub]:
        dest = target / source.name
        if not dest.exists() or dest.stat().st_mtime < source.stat().st_mtime:
            shutil.copy2(source, dest)
    return workdir / "backends"


@dataclass
class TritonServer(ManagedProcess):
    """One tritonserver, usable as a context manager that waits until it is ready.

    `drain` (one of several replicas: the tests', the load run's) runs it under the drain
    supervisor (embedded/drain.py) as in the container: stop() sends the supervisor SIGTERM,
    which drains Triton (the requests it holds finish, new ones are refused) and stops it.
    Without (a single Triton, `make serve`'s and `make triton`'s: nothing to fail over to)
    tritonserver runs alone with no model-repository API, so no drain key exists; stop()
    sends it SIGTERM and it waits `exit_timeout_s` for the requests it holds. Either way
    stop() then SIGKILLs whatever is left in the session: the process group holds the
    supervisor if any, Triton and the backend stubs, so killing the group is a crash of the
    whole replica."""

    name = "tritonserver"
    start_error = TritonStartError
    poll_interval_s = 0.5
    ready_timeout_s = 300.0  # loading the diffusion pipeline takes a while on 2 cores

    repository: Path = DEFAULT_REPOSITORY
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    workdir: Path = DEFAULT_WORKDIR
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # How long a stop waits for the requests Triton holds (the supervisor's drain), then how
    # long Triton itself waits for what is left (direct calls to one model) once signalled.
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    exit_timeout_s: int = 20
    # The drain's key opens model-repository on HTTP, on a command line every local user
    # reads (docs/security.md, "Triton's APIs"): only replicas that fail over to each other.
    drain: bool = True
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @classmethod
    def on_free_ports(cls, repository: Path, workdir: Path, **kwargs: object) -> TritonServer:
        """Start one on free loopback ports, logging to `workdir`, and wait until it is ready."""
        workdir.mkdir(parents=True, exist_ok=True)
        server = cls(
            repository=repository,
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            workdir=workdir,
            log_path=workdir / "triton.log",
            **kwargs,  # type: ignore[arg-type]
        )
        return server.launch()

    @property
    def stop_timeout_s(self) -> float:  # type: ignore[override]  # a class attribute there
        return (self.drain_timeout_s if self.drain else 0) + self.exit_timeout_s + 10

    def command(self) -> list[str]:
        server_dir, _ = _pytriton_dist()
        triton = [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={prepare_backends(Path(self.workdir))}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-cpu-metrics=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            *self.extra_args,
        ]
        if not self.drain:
            return undrained_command(triton)
        return [
            # By path, as the container runs it: nothing to import from this project.
            sys.executable, str(Path(__file__).with_name("drain.py")),
            f"--drain-timeout={self.drain_timeout_s:g}",
            "--",
            *triton,
        ]

    def environment(self) -> dict[str, str]:
        _, libs = _pytriton_dist()
        env = {**os.environ, **self.env}
        env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        # The stub links libpython3.X.so by soname; without this it may find the system's copy
        # (Debian's 3.11.2 here), older than this interpreter's stdlib extensions, and `import ssl`
        # fails with an undefined symbol. This interpreter's own libpython goes first.
        with _SYSCONFIG_LOCK:
            own_libpython = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (own_libpython, str(libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        return env

    @property
    def ready_url(self) -> str:
        return f"{self.http_url}/v2/health/ready"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--host", default=os.environ.get("TRITON_HOST", "127.0.0.1"))
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("TRITON_HTTP_PORT", "8000")))
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("TRITON_GRPC_PORT", "8001")))
    parser.add_argument(
        "--metrics-port", type=int, default=int(os.environ.get("TRITON_METRICS_PORT", "8002"))
    )
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    server = TritonServer(
        repository=args.model_repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        extra_args=extra,
        drain=False,  # a single Triton: docs/security.md, "Triton's APIs"
    )

    def forward(signum: int, _frame: object) -> None:
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signum)

    server.start()
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    assert server.process is not None
    code = server.process.wait()
    server.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
