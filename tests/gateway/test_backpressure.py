"""The in-flight bound: with GATEWAY_MAX_IN_FLIGHT requests at work, the next one is refused at
once with 429 and Retry-After, and a slot comes back however a request ended."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from werkzeug.test import TestResponse

from gateway import Settings
from tests.gateway.faults import FaultServer, held
from tests.models.helpers import wait_until

BODY = {"prompt": "p", "width": 64, "height": 64, "num_inference_steps": 1, "upscale": False}


def gauge(client: Any) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    [line] = [ln for ln in text.splitlines() if ln.startswith("gateway_generate_in_flight ")]
    return float(line.split()[1])


def test_the_request_past_the_bound_is_429_until_a_slot_frees(
    make_app: Any, triton_settings: Settings, fault_server: FaultServer
) -> None:
    # Uploads wait for the test's release; no client timeout runs out while it looks.
    app = make_app(triton_settings.replace(max_in_flight=2, retry_after_s=3, upload_timeout_s=120))
    fault_server.set_script(held(200))
    body = {**BODY, "s3_prefix": f"{fault_server.url}/b/1.png"}

    def post() -> TestResponse:
        with app.test_client() as client:
            return client.post("/generate", json=body)

    client = app.test_client()
    with ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(post) for _ in range(2)]
        try:
            wait_until(lambda: len(fault_server.requests) == 2, "both requests are uploading")
            # Answered while both slots are held: refused at once, not queued behind them.
            refused = pool.submit(post).result(timeout=60)
            assert fault_server.unanswered == 2 and not any(f.done() for f in busy)
            assert gauge(client) == 2
            assert client.get("/healthz").status_code == 200  # probes are not bounded
        finally:
            fault_server.release()
        assert [f.result().status_code for f in busy] == [200, 200]
    assert refused.status_code == 429
    assert refused.json["error"]["code"] == "overloaded"
    assert refused.headers["Retry-After"] == "3"

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
