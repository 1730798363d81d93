"""The spec's `nsfw` true/false on /generate and /moderate against real Tritons: below, at and
above GATEWAY_NSFW_THRESHOLD, the classifier's timeout and error (fail-safe: true), and the check
disabled (null). The verdict never blocks the upload."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flask import Flask
from PIL import Image

from embedded.triton import TritonServer
from gateway import Settings
from tests.gateway.conftest import LocalS3

GENERATE = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 1,
            "upscale": False, "seed": 11}


def image_b64() -> str:
    pixels = np.random.default_rng(5).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def flagged_count(app: Flask, endpoint: str) -> float:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    [line] = [ln for ln in text.splitlines()
              if ln.startswith(f'gateway_nsfw_flagged_total{{endpoint="{endpoint}"}}')]
    return float(line.split()[1])


def generate(app: Flask, s3: LocalS3, key: str, **fields: Any) -> dict[str, Any]:
    body = {**GENERATE, "s3_prefix": s3.presign_put(f"{key}/1.png"), **fields}
    response = app.test_client().post("/generate", json=body)
    assert response.status_code == 200, response.json
    data: dict[str, Any] = response.json["data"]
    assert s3.get(f"{key}/{data['image_hash']}.jpg")  # uploaded whatever the verdict
    return data


def moderate(app: Flask) -> dict[str, Any]:
    response = app.test_client().post("/moderate", json={"image": image_b64()})
    assert response.status_code == 200, response.json
    return response.json["data"]  # type: ignore[no-any-return]


@pytest.fixture
def app_with(make_app: Callable[[Settings], Flask], triton_settings: Settings) -> Callable[..., Flask]:
    return lambda **changes: make_app(triton_settings.replace(**changes))


def test_generate_below_at_and_above_the_threshold(
    app_with: Callable[..., Flask], s3: LocalS3
) -> None:
    score = generate(app_with(), s3, "verdict/probe")["nsfw_score"]
    for threshold, expected in ((score, True), (min(1.0, score + 1e-6), False),
                                (max(0.0, score - 1e-6), True)):
        app = app_with(nsfw_threshold=threshold)
        data = generate(app, s3, f"verdict/{threshold}")
        assert data["nsfw_score"] == score  # the same seed, the same score
        assert data["nsfw"] is expected, (threshold, score)
        assert data["nsfw_status"] == "ok"
        assert flagged_count(app, "generate") == (1 if expected else 0)


def test_moderate_below_at_and_above_the_threshold(app_with: Callable[..., Flask]) -> None:
    score = moderate(app_with())["nsfw_score"]
    for threshold, expected in ((score, True), (min(1.0, score + 1e-6), False),
                                (max(0.0, score - 1e-6), True)):
        app = app_with(nsfw_threshold=threshold)
        data = moderate(app)
        assert (data["nsfw_score"], data["nsfw"]) == (score, expected), threshold
        assert flagged_count(app, "moderate") == (1 if expected else 0)


def test_the_check_disabled_is_null(app_with: Callable[..., Flask], s3: LocalS3) -> None:
    app = app_with()
    data = generate(app, s3, "verdict/off", enable_nsfw_check=False)
    assert data["nsfw"] is None and data["nsfw_score"] is None and "nsfw_status" not in data
    response = app.test_client().post("/generate", json={
        **GENERATE, "response_format": "b64_json", "enable_nsfw_check": "false"})
    assert response.json["data"]["nsfw"] is None
    assert flagged_count(app, "generate") == 0


@pytest.mark.parametrize(("variant", "status"), [("slow", "timeout"), ("broken", "error")])
def test_a_classifier_that_fails_flags_the_image_on_both_endpoints(
    make_app: Callable[[Settings], Flask],
    triton_settings: Settings,
    failing_nsfw_triton: TritonServer,
    s3: LocalS3,
    variant: str,
    status: str,
) -> None:
    app = make_app(triton_settings.replace(
        triton_url=failing_nsfw_triton.grpc_url,
        triton_metrics_url=failing_nsfw_triton.metrics_url,
        triton_nsfw_model=f"txt2img_nsfw_{variant}",
        triton_classifier_model=f"nsfw_{variant}",
        nsfw_threshold=1.0,  # no real score could reach it: only the fail-safe flags
    ))
    data = generate(app, s3, f"verdict/{variant}")
    assert (data["nsfw"], data["nsfw_score"], data["nsfw_status"]) == (True, 1.0, status)
    data = moderate(app)
    assert (data["nsfw"], data["nsfw_score"], data["nsfw_status"]) == (True, 1.0, status)
    assert flagged_count(app, "generate") == 1 and flagged_count(app, "moderate") == 1


def test_the_upload_failed_body_carries_the_verdict(
    app_with: Callable[..., Flask], fault_server: Any
) -> None:
    fault_server.set_script(503)
    app = app_with(nsfw_threshold=0.0)
    body = {**GENERATE, "s3_prefix": f"{fault_server.url}/b/1.png"}
    response = app.test_client().post("/generate", json=body)
    assert response.status_code == 502
    assert response.json["data"]["nsfw"] is True
