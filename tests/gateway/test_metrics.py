"""The gateway's metrics: fixed vocabularies, the stages of /generate, requests in flight, and
the totals under gunicorn with two workers (prometheus_client's multi-process mode)."""

from __future__ import annotations

import inspect
import os
import random
import re
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from embedded.process import free_port
from gateway import Settings
from gateway.metrics import (
    NSFW_OUTCOMES,
    UPLOAD_OUTCOMES,
    UPLOAD_RESULTS,
    Metrics,
    NullMetrics,
    Recorder,
)
from gateway.vocabulary import (
    HTTP_METHODS,
    OTHER_METHOD,
    ApiOutcome,
    AssetResult,
    DeepfakeStatus,
    FailoverReason,
    ReplicaState,
    TritonOutcome,
    UploadOutcome,
    UploadVerdict,
)
from tests.gateway.faults import HANG, FaultServer

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def test_fixed_vocabularies_exist_at_zero_before_anything_happens() -> None:
    text = Metrics().render().decode()
    for outcome in UPLOAD_OUTCOMES:
        assert value(text, "gateway_upload_attempts_total", outcome=outcome) == 0
    for result, status_class in UPLOAD_RESULTS:
        assert value(text, "gateway_uploads_total", result=result, status_class=status_class) == 0
    for status in NSFW_OUTCOMES:
        assert value(text, "gateway_nsfw_checks_total", status=status) == 0
    assert value(text, "gateway_generate_in_flight") == 0


def test_nsfw_outcomes_and_only_real_scores_in_the_histogram() -> None:
    metrics = Metrics()
    metrics.nsfw_checked("ok", 0.03)
    metrics.nsfw_checked("ok", 0.97)
    metrics.nsfw_checked("timeout", 1.0)
    metrics.nsfw_checked("surprise", 1.0)  # anything unknown from the model counts as an error
    metrics.nsfw_checked(None, None)
    text = metrics.render().decode()
    assert value(text, "gateway_nsfw_checks_total", status="ok") == 2
    assert value(text, "gateway_nsfw_checks_total", status="timeout") == 1
    assert value(text, "gateway_nsfw_checks_total", status="error") == 1
    assert value(text, "gateway_nsfw_checks_total", status="disabled") == 1
    assert value(text, "gateway_nsfw_score_count") == 2
    assert value(text, "gateway_nsfw_score_bucket", le="0.05") == 1
    assert value(text, "gateway_nsfw_score_sum") == 1.0


def test_metrics_and_the_null_recorder_offer_every_method_of_a_recorder() -> None:
    """The clients call a `Recorder`: the app's Metrics and the default NullMetrics must both
    take every call, with the same parameters."""
    methods = [name for name in vars(Recorder) if not name.startswith("_")]
    assert "upload_finished" in methods and "triton_called" in methods
    for name in methods:
        wanted = inspect.signature(getattr(Recorder, name))
        assert inspect.signature(getattr(Metrics, name)) == wanted, name
        assert inspect.signature(getattr(NullMetrics, name)) == wanted, name


def test_the_clients_record_through_their_recorder() -> None:
    metrics = Metrics()
    metrics.upload_attempted(UploadOutcome.HTTP_5XX, retry=False)
    metrics.upload_attempted(UploadOutcome.OK, retry=True)
    metrics.upload_finished(UploadVerdict.SUCCESS, "2xx")
    metrics.triton_called("txt2img", TritonOutcome.QUEUE_TIMEOUT)
    metrics.triton_retried(FailoverReason.STOPPING)
    metrics.triton_addresses_found([ReplicaState.READY, ReplicaState.NOT_READY, ReplicaState.READY])
    metrics.deepfake_checked(DeepfakeStatus.NO_FACE, 0.3)
    metrics.deepfake_api_called(ApiOutcome.HTTP_429)
    metrics.deepfake_asset_sent(AssetResult.TIMEOUT)
    text = metrics.render().decode()
    assert value(text, "gateway_upload_attempts_total", outcome="http_5xx") == 1
    assert value(text, "gateway_upload_attempts_total", outcome="ok") == 1
    assert value(text, "gateway_upload_retries_total") == 1
    assert value(text, "gateway_uploads_total", result="success", status_class="2xx") == 1
    assert value(text, "gateway_triton_requests_total", model="txt2img", outcome="queue_timeout") == 1
    assert value(text, "gateway_triton_retries_total", reason="stopping") == 1
    assert value(text, "gateway_triton_addresses", state="ready") == 2
    assert value(text, "gateway_triton_addresses", state="not_ready") == 1
    assert value(text, "gateway_deepfake_checks_total", status="no_face") == 1
    assert value(text, "gateway_moderation_duration_seconds_count", signal="deepfake") == 1
    assert value(text, "gateway_deepfake_api_attempts_total", outcome="http_429") == 1
    assert value(text, "gateway_deepfake_assets_total", result="timeout") == 1


def test_stages_and_in_flight_of_one_generate(
    make_app: Any, triton_settings: Settings, fault_server: FaultServer
) -> None:
    """While storage holds the upload, the request is in flight; afterwards every stage has one
    sample, the upload's at least as long as storage held it."""
    fault_server.set_script(HANG)  # until released: then it drops the connection, unanswered
    # Only the release ends the upload: no client timeout runs out while the test looks.
    app = make_app(triton_settings.replace(upload_timeout_s=60, upload_backoff=()))
    body = {
        "prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 1,
        "upscale": False, "enable_nsfw_check": True, "s3_prefix": f"{fault_server.url}/b/1.png",
    }
    answers: list[int] = []
    worker = threading.Thread(
        target=lambda: answers.append(app.test_client().post("/generate", json=body).status_code)
    )
    worker.start()
    scrape = app.test_client()
    deadline = time.monotonic() + 60
    # The upload has started (and is held): generation, encoding and hashing are done.
    while not fault_server.requests and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fault_server.requests, "the upload never reached storage"
    text_during = scrape.get("/metrics").get_data(as_text=True)
    released = time.monotonic()
    fault_server.release()
    worker.join(60)
    assert answers == [502]
    assert value(text_during, "gateway_generate_in_flight") == 1
    text = scrape.get("/metrics").get_data(as_text=True)
    assert value(text, "gateway_generate_in_flight") == 0
    for stage in ("triton", "encode", "hash", "upload", "total"):
        assert value(text, "gateway_generate_stage_duration_seconds_count", stage=stage) == 1, stage
    total = value(text, "gateway_generate_stage_duration_seconds_sum", stage="total")
    upload = value(text, "gateway_generate_stage_duration_seconds_sum", stage="upload")
    held = released - fault_server.requests[0].at
    assert total is not None and upload is not None and held <= upload <= total
    assert value(text, "gateway_uploads_total", result="failure", status_class="none") == 1
    assert value(text, "gateway_upload_attempts_total", outcome="connection_error") == 1
    assert value(text, "gateway_nsfw_checks_total", status="ok") == 1
    assert value(text, "gateway_nsfw_score_count") == 1


def _get(url: str, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _healthz_by_worker(metrics_dir: Path) -> dict[str, float]:
    """Each worker's own count of /healthz, read from its multi-process file."""
    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = re.fullmatch(r"counter_(\d+)\.db", path.name)
        assert pid, path.name
        for metric in MultiProcessCollector.merge([str(path)], accumulate=False):
            for s in metric.samples:
                if s.name == "gateway_http_requests_total" and s.labels.get("endpoint") == "/healthz":
                    counts[pid.group(1)] = counts.get(pid.group(1), 0) + s.value
    return counts


def test_gunicorn_with_two_workers_reports_totals_summed_over_workers(tmp_path: Path) -> None:
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PROMETHEUS_"))}
    env.update(
        GATEWAY_PORT=str(port),
        GATEWAY_WORKERS="2",
        # The 5 invalid /generate calls below are sent at once: a worker must admit them all to
        # answer each 400 (admission comes before validation), and THREADS keeps 2 spare threads.
        GATEWAY_THREADS="8",
        GATEWAY_MAX_IN_FLIGHT="6",
        GATEWAY_METRICS_DIR=str(metrics_dir),
        GATEWAY_TRITON_URL=f"127.0.0.1:{free_port()}",  # no Triton: /healthz does not need it
        GATEWAY_ALLOW_ANONYMOUS="true",
        PYTHONPATH=str(PROJECT_ROOT),
    )
    log = (tmp_path / "gunicorn.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--config", "gateway/gunicorn.conf.py", "gateway:create_app()"],
        cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        # Each worker writes its file when it builds the app; two files: both workers are up.
        while len(list(metrics_dir.glob("counter_*.db"))) < 2:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "gunicorn.log").read_text()
            time.sleep(0.2)
        while True:
            try:
                if _get(f"{base}/healthz") == 200:
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)

        sent = 1
        with ThreadPoolExecutor(8) as pool:
            # Which worker accepts a connection is the kernel's choice: send until both have.
            while len(_healthz_by_worker(metrics_dir)) < 2:
                assert sent < 2000, "one gunicorn worker served every request"
                assert set(pool.map(lambda _: _get(f"{base}/healthz"), range(16))) == {200}
                sent += 16
            invalid = pool.map(lambda _: _get(f"{base}/generate", b'{"width": 64}'), range(5))
            bad = sum(1 for status in invalid if status == 400)

        per_worker = _healthz_by_worker(metrics_dir)
        assert len(per_worker) == 2 and sum(per_worker.values()) == sent
        for _ in range(3):  # any worker may answer the scrape; each reports the same totals
            with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            assert value(text, "gateway_http_requests_total", endpoint="/healthz", method="GET", status="200") == sent
            assert value(text, "gateway_http_requests_total", endpoint="/generate", method="POST", status="400") == bad == 5
            assert value(text, "gateway_uploads_total", result="failure", status_class="5xx") == 0
            assert value(text, "gateway_generate_in_flight") == 0
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_made_up_methods_and_paths_add_no_series(tmp_path: Path) -> None:
    """gunicorn takes any 3-20 capital letters as a method: 1,000 requests with made-up ones,
    to known and unknown paths, all land in series that exist after the first of them."""
    from tests.gateway.process import GunicornGateway

    def series(text: str) -> set[tuple[str, frozenset[tuple[str, str]]]]:
        return set(samples(text))

    def send(method: str, path: str) -> None:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            while sock.recv(65536):
                pass

    paths = ("/healthz", "/generate", "/no/such/path")
    rng = random.Random(7)
    made_up = {"".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 20))) for _ in range(1100)}
    methods = sorted(made_up - HTTP_METHODS)[:1000]
    gateway = GunicornGateway(tmp_path / "gunicorn.log", WORKERS="2", TRITON_URL=f"127.0.0.1:{free_port()}")
    with gateway:
        for path in paths:  # the first made-up method on each path makes its `other` series
            send("MADEUP", path)
        _scrape(gateway.url)  # a scrape is counted after it answers: the next one shows it
        before = series(_scrape(gateway.url))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: send(methods[i], paths[i % len(paths)]), range(len(methods))))
        text = _scrape(gateway.url)
    assert series(text) == before
    http = {dict(labels)["method"] for name, labels in before if name == "gateway_http_requests_total"}
    assert http <= HTTP_METHODS | {OTHER_METHOD} and OTHER_METHOD in http
    counted = sum(
        v for (name, labels), v in samples(text).items()
        if name == "gateway_http_requests_total" and dict(labels)["method"] == OTHER_METHOD
    )
    assert counted == len(methods) + len(paths)


def _scrape(base: str) -> str:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        return resp.read().decode()
