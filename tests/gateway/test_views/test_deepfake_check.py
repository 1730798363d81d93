"""POST /generate with `enable_deepfake_check`: the session's Triton, the fault server as
storage and the local fake of NVIDIA's API (tests/gateway/fake_nvidia.py)."""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from typing import Any

import pytest
from flask.testing import FlaskClient

from gateway import Settings
from tests.gateway.fake_nvidia import (
    API_KEY,
    API_PATH,
    CONTENT_FILTERED,
    NO_FACE,
    faces,
    sent,
)
from tests.gateway.faults import HANG, Action, FaultServer
from tests.gateway.test_views.test_generate import small

# The budget the failure test waits out; elsewhere the budget only stops a test that would hang
# (a check that must answer is given all the time a busy machine may take).
BUDGET_S = 1.5
GUARD_BUDGET_S = 60.0


@pytest.fixture
def deepfake_settings(triton_settings: Settings, nvidia_api: FaultServer) -> Settings:
    return triton_settings.replace(
        nvidia_api_url=f"{nvidia_api.url}{API_PATH}",
        nvidia_api_key=API_KEY,
        deepfake_budget_s=GUARD_BUDGET_S,
    )


@pytest.fixture
def deepfake_client(make_app: Any, deepfake_settings: Settings) -> FlaskClient:
    return make_app(deepfake_settings).test_client()


def checked(fault_server: FaultServer, **fields: Any) -> dict[str, Any]:
    return small(enable_deepfake_check=True, s3_prefix=f"{fault_server.url}/b/1.png", **fields)


@pytest.mark.parametrize(
    ("reply", "score", "status"),
    [
        (faces(0.87), 0.87, "ok"),
        (faces(0.12, 0.93, 0.4), 0.93, "ok"),
        (NO_FACE, 0.0, "no_face"),
        (CONTENT_FILTERED, 1.0, "content_filtered"),
    ],
    ids=["one-face", "several-faces", "no-face", "content-filtered"],
)
def test_the_uploaded_jpeg_is_checked(
    deepfake_client: FlaskClient,
    fault_server: FaultServer,
    nvidia_api: FaultServer,
    reply: Action,
    score: float,
    status: str,
) -> None:
    nvidia_api.set_script(reply)
    response = deepfake_client.post("/generate", json=checked(fault_server, enable_nsfw_check=True))
    assert response.status_code == 200, response.json
    data = response.json["data"]
    assert list(data) == ["s3_url", "nsfw_score", "image_hash", "s3_upload_status", "nsfw", "nsfw_status",
                          "deepfake_score", "deepfake_status"]
    assert (data["deepfake_score"], data["deepfake_status"]) == (score, status)
    assert data["s3_upload_status"] == 200

    # Exactly the uploaded bytes, as a JPEG data URL, with the bearer key.
    [put] = fault_server.requests
    [call] = nvidia_api.requests
    request = sent(call)
    assert request.mime == "image/jpeg"
    assert request.image == put.body
    assert hashlib.md5(request.image).hexdigest() == data["image_hash"]
    assert request.authorization == f"Bearer {API_KEY}"


@pytest.mark.parametrize(("reply", "status"), [(500, "error"), (HANG, "timeout")])
def test_a_failing_or_hanging_api_scores_1_without_stopping_the_upload(
    make_app: Any,
    deepfake_settings: Settings,
    fault_server: FaultServer,
    nvidia_api: FaultServer,
    reply: Action,
    status: str,
) -> None:
    nvidia_api.set_script(reply)
    client = make_app(deepfake_settings.replace(deepfake_budget_s=BUDGET_S)).test_client()
    response = client.post("/generate", json=checked(fault_server))
    answered = time.monotonic()
    assert response.status_code == 200, response.json
    data = response.json["data"]
    assert (data["deepfake_score"], data["deepfake_status"]) == (1.0, status)
    # The upload was done, with the image that was sent to the API.
    assert data["s3_upload_status"] == 200
    [put] = fault_server.requests
    assert sent(nvidia_api.requests[0]).image == put.body
    if reply == 500:
        # Retried, and "error", not "timeout": the retries ended inside the budget.
        assert len(nvidia_api.requests) >= 2
    else:
        # The answer came within the budget: the API still hangs, and the hang was waited out.
        assert nvidia_api.unanswered == 1
        assert answered - nvidia_api.requests[0].at >= BUDGET_S - 0.2


def test_b64_json_checks_the_returned_jpeg(
    deepfake_client: FlaskClient, nvidia_api: FaultServer
) -> None:
    response = deepfake_client.post(
        "/generate", json=small(response_format="b64_json", enable_deepfake_check="true")
    )
    assert response.status_code == 200, response.json
    data = response.json["data"]
    assert (data["deepfake_score"], data["deepfake_status"]) == (0.87, "ok")
    assert sent(nvidia_api.requests[0]).image == base64.b64decode(data["b64_json"])


def test_a_failed_upload_still_reports_the_deepfake_check(
    deepfake_client: FlaskClient, fault_server: FaultServer
) -> None:
    fault_server.set_script(503)
    response = deepfake_client.post("/generate", json=checked(fault_server))
    assert response.status_code == 502
    assert response.json["error"]["code"] == "upload_failed"
    data = response.json["data"]
    assert (data["deepfake_score"], data["deepfake_status"]) == (0.87, "ok")


def test_not_requested_calls_nothing_and_adds_nothing(
    deepfake_client: FlaskClient, fault_server: FaultServer, nvidia_api: FaultServer
) -> None:
    response = deepfake_client.post(
        "/generate", json=small(s3_prefix=f"{fault_server.url}/b/1.png")
    )
    assert response.status_code == 200
    assert "deepfake_score" not in response.json["data"]
    assert "deepfake_status" not in response.json["data"]
    assert nvidia_api.requests == []


def test_requested_without_an_api_key_is_a_400_saying_so(
    client: FlaskClient, fault_server: FaultServer
) -> None:
    # `client` has no key (and no Triton: nothing may be generated either).
    response = client.post("/generate", json=checked(fault_server))
    assert response.status_code == 400
    error = response.json["error"]
    assert error["code"] == "invalid_request" and error["field"] == "enable_deepfake_check"
    assert "API key" in error["message"]
    assert fault_server.requests == []


def test_the_key_stays_out_of_logs_and_metrics(
    deepfake_client: FlaskClient,
    fault_server: FaultServer,
    nvidia_api: FaultServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvidia_api.set_script(503, faces(0.2))
    with caplog.at_level(logging.DEBUG):
        response = deepfake_client.post("/generate", json=checked(fault_server))
    assert response.json["data"]["deepfake_status"] == "ok"
    metrics = deepfake_client.get("/metrics").get_data(as_text=True)
    assert "deepfake API attempt 1: HTTP 503" in caplog.text
    assert "deepfake=ok" in caplog.text
    for text in (caplog.text, metrics):
        assert API_KEY.removeprefix("nvapi-") not in text
    assert 'gateway_deepfake_checks_total{status="ok"} 1.0' in metrics
    assert 'gateway_deepfake_api_attempts_total{outcome="http_5xx"} 1.0' in metrics
    assert 'gateway_moderation_duration_seconds_count{signal="deepfake"} 1.0' in metrics
