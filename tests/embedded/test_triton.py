"""The embedded Triton launcher: ready, signals forwarded, nothing left behind; `make triton`'s
runs alone, with no drain key."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedded.drain import KEY_HEADER
from embedded.process import free_port
from embedded.triton import DEFAULT_REPOSITORY, PROJECT_ROOT, TritonServer


def session_processes(sid: int) -> list[str]:
    """Command names of the live processes in a session."""
    names = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                names.append((entry / "comm").read_text().strip())
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue
    return names


@pytest.fixture
def small_repository(tmp_path: Path) -> Path:
    """Just the upscaler: a repository that loads in seconds."""
    shutil.copytree(DEFAULT_REPOSITORY / "upscaler", tmp_path / "repository" / "upscaler")
    return tmp_path / "repository"


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_forwards_the_signal_and_leaves_no_stub_behind(
    small_repository: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    http = free_port()
    command = [sys.executable, "-m", "embedded.triton", "--model-repository", str(small_repository),
               "--http-port", str(http), "--grpc-port", str(free_port()),
               "--metrics-port", str(free_port())]
    with open(tmp_path / "out.log", "wb") as log:
        cli = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    probe = TritonServer(http_port=http)
    deadline = time.monotonic() + 120
    while not probe.is_ready():
        assert cli.poll() is None and time.monotonic() < deadline, (tmp_path / "out.log").read_text()
        time.sleep(0.5)
    (server_pid,) = children(cli.pid)
    # A single Triton runs alone, with no drain supervisor and so no drain key.
    args = Path(f"/proc/{server_pid}/cmdline").read_bytes().split(b"\0")
    assert args[0].endswith(b"/tritonserver") and not any(KEY_HEADER.encode() in a for a in args)
    server_session = os.getsid(server_pid)  # the launcher gives tritonserver a session of its own
    assert "triton_python_b" in session_processes(server_session)  # comm is cut to 15 characters

    cli.send_signal(signum)
    assert cli.wait(timeout=60) == 0
    assert session_processes(server_session) == []
    assert not probe.is_ready()


def test_context_manager_starts_ready_and_stops_everything(small_repository: Path, tmp_path: Path) -> None:
    server = TritonServer(repository=small_repository, http_port=free_port(),
                          grpc_port=free_port(), metrics_port=free_port(),
                          workdir=tmp_path, log_path=tmp_path / "triton.log")
    with server:
        assert server.process is not None
        sid = os.getsid(server.process.pid)
        names = session_processes(sid)
        assert "tritonserver" in names
        assert "triton_python_b" in names  # comm is cut to 15 characters
    assert session_processes(sid) == []
    assert not server.is_ready()
