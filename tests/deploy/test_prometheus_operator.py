"""components/prometheus-operator: the PodMonitors and the PrometheusRule that a
kube-prometheus-stack Prometheus picks up. Validated against the Operator's own CRD schemas
(the pydantic models of PyPI's cloudcoil-models-prometheus-operator, generated from those CRDs;
unknown fields refused), the rule groups held equal to the rule files promtool tests, and the
monitors held to what the raw scrape jobs of deploy/prometheus/kubernetes.yml do."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as operator

from harness import kube
from tests.deploy.overlay import only, render_with

COMPONENT = "components/prometheus-operator"
GROUP = "monitoring.coreos.com/v1"
MODELS: dict[str, type[pydantic.BaseModel]] = {
    "PodMonitor": operator.PodMonitor,
    "ServiceMonitor": operator.ServiceMonitor,
    "PrometheusRule": operator.PrometheusRule,
}
GENERATOR = kube.PROMETHEUS_DIR / "prometheusrule.py"


def crd_problems(doc: dict[str, Any]) -> list[str]:
    """The Operator's schema for the object's kind, with unknown fields refused (the API server
    prunes them silently, so a misspelt field would otherwise just do nothing)."""
    model = MODELS.get(doc["kind"])
    if doc.get("apiVersion") != GROUP or model is None:
        return [f"{doc.get('apiVersion')} {doc['kind']} is not a Prometheus Operator kind here"]
    try:
        # by_name=False: the models also take their Python names (target_label), which the API
        # server does not.
        model.model_validate(doc, extra="forbid", by_alias=True, by_name=False)
    except pydantic.ValidationError as exc:
        return [
            f"{doc['kind']}/{doc['metadata']['name']} {'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in exc.errors()
        ]
    return []


def _custom(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"] == GROUP


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> kube.Rendered:
    return render_with("overlays/gpu", [COMPONENT], tmp_path_factory.mktemp("operator"))


def test_the_component_adds_three_pod_monitors_and_the_rules(rendered: kube.Rendered) -> None:
    added = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in rendered.docs if _custom(d))
    assert added == [
        "PodMonitor/imagegen-gateway",
        "PodMonitor/imagegen-triton",
        "PodMonitor/imagegen-worker",
        "PrometheusRule/imagegen",
    ]
    for doc in filter(_custom, rendered.docs):
        assert doc["metadata"]["namespace"] == "imagegen"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "imagegen"


def test_the_objects_validate_against_the_operators_crds(rendered: kube.Rendered) -> None:
    assert [p for doc in filter(_custom, rendered.docs) for p in crd_problems(doc)] == []


BROKEN = {
    # name: (kind, edit of a copy, a word of the expected message)
    "misspelt spec field": (
        "PodMonitor",
        lambda d: d["spec"].__setitem__("podMetricEndpoints", d["spec"].pop("podMetricsEndpoints")),
        "spec.podMetricEndpoints: Extra inputs are not permitted",
    ),
    "misspelt relabeling field": (
        "PodMonitor",
        lambda d: d["spec"]["podMetricsEndpoints"][0]["relabelings"][1].__setitem__(
            "target_label", d["spec"]["podMetricsEndpoints"][0]["relabelings"][1].pop("targetLabel")
        ),
        "target_label: Extra inputs are not permitted",
    ),
    "misspelt rule field": (
        "PrometheusRule",
        lambda d: d["spec"]["groups"][0]["rules"][0].__setitem__(
            "recorded", d["spec"]["groups"][0]["rules"][0].pop("record")
        ),
        "recorded: Extra inputs are not permitted",
    ),
    "a rule without its expression": (
        "PrometheusRule",
        lambda d: d["spec"]["groups"][0]["rules"][0].pop("expr"),
        "expr: Field required",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_object_fails_the_crd_schema(rendered: kube.Rendered, case: str) -> None:
    kind, edit, expected = BROKEN[case]
    doc = copy.deepcopy(next(d for d in rendered.docs if d["kind"] == kind))
    edit(doc)
    problems = crd_problems(doc)
    assert [p for p in problems if expected in p], problems


@pytest.mark.parametrize("version", kube.KUBERNETES_VERSIONS)
def test_the_rest_is_the_gpu_shape_unchanged_and_valid(
    rendered: kube.Rendered, version: str, tmp_path: Path
) -> None:
    core = only(rendered, lambda d: not _custom(d), tmp_path)
    plain = kube.render(kube.KUBERNETES_DIR, "overlays/gpu", tmp_path)
    assert core.docs == plain.docs
    assert kube.schema_problems(core, version) == []


# --- one copy of the rules ---------------------------------------------------------------------


def _rule_file_groups() -> list[dict[str, Any]]:
    return [
        group
        for path in sorted((kube.PROMETHEUS_DIR / "rules").glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
    ]


def test_the_prometheus_rule_groups_are_the_promtool_tested_rule_files(
    rendered: kube.Rendered,
) -> None:
    rule = rendered.get("PrometheusRule", "imagegen")
    file_groups = _rule_file_groups()
    assert rule["spec"]["groups"] == file_groups
    names = [g["name"] for g in file_groups]
    assert len(names) == len(set(names)), "the Operator wants group names unique in a rule"
    assert any(r.get("record") for g in file_groups for r in g["rules"])
    assert any(r.get("alert") for g in file_groups for r in g["rules"])


def test_the_generated_file_is_up_to_date() -> None:
    checked = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


# --- the monitors scrape what the raw jobs scrape ----------------------------------------------


def _relabelled(endpoint: dict[str, Any]) -> dict[str, Any]:
    """What the endpoint's relabelings do: the job it names, and whether it keeps only ready
    pods."""
    rules = endpoint.get("relabelings", [])
    jobs = [r.get("replacement") for r in rules if r.get("targetLabel") == "job"]
    ready = any(
        r.get("action", "replace").lower() == "keep"
        and r.get("sourceLabels") == ["__meta_kubernetes_pod_ready"]
        and r.get("regex") == "true"
        for r in rules
    )
    return {"job": jobs[-1] if jobs else None, "ready_only": ready}


def test_the_pod_monitors_scrape_what_the_raw_jobs_scrape(rendered: kube.Rendered) -> None:
    config = yaml.safe_load((kube.PROMETHEUS_DIR / "kubernetes.yml").read_text())
    monitors = rendered.objects("PodMonitor")
    jobs = set()
    for job in config["scrape_configs"]:
        [keep] = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
        service_name, port_name, _ready = keep["regex"].split(";")
        service = rendered.get("Service", service_name)
        [port] = [p for p in service["spec"]["ports"] if p["name"] == port_name]
        [deployment] = [
            d
            for d in rendered.objects("Deployment")
            if service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        [monitor] = [
            m
            for m in monitors
            if m["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        ]
        [endpoint] = monitor["spec"]["podMetricsEndpoints"]
        # The same container port (the Service names it as its targetPort), the same job name
        # (the alert rules select on it), only ready pods, as the raw job does.
        assert endpoint["port"] == port["targetPort"], monitor["metadata"]["name"]
        assert endpoint.get("path", "/metrics") == job.get("metrics_path", "/metrics")
        assert _relabelled(endpoint) == {"job": job["job_name"], "ready_only": True}
        jobs.add(job["job_name"])
    assert len(monitors) == len(jobs) == 3


def test_the_rules_select_the_job_names_the_monitors_give() -> None:
    used = set()
    for group in _rule_file_groups():
        for rule in group["rules"]:
            for matcher in re.findall(r'job=~?"([^"]+)"', rule["expr"]):
                used |= set(matcher.split("|"))
    monitors = yaml.safe_load_all(
        (kube.KUBERNETES_DIR / COMPONENT / "podmonitors.yaml").read_text()
    )
    given = {_relabelled(m["spec"]["podMetricsEndpoints"][0])["job"] for m in monitors}
    assert used and used <= given


def test_every_object_carries_the_selector_label_of_kube_prometheus_stack(
    rendered: kube.Rendered,
) -> None:
    releases = {d["metadata"]["labels"].get("release") for d in rendered.docs if _custom(d)}
    assert releases == {"kube-prometheus-stack"}
