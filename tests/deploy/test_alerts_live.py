"""A real Prometheus with our config and rules scrapes a running gateway, a job worker
(`python -m gateway.jobs.worker`) and the session's Triton; uploads are made to fail, and the
upload-failure alert goes pending or firing. The job workers' scaling signal is computed from
what the gateway and the worker really export.

The test's copy of the config differs from deploy/prometheus only where it must: static loopback
targets instead of DNS discovery, 1 s scrape and evaluation intervals, `for:` cut to 1 s. The
alert expressions are the production ones.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from werkzeug.serving import make_server

from embedded.process import free_port
from embedded.redis import JobWorker
from gateway import Settings, create_app
from tests.deploy.tools import require
from tests.gateway.faults import FaultServer

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERT = "GatewayUploadFailureRatio"


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _post_json(url: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _until(what: str, check: Any, timeout: float, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            pytest.fail(f"{what} within {timeout:.0f}s\n{tail}")
        time.sleep(0.5)


@pytest.fixture
def gateway(triton: Any, redis_url: str) -> Iterator[tuple[str, FaultServer]]:
    """The gateway on a free port, uploading to a storage that answers 503 to every PUT; its
    store is the session's Redis (its /metrics reads the job queue from it)."""
    storage = FaultServer(script=[503]).start()
    settings = Settings(
        triton_url=triton.grpc_url,
        triton_metrics_url=triton.metrics_url,
        redis_url=redis_url,
        upload_allowed_hosts=(f"http://{storage.hostport}",),  # plain http is allowed per host
        upload_backoff=(0.05, 0.05, 0.05),
        upload_timeout_s=2.0,
    )
    app = create_app(settings)
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}", storage
    server.shutdown()
    app.extensions["gateway"].triton.close()
    storage.stop()


@pytest.fixture
def worker(triton: Any, redis_url: str, tmp_path: Path) -> Iterator[str]:
    """A job worker on the session's Triton and Redis; its metrics address."""
    port = free_port()
    env = {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_TRITON_URL": triton.grpc_url,
           "GATEWAY_TRITON_METRICS_URL": triton.metrics_url}
    with JobWorker(env=env, metrics_port=port, log_path=tmp_path / "worker.log"):
        yield f"127.0.0.1:{port}"


def _test_config(tmp_path: Path, targets: dict[str, str]) -> Path:
    rules = []
    for path in sorted((PROMETHEUS_DIR / "rules").glob("*.yml")):
        document = yaml.safe_load(path.read_text())
        for group in document["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "1s"
        copy = tmp_path / path.name
        copy.write_text(yaml.safe_dump(document))
        rules.append(str(copy))
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = rules
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        del job["dns_sd_configs"]
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_failing_uploads_raise_the_upload_failure_alert(
    triton: Any, gateway: tuple[str, FaultServer], worker: str, tmp_path: Path
) -> None:
    gateway_address, storage = gateway
    targets = {
        "gateway": gateway_address,
        "triton": f"{triton.host}:{triton.metrics_port}",
        "worker": worker,
    }
    config = _test_config(tmp_path, targets)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        prometheus = subprocess.Popen(
            [
                require("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        def targets_up() -> bool:
            active = _get_json(f"{api}/targets")["data"]["activeTargets"]
            return {t["labels"]["job"] for t in active if t["health"] == "up"} == set(targets)

        _until("every target (gateway, triton, worker) up in Prometheus", targets_up, 60, log)

        def jobs_outstanding() -> list[Any]:
            query = "imagegen:jobs_outstanding"
            return list(_get_json(f"{api}/query?query={query}")["data"]["result"])

        # The worker HPA's series, from the gateway's queue gauge (read from Redis) and the
        # worker's running gauge: nothing queued, nothing running.
        [outstanding] = _until("the jobs-outstanding rule evaluated", jobs_outstanding, 30, log)
        assert float(outstanding["value"][1]) == 0

        def loaded_models() -> int:
            result = _get_json(f"{api}/query?query=count(imagegen_model_info)")["data"]["result"]
            return int(result[0]["value"][1]) if result else 0

        assert _until("Triton's imagegen_model_info scraped", loaded_models, 30, log) == 3

        body = {
            "prompt": "a harbour at dawn", "width": 64, "height": 64, "num_inference_steps": 1,
            "upscale": False, "enable_nsfw_check": False,
        }
        for i in range(6):  # the alert wants at least 5 uploads in its window
            status = _post_json(
                f"http://{gateway_address}/generate", {**body, "s3_prefix": f"{storage.url}/b/{i}.png"}
            )
            assert status == 502
        assert len(storage.requests) == 6 * 4  # every upload was tried four times

        def alert_states() -> dict[str, str]:
            alerts = _get_json(f"{api}/alerts")["data"]["alerts"]
            states = {
                a["labels"]["severity"]: a["state"]
                for a in alerts
                if a["labels"]["alertname"] == ALERT and a["state"] in ("pending", "firing")
            }
            return states if len(states) == 2 else {}

        states = _until(f"{ALERT} pending or firing", alert_states, 60, log)
        assert set(states) == {"warning", "critical"}  # 100 % failures: over both thresholds
        # And past the (shortened) `for:`, firing.
        _until(f"{ALERT} firing", lambda: set(alert_states().values()) == {"firing"}, 30, log)

        def failed_uploads() -> float:
            query = "sum(gateway_uploads_total{result=%22failure%22})"
            return float(_get_json(f"{api}/query?query={query}")["data"]["result"][0]["value"][1])

        _until("Prometheus to count the 6 failed uploads", lambda: failed_uploads() == 6, 10, log)
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(30)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait()
