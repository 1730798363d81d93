"""Several embedded Tritons behind one name, for the load run and the replica tests.

Hosts: replica i listens on 127.0.0.(i+2), every one on the same three ports, and a DNS server
on loopback (harness/dnsserver.py) answers the name with their addresses: what a Kubernetes
headless Service or a compose service name gives a gateway. Ports: every replica on 127.0.0.1
with ports of its own, named by a fixed `ipv4:` list (a DNS answer has no ports).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from embedded.process import free_port
from embedded.triton import DEFAULT_REPOSITORY, TritonServer
from harness.dnsserver import LoopbackDns

SHM = Path("/dev/shm")
NAME = "triton.test"


def process_group(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # the 5th field of /proc/PID/stat: process group
            pids.append(int(stat.parent.name))
    return pids


def kill(server: TritonServer) -> None:
    """SIGKILL a replica as a crash or the OOM killer would: the drain supervisor, Triton and
    its backend stubs, with no drain. The stubs' shared-memory regions, which a killed Triton
    cannot remove, are removed by name (read from the stubs' command lines)."""
    if server.process is None:
        raise RuntimeError("the replica is not running")
    pgid = server.process.pid
    regions = set()
    for pid in process_group(pgid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        regions.update(a.decode() for a in args if a.startswith(b"triton_python_backend_shm_region_"))
    os.killpg(pgid, signal.SIGKILL)
    server.stop()
    for name in regions:
        (SHM / name).unlink(missing_ok=True)


def terminate(server: TritonServer, timeout_s: float) -> int:
    """SIGTERM to the supervisor alone, as Kubernetes and Docker send it to PID 1; its exit
    status once it has drained and stopped Triton."""
    if server.process is None:
        raise RuntimeError("the replica is not running")
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(timeout_s)
    server.stop()  # whatever the group left behind
    return code


def restart(server: TritonServer, timeout_s: float = 300.0) -> float:
    """Start a stopped replica again on the same address and ports; seconds until ready."""
    started = time.monotonic()
    server.start()
    server.wait_ready(timeout=timeout_s)
    return time.monotonic() - started


def free_port_on(hosts: Sequence[str]) -> int:
    """A port free on every one of these loopback addresses."""
    for _ in range(100):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


@dataclass
class ReplicaGroup:
    """Tritons and the target that names them all; `dns` is None with ports."""

    replicas: list[TritonServer]
    dns: LoopbackDns | None = None
    name: str = NAME

    @classmethod
    def launch(cls, count: int, workdir: Path, *, addressing: str = "hosts") -> ReplicaGroup:
        """`count` Tritons on the demo models, started together and ready."""
        if addressing == "hosts":
            hosts = [f"127.0.0.{i + 2}" for i in range(count)]
            http, grpc, metrics = (free_port_on(hosts) for _ in range(3))
            servers = [
                TritonServer(repository=DEFAULT_REPOSITORY, host=host, http_port=http,
                             grpc_port=grpc, metrics_port=metrics, workdir=workdir / host,
                             log_path=workdir / f"triton-{host}.log")
                for host in hosts
            ]
            dns: LoopbackDns | None = LoopbackDns().start()
        elif addressing == "ports":
            servers = [
                TritonServer(repository=DEFAULT_REPOSITORY, http_port=free_port(),
                             grpc_port=free_port(), metrics_port=free_port(),
                             workdir=workdir / f"triton-{i}", log_path=workdir / f"triton-{i}.log")
                for i in range(count)
            ]
            dns = None
        else:
            raise ValueError(f"addressing is hosts or ports, not {addressing!r}")
        for server in servers:
            Path(server.workdir).mkdir(parents=True, exist_ok=True)
        group = cls(servers, dns)
        try:
            with ThreadPoolExecutor(count) as pool:
                list(pool.map(lambda s: s.launch(), servers))
        except BaseException:
            group.stop()
            raise
        if dns is not None:
            group.publish(range(count))
        return group

    @property
    def target(self) -> str:
        """GATEWAY_TRITON_URL for the group."""
        if self.dns is not None:
            return self.dns.target(self.name, self.replicas[0].grpc_port)
        return "ipv4:" + ",".join(r.grpc_url for r in self.replicas)

    def address(self, index: int) -> str:
        """How the gateway names replica `index` (its metrics' `address` label)."""
        return self.replicas[index].grpc_url

    def publish(self, indices: Sequence[int] | range) -> None:
        """Let the name resolve to these replicas only (hosts mode)."""
        if self.dns is None:
            raise RuntimeError("replicas on ports are a fixed list")
        self.dns.set(self.name, [self.replicas[i].host for i in indices])

    def stop(self) -> None:
        with ThreadPoolExecutor(max(1, len(self.replicas))) as pool:
            list(pool.map(lambda s: s.stop(), self.replicas))
        if self.dns is not None:
            self.dns.stop()
