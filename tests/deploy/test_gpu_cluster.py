"""What a first day on a real GPU cluster needs of the manifests, held offline: weights that
arrive (an explicit file-storage class per cloud, a fill Job that really copies, or a claim from
a snapshot), nodes the cluster autoscaler can drain, Guaranteed memory and a priority for
Triton, the GPU container's securityContext as decided in docs/kubernetes.md, and the GPU-node
knobs. Rendered by `kubectl kustomize`, validated by kubernetes-validate and checkov."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import kube
from tests.deploy.overlay import render_with

SHAPES = ("overlays/gpu", "overlays/cpu")
STORAGE_DIR = kube.KUBERNETES_DIR / "storage"
FILL_DIR = kube.KUBERNETES_DIR / "weights-fill"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, kube.Rendered]:
    out = tmp_path_factory.mktemp("day-one")
    return {name: kube.render(kube.KUBERNETES_DIR, name, out) for name in kube.KUSTOMIZATIONS}


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def _claim(rendered: kube.Rendered) -> dict[str, Any]:
    return rendered.get("PersistentVolumeClaim", "imagegen-weights")


# --- weights that arrive -----------------------------------------------------------------------


def test_the_gpu_claim_is_shared_file_storage_of_an_explicit_class(
    rendered: dict[str, kube.Rendered],
) -> None:
    gpu = _claim(rendered["overlays/gpu"])["spec"]
    assert gpu["accessModes"] == ["ReadWriteMany"]
    assert gpu["storageClassName"] == "imagegen-weights"
    assert "dataSource" not in gpu  # a file share starts empty: the fill Job fills it
    cpu = _claim(rendered["overlays/cpu"])["spec"]
    assert cpu["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in cpu


def test_a_storage_class_of_that_name_for_each_big_cloud(
    rendered: dict[str, kube.Rendered], tmp_path: Path
) -> None:
    name = _claim(rendered["overlays/gpu"])["spec"]["storageClassName"]
    files = sorted(STORAGE_DIR.glob("*.yaml"))
    provisioners = set()
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        [storage_class] = docs
        assert storage_class["kind"] == "StorageClass"
        assert storage_class["metadata"]["name"] == name, path.name
        # Kept when the claim goes: refilling 100 GB of weights costs more than keeping them.
        assert storage_class["reclaimPolicy"] == "Retain", path.name
        provisioners.add(storage_class["provisioner"])
        as_rendered = kube.Rendered(path.stem, path, docs)
        for version in kube.KUBERNETES_VERSIONS:
            assert kube.schema_problems(as_rendered, version) == [], path.name
    assert provisioners == {
        "efs.csi.aws.com",  # EKS: Amazon EFS
        "filestore.csi.storage.gke.io",  # GKE: Filestore
        "file.csi.azure.com",  # AKS: Azure Files
    }


def _fill_script() -> str:
    [job] = [d for d in yaml.safe_load_all((FILL_DIR / "job.yaml").read_text()) if d]
    [container] = _pod_spec(job)["containers"]
    shell, flags, script = container["command"]
    assert (shell, flags) == ("sh", "-euc")
    return script


def _image_source() -> str:
    [copy] = re.findall(
        r"^COPY\s+\S+\s+(\S+)$", (FILL_DIR / "weights.Dockerfile").read_text(), re.MULTILINE
    )
    return copy.rstrip("/")


def test_the_fill_job_writes_the_claim_triton_reads_as_triton(
    rendered: dict[str, kube.Rendered],
) -> None:
    job = rendered["weights-fill"].get("Job", "imagegen-weights-fill")
    spec = _pod_spec(job)
    [container] = spec["containers"]
    [mount] = container["volumeMounts"]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "imagegen-weights"
    assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly")
    triton = _pod_spec(rendered["overlays/gpu"].get("Deployment", "imagegen-triton"))
    [triton_mount] = [m for m in triton["containers"][0]["volumeMounts"] if m["name"] == "weights"]
    assert triton_mount["readOnly"] and mount["mountPath"] == triton_mount["mountPath"]
    # The files it writes are Triton's to read; so are the loader's.
    loader = _pod_spec(rendered["weights-loader"].get("Pod", "imagegen-weights-loader"))
    for writer in (spec, loader):
        for key in ("runAsUser", "runAsGroup"):
            assert writer["securityContext"][key] == triton["securityContext"][key]
    # It copies from where weights.Dockerfile puts the weights.
    assert f"cd {_image_source()}\n" in _fill_script()


def _run_fill(source: Path, target: Path) -> subprocess.CompletedProcess[str]:
    script = _fill_script().replace(_image_source(), str(source)).replace("/weights", str(target))
    return subprocess.run(
        ["sh", "-euc", script], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_fill_copies_whole_folders_and_never_overwrites(tmp_path: Path) -> None:
    """The Job's own shell script, run here with the image's folder and the volume swapped for
    temporary ones."""
    image, volume = tmp_path / "image", tmp_path / "volume"
    (image / "diffusion" / "unet").mkdir(parents=True)
    (image / "diffusion" / "unet" / "weights.bin").write_bytes(b"new unet")
    (image / "nsfw").mkdir()
    (image / "nsfw" / "model.onnx").write_bytes(b"onnx")
    volume.mkdir()
    (volume / ".nsfw.partial").mkdir()  # a copy a failed run left half done
    (volume / ".nsfw.partial" / "junk").write_bytes(b"half")

    first = _run_fill(image, volume)
    assert first.returncode == 0, first.stderr
    assert (volume / "diffusion" / "unet" / "weights.bin").read_bytes() == b"new unet"
    assert sorted(p.name for p in (volume / "nsfw").iterdir()) == ["model.onnx"]
    assert not list(volume.glob(".*.partial"))

    (image / "diffusion" / "unet" / "weights.bin").write_bytes(b"other unet")
    second = _run_fill(image, volume)
    assert second.returncode == 0, second.stderr
    assert (volume / "diffusion" / "unet" / "weights.bin").read_bytes() == b"new unet"
    assert "kept" in second.stdout and "diffusion" in second.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run_fill(empty, volume).returncode != 0  # an image without weights fails the Job


def test_the_snapshot_component_makes_a_read_only_claim_from_a_snapshot(tmp_path: Path) -> None:
    rendered = render_with("overlays/gpu", ["components/weights-snapshot"], tmp_path)
    spec = _claim(rendered)["spec"]
    assert spec["accessModes"] == ["ReadOnlyMany"]
    assert spec["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": "imagegen-weights",
    }
    for version in kube.KUBERNETES_VERSIONS:
        assert kube.schema_problems(rendered, version) == []


# --- scheduling, eviction, priority ------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_the_cluster_autoscaler_may_drain_every_node_we_run_on(
    rendered: dict[str, kube.Rendered], shape: str
) -> None:
    for deployment in rendered[shape].objects("Deployment"):
        template = deployment["spec"]["template"]
        empty_dirs = {v["name"] for v in template["spec"]["volumes"] if "emptyDir" in v}
        annotation = (
            template["metadata"]
            .get("annotations", {})
            .get("cluster-autoscaler.kubernetes.io/safe-to-evict-local-volumes", "")
        )
        assert empty_dirs and set(annotation.split(",")) == empty_dirs, deployment["metadata"]


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_is_guaranteed_its_memory_and_outranks_batch_work(
    rendered: dict[str, kube.Rendered], shape: str
) -> None:
    [container] = _pod_spec(rendered[shape].get("Deployment", "imagegen-triton"))["containers"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS
    assert {"cpu", "memory"} <= set(resources["limits"])
    classes = {p["metadata"]["name"]: p for p in rendered[shape].objects("PriorityClass")}
    workloads = [*rendered[shape].objects("Deployment"), *rendered[shape].objects("StatefulSet")]
    assert {w["metadata"]["name"] for w in workloads} >= {"imagegen-redis", "imagegen-worker"}
    for deployment in workloads:
        name = _pod_spec(deployment).get("priorityClassName")
        assert name in classes, deployment["metadata"]["name"]
        # Above the default 0, below the system classes (2000000000 and up), never the default.
        assert 0 < classes[name]["value"] < 1_000_000_000
        assert classes[name]["globalDefault"] is False


def test_gpu_pods_tolerate_the_common_gpu_taints(rendered: dict[str, kube.Rendered]) -> None:
    tolerations = _pod_spec(rendered["overlays/gpu"].get("Deployment", "imagegen-triton"))[
        "tolerations"
    ]
    keys = {(t["key"], t.get("value"), t["effect"]) for t in tolerations}
    assert ("nvidia.com/gpu", None, "NoSchedule") in keys  # GKE, the GPU Operator
    assert ("sku", "gpu", "NoSchedule") in keys  # AKS's documented GPU pool taint


# --- the GPU container's securityContext ------------------------------------------------------


def _triton_security(rendered: kube.Rendered) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = _pod_spec(rendered.get("Deployment", "imagegen-triton"))
    return spec["securityContext"], spec["containers"][0]["securityContext"]


def test_the_gpu_container_security_context_is_as_decided(
    rendered: dict[str, kube.Rendered],
) -> None:
    """docs/kubernetes.md, "The GPU container's securityContext": uid 1000 (the NGC image's
    user) on both shapes; a writable root filesystem on GPU nodes only, where the container
    toolkit's hooks write into it; everything else of the restricted Pod Security Standard."""
    for shape in SHAPES:
        pod, container = _triton_security(rendered[shape])
        assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (1000, 1000, 1000)
        assert pod["runAsNonRoot"] and pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["allowPrivilegeEscalation"] is False
        assert container["capabilities"] == {"drop": ["ALL"]}
        assert container["readOnlyRootFilesystem"] is (shape == "overlays/cpu")
    annotations = rendered["overlays/gpu"].get("Deployment", "imagegen-triton")["metadata"][
        "annotations"
    ]
    assert any(v.startswith("CKV_K8S_22=") for v in annotations.values())
    docs = (kube.ROOT / "docs" / "kubernetes.md").read_text()
    assert "kserve/kserve/pull/5711" in docs and "nvidia-container-toolkit" in docs


def test_the_gpu_nodes_component_is_valid_and_passes_checkov(tmp_path: Path) -> None:
    rendered = render_with("overlays/gpu", ["components/gpu-nodes"], tmp_path)
    spec = _pod_spec(rendered.get("Deployment", "imagegen-triton"))
    assert spec["runtimeClassName"] == "nvidia"
    [term] = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    [expression] = term["matchExpressions"]
    assert expression["key"] == "nvidia.com/gpu.product" and expression["values"]
    for version in kube.KUBERNETES_VERSIONS:
        assert kube.schema_problems(rendered, version) == []
    assert kube.policy_problems(kube.checkov_report(rendered)) == []


def test_a_component_patch_that_misses_its_target_fails_to_render(tmp_path: Path) -> None:
    tree = tmp_path / "kubernetes"
    shutil.copytree(kube.KUBERNETES_DIR, tree)
    patch = tree / "components" / "gpu-nodes" / "triton.yaml"
    patch.write_text(patch.read_text().replace("name: imagegen-triton", "name: imagegen-trition"))
    with pytest.raises(kube.RenderError):
        render_with("overlays/gpu", ["components/gpu-nodes"], tmp_path / "out", tree)
