"""deploy/kubernetes's jobs: the job worker's Deployment and HPA, Redis's StatefulSet, held to the
project's own facts (the gateway's settings, the Redis configuration compose runs too, the
prometheus-adapter rules, the recording rule and the metrics it reads), and no secret value
anywhere in what is rendered. The generic checks (schemas, checkov, the NetworkPolicies'
meaning, Triton's callers) are in the other tests of this folder."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import yaml

from embedded.triton import DEFAULT_REPOSITORY
from gateway.metrics import Metrics, QueueReading
from gateway.settings import PREFIX, Settings
from harness import kube
from tests.deploy.test_compose_jobs import entrypoint_reads

SHAPES = ("overlays/gpu", "overlays/cpu")
WORKER_COMMAND = ["python", "-m", "gateway.jobs.worker"]
SHIPPED_REDIS_CONF = kube.ROOT / "deploy" / "redis" / "redis.conf"


@pytest.fixture(scope="module", params=SHAPES)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> kube.Rendered:
    return kube.render(kube.KUBERNETES_DIR, request.param, tmp_path_factory.mktemp("jobs"))


def _spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    [container] = [c for c in _spec(workload)["containers"] if c["name"] == name]
    return container  # type: ignore[no-any-return]


def _environment(rendered: kube.Rendered, container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it, a Secret's value standing in as a
    placeholder (the values are never in the repository)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(rendered.get("ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "placeholder-from-a-secret")
    return env


def _worker(rendered: kube.Rendered) -> tuple[dict[str, Any], dict[str, Any], Settings]:
    deployment = rendered.get("Deployment", "imagegen-worker")
    container = _container(deployment, "worker")
    return deployment, container, Settings.from_env(_environment(rendered, container))


def _max_batch_size() -> int:
    config = (DEFAULT_REPOSITORY / "diffusion" / "config.pbtxt").read_text()
    found = re.search(r"^\s*max_batch_size:\s*(\d+)", config, re.MULTILINE)
    assert found
    return int(found.group(1))


# --- the worker ------------------------------------------------------------------------------------


def test_the_worker_runs_the_worker_command_with_the_gateway_s_image_and_settings(
    rendered: kube.Rendered,
) -> None:
    deployment, container, settings = _worker(rendered)
    gateway = _container(rendered.get("Deployment", "imagegen-gateway"), "gateway")
    # Its args replace the image's CMD; the image's entrypoint (the secrets' files) stays.
    assert container["args"] == WORKER_COMMAND and "command" not in container
    assert container["image"] == gateway["image"]
    # The gateway's own ConfigMap: one copy of the settings a job runs under.
    assert container["envFrom"] == gateway["envFrom"]
    assert settings.worker_threads >= _max_batch_size()
    # Its metrics listener binds GATEWAY_HOST: every interface here (the ConfigMap's loopback is
    # gunicorn's), on the container port Prometheus and the probes use.
    assert settings.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": settings.worker_metrics_port}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    service = rendered.get("Service", "imagegen-worker")
    assert service["spec"]["clusterIP"] == "None"
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [("metrics", "metrics")]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # It serves no client: no API keys mounted.
    volumes = _spec(deployment)["volumes"]
    assert not [v for v in volumes if v.get("secret", {}).get("secretName") == "imagegen-gateway-api-keys"]
    assert "replicas" not in deployment["spec"]


def test_a_stopping_worker_has_time_for_the_jobs_it_holds(rendered: kube.Rendered) -> None:
    deployment, container, settings = _worker(rendered)
    # What the worker waits for on SIGTERM: a job's Triton deadline, then the longest request's
    # own time (the upload with every retry). No preStop: nothing routes to it.
    holds_s = settings.job_deadline_s + settings.longest_request_s
    assert "lifecycle" not in container
    assert _spec(deployment)["terminationGracePeriodSeconds"] > holds_s
    # A rollout surges new workers first; old ones then finish what they hold.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_pdb_lets_one_worker_go_at_a_time(rendered: kube.Rendered) -> None:
    pdb = rendered.get("PodDisruptionBudget", "imagegen-worker")
    labels = rendered.get("Deployment", "imagegen-worker")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --- the worker HPA ---------------------------------------------------------------------------------


def _recorded() -> dict[str, str]:
    return {
        rule["record"]: rule["expr"]
        for path in (kube.PROMETHEUS_DIR / "rules").glob("*.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def test_the_worker_hpa_follows_the_jobs_outstanding_one_worker_per_its_threads(
    rendered: kube.Rendered,
) -> None:
    _, _, settings = _worker(rendered)
    hpa = rendered.get("HorizontalPodAutoscaler", "imagegen-worker")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "imagegen-worker"}
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"] == {"name": "jobs_outstanding"}
    # replicas = outstanding / target: one worker per GATEWAY_WORKER_THREADS jobs.
    assert metric["external"]["target"] == {
        "type": "AverageValue", "averageValue": str(settings.worker_threads)}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # Scale-down waits out a job's deadline: the jobs of a burst have ended before workers go.
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= settings.job_deadline_s
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]


def test_the_worker_hpa_metric_is_served_from_the_queue_and_the_running_jobs() -> None:
    """HPA → the adapter's External rule → the recording rule → the gateways' queue gauge and
    the workers' running gauge, both exported; the namespace the adapter maps is set by the
    scrape jobs of both."""
    adapter = yaml.safe_load((kube.KUBERNETES_DIR / "prometheus-adapter" / "values.yaml").read_text())
    [rule] = [r for r in adapter["rules"]["external"] if r["name"]["as"] == "jobs_outstanding"]
    series = rule["seriesQuery"].split("{", 1)[0]
    assert re.fullmatch(rule["name"]["matches"], series)
    expr = _recorded()[series]
    used = set(re.findall(r"\b((?:gateway|worker)_[a-z_]+)\b", expr))
    assert used == {"gateway_jobs_queued", "worker_jobs_running"}
    # Every gateway reports the same global queue: taken once (max), never summed; the running
    # jobs are summed over the workers.
    assert "max by (namespace) (gateway_jobs_queued)" in expr
    assert "sum by (namespace) (worker_jobs_running)" in expr
    exported = Metrics().render(QueueReading(queued=3, oldest_age_s=1.5)).decode()
    for name in used:
        assert re.search(rf"^# TYPE {name} gauge$", exported, re.MULTILINE), name
    assert set(rule["resources"]["overrides"]) == {"namespace"}
    # A single value for the namespace: the HPA adds up what an External metric returns.
    assert rule["metricsQuery"] == "max(<<.Series>>{<<.LabelMatchers>>})"
    config = yaml.safe_load((kube.PROMETHEUS_DIR / "kubernetes.yml").read_text())
    for job in config["scrape_configs"]:
        if job["job_name"] in ("gateway", "worker"):
            assert "namespace" in {r.get("target_label") for r in job["relabel_configs"]}


# --- Redis --------------------------------------------------------------------------------------------


def test_redis_is_one_replica_on_its_own_volume_with_the_shipped_config(
    rendered: kube.Rendered,
) -> None:
    redis = rendered.get("StatefulSet", "imagegen-redis")
    spec = _spec(redis)
    container = _container(redis, "redis")
    assert redis["spec"]["replicas"] == 1
    service = rendered.get("Service", redis["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    # redis-server on the ConfigMap's file, which is deploy/redis/redis.conf as compose mounts it.
    [server, config_path] = container["command"]
    assert server == "redis-server"
    folder, file = config_path.rsplit("/", 1)
    config_map = rendered.get("ConfigMap", volumes[mounts[folder]["name"]]["configMap"]["name"])
    config = config_map["data"][file]
    assert config == SHIPPED_REDIS_CONF.read_text()
    # Its data folder is the claim of the StatefulSet, one ReadWriteOnce volume.
    [data_dir] = re.findall(r"^dir (\S+)$", config, re.MULTILINE)
    [claim] = redis["spec"]["volumeClaimTemplates"]
    assert mounts[data_dir]["name"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert redis["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain", "whenScaled": "Retain"}
    assert re.search(r"^appendonly yes$", config, re.MULTILINE)
    assert re.search(r"^appendfsync everysec$", config, re.MULTILINE)
    # The password: the file the config includes is the Secret's auth.conf, required.
    [include] = re.findall(r"^include (\S+)$", config, re.MULTILINE)
    folder, file = include.rsplit("/", 1)
    secret = volumes[mounts[folder]["name"]]["secret"]
    assert secret["secretName"] == "imagegen-redis" and not secret.get("optional")
    assert {"key": "auth.conf", "path": file} in secret["items"]
    # The port the Service and the probes name is the one the config listens on.
    [port] = re.findall(r"^port (\d+)$", config, re.MULTILINE)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"redis": int(port)}
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(int(port), "redis")]
    assert container["livenessProbe"]["tcpSocket"] == {"port": "redis"}
    assert include in " ".join(container["readinessProbe"]["exec"]["command"])


def test_gateway_and_worker_read_the_redis_url_and_webhook_secrets_from_files(
    rendered: kube.Rendered,
) -> None:
    """The Secrets' keys as the files the image's entrypoint reads, at its path: the same
    secrets compose mounts; never a variable of the Pod spec."""
    reads = entrypoint_reads()
    for deployment, name in (("imagegen-gateway", "gateway"), ("imagegen-worker", "worker")):
        workload = rendered.get("Deployment", deployment)
        container = _container(workload, name)
        assert "command" not in container, deployment  # the image's entrypoint runs
        assert not set(reads) & {e["name"] for e in container.get("env", [])}
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/run/secrets"]
        assert mount["readOnly"] is True
        [volume] = [v for v in _spec(workload)["volumes"] if v["name"] == mount["name"]]
        files = {
            item["path"]: (source["secret"]["name"], item["key"], source["secret"].get("optional", False))
            for source in volume["projected"]["sources"]
            for item in source["secret"]["items"]
        }
        assert files == {
            reads[f"{PREFIX}REDIS_URL"]: ("imagegen-redis", "url", False),
            reads[f"{PREFIX}WEBHOOK_SECRETS"]: ("imagegen-webhooks", "secrets", True),
        }, deployment
    # Redis's own password file comes from the same Secret, its other key: one Secret to create.
    redis = rendered.get("StatefulSet", "imagegen-redis")
    [auth] = [v for v in _spec(redis)["volumes"] if "secret" in v]
    assert auth["secret"]["secretName"] == "imagegen-redis"
    assert [i["key"] for i in auth["secret"]["items"]] == ["auth.conf"]  # not the clients' URL


# --- no secret value in what is rendered --------------------------------------------------------


SECRET_SETTINGS = {
    PREFIX + f.metadata["env"] for f in dataclasses.fields(Settings) if f.metadata.get("secret")
}
LITERAL_SECRETS = [
    re.compile(r"whsec_[A-Za-z0-9+/]{16,}"),  # a webhook secret
    re.compile(r"rediss?://[^:/\s]*:[^@\s<]+@"),  # a URL with a password written out
    re.compile(r"^\s*requirepass\s+\S", re.MULTILINE),  # a Redis password in a config
]


def test_no_secret_value_is_in_any_rendered_object(rendered: kube.Rendered) -> None:
    assert not rendered.objects("Secret")  # created by the operator, never shipped
    text = rendered.path.read_text()
    for pattern in LITERAL_SECRETS:
        assert not pattern.search(text), pattern.pattern
    for config_map in rendered.objects("ConfigMap"):
        assert not SECRET_SETTINGS & set(config_map.get("data", {})), config_map["metadata"]["name"]
    for workload in [*rendered.objects("Deployment"), *rendered.objects("StatefulSet")]:
        for container in _spec(workload)["containers"]:
            for item in container.get("env", []):
                secret_like = item["name"] in SECRET_SETTINGS or re.search(
                    r"PASSWORD|SECRET|API_KEY|TOKEN", item["name"])
                if not secret_like or item.get("value") == "":  # unset: no value to hide
                    continue
                assert "secretKeyRef" in item.get("valueFrom", {}), item["name"]


def test_the_check_finds_a_password_written_out() -> None:
    """So that the patterns above can fail: each finds what it is for."""
    written = {
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw": 0,
        "GATEWAY_REDIS_URL: redis://:hunter2hunter2@imagegen-redis:6379/0": 1,
        "redis.conf: |\n  requirepass hunter2\n": 2,
    }
    for text, index in written.items():
        assert [i for i, p in enumerate(LITERAL_SECRETS) if p.search(text)] == [index], text
    # What the comments write: a placeholder, not a password.
    assert not LITERAL_SECRETS[1].search("redis://:<password>@imagegen-redis:6379/0")
