"""After `kubectl apply`: is the image service serving on this cluster? One check a line.

    python deploy/kubernetes/smoke.py --api-key "$KEY"        # kubectl's current context
    python deploy/kubernetes/smoke.py --dry-run --gateway URL --gateway-probes URL \
        --triton URL --triton-metrics URL

Run from a checkout of this repository (it reads the model names from model_repository/), with
only Python's standard library and kubectl. The checks, each printed PASS or FAIL:

1. gpu       every ready Triton pod sees a GPU: `nvidia-smi -L` in the pod lists one.
2. models    Triton is ready and so is every model of the repository (through a port-forward to
             one ready Triton pod).
3. gateway   the gateway Service answers /readyz with 200 on its probe port (port-forward to the
             Service's `probes` port; the clients' port does not serve /readyz).
4. generate  one POST /generate round trip (b64_json: nothing is uploaded); the JPEG's MD5 is
             the answer's image_hash.
5. hpa       the three HPAs read a value for their metric, not <unknown>: Triton's and the
             gateways' Pods metrics, the job workers' External one (jobs_outstanding):
             prometheus-adapter, Prometheus and the recording rules are wired (waits up to
             --hpa-timeout).

--dry-run runs here against the local stack (`python -m embedded.stack`; `make test` does,
tests/deploy/test_cluster_smoke.py) with the kubectl parts replaced by what can be checked on
one machine: gpu reads Triton's metrics endpoint (the pod's GPU metrics, nv_gpu_*, are
reported, not required: a CPU has none); models, gateway and generate are the same calls on the
given URLs; hpa checks that the gateway and Triton export the series the HPA metrics are
computed from (Triton's diffusion queue and compute durations, the gateway's in-flight gauge and
the job queue's depth, which its store answers).
Exit status: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = ROOT / "model_repository"
TRITON_LABELS = "app.kubernetes.io/name=triton"
# The HPAs of deploy/kubernetes/base, each of which must read its metric.
HPAS = ("imagegen-triton", "imagegen-gateway", "imagegen-worker")
# The gateway Service's probe port (base/gateway/service.yaml): /healthz, /readyz, /metrics.
GATEWAY_PROBE_PORT = 8081
# What the recording rules of deploy/prometheus/rules/autoscaling.yml read.
TRITON_SIGNAL = re.compile(
    r'^nv_inference_(queue|compute_infer)_duration_us\{[^}]*model="diffusion"', re.MULTILINE
)
GATEWAY_SIGNAL = re.compile(r"^gateway_generate_in_flight(\{[^}]*\})? ", re.MULTILINE)
# The job queue's depth, which a gateway exports only when its store (Redis) answered the scrape.
JOBS_SIGNAL = re.compile(r"^gateway_jobs_queued(\{[^}]*\})? ", re.MULTILINE)


class CheckFailed(Exception):
    """A check's finding; the message says what was seen."""


@dataclass
class Result:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.detail}"


# --- HTTP ---------------------------------------------------------------------------------------


def http(
    url: str,
    body: dict[str, Any] | None = None,
    *,
    timeout: float = 10.0,
    api_key: str | None = None,
) -> tuple[int, bytes]:
    """(status, body) of a GET, or of a POST of `body` as JSON; unreachable raises CheckFailed."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError) as exc:
        raise CheckFailed(f"{url} unreachable ({exc})") from exc


def expected_models(repository: Path = MODEL_REPOSITORY) -> list[str]:
    return sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))


def check_models(triton_url: str) -> str:
    status, _ = http(f"{triton_url}/v2/health/ready")
    if status != 200:
        raise CheckFailed(f"{triton_url}/v2/health/ready answered {status}")
    models = expected_models()
    if not models:
        raise CheckFailed(f"no model in {MODEL_REPOSITORY}: run this from a checkout")
    not_ready = [m for m in models if http(f"{triton_url}/v2/models/{m}/ready")[0] != 200]
    if not_ready:
        raise CheckFailed(f"not ready: {', '.join(not_ready)}")
    return f"Triton and its {len(models)} models ready ({', '.join(models)})"


def check_gateway(gateway_url: str) -> str:
    status, body = http(f"{gateway_url}/readyz", timeout=30)
    if status != 200:
        raise CheckFailed(f"/readyz answered {status}: {body[:300]!r}")
    return "/readyz 200"


def check_generate(gateway_url: str, args: argparse.Namespace) -> str:
    request = {
        "prompt": "a lighthouse on a cliff at dawn",
        "width": args.width,
        "height": args.height,
        "num_inference_steps": args.steps,
        "response_format": "b64_json",
    }
    started = time.monotonic()
    status, body = http(
        f"{gateway_url}/generate", request, timeout=args.generate_timeout, api_key=args.api_key
    )
    took = time.monotonic() - started
    if status != 200:
        raise CheckFailed(f"POST /generate answered {status}: {body[:300]!r}")
    data = json.loads(body)["data"]
    jpeg = base64.b64decode(data["b64_json"])
    if not jpeg.startswith(b"\xff\xd8"):
        raise CheckFailed("the answer's image is not a JPEG")
    if hashlib.md5(jpeg).hexdigest() != data["image_hash"]:
        raise CheckFailed("the JPEG's MD5 is not the answer's image_hash")
    return (
        f"{args.width}x{args.height}, {args.steps} steps: a {len(jpeg)}-byte JPEG in "
        f"{took:.1f} s, nsfw={data.get('nsfw')}"
    )


# --- kubectl ------------------------------------------------------------------------------------


class Kubectl:
    def __init__(self, binary: str, namespace: str, context: str | None) -> None:
        self.base = [binary, "--namespace", namespace]
        if context:
            self.base += ["--context", context]

    def run(self, *args: str, timeout: float = 60) -> str:
        try:
            done = subprocess.run(
                [*self.base, *args], capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CheckFailed(f"kubectl {' '.join(args)}: {exc}") from exc
        if done.returncode != 0:
            raise CheckFailed(f"kubectl {' '.join(args)}: {done.stderr.strip()[:300]}")
        return done.stdout

    def json(self, *args: str) -> dict[str, Any]:
        return json.loads(self.run(*args, "-o", "json"))

    @contextlib.contextmanager
    def port_forward(self, target: str, port: int) -> Iterator[str]:
        """http://127.0.0.1:<local port> forwarded to the target's port, while in the block."""
        process = subprocess.Popen(
            [*self.base, "port-forward", target, f":{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = process.stdout.readline() if process.stdout else ""
            local = forwarded_port(line)
            if local is None:
                error = process.stderr.read()[:300] if process.stderr else ""
                raise CheckFailed(f"kubectl port-forward {target}: {line.strip() or error}")
            yield f"http://127.0.0.1:{local}"
        finally:
            process.terminate()
            process.wait(timeout=10)


def forwarded_port(line: str) -> int | None:
    """The local port of kubectl port-forward's first line ('Forwarding from 127.0.0.1:N -> P')."""
    found = re.match(r"Forwarding from (?:127\.0\.0\.1|\[::1\]):(\d+) -> \d+", line.strip())
    return int(found.group(1)) if found else None


def ready_pods(pods: dict[str, Any]) -> list[str]:
    """Names of the pods of a `kubectl get pods -o json` whose Ready condition is True."""
    return [
        pod["metadata"]["name"]
        for pod in pods.get("items", [])
        if any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in pod.get("status", {}).get("conditions", [])
        )
    ]


def gpus_listed(nvidia_smi_l: str) -> list[str]:
    """The GPUs of `nvidia-smi -L` ('GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)')."""
    return [line for line in nvidia_smi_l.splitlines() if re.match(r"GPU \d+: ", line)]


def metric_values(hpa: dict[str, Any]) -> dict[str, str | None]:
    """Each Pods or External metric of an HPA (`kubectl get hpa -o json`) and the value its
    status reads, None while the HPA shows <unknown>."""
    kinds = {"Pods": "pods", "External": "external"}
    wanted = [
        m[kinds[m["type"]]]["metric"]["name"]
        for m in hpa["spec"].get("metrics", [])
        if m["type"] in kinds
    ]
    current = {}
    for m in hpa.get("status", {}).get("currentMetrics") or []:
        if m.get("type") in kinds:
            status = m[kinds[m["type"]]]
            value = status["current"].get("averageValue", status["current"].get("value"))
            current[status["metric"]["name"]] = value
    return {name: current.get(name) for name in wanted}


def cluster_checks(args: argparse.Namespace) -> list[tuple[str, Callable[[], str]]]:
    kubectl = Kubectl(args.kubectl, args.namespace, args.context)

    def triton_pods() -> list[str]:
        pods = ready_pods(kubectl.json("get", "pods", "-l", TRITON_LABELS))
        if not pods:
            raise CheckFailed(f"no ready pod labelled {TRITON_LABELS}")
        return pods

    def gpu() -> str:
        seen = []
        for pod in triton_pods():
            listed = gpus_listed(kubectl.run("exec", pod, "-c", "triton", "--", "nvidia-smi", "-L"))
            if not listed:
                raise CheckFailed(f"{pod}: nvidia-smi lists no GPU")
            seen.append(f"{pod}: {listed[0]}")
        return "; ".join(seen)

    def models() -> str:
        with kubectl.port_forward(f"pod/{triton_pods()[0]}", 8000) as url:
            return check_models(url)

    def gateway() -> str:
        with kubectl.port_forward("service/imagegen-gateway", GATEWAY_PROBE_PORT) as url:
            return check_gateway(url)

    def generate() -> str:
        with kubectl.port_forward("service/imagegen-gateway", 80) as url:
            return check_generate(url, args)

    def hpa() -> str:
        deadline = time.monotonic() + args.hpa_timeout
        while True:
            values = {name: metric_values(kubectl.json("get", "hpa", name)) for name in HPAS}
            missing = [
                f"{h}/{m}" for h, found in values.items() for m, v in found.items() if v is None
            ]
            if not missing:
                return ", ".join(
                    f"{h} {m}={v}" for h, found in values.items() for m, v in found.items()
                )
            if time.monotonic() > deadline:
                raise CheckFailed(
                    f"<unknown> after {args.hpa_timeout:.0f} s: {', '.join(missing)} (see "
                    'docs/kubernetes.md, "Smoke test")'
                )
            time.sleep(15)

    return [
        ("gpu", gpu),
        ("models", models),
        ("gateway", gateway),
        ("generate", generate),
        ("hpa", hpa),
    ]


# --- dry run ------------------------------------------------------------------------------------


def dry_checks(args: argparse.Namespace) -> list[tuple[str, Callable[[], str]]]:
    probes = args.gateway_probes or args.gateway

    def metrics(url: str) -> str:
        status, body = http(url)
        if status != 200:
            raise CheckFailed(f"{url} answered {status}")
        return body.decode()

    def gpu() -> str:
        text = metrics(args.triton_metrics)
        gpu_series = "nv_gpu_utilization" in text
        return "dry run: no pod to exec into; Triton's metrics endpoint answers, " + (
            "with GPU metrics" if gpu_series else "without GPU metrics (no GPU here)"
        )

    def hpa() -> str:
        if len(set(TRITON_SIGNAL.findall(metrics(args.triton_metrics)))) < 2:
            raise CheckFailed("Triton exports no diffusion queue and compute durations")
        gateway = metrics(f"{probes}/metrics")
        if not GATEWAY_SIGNAL.search(gateway):
            raise CheckFailed("the gateway exports no gateway_generate_in_flight")
        if not JOBS_SIGNAL.search(gateway):
            raise CheckFailed("the gateway exports no gateway_jobs_queued (is its store up?)")
        return (
            "dry run: no HPA; the series the HPA metrics are recorded from are exported "
            "(Triton's diffusion queue/compute durations, gateway_generate_in_flight, "
            "gateway_jobs_queued)"
        )

    return [
        ("gpu", gpu),
        ("models", lambda: check_models(args.triton)),
        ("gateway", lambda: check_gateway(probes)),
        ("generate", lambda: check_generate(args.gateway, args)),
        ("hpa", hpa),
    ]


def run(checks: list[tuple[str, Callable[[], str]]]) -> list[Result]:
    results = []
    for name, check in checks:
        try:
            result = Result(name, True, check())
        except CheckFailed as failed:
            result = Result(name, False, str(failed))
        print(result.line(), flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="against local URLs, no kubectl")
    parser.add_argument("--namespace", default="imagegen")
    parser.add_argument("--context", help="kubectl context (default: the current one)")
    parser.add_argument("--kubectl", default="kubectl")
    parser.add_argument("--gateway", help="dry run: the gateway's URL (its clients' port)")
    parser.add_argument(
        "--gateway-probes", help="dry run: the gateway's probe port URL (default: --gateway)"
    )
    parser.add_argument("--triton", help="dry run: Triton's HTTP URL")
    parser.add_argument("--triton-metrics", help="dry run: Triton's metrics URL")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("IMAGEGEN_API_KEY"),
        help="one of the gateway's API keys (default: $IMAGEGEN_API_KEY)",
    )
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--generate-timeout", type=float, default=300.0)
    parser.add_argument("--hpa-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    if args.dry_run and not (args.gateway and args.triton and args.triton_metrics):
        parser.error("--dry-run needs --gateway, --triton and --triton-metrics")
    results = run(dry_checks(args) if args.dry_run else cluster_checks(args))
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
