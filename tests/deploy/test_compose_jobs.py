"""docker-compose.yml's job worker and Redis, as `docker-compose config` resolves them: the worker
is the gateway's image and settings with the worker command, and waits long enough on stop for
the jobs it holds; Redis is the official image, pinned as Kubernetes pins it, running
deploy/redis/redis.conf with its data on a named volume. The secrets that the gateway reads only
from its environment reach it through the image's entrypoint (deploy/docker/gateway-entrypoint.sh),
run here with a real `sh`."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedded.triton import DEFAULT_REPOSITORY
from gateway.settings import PREFIX, Settings
from harness import kube
from tests.deploy.test_compose import DOCKER, ROOT, compose
from tests.deploy.test_triton_drain_config import _seconds

SECRETS_DIR = "/run/secrets/"  # where compose mounts a service's secrets
# What the image's entrypoint sets from a secret, stood in where a test needs the settings whole.
PLACEHOLDERS = {f"{PREFIX}REDIS_URL": "redis://:placeholder@redis:6379/0"}


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    done = compose("config")
    assert done.returncode == 0, done.stderr
    return dict(yaml.safe_load(done.stdout))


@pytest.fixture(scope="module")
def services(resolved: dict[str, Any]) -> dict[str, Any]:
    return dict(resolved["services"])


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def _secrets(service: dict[str, Any]) -> set[str]:
    return {s["source"] if isinstance(s, dict) else s for s in service.get("secrets", [])}


def _max_batch_size() -> int:
    config = (DEFAULT_REPOSITORY / "diffusion" / "config.pbtxt").read_text()
    found = re.search(r"^\s*max_batch_size:\s*(\d+)", config, re.MULTILINE)
    assert found
    return int(found.group(1))


# --- the worker ------------------------------------------------------------------------------------


def test_the_worker_is_the_gateway_image_with_the_worker_command(services: dict[str, Any]) -> None:
    worker, gateway = services["worker"], services["gateway"]
    assert worker["command"] == ["python", "-m", "gateway.jobs.worker"]
    assert worker["image"] == gateway["image"] and worker["build"] == gateway["build"]
    # The gateway runs the image's CMD (gunicorn).
    assert "command" not in gateway


def test_the_worker_shares_the_gateway_s_settings(services: dict[str, Any]) -> None:
    worker, gateway = _env(services["worker"]), _env(services["gateway"])
    # Where each listens is its own (gunicorn on loopback behind its front door; the worker's
    # metrics on every interface); everything else they both set is the same.
    shared = set(worker) & set(gateway) - {f"{PREFIX}HOST"}
    # Triton, uploads and jobs: a job runs as /generate would, under the same limits.
    assert {
        f"{PREFIX}TRITON_URL",
        f"{PREFIX}TRITON_DEADLINE_S",
        f"{PREFIX}UPLOAD_ALLOWED_HOSTS",
        f"{PREFIX}WEBHOOK_ALLOWED_HOSTS",
        f"{PREFIX}JOB_DEADLINE_S",
        f"{PREFIX}WORKER_THREADS",
    } <= shared
    assert {k: worker[k] for k in shared} == {k: gateway[k] for k in shared}
    settings = Settings.from_env({**worker, **PLACEHOLDERS})  # the worker's own start check
    # Queued jobs of one shape share a denoising pass only if one worker holds a batch of them.
    assert settings.worker_threads >= _max_batch_size()
    # Its metrics listener binds GATEWAY_HOST: every interface, where Prometheus reaches it.
    assert settings.host == "0.0.0.0" and settings.worker_metrics_port is not None
    # It serves no client: no API keys.
    assert "api_keys" not in _secrets(services["worker"])
    assert f"{PREFIX}API_KEYS_FILE" not in worker


def test_a_stopping_worker_has_time_for_the_jobs_it_holds(services: dict[str, Any]) -> None:
    worker = services["worker"]
    settings = Settings.from_env({**_env(worker), **PLACEHOLDERS})
    # What the worker waits for on SIGTERM: a job's Triton deadline, then the longest request's
    # own time (its upload with every retry); Docker's SIGKILL must come after.
    holds_s = settings.job_deadline_s + settings.longest_request_s
    assert _seconds(worker["stop_grace_period"]) > holds_s


def test_the_worker_waits_for_a_ready_redis_and_the_gateway_does_not(
    services: dict[str, Any],
) -> None:
    assert services["worker"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert services["worker"]["depends_on"]["triton"] == {"condition": "service_healthy"}
    # /generate serves without the store (its /readyz says the store is down).
    assert services["gateway"]["depends_on"]["redis"] == {"condition": "service_started"}


# --- the secrets the gateway reads from its environment -------------------------------------------


def _secret_settings() -> set[str]:
    return {
        PREFIX + f.metadata["env"]
        for f in dataclasses.fields(Settings)
        if f.metadata.get("secret")
    }


ENTRYPOINT = DOCKER / "gateway-entrypoint.sh"


def entrypoint_reads() -> dict[str, str]:
    """{variable: file under /run/secrets} of the gateway image's entrypoint."""
    return dict(
        re.findall(r'(GATEWAY_[A-Z_]+)="\$\(cat /run/secrets/(\w+)\)"', ENTRYPOINT.read_text())
    )


def test_the_image_reads_the_secret_settings_from_the_files_compose_mounts(
    services: dict[str, Any],
) -> None:
    dockerfile = (DOCKER / "gateway.Dockerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.MULTILINE)
    assert entrypoint and json.loads(entrypoint.group(1)) == ["sh", "/usr/local/bin/gateway-entrypoint.sh"]
    assert re.search(
        r"^COPY deploy/docker/gateway-entrypoint\.sh /usr/local/bin/gateway-entrypoint\.sh$",
        dockerfile, re.MULTILINE)
    reads = entrypoint_reads()
    assert reads == {f"{PREFIX}REDIS_URL": "redis_url", f"{PREFIX}WEBHOOK_SECRETS": "webhook_secrets"}
    for service in (services["gateway"], services["worker"]):
        # The image's entrypoint runs (no service replaces it) and finds each file mounted.
        assert "entrypoint" not in service
        for variable, secret in reads.items():
            assert variable in _secret_settings()  # only settings that are secrets go this way
            assert secret in _secrets(service)
            assert variable not in _env(service)


def _run_entrypoint(secrets_dir: Path, *command: str) -> subprocess.CompletedProcess[str]:
    script = ENTRYPOINT.read_text().replace(SECRETS_DIR, f"{secrets_dir}/")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    environ[f"{PREFIX}LOG_LEVEL"] = "INFO"  # a setting set directly, left as it is
    return subprocess.run(
        ["sh", "-c", script, "gateway-entrypoint.sh", *command],
        capture_output=True, text=True, timeout=30, env=environ, check=False,
    )


# The command the entrypoint execs reports its environment and its own command line.
REPORT = (
    "import json, os; print(json.dumps({'env': {k: v for k, v in os.environ.items() "
    "if k.startswith('GATEWAY_')}, 'cmdline': open('/proc/self/cmdline').read()}))"
)


def test_the_entrypoint_puts_the_files_in_the_command_s_environment_only(tmp_path: Path) -> None:
    values = {
        "redis_url": "redis://:4f1d9c0be2a7@redis:6379/0\n",
        "webhook_secrets": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n",
    }
    for secret, value in values.items():
        (tmp_path / secret).write_text(value)
    done = _run_entrypoint(tmp_path, sys.executable, "-c", REPORT)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["env"] == {
        f"{PREFIX}LOG_LEVEL": "INFO",
        f"{PREFIX}REDIS_URL": values["redis_url"].strip(),
        f"{PREFIX}WEBHOOK_SECRETS": values["webhook_secrets"].strip(),
    }
    assert "4f1d9c0be2a7" not in seen["cmdline"] and "whsec_" not in seen["cmdline"]
    settings = Settings.from_env(seen["env"])  # the values parse as the gateway's settings
    assert settings.redis_url and settings.webhook_secrets


def test_without_the_files_the_environment_stays_and_an_unreadable_one_stops(
    tmp_path: Path,
) -> None:
    done = _run_entrypoint(tmp_path, sys.executable, "-c", REPORT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["env"] == {f"{PREFIX}LOG_LEVEL": "INFO"}
    (tmp_path / "redis_url").mkdir()  # there, but not a file cat can read
    stopped = _run_entrypoint(tmp_path, sys.executable, "-c", "print('ran')")
    assert stopped.returncode != 0 and "ran" not in stopped.stdout


# --- Redis -------------------------------------------------------------------------------------------


def test_redis_is_the_official_image_pinned_as_on_kubernetes(
    services: dict[str, Any], tmp_path: Path
) -> None:
    image = services["redis"]["image"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+-alpine", image), image
    rendered = kube.render(kube.KUBERNETES_DIR, "overlays/gpu", tmp_path)
    [container] = rendered.get("StatefulSet", "imagegen-redis")["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["image"] == image


def test_redis_runs_the_shipped_config_with_its_data_on_a_named_volume(
    resolved: dict[str, Any], services: dict[str, Any]
) -> None:
    redis = services["redis"]
    [server, config_path] = redis["command"]
    assert server == "redis-server"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in redis["volumes"]}
    shipped = ROOT / "deploy" / "redis" / "redis.conf"
    assert mounts[config_path] == str(shipped)
    # One file for compose and Kubernetes: deploy/redis is a link to the ConfigMap's folder.
    assert shipped.resolve() == kube.KUBERNETES_DIR / "base" / "redis" / "config" / "redis.conf"
    config = shipped.read_text()
    assert re.search(r"^dir /data$", config, re.MULTILINE)
    assert mounts["/data"] == "redis-data" and "redis-data" in resolved["volumes"]
    # The password: the secret redis_auth, at the path the config includes.
    [include] = re.findall(r"^include (\S+)$", config, re.MULTILINE)
    assert include == SECRETS_DIR + "redis_auth" and _secrets(redis) == {"redis_auth"}
    assert "requirepass" not in [line.split()[0] for line in config.splitlines() if line.strip()
                                 and not line.startswith("#")]
    # Its SIGTERM (an AOF fsync) fits in the grace period; not Docker's 10 s default.
    assert _seconds(redis["stop_grace_period"]) >= 10
