"""deploy/kubernetes, checked offline (no cluster exists here): every kustomization rendered by a
real `kubectl kustomize`, every object validated by `kubernetes-validate --strict` for the oldest
and newest Kubernetes supported, scanned by checkov, and held against the project's own facts.
A broken copy of the manifests shows that each kind of check can fail."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from harness import kube
from tests.deploy.tools import require

SHAPES = {"overlays/gpu": "gpu", "overlays/cpu": "cpu"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, kube.Rendered]:
    out = tmp_path_factory.mktemp("rendered")
    return {name: kube.render(kube.KUBERNETES_DIR, name, out) for name in kube.KUSTOMIZATIONS}


def test_every_kustomization_is_rendered_and_tested() -> None:
    found = {
        str(path.parent.relative_to(kube.KUBERNETES_DIR))
        for path in kube.KUBERNETES_DIR.rglob("kustomization.yaml")
    }
    assert found - {"base"} == set(kube.KUSTOMIZATIONS) | set(kube.COMPONENTS)
    assert set(SHAPES) <= found


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_each_shape_deploys_the_whole_service(
    rendered: dict[str, kube.Rendered], name: str
) -> None:
    docs = rendered[name].docs
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    config_maps = [k for k in kinds if k.startswith("ConfigMap/")]
    # The gateway's settings (the workers' too), its front door's, the front door's nginx
    # files, Redis's configuration, the tenants file; hashed: each rolls its pods when it changes.
    assert [re.sub(r"-[a-z0-9]{10}$", "", k) for k in config_maps] == [
        "ConfigMap/imagegen-front-door",
        "ConfigMap/imagegen-front-door-nginx",
        "ConfigMap/imagegen-gateway",
        "ConfigMap/imagegen-redis",
        "ConfigMap/imagegen-tenants",
    ], config_maps
    assert kinds == sorted(
        [
            "Namespace/imagegen",
            *config_maps,
            "Deployment/imagegen-gateway",
            "Deployment/imagegen-triton",
            "Deployment/imagegen-worker",
            "HorizontalPodAutoscaler/imagegen-gateway",
            "HorizontalPodAutoscaler/imagegen-triton",
            "HorizontalPodAutoscaler/imagegen-worker",
            "NetworkPolicy/default-deny",
            "NetworkPolicy/imagegen-gateway",
            "NetworkPolicy/imagegen-redis",
            "NetworkPolicy/imagegen-triton",
            "NetworkPolicy/imagegen-triton-from-worker",
            "NetworkPolicy/imagegen-worker",
            "PersistentVolumeClaim/imagegen-weights",
            "PodDisruptionBudget/imagegen-gateway",
            "PodDisruptionBudget/imagegen-triton",
            "PodDisruptionBudget/imagegen-worker",
            "PriorityClass/imagegen-serving",
            "Service/imagegen-gateway",
            "Service/imagegen-redis",
            "Service/imagegen-triton",
            "Service/imagegen-worker",
            "ServiceAccount/imagegen-gateway",
            "ServiceAccount/imagegen-redis",
            "ServiceAccount/imagegen-triton",
            "ServiceAccount/imagegen-worker",
            "StatefulSet/imagegen-redis",
        ]
    )
    for doc in docs:
        if doc["kind"] not in ("Namespace", "PriorityClass"):  # cluster-scoped
            assert doc["metadata"]["namespace"] == "imagegen", doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "imagegen"
    for deployment in rendered[name].objects("Deployment"):
        assert "replicas" not in deployment["spec"]  # the HPA owns the count
    # Every Deployment has an HPA of its own; Redis is one replica, on purpose.
    hpas = rendered[name].objects("HorizontalPodAutoscaler")
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in hpas}
    assert scaled == {d["metadata"]["name"] for d in rendered[name].objects("Deployment")}
    assert rendered[name].get("StatefulSet", "imagegen-redis")["spec"]["replicas"] == 1


@pytest.mark.parametrize("version", kube.KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", kube.KUSTOMIZATIONS)
def test_kubernetes_validate_strict(
    rendered: dict[str, kube.Rendered], name: str, version: str
) -> None:
    assert kube.schema_problems(rendered[name], version) == []


@pytest.mark.parametrize("name", kube.KUSTOMIZATIONS)
def test_checkov_finds_nothing_unexplained(rendered: dict[str, kube.Rendered], name: str) -> None:
    report = kube.checkov_report(rendered[name])
    assert kube.policy_problems(report) == []
    print(name, report["summary"])


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_manifests_agree_with_the_project(rendered: dict[str, kube.Rendered], name: str) -> None:
    assert kube.consistency_problems(rendered[name], kube.KUBERNETES_DIR, SHAPES[name]) == []


# --- the checks can fail -------------------------------------------------------------------------


def _edit(tree: Path, relative: str, old: str, new: str) -> None:
    path = tree / relative
    text = path.read_text()
    assert old in text, f"{old!r} not in {relative}"
    path.write_text(text.replace(old, new, 1))


def _schema(rendered: kube.Rendered, tree: Path) -> list[str]:
    return [p for v in kube.KUBERNETES_VERSIONS for p in kube.schema_problems(rendered, v)]


def _policy(rendered: kube.Rendered, tree: Path) -> list[str]:
    return kube.policy_problems(kube.checkov_report(rendered))


def _consistency(rendered: kube.Rendered, tree: Path) -> list[str]:
    return kube.consistency_problems(rendered, tree, "gpu")


BROKEN: dict[str, tuple[str, str, str, Callable[[kube.Rendered, Path], list[str]], str]] = {
    # name: (file, old, new, the check that must catch it, a word of its message)
    "misspelt field": (
        "base/triton/deployment.yaml",
        "          readinessProbe:",
        "          readinesProbe:",
        _schema,
        "'readinesProbe' was unexpected",
    ),
    "writable root filesystem": (
        "base/gateway/deployment.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFilesystem: false",
        _policy,
        "CKV_K8S_22",
    ),
    "a skip without a reason": (
        "base/triton/deployment.yaml",
        (
            "CKV_K8S_15=Pinned, never reused release tags: IfNotPresent keeps a pod start (failover, "
            "scale-up) from waiting on the registry for a 15 GB image that is already on the node"
        ),
        "CKV_K8S_15=ok",
        _policy,
        "skipped without a reason",
    ),
    "misspelt gateway setting": (
        "base/gateway/gateway.env",
        "GATEWAY_TRITON_DEADLINE_S=",
        "GATEWAY_TRITON_DEADLINE=",
        _consistency,
        "unknown settings: GATEWAY_TRITON_DEADLINE",
    ),
    "deadline longer than Triton's drain": (
        "base/gateway/gateway.env",
        "GATEWAY_TRITON_DEADLINE_S=120",
        "GATEWAY_TRITON_DEADLINE_S=300",
        _consistency,
        "TRITON_DRAIN_TIMEOUT_S=130 is shorter",
    ),
    "HPA metric the adapter does not serve": (
        "base/triton/hpa.yaml",
        "name: triton_diffusion_queue_compute_ratio",
        "name: triton_queue_compute_ratio",
        _consistency,
        "is not served by the adapter",
    ),
    "Triton port moved, probes left behind": (
        "base/triton/deployment.yaml",
        "--grpc-port=8001",
        "--grpc-port=8081",
        _consistency,
        "--grpc-port=8081 but the container port grpc is 8001",
    ),
    "Triton HTTP port moved, liveness left behind": (
        "base/triton/deployment.yaml",
        "--http-port=8000",
        "--http-port=8080",
        _consistency,
        "livenessProbe does not run /v2/health/live on --http-port",
    ),
    "Triton's HTTP published outside the pod": (
        "base/triton/deployment.yaml",
        "            - --strict-readiness=true\n",
        "            - --strict-readiness=true\n            - --http-address=0.0.0.0\n",
        _consistency,
        "Triton's HTTP port is the pod's own",
    ),
    "front door's body cap not the gateway's": (
        "base/gateway/front-door.env",
        "FRONT_GENERATE_MAX_BODY_BYTES=65536",
        "FRONT_GENERATE_MAX_BODY_BYTES=1048576",
        _consistency,
        "FRONT_GENERATE_MAX_BODY_BYTES=1048576, but the gateway's settings need 65536",
    ),
    "gunicorn reachable past its front door": (
        "base/gateway/gateway.env",
        "GATEWAY_HOST=127.0.0.1",
        "GATEWAY_HOST=0.0.0.0",
        _consistency,
        "not on the pod's loopback behind its front door",
    ),
    "liveness probe on gunicorn's own port": (
        "base/gateway/deployment.yaml",
        "              path: /healthz\n              port: 8081",
        "              path: /healthz\n              port: 8000",
        _consistency,
        "gateway livenessProbe is not /healthz on the front door's probe port",
    ),
    "tenants file with a misspelt field": (
        "base/tenants/tenants.toml",
        "requests_per_minute = 120",
        "request_per_minute = 120",
        _consistency,
        "unknown field 'request_per_minute'",
    ),
    "tenants file not mounted in the worker": (
        "base/worker/deployment.yaml",
        "              mountPath: /etc/imagegen/tenants\n",
        "              mountPath: /etc/imagegen/tenant\n",
        _consistency,
        "is not on a required ConfigMap in the worker",
    ),
    "worker left reading the gateways' key file": (
        "base/worker/deployment.yaml",
        "            - name: GATEWAY_API_KEYS_FILE\n              value: \"\"\n",
        "",
        _consistency,
        "the worker would read GATEWAY_API_KEYS_FILE",
    ),
    "image tag that no Dockerfile makes": (
        "base/gateway/deployment.yaml",
        "image: imagegen-gateway:0.1.0-py3.11",
        "image: imagegen-gateway:latest",
        _consistency,
        "imagegen-gateway runs imagegen-gateway:latest",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_copy_is_caught(case: str, tmp_path: Path) -> None:
    relative, old, new, check, expected = BROKEN[case]
    tree = tmp_path / "kubernetes"
    shutil.copytree(kube.KUBERNETES_DIR, tree)
    if check is not _policy:  # checkov on the intact tree is test_checkov_finds_nothing_unexplained
        assert not [
            p for p in check(kube.render(tree, "overlays/gpu", tmp_path), tree) if expected in p
        ]
    _edit(tree, relative, old, new)
    out = tmp_path / "broken"
    out.mkdir()
    problems = check(kube.render(tree, "overlays/gpu", out), tree)
    assert [p for p in problems if expected in p], problems


def test_a_broken_kustomization_does_not_render(tmp_path: Path) -> None:
    tree = tmp_path / "kubernetes"
    shutil.copytree(kube.KUBERNETES_DIR, tree)
    (tree / "base" / "triton" / "pdb.yaml").unlink()
    with pytest.raises(kube.RenderError, match="pdb.yaml"):
        kube.render(tree, "overlays/cpu", tmp_path)


# --- the Prometheus side of it -------------------------------------------------------------------

# Prometheus's kubernetes_sd_config fields, and the roles, as documented.
SD_FIELDS = {
    "role",
    "api_server",
    "kubeconfig_file",
    "namespaces",
    "selectors",
    "attach_metadata",
    "basic_auth",
    "authorization",
    "oauth2",
    "proxy_url",
    "follow_redirects",
    "tls_config",
    "enable_http2",
}
ROLES = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}
# The endpointslice role's meta labels this config may use (Prometheus's documentation), plus
# those of the Service and the Pod it attaches.
ENDPOINTSLICE_LABELS = re.compile(
    r"__meta_kubernetes_(namespace|endpointslice_(name|address_type|port|port_name|port_protocol"
    r"|endpoint_conditions_(ready|serving|terminating)|address_target_(kind|name))"
    r"|service_name|pod_name)"
)


def test_the_kubernetes_scrape_config(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes discovery, so the config is checked with
    each kubernetes_sd_configs swapped for a file_sd_configs; the discovery blocks themselves are
    checked against the documented fields, and the live scaling test runs the relabelling."""
    config = yaml.safe_load((kube.PROMETHEUS_DIR / "kubernetes.yml").read_text())
    assert {job["job_name"] for job in config["scrape_configs"]} == {"gateway", "triton", "worker"}
    for job in config["scrape_configs"]:
        [sd] = job.pop("kubernetes_sd_configs")
        assert set(sd) <= SD_FIELDS and sd["role"] == "endpointslice" and sd["role"] in ROLES
        job["file_sd_configs"] = [{"files": [str(tmp_path / "targets.json")]}]
        for relabel in job["relabel_configs"]:
            for label in relabel.get("source_labels", []):
                assert ENDPOINTSLICE_LABELS.fullmatch(label), label
        assert {"namespace", "pod"} <= {r.get("target_label") for r in job["relabel_configs"]}
    shutil.copytree(kube.PROMETHEUS_DIR / "rules", tmp_path / "rules")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run(
        [require("promtool"), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = len(list((kube.PROMETHEUS_DIR / "rules").glob("*.yml")))
    assert f"SUCCESS: {rules} rule files found" in checked.stdout
