"""Gateway slots against Triton's capacity, read from the real sources: the gateway's settings
(base/gateway/gateway.env through Settings.from_env), both HPAs of the gpu shape, the Triton
Deployment's instance count and the diffusion model's config.pbtxt. docs/kubernetes.md,
"Gateway slots and Triton capacity", writes the arithmetic out.

- A gateway pod admits WORKERS x MAX_IN_FLIGHT generations; its HPA must add a pod before
  they are all taken (the target, plus the HPA's 10 % tolerance, under the slots).
- To hold Triton at maxReplicas, each pod must see its target queue: one running pass of
  max_batch_size per instance plus `target` passes waiting (the ratio counts passes), past the
  tolerance. The gateways at their maxReplicas must admit that much on their own, or Triton's
  HPA stops short while the gateways refuse (the workers never refuse: their jobs wait).
- Every caller at its maxReplicas, gateways and workers together, should not admit more than
  Triton at maxReplicas can hold (running passes plus max_queue_size): past that, Triton's queue
  refuses what a caller admitted. The queue is the interactive level's, where the gateways'
  calls wait; the workers' batch level has a queue of its own, so counting them against it too
  errs on the safe side.

Every caller of Triton adds its slots: the jobs' workers join `callers()` with their
concurrency (GATEWAY_WORKER_THREADS generations each) x their HPA's maxReplicas, and their HPA
must add a worker before the jobs outstanding outnumber a worker's threads.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from embedded.triton import DEFAULT_REPOSITORY
from gateway.settings import Settings
from gateway.triton.contract import Priority
from harness import kube

# The HPA controller's default --horizontal-pod-autoscaler-tolerance: no change within 10 %.
HPA_TOLERANCE = Fraction(1, 10)


def quantity(value: str | int) -> Fraction:
    """A Kubernetes quantity as the HPA targets use them ("8", "500m", "1.5")."""
    text = str(value)
    if text.endswith("m"):
        return Fraction(text[:-1]) / 1000
    return Fraction(text)


def _pods_target(hpa: dict, metric: str) -> Fraction | None:
    for item in hpa["spec"]["metrics"]:
        if item["type"] == "Pods" and item["pods"]["metric"]["name"] == metric:
            return quantity(item["pods"]["target"]["averageValue"])
    return None


def _external_target(hpa: dict, metric: str) -> Fraction | None:
    for item in hpa["spec"]["metrics"]:
        if item["type"] == "External" and item["external"]["metric"]["name"] == metric:
            return quantity(item["external"]["target"]["averageValue"])
    return None


def _pbtxt(name: str, text: str) -> int:
    found = re.search(rf"^\s*{name}:\s*(\d+)", text, re.MULTILINE)
    if not found:
        raise ValueError(f"{name} not in config.pbtxt")
    return int(found.group(1))


def _queue_size(level: Priority, text: str) -> int:
    """The max_queue_size of one priority level's queue policy."""
    batcher = text_format.Parse(text, model_config_pb2.ModelConfig()).dynamic_batching
    if level not in batcher.priority_queue_policy:
        raise ValueError(f"config.pbtxt has no queue policy for priority level {level}")
    return int(batcher.priority_queue_policy[level].max_queue_size)


@dataclass(frozen=True)
class Capacity:
    gateway_workers: int
    gateway_max_in_flight: int
    gateway_threads: int
    gateway_target: Fraction | None
    gateway_max_replicas: int
    triton_max_replicas: int
    triton_instances: int
    triton_ratio_target: Fraction
    max_batch_size: int
    max_queue_size: int
    worker_threads: int
    worker_target: Fraction | None
    worker_max_replicas: int

    @classmethod
    def read(cls, rendered: kube.Rendered, repository: Path = DEFAULT_REPOSITORY) -> Capacity:
        settings = Settings.from_env(kube.gateway_environment(rendered))
        gateway_hpa = rendered.get("HorizontalPodAutoscaler", "imagegen-gateway")
        triton_hpa = rendered.get("HorizontalPodAutoscaler", "imagegen-triton")
        # The workers share the gateway's ConfigMap: GATEWAY_WORKER_THREADS is read from it.
        worker_hpa = rendered.get("HorizontalPodAutoscaler", "imagegen-worker")
        [triton] = rendered.get("Deployment", "imagegen-triton")["spec"]["template"]["spec"][
            "containers"
        ]
        env = {e["name"]: e.get("value") for e in triton.get("env", [])}
        [ratio_metric] = [m["pods"]["metric"]["name"] for m in triton_hpa["spec"]["metrics"]]
        config = (repository / "diffusion" / "config.pbtxt").read_text()
        return cls(
            gateway_workers=settings.workers,
            gateway_max_in_flight=settings.max_in_flight,
            gateway_threads=settings.threads,
            gateway_target=_pods_target(gateway_hpa, "gateway_generate_in_flight"),
            gateway_max_replicas=gateway_hpa["spec"]["maxReplicas"],
            triton_max_replicas=triton_hpa["spec"]["maxReplicas"],
            triton_instances=int(env["TRITON_INSTANCES_DIFFUSION"]),
            triton_ratio_target=_pods_target(triton_hpa, ratio_metric) or Fraction(0),
            max_batch_size=_pbtxt("max_batch_size", config),
            max_queue_size=_queue_size(Priority.INTERACTIVE, config),
            worker_threads=settings.worker_threads,
            worker_target=_external_target(worker_hpa, "jobs_outstanding"),
            worker_max_replicas=worker_hpa["spec"]["maxReplicas"],
        )

    @property
    def gateway_slots_per_pod(self) -> int:
        return self.gateway_workers * self.gateway_max_in_flight

    def callers(self) -> dict[str, int]:
        """Generations each caller of Triton admits at its maxReplicas: the gateways' slots, and
        the jobs' workers, each holding up to GATEWAY_WORKER_THREADS generations."""
        return {
            "gateways": self.gateway_max_replicas * self.gateway_slots_per_pod,
            "workers": self.worker_max_replicas * self.worker_threads,
        }

    def triton_needs(self) -> Fraction:
        """In flight to hold Triton at maxReplicas on its target: per instance one running pass
        of max_batch_size plus `target` passes waiting, past the HPA's tolerance."""
        per_instance = self.max_batch_size * (1 + self.triton_ratio_target * (1 + HPA_TOLERANCE))
        return self.triton_max_replicas * self.triton_instances * per_instance

    def triton_holds(self) -> int:
        """What Triton at maxReplicas takes before its queue refuses: running plus queued."""
        per_pod = self.triton_instances * self.max_batch_size + self.max_queue_size
        return self.triton_max_replicas * per_pod

    def problems(self) -> list[str]:
        problems = []
        if self.gateway_max_in_flight >= self.gateway_threads:
            problems.append(
                "GATEWAY_MAX_IN_FLIGHT is not below GATEWAY_THREADS: no thread left for probes"
            )
        if self.gateway_target is None:
            problems.append("the gateway HPA does not scale on gateway_generate_in_flight")
        elif self.gateway_target * (1 + HPA_TOLERANCE) >= self.gateway_slots_per_pod:
            problems.append(
                f"the gateway HPA adds a pod at {float(self.gateway_target):g} in flight per pod "
                f"(+10 %), not before its {self.gateway_slots_per_pod} slots are taken"
            )
        if self.worker_target is None:
            problems.append("the worker HPA does not scale on jobs_outstanding")
        elif self.worker_target > self.worker_threads:
            problems.append(
                f"the worker HPA adds a worker at {float(self.worker_target):g} jobs outstanding "
                f"per worker, more than the {self.worker_threads} one worker runs at once"
            )
        if self.worker_threads < self.max_batch_size:
            problems.append(
                f"a worker runs {self.worker_threads} jobs at once, fewer than the diffusion "
                f"model's max_batch_size ({self.max_batch_size}): jobs of one shape cannot fill "
                "a pass"
            )
        # The gateways alone: synchronous traffic must drive Triton to its maximum, or the
        # gateways refuse (429) while Triton stops short. Workers never refuse; their jobs wait.
        gateways = self.callers()["gateways"]
        if gateways < self.triton_needs():
            problems.append(
                f"the gateways admit {gateways} generations at their maxReplicas; Triton at "
                f"{self.triton_max_replicas} replicas needs {float(self.triton_needs()):g} in "
                "flight to reach its target"
            )
        # Everyone at once: what they admit must fit in Triton's running passes and queue.
        admitted = sum(self.callers().values())
        if admitted > self.triton_holds():
            problems.append(
                f"the callers admit {admitted} generations; Triton at "
                f"{self.triton_max_replicas} replicas holds {self.triton_holds()}"
            )
        return problems


@pytest.fixture(scope="module")
def gpu(tmp_path_factory: pytest.TempPathFactory) -> kube.Rendered:
    return kube.render(kube.KUBERNETES_DIR, "overlays/gpu", tmp_path_factory.mktemp("capacity"))


def test_gateway_slots_match_triton_capacity(gpu: kube.Rendered) -> None:
    capacity = Capacity.read(gpu)
    assert capacity.problems() == []
    # What the docs' worked example says, so that a change of any source shows up there too.
    print(
        f"slots per gateway pod {capacity.gateway_slots_per_pod}, at maxReplicas "
        f"{capacity.callers()}; Triton needs {float(capacity.triton_needs()):g}, holds "
        f"{capacity.triton_holds()}"
    )


BROKEN = {
    # name: (file, old, new, a word of the expected problem)
    "the gateway HPA capped as it was": (
        "base/gateway/hpa.yaml",
        "maxReplicas: 16",
        "maxReplicas: 10",
        "Triton at 8 replicas needs",
    ),
    "a target at the slots": (
        "base/gateway/hpa.yaml",
        'averageValue: "8"',
        'averageValue: "11"',
        "not before its 12 slots are taken",
    ),
    "CPU as the only gateway metric": (
        "base/gateway/hpa.yaml",
        "name: gateway_generate_in_flight",
        "name: gateway_requests_in_flight",
        "does not scale on gateway_generate_in_flight",
    ),
    "more Triton replicas, the gateways left as they are": (
        "overlays/gpu/triton-hpa.yaml",
        "maxReplicas: 8",
        "maxReplicas: 12",
        "Triton at 12 replicas needs",
    ),
    "more workers, Triton left as it is": (
        "base/worker/hpa.yaml",
        "maxReplicas: 6",
        "maxReplicas: 9",
        "replicas holds",
    ),
    "a worker target past its threads": (
        "base/worker/hpa.yaml",
        'averageValue: "16"',
        'averageValue: "24"',
        "more than the 16 one worker runs at once",
    ),
    "the worker HPA on something else": (
        "base/worker/hpa.yaml",
        "name: jobs_outstanding",
        "name: jobs_queued",
        "does not scale on jobs_outstanding",
    ),
    "workers too narrow for a batch": (
        "base/gateway/gateway.env",
        "GATEWAY_WORKER_THREADS=16",
        "GATEWAY_WORKER_THREADS=4",
        "fewer than the diffusion model's max_batch_size (8)",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_copy_is_caught(case: str, tmp_path: Path) -> None:
    relative, old, new, expected = BROKEN[case]
    tree = tmp_path / "kubernetes"
    shutil.copytree(kube.KUBERNETES_DIR, tree)
    path = tree / relative
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    problems = Capacity.read(kube.render(tree, "overlays/gpu", tmp_path)).problems()
    assert [p for p in problems if expected in p], problems


def test_gateways_admitting_more_than_triton_holds_are_caught(tmp_path: Path) -> None:
    tree = tmp_path / "kubernetes"
    shutil.copytree(kube.KUBERNETES_DIR, tree)
    env = tree / "base" / "gateway" / "gateway.env"
    env.write_text(
        env.read_text()
        .replace("GATEWAY_THREADS=8", "GATEWAY_THREADS=32", 1)
        .replace("GATEWAY_MAX_IN_FLIGHT=6", "GATEWAY_MAX_IN_FLIGHT=24", 1)
    )
    problems = Capacity.read(kube.render(tree, "overlays/gpu", tmp_path)).problems()
    assert [p for p in problems if "replicas holds" in p], problems


# --- the gateway HPA's metric is served -------------------------------------------------------


def test_the_gateway_hpa_metric_is_served_by_the_adapter(gpu: kube.Rendered) -> None:
    """HPA → prometheus-adapter rule → recording rule → the gateway's own gauge, and the labels
    the adapter maps to pods are set by both scrape paths."""
    hpa = gpu.get("HorizontalPodAutoscaler", "imagegen-gateway")
    [pods_metric] = [
        m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
    ]
    adapter = yaml.safe_load(
        (kube.KUBERNETES_DIR / "prometheus-adapter" / "values.yaml").read_text()
    )
    [rule] = [r for r in adapter["rules"]["custom"] if r["name"]["as"] == pods_metric]
    series = rule["seriesQuery"].split("{", 1)[0]
    assert re.fullmatch(rule["name"]["matches"], series)
    recorded = {
        r["record"]: r["expr"]
        for path in (kube.PROMETHEUS_DIR / "rules").glob("*.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for r in group["rules"]
        if "record" in r
    }
    assert series in recorded
    source = re.findall(r"\b(gateway_[a-z_]+)\b", recorded[series])
    assert source == ["gateway_generate_in_flight"]
    assert f'"{source[0]}"' in (kube.ROOT / "gateway" / "metrics.py").read_text()
    # The adapter maps `namespace` and `pod` to the pod; the raw scrape job sets both (the
    # Operator's PodMonitor sets them itself).
    overrides = set(rule["resources"]["overrides"])
    config = yaml.safe_load((kube.PROMETHEUS_DIR / "kubernetes.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "gateway"]
    assert overrides == {"namespace", "pod"}
    assert overrides <= {r.get("target_label") for r in job["relabel_configs"]}
    # Served per pod, so the HPA averages over the gateway pods it scales.
    assert hpa["spec"]["scaleTargetRef"]["name"] == "imagegen-gateway"
