"""docker-compose.yml is safe to expose, as `docker-compose config` resolves it: the gateway's
API keys come from a Docker secret, no secret setting sits in any service's environment or in the
rendered file, and nothing but the port clients call is published on every interface
(Prometheus has no authentication: this host's loopback only; Triton, Redis and the job workers:
nothing)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import PREFIX, Settings
from tests.deploy.test_compose import compose

SECRETS_DIR = "/run/secrets/"  # where compose mounts a service's secrets


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    done = compose("config")
    assert done.returncode == 0, done.stderr
    return dict(yaml.safe_load(done.stdout))


def published(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host address, published port) of each port the service publishes; "" is every
    interface. Compose 1.29 prints short entries as `[IP:]PUBLISHED:TARGET[/PROTO]` and long
    ones as mappings."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append((str(port.get("host_ip", "")), str(port.get("published", ""))))
            continue
        parts = str(port).split("/")[0].split(":")
        host = parts[0] if len(parts) == 3 else ""
        found.append((host, parts[-2] if len(parts) >= 2 else ""))
    return found


def test_the_gateway_s_api_keys_come_from_a_docker_secret(resolved: dict[str, Any]) -> None:
    gateway = resolved["services"]["gateway"]
    env = {k: str(v) for k, v in gateway["environment"].items()}
    assert f"{PREFIX}API_KEYS" not in env  # never a key in the environment or in the file
    keys_file = env[f"{PREFIX}API_KEYS_FILE"]
    assert keys_file.startswith(SECRETS_DIR)
    name = keys_file.removeprefix(SECRETS_DIR)
    assert name in {s["source"] if isinstance(s, dict) else s for s in gateway["secrets"]}
    assert "file" in resolved["secrets"][name]
    assert Settings.from_env(env).api_keys_file == keys_file  # the gateway reads it as such


def test_nothing_but_the_client_port_is_published_on_every_interface(
    resolved: dict[str, Any],
) -> None:
    services = resolved["services"]
    everywhere = [
        (name, port)
        for name, service in services.items()
        for host, port in published(service)
        if host in ("", "0.0.0.0", "::", "[::]")
    ]
    assert len(everywhere) == 1, everywhere
    [(front, _)] = everywhere
    assert front not in {"triton", "prometheus", "redis", "worker"}
    for internal in ("triton", "redis", "worker"):
        assert published(services[internal]) == [], internal
    assert {host for host, _ in published(services["prometheus"])} == {"127.0.0.1"}
    # Triton's HTTP port is its container's own (the entrypoint binds it to loopback).
    assert "8000" not in [str(p) for p in services["triton"].get("expose", [])]


SECRET_SETTINGS = {
    PREFIX + f.metadata["env"] for f in dataclasses.fields(Settings) if f.metadata.get("secret")
}
MARKER = "c0ffee5ecret7d1b"


def test_no_secret_setting_is_in_an_environment_or_the_rendered_file(tmp_path: Path) -> None:
    """Every secret the gateway and its workers know (API keys, the Redis URL with its password,
    the webhook secrets, the NVIDIA key), set in the shell that runs compose and written into
    the secrets' files: neither reaches any service's environment or the rendered file."""
    assert {f"{PREFIX}API_KEYS", f"{PREFIX}REDIS_URL", f"{PREFIX}WEBHOOK_SECRETS"} <= SECRET_SETTINGS
    shell = {
        f"{PREFIX}API_KEYS": f"key-{MARKER}",
        f"{PREFIX}REDIS_URL": f"redis://:{MARKER}@redis:6379/0",
        f"{PREFIX}WEBHOOK_SECRETS": f"whsec_{MARKER}",
        f"{PREFIX}NVIDIA_API_KEY": f"nvapi-{MARKER}",
        "REDIS_PASSWORD": MARKER,
    }
    files = {}
    for variable in ("GATEWAY_API_KEYS_SECRET", "REDIS_AUTH_SECRET", "GATEWAY_REDIS_URL_SECRET",
                     "GATEWAY_WEBHOOK_SECRETS_SECRET"):
        path = tmp_path / variable.lower()
        path.write_text(f"requirepass {MARKER}\n")
        files[variable] = str(path)
    done = compose("config", **shell, **files)
    assert done.returncode == 0, done.stderr
    assert MARKER not in done.stdout
    resolved = yaml.safe_load(done.stdout)
    for name, service in resolved["services"].items():
        assert not SECRET_SETTINGS & set(service.get("environment", {})), name
    # The secrets' files are the ones named, each as a file compose mounts, not inlined.
    assert {s["file"] for s in resolved["secrets"].values()} == set(files.values())


def test_the_check_reads_every_shape_compose_prints() -> None:
    # So that a wrong parse cannot pass the test above: an address, none, a long entry, and a
    # container port alone (a random host port, on every interface).
    ports = ["127.0.0.1:9090:9090/tcp", "9091:9091", {"published": 80, "target": 8080}, "8000"]
    assert published({"ports": ports}) == [
        ("127.0.0.1", "9090"), ("", "9091"), ("", "80"), ("", "")]
