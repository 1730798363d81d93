"""The rendered NetworkPolicies, evaluated: a small evaluator of the NetworkPolicy API's rules
(https://kubernetes.io/docs/concepts/services-networking/network-policies/) answers whether a
connection from one pod to a pod or an address, on a port, is admitted. No CNI runs here, so
this is the API's meaning, not an enforcement test; what the cluster's own DNS answers on is
the part the first day on a real cluster needed: kube-dns/CoreDNS pods, NodeLocal DNSCache
(169.254.20.10) and GKE Cloud DNS (169.254.169.254), with link-local closed to everything else.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness import kube

NAMESPACE = "imagegen"


@dataclass(frozen=True)
class Peer:
    """A pod (namespace, labels, named container ports) or, with `ip`, an address outside the
    cluster's pods (a host-network cache, the metadata server, the internet)."""

    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    ip: str | None = None

    @property
    def namespace_labels(self) -> dict[str, str]:
        # What the API server sets on every namespace.
        return {"kubernetes.io/metadata.name": self.namespace} if self.namespace else {}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions, all of them; {} selects everything."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _peer_matches(rule_peer: dict[str, Any], peer: Peer, policy_namespace: str) -> bool:
    if "ipBlock" in rule_peer:
        if peer.ip is None:
            return False
        address = ipaddress.ip_address(peer.ip)
        block = rule_peer["ipBlock"]
        network = ipaddress.ip_network(block["cidr"])
        if address.version != network.version or address not in network:
            return False
        return not any(
            address in ipaddress.ip_network(e)
            for e in block.get("except", [])
            if ipaddress.ip_network(e).version == address.version
        )
    if peer.namespace is None:  # an address, not a pod: only ipBlocks match it
        return False
    if "namespaceSelector" in rule_peer:
        if not selects(rule_peer["namespaceSelector"], peer.namespace_labels):
            return False
    elif peer.namespace != policy_namespace:  # a podSelector alone: the policy's namespace
        return False
    return selects(rule_peer.get("podSelector", {}), peer.labels)


def _port_matches(rule_port: dict[str, Any], target: Peer, port: int, protocol: str) -> bool:
    if rule_port.get("protocol", "TCP") != protocol:
        return False
    wanted = rule_port.get("port")
    if wanted is None:
        return True
    if isinstance(wanted, str):  # a named port: the destination pod's container port
        return target.ports.get(wanted) == port
    return wanted <= port <= rule_port.get("endPort", wanted)


def admitted(
    policies: list[dict[str, Any]],
    source: Peer,
    destination: Peer,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether the policies let `source` open a connection to `destination`: its egress side
    (if `source` is a pod) and its ingress side (if `destination` is a pod) must both allow it.
    A side with no policy selecting that pod for that direction allows everything."""

    def side(pod: Peer, direction: str, other: Peer) -> bool:
        key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        selecting = [
            p
            for p in policies
            if p["metadata"].get("namespace") == pod.namespace
            and selects(p["spec"]["podSelector"], pod.labels)
            and direction
            in p["spec"].get(
                "policyTypes", ["Ingress"] + (["Egress"] if "egress" in p["spec"] else [])
            )
        ]
        if not selecting:
            return True
        return any(
            (
                not rule.get(peers_key)
                or any(
                    _peer_matches(r, other, policy["metadata"]["namespace"])
                    for r in rule[peers_key]
                )
            )
            and (
                not rule.get("ports")
                or any(_port_matches(r, destination, port, protocol) for r in rule["ports"])
            )
            for policy in selecting
            for rule in policy["spec"].get(key, [])
        )

    egress_ok = source.namespace is None or side(source, "Egress", destination)
    ingress_ok = destination.namespace is None or side(destination, "Ingress", source)
    return egress_ok and ingress_ok


# --- the pods and peers of this service ---------------------------------------------------------


def _pod(rendered: kube.Rendered, deployment: str, kind: str = "Deployment") -> Peer:
    template = rendered.get(kind, deployment)["spec"]["template"]
    return Peer(
        namespace=NAMESPACE,
        labels=template["metadata"]["labels"],
        # The pod's ports, whichever of its containers declares them (the gateway's front door).
        ports={
            p["name"]: p["containerPort"]
            for container in template["spec"]["containers"]
            for p in container.get("ports", [])
        },
    )


KUBE_DNS = Peer("kube-system", {"k8s-app": "kube-dns", "pod-template-hash": "5d78c9869d"})
COREDNS_CHART = Peer("kube-system", {"k8s-app": "coredns", "app.kubernetes.io/name": "coredns"})
NODE_LOCAL_DNS = Peer(ip="169.254.20.10")
METADATA_SERVER = Peer(ip="169.254.169.254")  # GKE Cloud DNS's resolver, and cloud metadata
STORAGE = Peer(ip="52.95.110.1")  # an object store's public address
PROMETHEUS = Peer(
    "monitoring",
    {"app.kubernetes.io/name": "prometheus", "prometheus": "kube-prometheus-stack-prometheus"},
)


@pytest.fixture(scope="module", params=sorted(k for k in kube.KUSTOMIZATIONS if "overlays/" in k))
def rendered(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> kube.Rendered:
    return kube.render(kube.KUBERNETES_DIR, request.param, tmp_path_factory.mktemp("netpol"))


def _policies(rendered: kube.Rendered) -> list[dict[str, Any]]:
    return rendered.objects("NetworkPolicy")


@pytest.mark.parametrize("protocol", ["UDP", "TCP"])
@pytest.mark.parametrize(
    "resolver",
    [KUBE_DNS, COREDNS_CHART, NODE_LOCAL_DNS, METADATA_SERVER],
    ids=["kube-dns pod", "CoreDNS chart pod", "NodeLocal DNSCache", "GKE Cloud DNS"],
)
def test_a_gateway_pod_reaches_dns(rendered: kube.Rendered, resolver: Peer, protocol: str) -> None:
    gateway = _pod(rendered, "imagegen-gateway")
    assert admitted(_policies(rendered), gateway, resolver, 53, protocol)


@pytest.mark.parametrize(
    ("destination", "port"),
    [
        (METADATA_SERVER, 443),  # link-local: cloud credentials, never
        (METADATA_SERVER, 80),
        (NODE_LOCAL_DNS, 443),
        (Peer(ip="8.8.8.8"), 53),  # no resolver of its own choosing: exfiltration over DNS
        (Peer("default", {"k8s-app": "kube-dns"}), 53),  # the labels alone, elsewhere
        (KUBE_DNS, 443),
        (Peer(ip="fe80::1"), 443),
    ],
    ids=lambda v: getattr(v, "ip", None) or getattr(v, "namespace", None) or str(v),
)
def test_a_gateway_pod_reaches_nothing_else_there(
    rendered: kube.Rendered, destination: Peer, port: int
) -> None:
    gateway = _pod(rendered, "imagegen-gateway")
    assert not admitted(_policies(rendered), gateway, destination, port)


def test_the_service_paths_are_open(rendered: kube.Rendered) -> None:
    policies = _policies(rendered)
    gateway, triton = _pod(rendered, "imagegen-gateway"), _pod(rendered, "imagegen-triton")
    assert admitted(policies, gateway, STORAGE, 443)  # presigned uploads, NVIDIA's API
    for port in ("grpc", "metrics"):
        assert admitted(policies, gateway, triton, triton.ports[port])
    # Triton's HTTP listens on the pod's loopback only (the drain supervisor's): no port of it.
    assert "http" not in triton.ports
    # Prometheus as kube-prometheus-stack runs it scrapes both (the PodMonitors' ports): the
    # gateway on its front door's probe port, which nothing else in the namespace reaches.
    assert admitted(policies, PROMETHEUS, triton, triton.ports["metrics"])
    assert admitted(policies, PROMETHEUS, gateway, gateway.ports["probes"])
    assert not admitted(
        policies, Peer(NAMESPACE, {"app.kubernetes.io/name": "debug"}), gateway, gateway.ports["probes"]
    )
    # Triton reaches nothing, DNS included: its weights are on a volume, HF_HUB_OFFLINE is set.
    for destination, port in ((KUBE_DNS, 53), (NODE_LOCAL_DNS, 53), (STORAGE, 443)):
        assert not admitted(policies, triton, destination, port)
    # Nothing else in the namespace reaches Triton.
    stranger = Peer(NAMESPACE, {"app.kubernetes.io/name": "debug"})
    assert not admitted(policies, stranger, triton, triton.ports["grpc"])


def test_the_job_paths_are_open_and_nothing_else(rendered: kube.Rendered) -> None:
    policies = _policies(rendered)
    gateway, triton = _pod(rendered, "imagegen-gateway"), _pod(rendered, "imagegen-triton")
    worker = _pod(rendered, "imagegen-worker")
    redis = _pod(rendered, "imagegen-redis", "StatefulSet")
    stranger = Peer(NAMESPACE, {"app.kubernetes.io/name": "debug"})
    # The worker: Triton's gRPC, Redis, DNS wherever the cluster answers it, HTTPS out
    # (storage, webhook receivers, NVIDIA's API).
    assert admitted(policies, worker, triton, triton.ports["grpc"])
    assert admitted(policies, worker, redis, redis.ports["redis"])
    assert admitted(policies, worker, STORAGE, 443)
    for resolver in (KUBE_DNS, COREDNS_CHART, NODE_LOCAL_DNS, METADATA_SERVER):
        for protocol in ("UDP", "TCP"):
            assert admitted(policies, worker, resolver, 53, protocol)
    # ...and nothing else: not the metadata server's credentials, not a webhook on plain http,
    # not Triton's metrics, not the gateways.
    for destination, port in (
        (METADATA_SERVER, 80),
        (METADATA_SERVER, 443),
        (Peer(ip="fe80::1"), 443),
        (STORAGE, 80),
        (Peer(ip="8.8.8.8"), 53),
        (triton, triton.ports["metrics"]),
        (gateway, gateway.ports["http"]),
    ):
        assert not admitted(policies, worker, destination, port), destination
    # Triton's gRPC: the gateways and the workers, no one else; its metrics are not the workers'.
    assert admitted(policies, gateway, triton, triton.ports["grpc"])
    assert not admitted(policies, stranger, triton, triton.ports["grpc"])
    # Redis: the gateways and the workers on its port; not Prometheus, not a stranger, not
    # Triton. Redis itself reaches nothing, DNS included.
    assert admitted(policies, gateway, redis, redis.ports["redis"])
    for source in (PROMETHEUS, stranger, triton):
        assert not admitted(policies, source, redis, redis.ports["redis"]), source
    for destination, port in ((KUBE_DNS, 53), (STORAGE, 443), (triton, triton.ports["grpc"])):
        assert not admitted(policies, redis, destination, port)
    # The worker's metrics: Prometheus only.
    assert admitted(policies, PROMETHEUS, worker, worker.ports["metrics"])
    for source in (stranger, gateway):
        assert not admitted(policies, source, worker, worker.ports["metrics"])


def test_the_evaluator_refuses_what_the_old_dns_rule_refused(rendered: kube.Rendered) -> None:
    """The DNS rule with only its pod selector (as before NodeLocal DNSCache was known): the
    node-local cache and Cloud DNS are refused, kube-dns still admitted. The evaluator can say
    no."""
    policies = copy.deepcopy(_policies(rendered))
    gateway_policy = next(p for p in policies if p["metadata"]["name"] == "imagegen-gateway")
    [dns_rule] = [
        r
        for r in gateway_policy["spec"]["egress"]
        if any(p.get("port") == 53 for p in r.get("ports", []))
    ]
    dns_rule["to"] = [peer for peer in dns_rule["to"] if "ipBlock" not in peer]
    gateway = _pod(rendered, "imagegen-gateway")
    assert admitted(policies, gateway, KUBE_DNS, 53, "UDP")
    assert not admitted(policies, gateway, NODE_LOCAL_DNS, 53, "UDP")
    assert not admitted(policies, gateway, METADATA_SERVER, 53, "UDP")


def test_the_one_off_pods_have_no_network(tmp_path: Path) -> None:
    for name in ("weights-loader", "weights-fill"):
        rendered = kube.render(kube.KUBERNETES_DIR, name, tmp_path)
        [pod_labels] = [
            (d["spec"]["template"]["metadata"] if d["kind"] == "Job" else d["metadata"])["labels"]
            for d in rendered.docs
            if d["kind"] in ("Pod", "Job")
        ]
        pod = Peer(NAMESPACE, pod_labels)
        policies = _policies(rendered)
        for destination, port in ((KUBE_DNS, 53), (STORAGE, 443), (METADATA_SERVER, 80)):
            assert not admitted(policies, pod, destination, port), name
        assert not admitted(policies, Peer(NAMESPACE, {"app": "x"}), pod, 8080), name
