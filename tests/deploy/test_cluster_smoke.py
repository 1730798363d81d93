"""deploy/kubernetes/smoke.py, the check an operator runs after `kubectl apply`: its dry run
against the real local stack (`python -m embedded.stack` on free ports, as `make serve` runs
it), once passing and once failing; and the parts of its cluster mode that read kubectl's
output, on outputs of the documented shapes (no cluster exists here)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import ModuleType

import pytest

from embedded.process import free_port
from embedded.triton import PROJECT_ROOT

SMOKE = PROJECT_ROOT / "deploy" / "kubernetes" / "smoke.py"
CHECKS = ("gpu", "models", "gateway", "generate", "hpa")


def _smoke_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("imagegen_smoke", SMOKE)
    if spec is None or spec.loader is None:
        raise ImportError(SMOKE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    run_dir = tmp_path_factory.mktemp("smoke")
    ports = {name: free_port() for name in ("http", "grpc", "metrics", "s3", "gateway", "probes")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FRONT_"))}
    # The gateway as a cluster's clients and probes reach it: its front door's two ports.
    env.update(
        FRONT_PORT=str(ports["gateway"]),
        FRONT_PROBE_PORT=str(ports["probes"]),
        PYTHONPATH=str(PROJECT_ROOT),
    )
    log_path = run_dir / "stack.out"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "embedded.stack",
                "--triton-http-port",
                str(ports["http"]),
                "--triton-grpc-port",
                str(ports["grpc"]),
                "--triton-metrics-port",
                str(ports["metrics"]),
                "--s3-port",
                str(ports["s3"]),
                "--run-dir",
                str(run_dir / "run"),
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and process.poll() is None:
                if b"ready: try `make demo`" in log_path.read_bytes():
                    break
                time.sleep(0.5)
            output = log_path.read_text(errors="replace")
            assert process.poll() is None and "ready: try `make demo`" in output, output[-3000:]
            yield ports
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _dry_run(ports: dict[str, int], **overrides: int) -> subprocess.CompletedProcess[str]:
    port = {**ports, **overrides}
    return subprocess.run(
        [
            sys.executable,
            str(SMOKE),
            "--dry-run",
            "--gateway",
            f"http://127.0.0.1:{port['gateway']}",
            "--gateway-probes",
            f"http://127.0.0.1:{port['probes']}",
            "--triton",
            f"http://127.0.0.1:{port['http']}",
            "--triton-metrics",
            f"http://127.0.0.1:{port['metrics']}/metrics",
            # The demo models on 2 cores: small and few steps.
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_dry_run_passes_against_the_local_stack(stack: dict[str, int]) -> None:
    done = _dry_run(stack)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines[: len(CHECKS)]] == [
        f"PASS {name}" for name in CHECKS
    ]
    assert "models ready (diffusion," in done.stdout  # the repository's models, each asked
    assert "64x64, 2 steps: a " in done.stdout  # its MD5 is the answer's image_hash
    assert lines[-1] == f"{len(CHECKS)} passed, 0 failed"


def test_the_dry_run_fails_when_triton_is_not_there(stack: dict[str, int]) -> None:
    done = _dry_run(stack, http=free_port(), metrics=free_port())
    assert done.returncode == 1, done.stdout + done.stderr
    failed = {line.split(":", 1)[0] for line in done.stdout.splitlines() if line.startswith("FAIL")}
    assert failed == {"FAIL gpu", "FAIL models", "FAIL hpa"}, done.stdout
    assert "PASS generate" in done.stdout  # the gateway still reaches its own Triton


# --- the cluster mode's reading of kubectl ------------------------------------------------------


def test_it_reads_kubectls_outputs() -> None:
    smoke = _smoke_module()
    assert smoke.forwarded_port("Forwarding from 127.0.0.1:41235 -> 8000\n") == 41235
    assert smoke.forwarded_port("error: unable to forward port") is None
    listed = (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5f3c7e4a-0d1b-4c2e-9a8f-1b2c3d4e5f60)\n"
        "  MIG 1g.10gb Device 0: (UUID: MIG-1)\n"
    )
    assert smoke.gpus_listed(listed) == [listed.splitlines()[0]]
    assert smoke.gpus_listed("No devices were found\n") == []
    pods = {
        "items": [
            {
                "metadata": {"name": "imagegen-triton-a"},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]},
            },
            {
                "metadata": {"name": "imagegen-triton-b"},
                "status": {"conditions": [{"type": "Ready", "status": "False"}]},
            },
        ]
    }
    assert smoke.ready_pods(pods) == ["imagegen-triton-a"]


def test_it_reads_an_hpa_with_and_without_its_metric() -> None:
    smoke = _smoke_module()
    hpa = {
        "spec": {
            "metrics": [
                {"type": "Pods", "pods": {"metric": {"name": "gateway_generate_in_flight"}}},
                {"type": "Resource", "resource": {"name": "cpu"}},
            ]
        },
        # What `kubectl get hpa -o json` shows while the adapter serves nothing: <unknown>.
        "status": {"currentMetrics": [{"type": ""}, {"type": "Resource", "resource": {}}]},
    }
    assert smoke.metric_values(hpa) == {"gateway_generate_in_flight": None}
    hpa["status"]["currentMetrics"][0] = {
        "type": "Pods",
        "pods": {
            "metric": {"name": "gateway_generate_in_flight"},
            "current": {"averageValue": "3500m"},
        },
    }
    assert smoke.metric_values(hpa) == {"gateway_generate_in_flight": "3500m"}


def test_it_reads_the_worker_hpa_s_external_metric() -> None:
    smoke = _smoke_module()
    assert "imagegen-worker" in smoke.HPAS
    hpa = {
        "spec": {
            "metrics": [{"type": "External", "external": {"metric": {"name": "jobs_outstanding"}}}]
        },
        "status": {"currentMetrics": None},  # no value yet: <unknown>
    }
    assert smoke.metric_values(hpa) == {"jobs_outstanding": None}
    hpa["status"]["currentMetrics"] = [
        {
            "type": "External",
            "external": {
                "metric": {"name": "jobs_outstanding"},
                "current": {"averageValue": "12500m"},
            },
        }
    ]
    assert smoke.metric_values(hpa) == {"jobs_outstanding": "12500m"}
