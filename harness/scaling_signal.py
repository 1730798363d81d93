"""The Triton autoscaling signal, measured: a real Prometheus scrapes a real Triton, computes the
recording rule of deploy/prometheus/rules/autoscaling.yml, and is asked the query that
prometheus-adapter sends for the Triton HPA, while clients drive the diffusion model past what
one instance can serve, then stop.

    python -m harness.scaling_signal               # the shipped rule as is (1 minute windows)
    python -m harness.scaling_signal --window 10s --scrape-interval 1s --load-s 30

Only the Kubernetes API is missing here, so the Prometheus config is deploy/prometheus/kubernetes.yml's
triton job with its `kubernetes_sd_configs` replaced by a file of targets that carry the labels
Prometheus's endpointslice role gives an EndpointSlice endpoint of the headless Service (one ready
pod: the running Triton; one not ready: it must not be scraped). The job's own relabelling then
turns them into the `namespace` and `pod` labels that the adapter's query selects on.
tests/deploy/test_scaling_signal.py runs a short version in `make test`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from embedded.process import ManagedProcess, free_port
from embedded.triton import DEFAULT_REPOSITORY, TritonServer
from embedded.triton import PROJECT_ROOT as ROOT
from gateway.triton.contract import Generation, Model
from harness.tools import MissingTool, system_tool

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"
RULES = PROMETHEUS_DIR / "rules" / "autoscaling.yml"
ADAPTER_VALUES = KUBERNETES_DIR / "prometheus-adapter" / "values.yaml"
TRITON_HPA = KUBERNETES_DIR / "base" / "triton" / "hpa.yaml"
NAMESPACE = "imagegen"
POD = "imagegen-triton-5d8f7c9b4-x2k8q"
UNREADY_POD = "imagegen-triton-5d8f7c9b4-loading"


def saturating_clients() -> int:
    """Callers that keep two passes waiting behind the running one: diffusion batches up to its
    max_batch_size same-shape requests into one pass, so fewer callers than that never queue
    (they all ride in each pass) and the ratio would say, rightly, that nothing waits."""
    text = (DEFAULT_REPOSITORY / Model.DIFFUSION.value / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    return 3 * max(1, config.max_batch_size)


def quantity(value: str | float) -> float:
    """A Kubernetes quantity as the HPA reads it ("1", "500m", "1.5")."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def hpa_target() -> float:
    """The Triton HPA's target for the queue:compute ratio, from the shipped manifest."""
    hpa = yaml.safe_load(TRITON_HPA.read_text())
    [metric] = hpa["spec"]["metrics"]
    return quantity(metric["pods"]["target"]["averageValue"])


def adapter_rule() -> dict[str, Any]:
    """The adapter rule that serves the Triton HPA's metric (the gateways' is another)."""
    [metric] = yaml.safe_load(TRITON_HPA.read_text())["spec"]["metrics"]
    served = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    [rule] = [r for r in served if r["name"]["as"] == metric["pods"]["metric"]["name"]]
    return rule


def adapter_query(namespace: str, pods: list[str]) -> str:
    """The PromQL prometheus-adapter sends for a Pods metric of these pods: its metricsQuery
    template filled in as the adapter does (series name, label matchers, group by pod)."""
    rule = adapter_rule()
    series = rule["seriesQuery"].split("{", 1)[0]
    overrides = rule["resources"]["overrides"]
    namespace_label = next(k for k, v in overrides.items() if v["resource"] == "namespace")
    pod_label = next(k for k, v in overrides.items() if v["resource"] == "pod")
    matchers = f'{namespace_label}="{namespace}",{pod_label}=~"{"|".join(pods)}"'
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", pod_label)
    )


def endpointslice_target(address: str, pod: str, ready: bool) -> dict[str, Any]:
    """A file_sd target group with the meta labels of Prometheus's endpointslice role for one
    endpoint of the headless Triton Service's `metrics` port."""
    return {
        "targets": [address],
        "labels": {
            "__meta_kubernetes_namespace": NAMESPACE,
            "__meta_kubernetes_service_name": "imagegen-triton",
            "__meta_kubernetes_endpointslice_name": "imagegen-triton-abcde",
            "__meta_kubernetes_endpointslice_port_name": "metrics",
            "__meta_kubernetes_endpointslice_port": address.rsplit(":", 1)[1],
            "__meta_kubernetes_endpointslice_port_protocol": "TCP",
            "__meta_kubernetes_endpointslice_endpoint_conditions_ready": str(ready).lower(),
            "__meta_kubernetes_endpointslice_address_target_kind": "Pod",
            "__meta_kubernetes_endpointslice_address_target_name": pod,
            "__meta_kubernetes_pod_name": pod,
        },
    }


def window_rules(window: str) -> dict[str, Any]:
    """The shipped recording rule, its rate windows set to `window` (unchanged for 1m)."""
    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule["expr"] = re.sub(r"\[1m\]", f"[{window}]", rule["expr"])
    return document


def prometheus_config(workdir: Path, triton_metrics: str, window: str, interval: str) -> Path:
    """deploy/prometheus/kubernetes.yml's triton job on a file of endpointslice-shaped targets."""
    config = yaml.safe_load((PROMETHEUS_DIR / "kubernetes.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "triton"]
    workdir.mkdir(parents=True, exist_ok=True)
    targets = workdir / "triton-targets.json"
    unready = f"127.0.0.1:{free_port()}"  # nothing listens: scraping it would read up=0
    targets.write_text(
        json.dumps(
            [
                endpointslice_target(triton_metrics, POD, ready=True),
                endpointslice_target(unready, UNREADY_POD, ready=False),
            ]
        )
    )
    del job["kubernetes_sd_configs"]
    job["file_sd_configs"] = [{"files": [str(targets)]}]
    config["scrape_configs"] = [job]
    config["global"].update(
        scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval
    )
    rules = workdir / "autoscaling.yml"
    rules.write_text(yaml.safe_dump(window_rules(window)))
    config["rule_files"] = [str(rules)]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Prometheus(ManagedProcess):
    binary: str = ""
    config: Path = Path()
    workdir: Path = Path()
    port: int = field(default_factory=free_port)
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    name = "prometheus"

    def command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/-/ready"

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())["data"]

    def query(self, promql: str) -> dict[str, float]:
        """Instant query: the value of each series by its `pod` label."""
        return {
            r["metric"].get("pod", ""): float(r["value"][1])
            for r in self.api("query", query=promql)["result"]
        }

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]


class Load:
    """`clients` threads, each calling the txt2img ensemble (what the gateway calls) back to back
    over gRPC until stopped: with one diffusion instance, all but the requests of the running pass
    wait in its queue."""

    def __init__(self, grpc_url: str, clients: int, size: int, steps: int) -> None:
        self.grpc_url, self.clients, self.size, self.steps = grpc_url, clients, size, steps
        self.done = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _client(self, index: int) -> None:
        client = grpcclient.InferenceServerClient(self.grpc_url)
        inputs = Generation(
            prompt="a lighthouse at dusk", width=self.size, height=self.size, steps=self.steps,
            seed=index,
        ).inputs()
        try:
            while not self._stop.is_set():
                try:
                    client.infer(Model.TXT2IMG.value, inputs, client_timeout=120)
                except InferenceServerException as exc:
                    with self._lock:
                        self.errors.append(str(exc))
                    continue
                with self._lock:
                    self.done += 1
        finally:
            client.close()

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(self.clients)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(150)


@dataclass
class Sample:
    t: float
    phase: str
    ratio: float | None  # the HPA's view: the average over the pods the adapter returned
    done: int


@dataclass
class Measurement:
    target: float
    samples: list[Sample]
    scraped: list[str]  # `pod` labels of the targets Prometheus scrapes
    dropped: int  # targets relabelling dropped (the not-ready endpoint)
    errors: list[str]

    def values(self, phase: str) -> list[float]:
        return [s.ratio for s in self.samples if s.phase == phase and s.ratio is not None]

    def first_time(self, phase: str, above: bool) -> float | None:
        start = next((s.t for s in self.samples if s.phase == phase), None)
        for s in self.samples:
            if s.phase == phase and s.ratio is not None and (s.ratio > self.target) == above:
                return s.t - (start or 0.0)
        return None


@contextmanager
def prometheus_on(
    binary: str, workdir: Path, triton_metrics: str, window: str, interval: str
) -> Iterator[Prometheus]:
    config = prometheus_config(workdir, triton_metrics, window, interval)
    server = Prometheus(
        binary=binary, config=config, workdir=workdir, log_path=workdir / "prometheus.log"
    )
    with server:
        yield server


def measure(
    prometheus: Prometheus,
    grpc_url: str,
    *,
    clients: int,
    load_s: float,
    cool_s: float,
    sample_s: float,
    size: int = 64,
    steps: int = 2,
    enough_above: int | None = None,
    out: Any = sys.stdout,
) -> Measurement:
    """Wait until the series exists, load for `load_s` (or, with `enough_above`, only until that
    many samples in a row were above the target), then stop and watch for up to `cool_s` (less
    once the ratio is back below the target); one sample every `sample_s`."""
    target = hpa_target()
    query = adapter_query(NAMESPACE, [POD, UNREADY_POD])
    print(f"HPA target: {target:g}; adapter query: {query}", file=out, flush=True)

    def ratio() -> float | None:
        values = prometheus.query(query)
        return sum(values.values()) / len(values) if values else None

    deadline = time.monotonic() + 60
    while ratio() is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no value for {query} within 60 s; see {prometheus.log_path}")
        time.sleep(0.5)

    samples: list[Sample] = []
    load = Load(grpc_url, clients, size, steps)
    start = time.monotonic()

    def sample(phase: str) -> Sample:
        taken = Sample(round(time.monotonic() - start, 1), phase, ratio(), load.done)
        samples.append(taken)
        shown = "-" if taken.ratio is None else f"{taken.ratio:7.3f}"
        mark = "above" if taken.ratio is not None and taken.ratio > target else "below"
        print(
            f"t={taken.t:6.1f}s  {phase:<4}  ratio={shown}  ({mark} target {target:g})  "
            f"generations done={taken.done}",
            file=out,
            flush=True,
        )
        return taken

    load.start()
    try:
        above = 0
        while time.monotonic() - start < load_s:
            taken = sample("load")
            above = above + 1 if taken.ratio is not None and taken.ratio > target else 0
            if enough_above is not None and above >= enough_above:
                break
            time.sleep(sample_s)
    finally:
        load.stop()
    print(f"load stopped after {load.done} generations", file=out, flush=True)
    stopped = time.monotonic()
    while time.monotonic() - stopped < cool_s:
        taken = sample("cool")
        if (
            taken.ratio is not None
            and taken.ratio < target
            and taken.t - (stopped - start) > sample_s
        ):
            break
        time.sleep(sample_s)

    active = prometheus.targets()
    dropped = prometheus.api("targets", state="dropped")["droppedTargets"]
    return Measurement(
        target=target,
        samples=samples,
        scraped=[t["labels"].get("pod", "") for t in active],
        dropped=len(dropped),
        errors=load.errors,
    )


def summary(result: Measurement) -> str:
    load, cool = result.values("load"), result.values("cool")
    up = result.first_time("load", above=True)
    down = result.first_time("cool", above=False)
    return (
        f"target {result.target:g}; under load max {max(load, default=float('nan')):.3f}, "
        f"median {sorted(load)[len(load) // 2] if load else float('nan'):.3f}; "
        f"above the target {'never' if up is None else f'{up:.0f} s'} after the load started; "
        f"after it stopped, last {cool[-1] if cool else float('nan'):.3f}, below the target "
        f"{'never' if down is None else f'{down:.0f} s'} later; scraped pods {result.scraped}, "
        f"dropped targets {result.dropped}; errors {len(result.errors)}"
    )


def main(argv: list[str] | None = None) -> int:
    from export.demo_models import build

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", default="1m", help="rate window of the rule (shipped: 1m)")
    parser.add_argument("--scrape-interval", default="5s", help="scrape and evaluation interval")
    parser.add_argument("--clients", type=int, default=saturating_clients(),
                        help="concurrent callers (default: 3 passes, 3 x diffusion's max_batch_size)")
    parser.add_argument("--load-s", type=float, default=180, help="seconds of load")
    parser.add_argument("--cool-s", type=float, default=180, help="longest wait after the load")
    parser.add_argument("--sample-s", type=float, default=5, help="seconds between samples")
    parser.add_argument("--size", type=int, default=64, help="image width and height")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps")
    args = parser.parse_args(argv)

    try:
        binary = system_tool("prometheus")
    except MissingTool as missing:
        parser.error(str(missing))
    build()
    with tempfile.TemporaryDirectory(prefix="scaling-signal-") as tmp:
        workdir = Path(tmp)
        triton = TritonServer.on_free_ports(DEFAULT_REPOSITORY, workdir / "triton")
        try:
            metrics = f"{triton.host}:{triton.metrics_port}"
            with prometheus_on(
                binary, workdir / "prometheus", metrics, args.window, args.scrape_interval
            ) as prom:
                result = measure(
                    prom,
                    triton.grpc_url,
                    clients=args.clients,
                    load_s=args.load_s,
                    cool_s=args.cool_s,
                    sample_s=args.sample_s,
                    size=args.size,
                    steps=args.steps,
                )
        finally:
            triton.stop()
    print(summary(result))
    load, cool = result.values("load"), result.values("cool")
    ok = bool(load and max(load) > result.target and cool and cool[-1] < result.target)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
