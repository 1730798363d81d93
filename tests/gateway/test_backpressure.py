"""The in-flight bound: with GATEWAY_MAX_IN_FLIGHT requests at work, the next one is refused at
once with 429 and Retry-After, and a slot comes back however a request ended."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gateway import Settings
from tests.gateway.faults import FaultServer, Respond

BODY = {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 1, "upscale": False}


def gauge(client: Any) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    [line] = [ln for ln in text.splitlines() if ln.startswith("gateway_generate_in_flight ")]
    return float(line.split()[1])


def test_the_request_past_the_bound_is_429_until_a_slot_frees(
    make_app: Any, triton_settings: Settings, fault_server: FaultServer
) -> None:
    app = make_app(triton_settings.replace(max_in_flight=2, retry_after_s=3))
    fault_server.set_script(Respond(200, delay_s=1.0))  # each upload takes 1 s (timeout: 2 s)
    body = {**BODY, "s3_prefix": f"{fault_server.url}/b/1.png"}

    def post() -> int:
        with app.test_client() as client:
            return client.post("/generate", json=body).status_code

    with ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(post) for _ in range(2)]
        deadline = time.monotonic() + 60
        while len(fault_server.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(fault_server.requests) == 2  # both are at work (uploading)

        client = app.test_client()
        started = time.monotonic()
        refused = client.post("/generate", json=body)
        assert time.monotonic() - started < 1.0  # refused at once, not queued
        assert refused.status_code == 429
        assert refused.json["error"]["code"] == "overloaded"
        assert refused.headers["Retry-After"] == "3"
        assert client.get("/healthz").status_code == 200  # probes are not bounded
        assert gauge(client) == 2
        assert [f.result() for f in busy] == [200, 200]

    assert gauge(client) == 0
    fault_server.set_script(200)
    assert client.post("/generate", json=body).status_code == 200
    assert len(fault_server.requests) == 3  # the refused request sent nothing


def test_a_request_that_fails_gives_its_slot_back(make_app: Any, base_settings: Settings) -> None:
    # Triton is a dead port here: every request fails with 503, and must still release its slot.
    client = make_app(base_settings.replace(max_in_flight=1)).test_client()
    body = {**BODY, "response_format": "b64_json"}
    assert [client.post("/generate", json=body).status_code for _ in range(3)] == [503] * 3
    assert client.post("/generate", data=b"{", content_type="application/json").status_code == 400
    assert gauge(client) == 0
