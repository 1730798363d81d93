"""/readyz against the session's Triton, and the gateway through a Triton that goes away and
comes back (a Triton of its own, so the shared one is never stopped)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient

from embedded.process import free_port
from embedded.triton import DEFAULT_REPOSITORY, TritonServer
from gateway import Settings


def test_ready_with_both_ensembles_and_the_loaded_models(triton_client: FlaskClient) -> None:
    response = triton_client.get("/readyz")
    assert response.status_code == 200, response.json
    body = response.json
    assert body["status"] == "ready"
    assert body["triton"]["live"] and body["triton"]["ready"]
    assert body["models"] == {"txt2img": {"ready": True}, "txt2img_nsfw": {"ready": True}}
    assert {"diffusion", "upscaler", "nsfw"} <= set(body["loaded"])
    assert body["loaded"]["diffusion"]["demo"] == "true"  # the test repository's demo weights
    assert {"kind", "source", "demo"} <= set(body["loaded"]["nsfw"])
    assert body["demo"] is True
    assert body["problems"] == []


def test_the_loaded_sources_read_alike(triton_client: FlaskClient) -> None:
    # Both demo models come from folders: each is reported as an absolute path, not one as the
    # config's relative string and the other as the exporter's absolute one.
    loaded = triton_client.get("/readyz").json["loaded"]
    for model in ("diffusion", "nsfw"):
        source = Path(loaded[model]["source"])
        assert source.is_absolute() and source.is_dir(), (model, source)
        assert ".." not in source.parts, (model, source)


def test_an_unreadable_metrics_endpoint_is_reported_but_not_fatal(
    make_app: Any, triton_settings: Settings
) -> None:
    settings = triton_settings.replace(triton_metrics_url=f"http://127.0.0.1:{free_port()}/metrics")
    response = make_app(settings).test_client().get("/readyz")
    assert response.status_code == 200
    assert response.json["loaded"] == {} and response.json["demo"] is None
    assert any("model info" in p for p in response.json["problems"])


def test_a_missing_ensemble_is_not_ready(make_app: Any, triton_settings: Settings) -> None:
    response = make_app(triton_settings.replace(triton_nsfw_model="no_such_model")).test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json["status"] == "not_ready"
    assert response.json["models"].get("no_such_model") is not True


def test_no_triton_is_not_ready(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json["status"] == "not_ready"
    assert response.json["triton"]["live"] is False
    assert response.json["problems"]


def _wait_ready(client: FlaskClient, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        status = client.get("/readyz").status_code
        if status == 200:
            break
        time.sleep(0.5)
    return status


def test_triton_down_then_back(make_app: Any, tmp_path: Path) -> None:
    own = TritonServer(
        repository=DEFAULT_REPOSITORY,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        workdir=tmp_path / "triton",
        log_path=tmp_path / "triton.log",
    )
    (tmp_path / "triton").mkdir()
    settings = Settings(
        triton_url=own.grpc_url,
        triton_metrics_url=own.metrics_url,
        probe_timeout_s=1.0,
        ready_cache_s=0.0,  # each call asks Triton again
    )
    client = make_app(settings).test_client()
    body = {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 2,
            "response_format": "b64_json", "enable_nsfw_check": False}
    try:
        own.start().wait_ready(timeout=300)
        assert _wait_ready(client, 30) == 200
        assert client.post("/generate", json=body).status_code == 200

        own.stop()
        down = client.get("/readyz")
        assert down.status_code == 503 and down.json["status"] == "not_ready"
        response = client.post("/generate", json=body)
        assert response.status_code == 503
        assert response.json["error"]["code"] == "unavailable"
        assert response.headers["Retry-After"]

        own.start().wait_ready(timeout=300)
        assert _wait_ready(client, 30) == 200
        assert client.post("/generate", json=body).status_code == 200
    finally:
        own.stop()


API_KEY = "readiness-test-key-0123456789"


def test_without_a_key_the_body_names_no_address_and_no_path(
    make_app: Any, triton_settings: Settings, triton: Any
) -> None:
    client = make_app(triton_settings.replace(api_keys=(API_KEY,))).test_client()
    public = client.get("/readyz")
    detailed = client.get("/readyz", headers={"Authorization": f"Bearer {API_KEY}"})
    assert public.status_code == detailed.status_code == 200
    assert public.json == {
        "status": "ready",
        "models": {"txt2img": {"ready": True}, "txt2img_nsfw": {"ready": True}},
        "demo": True,
        "store": "none",  # no GATEWAY_REDIS_URL here
    }
    text = public.get_data(as_text=True)
    for secret in (f":{triton.grpc_port}", f":{triton.metrics_port}", "127.0.0.1", "/"):
        assert secret not in text, secret
    # With the key, everything an operator reads: replicas, weight sources, limits.
    body = detailed.json
    assert body["triton"]["replicas"] and Path(body["loaded"]["nsfw"]["source"]).is_absolute()
    assert body["limits"]["max_steps"] >= 1
    # A wrong key is no key: the public body, not a 401 (probes carry none).
    wrong = client.get("/readyz", headers={"Authorization": "Bearer not-the-key-0123456789"})
    assert wrong.status_code == 200 and wrong.json == public.json


def test_one_check_answers_every_call_within_the_cache_time(
    make_app: Any, base_settings: Settings, fault_server: Any
) -> None:
    # Triton's metrics endpoint is the fault server here: each check scrapes it once.
    settings = base_settings.replace(triton_metrics_url=f"{fault_server.url}/metrics")
    cached = make_app(settings.replace(ready_cache_s=60.0)).test_client()
    assert {cached.get("/readyz").status_code for _ in range(10)} == {503}
    assert len(fault_server.requests) == 1
    uncached = make_app(settings.replace(ready_cache_s=0.0)).test_client()
    for _ in range(10):
        uncached.get("/readyz")
    assert len(fault_server.requests) == 11
