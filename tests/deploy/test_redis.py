"""deploy/redis/redis.conf, the one Redis configuration of compose and Kubernetes, run by a real
redis-server (Debian's): only its listening address, port, data folder and the secret's path are
moved for the test. It asks for the password it includes, persists to an append-only file
fsynced every second, evicts nothing, and a SIGKILL right after a write loses nothing that was
acknowledged. The readiness checks of both shapes are run against it as written."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import yaml

from embedded.process import free_port
from embedded.redis import PERSISTENCE, RedisServer, redis_server_binary
from harness import kube
from tests.deploy.test_compose import compose

SHIPPED = kube.ROOT / "deploy" / "redis" / "redis.conf"
SECRET = "/run/secrets/redis_auth"
PASSWORD = "8c1e5f0a9b2d4c6e8f0a1b3c5d7e9f10"


def _moved(config: str, workdir: Path, port: int) -> str:
    """The shipped file with what only a container has moved to the test's folder and port;
    each line it moves must be there exactly once."""
    for old, new in (
        ("bind * -::*", "bind 127.0.0.1"),
        ("port 6379", f"port {port}"),
        ("dir /data", f"dir {workdir}"),
        (f"include {SECRET}", f"include {workdir / 'redis_auth'}"),
    ):
        assert config.count(f"\n{old}\n") == 1, old
        config = config.replace(f"\n{old}\n", f"\n{new}\n")
    return config


@dataclass
class ShippedRedis(RedisServer):
    """redis-server on the shipped configuration, its password in `workdir`/redis_auth."""

    def command(self) -> list[str]:
        config = self.workdir / "redis.conf"
        config.write_text(_moved(SHIPPED.read_text(), self.workdir, self.port))
        return [redis_server_binary(), str(config)]

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@{self.host}:{self.port}/0"


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "redis_auth").write_text(f"requirepass {PASSWORD}\n")
    return tmp_path


def test_the_config_asks_for_the_included_password_and_persists_every_second(
    workdir: Path,
) -> None:
    with ShippedRedis(workdir=workdir, port=free_port()) as server:
        anonymous = redis.Redis(port=server.port, socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        assert client.ping()
        config = client.config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "everysec"
        assert config["save"] == ""
        assert config["maxmemory-policy"] == "noeviction"
        assert int(config["maxmemory"]) == 2 * 1024**3
        assert config["dir"] == str(workdir)
        assert client.info("persistence")["aof_enabled"] == 1


def test_the_local_redis_persists_as_the_containers_do() -> None:
    """embedded/redis.py (make serve, the tests) keeps the shipped persistence."""
    lines = {line.strip() for line in SHIPPED.read_text().splitlines()}
    assert set(PERSISTENCE) <= lines


def test_a_sigkill_after_a_write_loses_nothing_acknowledged(workdir: Path) -> None:
    port = free_port()
    with ShippedRedis(workdir=workdir, port=port) as server:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        client.zadd("imagegen:jobs:queued", {"job_a": 1.0, "job_b": 2.0})
        assert server.process is not None
        # Acknowledged means written to the file (the page cache): Redis writes the AOF buffer
        # before it answers; only the fsync waits for the next second.
        incr = list((workdir / "appendonlydir").glob("*.incr.aof"))
        assert [p for p in incr if b"job_b" in p.read_bytes()], incr
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
    with ShippedRedis(workdir=workdir, port=port) as again:
        client = redis.Redis.from_url(again.url, socket_timeout=5)
        assert client.zrange("imagegen:jobs:queued", 0, -1) == [b"job_a", b"job_b"]


def _readiness_commands(tmp_path: Path) -> dict[str, str]:
    """The shell each shape runs to ask whether Redis is ready: compose's healthcheck, the
    StatefulSet's readiness probe."""
    done = compose("config")
    assert done.returncode == 0, done.stderr
    test = yaml.safe_load(done.stdout)["services"]["redis"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    rendered = kube.render(kube.KUBERNETES_DIR, "overlays/gpu", tmp_path)
    [container] = rendered.get("StatefulSet", "imagegen-redis")["spec"]["template"]["spec"][
        "containers"
    ]
    sh, flag, probe = container["readinessProbe"]["exec"]["command"]
    assert (sh, flag) == ("sh", "-c")
    return {"compose": test[1].replace("$$", "$"), "kubernetes": probe}


def _run_check(command: str, workdir: Path, port: int) -> int:
    # The container's secret path and default port, moved to the test's.
    assert SECRET in command and "redis-cli ping" in command
    local = command.replace(SECRET, str(workdir / "redis_auth")).replace(
        "redis-cli ping", f"redis-cli -p {port} ping"
    )
    environ = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    return subprocess.run(["sh", "-c", local], env=environ, timeout=30, check=False).returncode


def test_the_readiness_checks_pass_with_the_password_and_fail_without(
    workdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    commands = _readiness_commands(tmp_path_factory.mktemp("render"))
    # The password reaches redis-cli through its environment, never its command line.
    for command in commands.values():
        assert "-a " not in command and "--pass" not in command
        assert command.startswith('REDISCLI_AUTH="$(') and ')" redis-cli ping' in command
    port = free_port()
    for shape, command in commands.items():
        assert _run_check(command, workdir, port) != 0, f"{shape}: ready with no Redis"
    with ShippedRedis(workdir=workdir, port=port):
        for shape, command in commands.items():
            assert _run_check(command, workdir, port) == 0, shape
        # A wrong password reads as not ready (redis-cli exits 0 on an error reply).
        (workdir / "redis_auth").write_text("requirepass wrong-password\n")
        for shape, command in commands.items():
            assert _run_check(command, workdir, port) != 0, shape
