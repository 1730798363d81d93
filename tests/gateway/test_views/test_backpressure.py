"""Triton's queue policy on the diffusion model, seen through the gateway: while one long
generation occupies the model, a burst fills the bounded queue; the requests past it are 429 at
once and the queued ones that wait past their queue timeout are 503, all JSON with Retry-After."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient
from flask import Flask

from gateway import Settings
from tests.models.helpers import generation, metric, tensors

DIFFUSION_CONFIG = Path(__file__).resolve().parents[3] / "model_repository" / "diffusion" / "config.pbtxt"
TINY = {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 1, "upscale": False,
        "enable_nsfw_check": False, "response_format": "b64_json"}


def max_queue_size() -> int:
    match = re.search(r"max_queue_size:\s*(\d+)", DIFFUSION_CONFIG.read_text())
    assert match, "the diffusion model has no queue policy"
    return int(match.group(1))


def test_a_full_queue_is_429_and_an_expired_wait_is_503(
    make_app: Any, triton_settings: Settings, triton: Any
) -> None:
    queue = max_queue_size()
    burst = queue + 6
    # A queue timeout that expires while the long generation still runs; no in-flight bound here.
    app: Flask = make_app(
        triton_settings.replace(triton_queue_timeout_s=1.0, max_in_flight=burst, retry_after_s=2)
    )

    def post(_: int) -> tuple[int, dict[str, Any], str | None]:
        with app.test_client() as client:
            response = client.post("/generate", json=TINY)
            return response.status_code, response.json, response.headers.get("Retry-After")

    # The long generation is a direct call, so it can be cancelled as soon as the burst is answered.
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    steps_before = metric(triton.metrics_url, "imagegen_diffusion_steps_total")
    long = client.async_infer(
        "diffusion",
        tensors(**generation(width=512, height=512, steps=100, scale=None)),
        callback=lambda result, error: None,
        client_timeout=120,
    )
    try:
        deadline = time.monotonic() + 60
        while metric(triton.metrics_url, "imagegen_diffusion_steps_total") == steps_before:
            assert time.monotonic() < deadline, "the long generation never started"
            time.sleep(0.05)
        with ThreadPoolExecutor(burst) as pool:
            answers = list(pool.map(post, range(burst)))
    finally:
        long.cancel()
        client.close()

    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [429] * (burst - queue) + [503] * queue, statuses
    for status, body, retry_after in answers:
        assert retry_after == "2"
        if status == 429:
            assert body["error"]["code"] == "overloaded"
        else:
            assert body["error"]["code"] == "unavailable"
            assert "queue" in body["error"]["message"]
