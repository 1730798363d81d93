"""docker-compose.yml and deploy/docker: validated by Debian's docker-compose (no Docker engine
here, so nothing is built or run), and checked against the project's own facts: the gateway's
settings, the front door's (the same nginx configuration as `make serve`, its values agreeing
with the gateway's and accepted by a real nginx), the models in the repository, the Prometheus
config, the embedded Triton's version."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import urllib.request
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedded.front_door import (
    MAIN_CONFIG,
    TEMPLATE,
    FrontDoor,
    FrontDoorError,
    FrontDoorSettings,
    template_variables,
)
from embedded.triton import DEFAULT_REPOSITORY
from gateway.settings import Settings
from gateway.tenants.tenant import Tenants
from tests.deploy.tools import require

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
# The embedded binary (nvidia-pytriton 0.7.0, the newest wheel reachable): Triton 2.51.0, NGC
# 24.10's. The image is a newer release (test_triton_image.py); docs/security.md says what the
# difference means.
EMBEDDED_TRITON_VERSION = "2.51.0"


def compose(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # The file's defaults, not whatever this shell happens to export.
    environ = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("GATEWAY_", "TRITON_", "IMAGEGEN_", "FRONT_"))
    }
    return subprocess.run(
        [require("docker-compose"), "-f", str(ROOT / "docker-compose.yml"), *args],
        cwd=ROOT, env={**environ, **env}, capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    checked = compose("config", "-q")
    assert checked.returncode == 0, checked.stderr
    resolved = compose("config")
    assert resolved.returncode == 0, resolved.stderr
    return yaml.safe_load(resolved.stdout)["services"]


def test_the_services(services: dict[str, Any]) -> None:
    assert set(services) == {"triton", "gateway", "front", "prometheus", "worker", "redis"}


def test_triton_has_a_gpu_shared_memory_the_repository_and_the_weights(services: dict[str, Any]) -> None:
    triton = services["triton"]
    [device] = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    size = re.fullmatch(r"(\d+)gb", str(triton["shm_size"]))
    assert size and int(size.group(1)) >= 1, triton["shm_size"]
    mounts = {volume.split(":")[1]: volume for volume in triton["volumes"]}
    assert mounts["/models"] == f"{DEFAULT_REPOSITORY}:/models:ro"
    env = triton["environment"]
    for variable in ("IMAGEGEN_DIFFUSION_MODEL", "IMAGEGEN_NSFW_ONNX"):
        assert env[variable].startswith("/weights/")
    assert "/weights" in mounts


def test_every_model_with_instances_has_its_count_variable(services: dict[str, Any]) -> None:
    env = services["triton"]["environment"]
    models = [
        path.parent.name
        for path in DEFAULT_REPOSITORY.glob("*/config.pbtxt")
        if "instance_group" in path.read_text()
    ]
    assert sorted(models) == ["diffusion", "nsfw", "upscaler"]
    assert {k for k in env if k.startswith("TRITON_INSTANCES_")} == {
        f"TRITON_INSTANCES_{m.upper()}" for m in models
    }
    raised = compose("config", TRITON_INSTANCES_DIFFUSION="3")
    assert yaml.safe_load(raised.stdout)["services"]["triton"]["environment"][
        "TRITON_INSTANCES_DIFFUSION"
    ] == "3"


def test_the_triton_image_and_the_embedded_binary_are_the_releases_the_docs_name(
    triton: Any, services: dict[str, Any]
) -> None:
    dockerfile = (DOCKER / "triton.Dockerfile").read_text()
    release = re.search(r"^FROM nvcr\.io/nvidia/tritonserver:(\d+\.\d+)-py3$", dockerfile, re.MULTILINE)
    assert release
    assert services["triton"]["image"] == f"imagegen-triton:{release.group(1)}"
    with urllib.request.urlopen(f"{triton.http_url}/v2", timeout=10) as resp:
        assert json.loads(resp.read())["version"] == EMBEDDED_TRITON_VERSION
    assert '"numpy<2"' in dockerfile  # the 2.51 stub crashes on string tensors with numpy 2
    entrypoint = (DOCKER / "triton-entrypoint.sh").read_text()
    assert "set_instances.py" in entrypoint and "tritonserver --model-repository" in entrypoint


def test_the_gateway_starts_with_these_settings(services: dict[str, Any]) -> None:
    env = {k: str(v) for k, v in services["gateway"]["environment"].items()}
    settings = Settings.from_env(env)  # an unknown or bad GATEWAY_* would stop the gateway
    assert settings.workers > 1
    assert settings.triton_url == "dns:///triton:8001"
    assert settings.triton_metrics_url == "http://triton:8002/metrics"
    # gunicorn on loopback: only its front door, in the same network namespace, reaches it.
    assert settings.host == "127.0.0.1"


def test_prometheus_scrapes_the_ports_the_services_serve(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    assert f"{ROOT / 'deploy' / 'prometheus'}:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["dns_sd_configs"][0] for job in config["scrape_configs"]}
    # The front door's probe port, in the gateway's network namespace.
    probe_port = int(services["front"]["environment"]["FRONT_PROBE_PORT"])
    assert services["front"]["network_mode"] == "service:gateway"
    assert jobs["gateway"] == {"names": ["gateway"], "type": "A", "port": probe_port}
    assert jobs["triton"] == {"names": ["triton"], "type": "A", "port": 8002}
    assert "8002" in services["triton"]["expose"]
    # The job workers' metrics listener, on the port their settings give it.
    worker = Settings.from_env({k: str(v) for k, v in services["worker"]["environment"].items()})
    assert jobs["worker"] == {"names": ["worker"], "type": "A", "port": worker.worker_metrics_port}
    assert str(worker.worker_metrics_port) in services["worker"]["expose"]
    assert set(jobs) == {"gateway", "triton", "worker"}
    # The image runs the Prometheus whose promtool checks the rules here.
    version = subprocess.run(
        [require("promtool"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    promtool = re.search(r"version (\d+\.\d+)\.", version)
    assert promtool and prometheus["image"].startswith(f"prom/prometheus:v{promtool.group(1)}.")


def front_door(services: dict[str, Any]) -> FrontDoorSettings:
    """The front door's settings as the image's entrypoint renders them, checked against the
    gateway's settings (a derived value that disagrees raises)."""
    env = {k: str(v) for k, v in services["front"]["environment"].items()}
    gateway = {k: str(v) for k, v in services["gateway"]["environment"].items()}
    # The entrypoint substitutes only these: nginx's own $variables stay as written.
    assert env.pop("NGINX_ENVSUBST_FILTER") == "^FRONT_"
    # Every variable of the template has its value, and nothing else is set.
    assert set(env) == template_variables(TEMPLATE.read_text())
    return FrontDoorSettings.from_env(env, Settings.from_env(gateway))


def test_the_front_door_is_make_serves_and_takes_the_published_port(
    services: dict[str, Any], tmp_path: Path
) -> None:
    front, gateway = services["front"], services["gateway"]
    assert front["image"].startswith("nginxinc/nginx-unprivileged:")  # uid 101, port 8080
    assert front["network_mode"] == "service:gateway"
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in front["volumes"]}
    assert mounts == {
        "/etc/nginx/nginx.conf": str(MAIN_CONFIG),
        "/etc/nginx/templates/gateway.conf.template": str(TEMPLATE),
    }
    # The image's entrypoint renders into conf.d: writable, and without the image's own server.
    assert front["tmpfs"] == ["/etc/nginx/conf.d"]
    # The prefix for the pid file and temp folders (deploy/nginx/nginx.conf), as LocalStack's.
    assert front["command"] == ["nginx", "-p", "/tmp/", "-g", "daemon off;"]

    settings = front_door(services)
    gateway_settings = Settings.from_env({k: str(v) for k, v in gateway["environment"].items()})
    assert settings.upstream == f"{gateway_settings.host}:{gateway_settings.port}"
    assert settings.probe_upstream == f"{gateway_settings.host}:{gateway_settings.probe_port}"
    [published] = gateway["ports"]
    assert published["target"] == settings.port
    assert settings.probe_port != settings.port
    # A real nginx takes the configuration these values render.
    FrontDoor(settings, tmp_path).check_config()


def test_a_raised_deadline_needs_the_front_door_to_wait_as_long(tmp_path: Path) -> None:
    raised = compose("config", GATEWAY_TRITON_DEADLINE_S="300")
    assert raised.returncode == 0, raised.stderr
    with pytest.raises(FrontDoorError, match="FRONT_UPSTREAM_TIMEOUT_S=182"):
        front_door(yaml.safe_load(raised.stdout)["services"])
    both = compose("config", GATEWAY_TRITON_DEADLINE_S="300", FRONT_UPSTREAM_TIMEOUT_S="362")
    assert front_door(yaml.safe_load(both.stdout)["services"]).upstream_timeout_s == 362


def _third_party_imports(folder: Path) -> set[str]:
    modules = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != folder.name}


def test_the_gateway_image_installs_everything_the_gateway_imports() -> None:
    listed = {
        re.split(r"[\[<>=!~;\s]", line, maxsplit=1)[0].lower().replace("_", "-")
        for line in (DOCKER / "gateway-requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    distributions = packages_distributions()
    imported = _third_party_imports(ROOT / "gateway")
    assert {"flask", "tritonclient", "prometheus_client"} <= imported
    dockerfile = (DOCKER / "gateway.Dockerfile").read_text()
    for module in imported:
        names = {d.lower().replace("_", "-") for d in distributions[module]}
        if names == {"imagegen"}:  # a module of this project (the models' contract): copied in
            assert re.search(rf"^COPY {module}\.py /app/$", dockerfile, re.MULTILINE), module
            continue
        assert names & listed, f"gateway/ imports {module} ({names}); not in gateway-requirements.txt"
    assert "gunicorn" in listed and '"gunicorn", "--config", "gateway/gunicorn.conf.py"' in dockerfile


def test_the_gateway_s_settings_start_gunicorn(services: dict[str, Any]) -> None:
    """The gateway's GATEWAY_* values as compose resolves them are settings gunicorn starts
    with: THREADS at least MAX_IN_FLIGHT + 2 (a default raised in the code and left behind in
    this file would stop the gateway at start)."""
    from gateway.settings import Settings

    environment = services["gateway"]["environment"]
    gateway = {k: str(v) for k, v in environment.items() if k.startswith("GATEWAY_")}
    settings = Settings.from_env(gateway)
    assert settings.threads_problem() is None, settings.threads_problem()


def test_the_gateway_and_the_worker_read_the_same_tenants_file(services: dict[str, Any]) -> None:
    """GATEWAY_TENANTS_FILE is mounted, read-only, into both (a running job holds its tenant's
    max_concurrent too), from the file the Kubernetes ConfigMap holds, which parses."""
    mounted = set()
    for name in ("gateway", "worker"):
        settings = Settings.from_env({k: str(v) for k, v in services[name]["environment"].items()})
        assert settings.tenants_file
        [volume] = [v for v in services[name]["volumes"] if v.split(":")[1] == settings.tenants_file]
        source, _, mode = volume.split(":")
        assert mode == "ro"
        mounted.add(Path(source))
    assert mounted == {ROOT / "deploy" / "tenants" / "tenants.toml"}
    assert (ROOT / "deploy" / "tenants").resolve() == ROOT / "deploy" / "kubernetes" / "base" / "tenants"
    tenants = Tenants.from_settings(Settings(tenants_file=str(mounted.pop())))
    assert {t.name for t in tenants.all} and tenants.keyed
