"""Triton's queue policy on the diffusion model, seen through the gateway: while a held
generation occupies the model, requests past the bounded queue of their level (INTERACTIVE, a
synchronous /generate's) are 429 at once and queued ones that wait past their queue timeout are
503, all JSON with Retry-After."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import tritonclient.grpc as grpcclient
from flask import Flask

from gateway import Settings
from gateway.triton.contract import Priority
from tests.models.helpers import (
    DIFFUSION,
    diffusion_held,
    diffusion_idle,
    diffusion_pending,
    generation,
    tensors,
    wait_until,
)
from tests.models.priorities import queue_policy

TINY = {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 1, "upscale": False,
        "enable_nsfw_check": False, "response_format": "b64_json"}
# Longer than the test: the direct requests that fill the queue never expire in it.
FILL_QUEUE_TIMEOUT_US = 600_000_000


def test_a_full_queue_is_429_and_an_expired_wait_is_503(
    make_app: Any, triton_settings: Settings, triton: Any
) -> None:
    queue, past = queue_policy(Priority.INTERACTIVE).max_queue_size, 6
    app: Flask = make_app(
        triton_settings.replace(triton_queue_timeout_s=1.0, max_in_flight=queue, retry_after_s=2)
    )

    def post(_: int) -> tuple[int, dict[str, Any], str | None]:
        with app.test_client() as client:
            response = client.post("/generate", json=TINY)
            return response.status_code, response.json, response.headers.get("Retry-After")

    # The /generate level's queue filled to its bound by direct requests that cannot expire:
    # every request past it is refused at once. The filling requests are cancelled, and leave
    # with the hold.
    with diffusion_held(triton), grpcclient.InferenceServerClient(triton.grpc_url) as direct:
        fill = [
            direct.async_infer(
                DIFFUSION, tensors(**generation(steps=1, seed=i, scale=None)),
                callback=lambda result, error: None, timeout=FILL_QUEUE_TIMEOUT_US,
                priority=int(Priority.INTERACTIVE),
            )
            for i in range(queue)
        ]
        wait_until(lambda: diffusion_pending(triton) == queue, f"{queue} requests wait in the queue")
        with ThreadPoolExecutor(past) as pool:
            refused = list(pool.map(post, range(past)))
        for request in fill:
            request.cancel()
    wait_until(lambda: diffusion_pending(triton) == 0, "the cancelled requests left the queue")
    # The model stays busy past their 1 s queue timeout: every queued request expires.
    with diffusion_held(triton), ThreadPoolExecutor(queue) as pool:
        expired = list(pool.map(post, range(queue)))
    diffusion_idle(triton)

    assert [status for status, _, _ in refused] == [429] * past, refused
    assert [status for status, _, _ in expired] == [503] * queue, expired
    for status, body, retry_after in refused + expired:
        assert retry_after == "2"
        if status == 429:
            assert body["error"]["code"] == "overloaded"
        else:
            assert body["error"]["code"] == "unavailable"
            assert "queue" in body["error"]["message"]
