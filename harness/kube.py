"""Offline checks of deploy/kubernetes: every kustomization rendered by `kubectl kustomize`,
validated by `kubernetes-validate --strict`, scanned by checkov, and held against the project's
own facts (the gateway's settings, its front door's, Triton's flags, the Dockerfiles, the
Prometheus rules and scrape config, the prometheus-adapter rules).

Each check takes a tree (the repository's deploy/kubernetes, or a test's broken copy of it) or
what was rendered from it, and returns its problems as sentences: an empty list is a pass.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import imagegen_contract
from embedded.front_door import (
    MAIN_CONFIG,
    TEMPLATE,
    FrontDoor,
    FrontDoorError,
    FrontDoorSettings,
    template_variables,
)
from embedded.triton import DEFAULT_REPOSITORY as MODEL_REPOSITORY
from embedded.triton import PROJECT_ROOT as ROOT
from gateway.settings import PREFIX, Settings, SettingsError
from gateway.tenants.tenant import Tenants
from harness.tools import checkov, kubectl, kubernetes_validate

KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DOCKER_DIR = ROOT / "deploy" / "docker"
# The oldest Kubernetes these manifests support (the preStop `sleep` action is on by default
# from 1.30) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# The shapes, and the one-off weights loader and fill Job: every kustomization that is applied.
KUSTOMIZATIONS = ("overlays/gpu", "overlays/cpu", "weights-loader", "weights-fill")
# Kustomize components an operator's overlay adds to a shape (tests/deploy renders each so).
COMPONENTS = (
    "components/gpu-nodes",
    "components/prometheus-operator",
    "components/weights-snapshot",
)


class RenderError(RuntimeError):
    pass


@dataclass
class Rendered:
    name: str
    path: Path  # the rendered multi-document YAML
    docs: list[dict[str, Any]]

    def objects(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.objects(kind) if d["metadata"]["name"] == name]
        if len(found) != 1:
            raise KeyError(f"{kind}/{name}: {len(found)} found")
        return found[0]


def render(tree: Path, kustomization: str, out_dir: Path) -> Rendered:
    done = subprocess.run(
        [kubectl(), "kustomize", str(tree / kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RenderError(f"kubectl kustomize {kustomization}: {done.stderr.strip()}")
    path = out_dir / (kustomization.replace("/", "-") + ".yaml")
    path.write_text(done.stdout)
    return Rendered(kustomization, path, [d for d in yaml.safe_load_all(done.stdout) if d])


# --- schema and policy --------------------------------------------------------------------------


def schema_problems(rendered: Rendered, version: str) -> list[str]:
    """kubernetes-validate --strict: every object known to that version, no unknown field."""
    done = subprocess.run(
        [kubernetes_validate(), "--strict", "-k", version, str(rendered.path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = (done.stdout + done.stderr).splitlines()
    # A kind without a schema only warns (exit 0): here that is a failure, it was not checked.
    problems = [line for line in lines if not line.startswith("INFO ")]
    passed = sum(" passed for resource " in line for line in lines)
    if passed != len(rendered.docs):
        problems.append(f"{passed} of {len(rendered.docs)} objects passed")
    if done.returncode != 0 and not problems:
        problems.append(f"kubernetes-validate exited {done.returncode}")
    return problems


def checkov_report(rendered: Rendered) -> dict[str, Any]:
    # --skip-download: no calls to the vendor's platform (there is no network here anyway).
    done = subprocess.run(
        [
            checkov(),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--output",
            "json",
            "--file",
            rendered.path.name,
        ],
        cwd=rendered.path.parent,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(
            f"checkov printed no report (exit {done.returncode}): {done.stderr[-2000:]}"
        )
    return report


def policy_problems(report: dict[str, Any]) -> list[str]:
    """checkov's failed checks, parse errors, and skips without a written reason."""
    results = report["results"]
    problems = [
        f"{c['check_id']} {c['check_name']}: {c['resource']}" for c in results["failed_checks"]
    ]
    problems += [f"checkov could not parse {p}" for p in results["parsing_errors"]]
    problems += [
        f"{c['check_id']} skipped without a reason: {c['resource']}"
        for c in results["skipped_checks"]
        if len((c["check_result"].get("suppress_comment") or "").strip()) < 20
    ]
    if not results["passed_checks"]:
        problems.append("checkov passed no check at all: did it see the objects?")
    return problems


# --- consistency with the project's own facts ----------------------------------------------------


def _container(deployment: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """The Deployment's container `name`, or its only one."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    if name is None:
        [container] = containers
        return container  # type: ignore[no-any-return]
    [container] = [c for c in containers if c["name"] == name]
    return container  # type: ignore[no-any-return]


def _port(container: dict[str, Any], name_or_number: str | int) -> int | None:
    for port in container.get("ports", []):
        if name_or_number in (port.get("name"), port["containerPort"]):
            return int(port["containerPort"])
    return None


def _flags(container: dict[str, Any]) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in container.get("args", []))


def _volume_mount(
    deployment: dict[str, Any], path: str, container: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(volumeMount, volume) of the mount that holds `path` in `container`, the deepest one."""
    spec = deployment["spec"]["template"]["spec"]
    mounts = [
        m
        for m in _container(deployment, container).get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    if not mounts:
        return None
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def _pre_stop_s(container: dict[str, Any]) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    return int(pre_stop.get("sleep", {}).get("seconds", 0))


def gateway_environment(rendered: Rendered) -> dict[str, str]:
    """The gateway container's environment as the kubelet builds it; secrets stand in as a
    placeholder (their values are never in the repository)."""
    deployment = rendered.get("Deployment", "imagegen-gateway")
    container = _container(deployment, "gateway")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        config_map = rendered.get("ConfigMap", source["configMapRef"]["name"])
        env.update(config_map.get("data", {}))
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "placeholder-from-a-secret")
    return env


def gateway_problems(rendered: Rendered) -> list[str]:
    deployment = rendered.get("Deployment", "imagegen-gateway")
    container = _container(deployment, "gateway")
    env = gateway_environment(rendered)
    try:
        settings = Settings.from_env(env)  # what the gateway does at start
    except SettingsError as exc:
        return [f"the gateway would not start: {exc}"]
    problems = []
    secret_names = {f"{PREFIX}API_KEYS", f"{PREFIX}NVIDIA_API_KEY"}
    for source in container.get("envFrom", []):
        data = rendered.get("ConfigMap", source["configMapRef"]["name"]).get("data", {})
        problems += [
            f"{name} is a secret but sits in a ConfigMap" for name in secret_names & set(data)
        ]
    headless = [
        s
        for s in rendered.objects("Service")
        if s["spec"].get("clusterIP") == "None"
        and s["spec"]["selector"]
        == rendered.get("Deployment", "imagegen-triton")["spec"]["selector"]["matchLabels"]
    ]
    if len(headless) != 1:
        return problems + [f"{len(headless)} headless Services select the Triton pods"]
    service = headless[0]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    name = service["metadata"]["name"]
    if settings.triton_url != f"dns:///{name}:{ports.get('grpc')}":
        problems.append(
            f"GATEWAY_TRITON_URL {settings.triton_url} is not dns:///{name}:{ports.get('grpc')}"
        )
    if settings.triton_metrics_url != f"http://{name}:{ports.get('metrics')}/metrics":
        problems.append(f"GATEWAY_TRITON_METRICS_URL {settings.triton_metrics_url} is not Triton's")
    # Clients, probes and Prometheus reach the front door; gunicorn only through it.
    if settings.host != "127.0.0.1" or container.get("ports"):
        problems.append(
            f"gunicorn binds {settings.host}:{settings.port} with container ports "
            f"{container.get('ports')}: not on the pod's loopback behind its front door"
        )
    front_problems, front = front_door_problems(rendered, settings)
    problems += front_problems
    if front is None:
        return problems
    front_container = _container(deployment, "front")
    gateway_service = rendered.get("Service", "imagegen-gateway")
    targets = {port["name"]: port["targetPort"] for port in gateway_service["spec"]["ports"]}
    if {name: _port(front_container, t) for name, t in targets.items()} != {
        "http": front.port,
        "probes": front.probe_port,
    }:
        problems.append(f"Service ports {targets} are not the front door's http and probes")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") != front.probe_port:
            problems.append(f"gateway {probe} is not {path} on the front door's probe port")
    readiness = container.get("readinessProbe", {})
    if readiness.get("timeoutSeconds", 1) <= settings.probe_timeout_s:
        problems.append("the readiness probe gives up before /readyz's own Triton probes can")
    if _pre_stop_s(front_container) != _pre_stop_s(container):
        problems.append("the front door's preStop is not the gateway's: one stops accepting first")
    grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    needed = _pre_stop_s(container) + math.ceil(settings.graceful_timeout_s)
    if grace < needed:
        problems.append(f"gateway grace period {grace}s < preStop + graceful timeout ({needed}s)")
    if settings.metrics_dir is None or settings.workers < 2:
        problems.append("several gunicorn workers with a shared metrics directory expected")
    else:
        found = _volume_mount(deployment, settings.metrics_dir, "gateway")
        if not found or "emptyDir" not in found[1] or found[0].get("readOnly"):
            problems.append(
                f"GATEWAY_METRICS_DIR {settings.metrics_dir} is not a writable emptyDir"
            )
    if settings.api_keys_file is None:
        problems.append("no GATEWAY_API_KEYS_FILE: the gateway would serve everyone")
    else:
        found = _volume_mount(deployment, settings.api_keys_file, "gateway")
        if not found or "secret" not in found[1] or found[1]["secret"].get("optional"):
            problems.append(
                f"GATEWAY_API_KEYS_FILE {settings.api_keys_file} is not on a required Secret"
            )
    return problems


def tenants_problems(rendered: Rendered) -> list[str]:
    """GATEWAY_TENANTS_FILE on a ConfigMap in the gateway and the worker (it holds digests, no
    key), and that ConfigMap's file a tenants file the gateway starts with."""
    try:
        settings = Settings.from_env(gateway_environment(rendered))
    except SettingsError:
        return []  # gateway_problems says why
    if settings.tenants_file is None:
        return []
    problems: list[str] = []
    found_data: dict[str, str] = {}
    for name, container in (("imagegen-gateway", "gateway"), ("imagegen-worker", "worker")):
        found = _volume_mount(rendered.get("Deployment", name), settings.tenants_file, container)
        if not found or "configMap" not in found[1] or found[1]["configMap"].get("optional"):
            problems.append(f"GATEWAY_TENANTS_FILE {settings.tenants_file} is not on a required "
                            f"ConfigMap in the {container}")
            continue
        mount, volume = found
        relative = settings.tenants_file.removeprefix(mount["mountPath"].rstrip("/") + "/")
        data = rendered.get("ConfigMap", volume["configMap"]["name"]).get("data", {})
        if relative not in data:
            problems.append(f"the {container}'s ConfigMap has no {relative}")
            continue
        found_data[container] = data[relative]
    worker = _container(rendered.get("Deployment", "imagegen-worker"), "worker")
    worker_env = {**gateway_environment(rendered), **{
        e["name"]: e.get("value", "placeholder-from-a-secret") for e in worker.get("env", [])}}
    keys_file = Settings.from_env(worker_env).api_keys_file
    if keys_file and not _volume_mount(rendered.get("Deployment", "imagegen-worker"), keys_file,
                                       "worker"):
        # The worker reads its tenants, the settings keys' `default` with them, at start.
        problems.append(f"the worker would read GATEWAY_API_KEYS_FILE {keys_file}, not mounted")
    for container, text in found_data.items():
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "tenants.toml"
            path.write_text(text)
            try:
                # The file alone: the API keys are a Secret's, not in the repository.
                Tenants.from_settings(
                    settings.replace(api_keys=(), api_keys_file=None, tenants_file=str(path))
                )
            except SettingsError as exc:
                problems.append(f"the {container} would not start: {exc}")
    return problems


def front_door_problems(
    rendered: Rendered, settings: Settings
) -> tuple[list[str], FrontDoorSettings | None]:
    """The gateway pod's `front` container is the front door of make serve and compose: the
    same two nginx files, FRONT_* values that render the whole template and agree with the
    gateway's settings, nginx accepting what they render; and its settings."""
    deployment = rendered.get("Deployment", "imagegen-gateway")
    try:
        container = _container(deployment, "front")
    except ValueError:
        return ["the gateway pod has no `front` container: clients would reach gunicorn"], None
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(rendered.get("ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    problems = []
    if env.pop("NGINX_ENVSUBST_FILTER", None) != "^FRONT_":
        problems.append("the image's envsubst is not limited to FRONT_* (NGINX_ENVSUBST_FILTER)")
    missing = template_variables(TEMPLATE.read_text()) ^ set(env)
    if missing:
        problems.append(f"the front door's variables and the template's differ: {sorted(missing)}")
    try:
        front = FrontDoorSettings.from_env(env, settings)
    except FrontDoorError as exc:
        return [*problems, f"the front door disagrees with the gateway: {exc}"], None
    if front.upstream != f"{settings.host}:{settings.port}" or front.probe_upstream != (
        f"{settings.host}:{settings.probe_port}"
    ):
        problems.append(
            f"the front door proxies to {front.upstream} and {front.probe_upstream}; gunicorn is "
            f"on {settings.host}:{settings.port}, its probes on port {settings.probe_port}"
        )
    if (_port(container, "http"), _port(container, "probes")) != (front.port, front.probe_port):
        problems.append("the front container's http and probes ports are not FRONT_PORT's and "
                        "FRONT_PROBE_PORT's")
    if not container["image"].startswith("nginxinc/nginx-unprivileged:"):
        problems.append(f"the front door runs {container['image']}, not nginx-unprivileged")
    if container.get("args") != ["nginx", "-p", "/tmp/", "-g", "daemon off;"]:
        problems.append(f"the front door's args {container.get('args')} are not make serve's")
    for path, source in (
        ("/etc/nginx/nginx.conf", MAIN_CONFIG),
        ("/etc/nginx/templates/gateway.conf.template", TEMPLATE),
    ):
        found = _volume_mount(deployment, path, "front")
        if not found or "configMap" not in found[1]:
            problems.append(f"{path} is not mounted from a ConfigMap")
            continue
        data = rendered.get("ConfigMap", found[1]["configMap"]["name"]).get("data", {})
        if data.get(found[0].get("subPath", "")) != source.read_text():
            problems.append(f"{path} is not deploy/nginx/{source.name}")
    for path in ("/etc/nginx/conf.d", "/tmp"):
        found = _volume_mount(deployment, path, "front")
        if not found or "emptyDir" not in found[1] or found[0].get("readOnly"):
            problems.append(f"the front door's {path} is not a writable emptyDir")
    with tempfile.TemporaryDirectory() as prefix:
        try:
            FrontDoor(front, Path(prefix)).check_config()
        except FrontDoorError as exc:
            problems.append(str(exc))
    return problems, front


def triton_problems(rendered: Rendered, shape: str) -> list[str]:
    """Flags, ports, probes, shutdown timing, weights, instance counts, GPU."""
    deployment = rendered.get("Deployment", "imagegen-triton")
    spec = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    flags = _flags(container)
    problems = []
    for kind in ("grpc", "metrics"):
        flag = flags.get(f"{kind}-port")
        if flag is None or _port(container, kind) != int(flag):
            problems.append(
                f"--{kind}-port={flag} but the container port {kind} is {_port(container, kind)}"
            )
    # Triton's HTTP listens on the pod's loopback only (the entrypoint binds it there, after
    # these flags): nothing outside the pod reaches it, so no port, probe or flag may count on it.
    if _port(container, "http") is not None or "http-address" in flags:
        problems.append("Triton's HTTP port is the pod's own (loopback): no container port or "
                        "--http-address for it")
    for probe in ("startupProbe", "readinessProbe"):
        port = container.get(probe, {}).get("grpc", {}).get("port")
        if port is None or str(port) != flags.get("grpc-port"):
            problems.append(f"Triton {probe} is not a gRPC health probe on --grpc-port")
    live = " ".join(container.get("livenessProbe", {}).get("exec", {}).get("command", []))
    if f"127.0.0.1:{flags.get('http-port')}/v2/health/live" not in live:
        problems.append("Triton livenessProbe does not run /v2/health/live on --http-port in the pod")
    startup = container.get("startupProbe", {})
    startup_budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if startup_budget < 600:
        problems.append(
            f"the startup probe allows {startup_budget}s to load weights, under 10 minutes"
        )
    # The entrypoint runs Triton under the drain supervisor (embedded/drain.py), which owns the
    # model control mode and the exit timeout: a SIGTERM unloads the ensembles and waits up to
    # TRITON_DRAIN_TIMEOUT_S for their requests, then Triton waits TRITON_EXIT_TIMEOUT_S more.
    env_values = {e["name"]: e.get("value") for e in container.get("env", [])}
    for owned in ("exit-timeout-secs", "model-control-mode", "http-restricted-api",
                  "grpc-restricted-protocol"):
        if owned in flags:
            problems.append(f"--{owned} is the drain supervisor's (set by the entrypoint)")
    drain = float(env_values.get("TRITON_DRAIN_TIMEOUT_S") or 130)
    exit_timeout = float(env_values.get("TRITON_EXIT_TIMEOUT_S") or 20)
    try:
        deadline = Settings.from_env(gateway_environment(rendered)).triton_deadline_s
    except SettingsError:
        pass  # gateway_problems says why
    else:
        if drain < deadline:
            problems.append(
                f"TRITON_DRAIN_TIMEOUT_S={drain:g} is shorter than the gateway's {deadline:g}s "
                "deadline"
            )
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace < _pre_stop_s(container) + drain + exit_timeout:
        problems.append(
            f"Triton grace period {grace}s < preStop + TRITON_DRAIN_TIMEOUT_S + "
            "TRITON_EXIT_TIMEOUT_S"
        )
    if _pre_stop_s(container) < 5:
        problems.append(
            "no preStop pause: Triton would refuse new calls before gateways saw it leave"
        )
    # Weights: every IMAGEGEN_* the models read is set, under a read-only PVC mount.
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    read = set()
    for path in MODEL_REPOSITORY.glob("*/1/model.py"):
        read |= set(re.findall(r"environ\.get\(\"(IMAGEGEN_[A-Z_]+)\"", path.read_text()))
    if not read or read - set(env):
        problems.append(
            f"IMAGEGEN_* variables the models read but the pod does not set: {sorted(read - set(env))}"
        )
    if imagegen_contract.TEST_HOLD_ENV in env:
        problems.append(f"{imagegen_contract.TEST_HOLD_ENV} is the models' test hook: no pod sets it")
    for name in sorted(read & set(env)):
        if not env[name]:
            continue
        found = _volume_mount(deployment, env[name])
        claim = found and found[1].get("persistentVolumeClaim")
        if not found or not claim or not found[0].get("readOnly") or not claim.get("readOnly"):
            problems.append(f"{name}={env[name]} is not on the read-only weights volume")
        elif not any(
            p["metadata"]["name"] == claim["claimName"]
            for p in rendered.objects("PersistentVolumeClaim")
        ):
            problems.append(f"the weights claim {claim['claimName']} is not deployed")
    models = sorted(
        p.parent.name
        for p in MODEL_REPOSITORY.glob("*/config.pbtxt")
        if "instance_group" in p.read_text()
    )
    counts = {k for k in env if k.startswith("TRITON_INSTANCES_")}
    if not models or counts != {f"TRITON_INSTANCES_{m.upper()}" for m in models}:
        problems.append(
            f"TRITON_INSTANCES_* {sorted(counts)} do not match the models with instances {models}"
        )
    shm = _volume_mount(deployment, "/dev/shm")
    if (
        not shm
        or shm[1].get("emptyDir", {}).get("medium") != "Memory"
        or not shm[1]["emptyDir"].get("sizeLimit")
    ):
        problems.append("/dev/shm is not a memory-backed emptyDir with a size limit")
    gpus = {container["resources"].get(k, {}).get("nvidia.com/gpu") for k in ("requests", "limits")}
    if shape == "gpu" and gpus != {"1"}:
        problems.append(f"the gpu shape's Triton asks for nvidia.com/gpu {gpus}, not 1")
    if shape == "cpu" and gpus != {None}:
        problems.append("the cpu shape's Triton asks for a GPU")
    return problems


def _recorded() -> set[str]:
    return {
        rule["record"]
        for path in (PROMETHEUS_DIR / "rules").glob("*.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def _relabelled_targets(job: dict[str, Any]) -> set[str]:
    return {r["target_label"] for r in job.get("relabel_configs", []) if "target_label" in r}


def autoscaling_problems(rendered: Rendered, tree: Path) -> list[str]:
    """HPA → adapter rule → recording rule → scrape labels, each naming what the next serves."""
    problems = []
    hpa = rendered.get("HorizontalPodAutoscaler", "imagegen-triton")
    deployment = rendered.get("Deployment", "imagegen-triton")
    target = hpa["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", deployment["metadata"]["name"]):
        problems.append(f"the Triton HPA scales {target}, not the Triton Deployment")
    [metric] = hpa["spec"]["metrics"]
    served = {}
    adapter = yaml.safe_load((tree / "prometheus-adapter" / "values.yaml").read_text())
    for rule in adapter["rules"]["custom"]:
        served[rule["name"]["as"]] = rule
    name = metric.get("pods", {}).get("metric", {}).get("name")
    if metric["type"] != "Pods" or name not in served:
        return problems + [
            f"the Triton HPA's metric {name!r} is not served by the adapter ({sorted(served)})"
        ]
    rule = served[name]
    series = rule["seriesQuery"].split("{", 1)[0]
    if series not in _recorded():
        problems.append(f"the adapter reads {series}, which no recording rule records")
    if not re.fullmatch(rule["name"]["matches"], series):
        problems.append(f"the adapter's name pattern does not match {series}")
    labels = set(rule["resources"]["overrides"])
    config = yaml.safe_load((PROMETHEUS_DIR / "kubernetes.yml").read_text())
    [triton_job] = [j for j in config["scrape_configs"] if j["job_name"] == "triton"]
    if not labels <= _relabelled_targets(triton_job):
        problems.append(
            f"the adapter maps {sorted(labels)} to pods; the triton scrape job sets "
            f"{sorted(_relabelled_targets(triton_job))}"
        )
    startup = _container(deployment).get("startupProbe", {})
    load_s = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    down = (
        hpa["spec"].get("behavior", {}).get("scaleDown", {}).get("stabilizationWindowSeconds", 300)
    )
    if down < load_s:
        problems.append(
            f"scale-down stabilization {down}s is shorter than a weight load may take ({load_s}s)"
        )
    return problems


def scrape_problems(rendered: Rendered) -> list[str]:
    """deploy/prometheus/kubernetes.yml keeps the Services and port names that are deployed."""
    problems = []
    config = yaml.safe_load((PROMETHEUS_DIR / "kubernetes.yml").read_text())
    namespace = rendered.get("Deployment", "imagegen-triton")["metadata"]["namespace"]
    for job in config["scrape_configs"]:
        [sd] = job["kubernetes_sd_configs"]
        if namespace not in sd.get("namespaces", {}).get("names", []):
            problems.append(f"job {job['job_name']} does not look in namespace {namespace}")
        [keep] = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
        service, port, ready = keep["regex"].split(";")
        try:
            ports = {p["name"] for p in rendered.get("Service", service)["spec"]["ports"]}
        except KeyError:
            problems.append(
                f"job {job['job_name']} scrapes Service {service}, which is not deployed"
            )
            continue
        if port not in ports or ready != "true":
            problems.append(
                f"job {job['job_name']} keeps port {port} (ready={ready}); {service} has {sorted(ports)}"
            )
    return problems


def image_problems(rendered: Rendered) -> list[str]:
    """Tags carry the project's version and the Dockerfile's base: a new base is a new tag."""
    version = re.search(
        r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE
    )
    triton_from = re.search(
        r"^FROM nvcr\.io/nvidia/tritonserver:(\d+\.\d+)-py3$",
        (DOCKER_DIR / "triton.Dockerfile").read_text(),
        re.MULTILINE,
    )
    gateway_from = re.search(
        r"^FROM python:(\d+\.\d+)-slim$",
        (DOCKER_DIR / "gateway.Dockerfile").read_text(),
        re.MULTILINE,
    )
    if not (version and triton_from and gateway_from):
        return ["cannot read the version or a Dockerfile's FROM"]
    expected = {
        "imagegen-triton": f"imagegen-triton:{version.group(1)}-ngc{triton_from.group(1)}",
        "imagegen-gateway": f"imagegen-gateway:{version.group(1)}-py{gateway_from.group(1)}",
    }
    problems = []
    for name, image in expected.items():
        found = _container(rendered.get("Deployment", name), name.removeprefix("imagegen-"))["image"]
        if found != image:
            problems.append(f"{name} runs {found}; the Dockerfile and pyproject.toml make {image}")
    return problems


def network_problems(rendered: Rendered) -> list[str]:
    policies = {p["metadata"]["name"]: p["spec"] for p in rendered.objects("NetworkPolicy")}
    problems = []
    deny = [
        s
        for s in policies.values()
        if s["podSelector"] == {} and not s.get("ingress") and not s.get("egress")
    ]
    if not any(set(s.get("policyTypes", [])) == {"Ingress", "Egress"} for s in deny):
        problems.append("no default-deny NetworkPolicy for ingress and egress")
    triton = policies.get("imagegen-triton", {})
    peers = [peer for rule in triton.get("ingress", []) for peer in rule.get("from", [])]
    allowed = {
        peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
        for peer in peers
    }
    if not peers or allowed != {"gateway", "prometheus"}:
        problems.append(f"Triton is reachable from {allowed}, not only the gateway and Prometheus")
    egress = policies.get("imagegen-gateway", {}).get("egress", [])
    dns = {(p.get("protocol"), p.get("port")) for rule in egress for p in rule.get("ports", [])}
    if not {("UDP", 53), ("TCP", 53)} <= dns:
        problems.append("the gateway cannot reach DNS")
    return problems


def consistency_problems(rendered: Rendered, tree: Path, shape: str) -> list[str]:
    checks = (
        gateway_problems(rendered),
        tenants_problems(rendered),
        triton_problems(rendered, shape),
        autoscaling_problems(rendered, tree),
        scrape_problems(rendered),
        image_problems(rendered),
        network_problems(rendered),
    )
    return [problem for found in checks for problem in found]
