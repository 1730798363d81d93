"""Images over NVIDIA's inline limit reach the deepfake API through NVCF's asset upload: against
the local fake of both (tests/gateway/fake_nvidia.py, `FakeNvcf`), with every documented step,
each failure of the flow mapped to its status, and the one budget holding over all of it."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import urllib3
from PIL import Image
from skimage import data as photos

from gateway.metrics import NULL_METRICS, Metrics, Recorder
from gateway.nvidia.api import INLINE_MAX_BYTES
from gateway.nvidia.assets import DESCRIPTION
from gateway.nvidia.deepfake import DeepfakeClient, DeepfakeResult
from gateway.retry import RetryPolicy
from tests.gateway.fake_nvidia import (
    API_KEY,
    API_PATH,
    ASSETS_PATH,
    EXPIRED,
    NORMAL,
    FakeNvcf,
    faces,
    json_response,
)
from tests.gateway.faults import HANG, HELD_S, Respond, Trap
from tests.models.helpers import wait_until

FAST = RetryPolicy(backoff=(0.05, 0.1, 0.2))
# The budget of a check that must answer: it only stops a test that would hang (the tests
# of the budget itself give theirs).
GUARD_BUDGET_S = 60.0


def natural_jpeg(width: int = 1024, height: int = 2048) -> bytes:
    """A photograph (scikit-image's astronaut) at the spec's default output size, as the gateway
    encodes it: far over the inline limit, as natural images at that size are."""
    out = io.BytesIO()
    Image.fromarray(photos.astronaut()).resize((width, height), Image.LANCZOS).save(
        out, format="JPEG", quality=90
    )
    return out.getvalue()


PHOTO = natural_jpeg()


@pytest.fixture
def nvcf() -> Iterator[FakeNvcf]:
    server = FakeNvcf().start()
    yield server
    server.stop()


MakeClient = Callable[..., DeepfakeClient]


@pytest.fixture
def make_client(nvcf: FakeNvcf) -> Iterator[MakeClient]:
    clients: list[DeepfakeClient] = []

    def make(
        budget_s: float = GUARD_BUDGET_S, metrics: Recorder = NULL_METRICS, **kwargs: Any
    ) -> DeepfakeClient:
        client = DeepfakeClient(
            url=f"{nvcf.url}{API_PATH}",
            assets_url=f"{nvcf.url}{ASSETS_PATH}",
            api_key=API_KEY,
            budget_s=budget_s,
            max_image_bytes=kwargs.pop("max_image_bytes", 10 << 20),
            http=urllib3.PoolManager(retries=False),
            executor=ThreadPoolExecutor(4),
            policy=FAST,
            metrics=metrics,
            **kwargs,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()




def counted(metrics: Metrics, result: str) -> float:
    text = metrics.render().decode()
    prefix = f'gateway_deepfake_assets_total{{result="{result}"}} '
    return sum(float(line.split()[1]) for line in text.splitlines() if line.startswith(prefix))


def test_a_photo_at_the_default_output_size_gets_a_verdict_through_an_asset(
    make_client: MakeClient, nvcf: FakeNvcf
) -> None:
    assert len(PHOTO) > INLINE_MAX_BYTES  # a 1024x2048 photo does not fit inline
    metrics = Metrics()
    assert make_client(metrics=metrics).start(PHOTO).result() == DeepfakeResult(0.87, "ok")
    [create] = nvcf.sent("create")
    assert create.headers["Authorization"] == f"Bearer {API_KEY}"
    assert create.headers["Content-Type"] == "application/json"
    assert create.body == b'{"contentType": "image/jpeg", "description": "%s"}' % DESCRIPTION.encode()
    [upload] = nvcf.sent("upload")
    assert upload.body == PHOTO  # exactly the bytes checked
    assert "Authorization" not in upload.headers  # the key never goes to storage
    assert upload.headers["Content-Type"] == "image/jpeg"
    assert upload.headers["x-amz-meta-nvcf-asset-description"] == DESCRIPTION
    [detect] = nvcf.sent("detect")
    asset_id = detect.headers["NVCF-INPUT-ASSET-REFERENCES"]
    assert upload.target.startswith(f"/s3/nvcf-assets/{asset_id}?")  # the asset created
    assert detect.body == (
        b'{"input": ["data:image/jpeg;asset_id,%s"], "return_image": false}' % asset_id.encode()
    )
    wait_until(lambda: len(nvcf.sent("delete")) == 1, "the asset was deleted")  # once answered
    assert nvcf.sent("delete")[0].target == f"{ASSETS_PATH}/{asset_id}"
    assert counted(metrics, "ok") == 1


def test_an_image_within_the_inline_limit_is_sent_inline(
    make_client: MakeClient, nvcf: FakeNvcf
) -> None:
    small = natural_jpeg(256, 256)
    assert len(small) <= INLINE_MAX_BYTES
    assert make_client().start(small).result() == DeepfakeResult(0.87, "ok")
    assert [step for step, _ in nvcf.requests] == ["detect"]


def test_a_transient_failure_to_create_is_retried(make_client: MakeClient, nvcf: FakeNvcf) -> None:
    nvcf.set_script("create", 503, 429, NORMAL)
    assert make_client().start(PHOTO).result() == DeepfakeResult(0.87, "ok")
    assert len(nvcf.sent("create")) == 3


@pytest.mark.parametrize(
    ("step", "script", "result", "attempts"),
    [
        # Asset creation refused: the key (401), the account (403), the request (400).
        ("create", [401], "create_failed", 1),
        ("create", [403], "create_failed", 1),
        ("create", [500], "create_failed", FAST.max_attempts),
        ("create", [json_response({"uploadUrl": "https://x.test/1"})], "create_failed", 1),
        ("create", [json_response({"assetId": "a b", "uploadUrl": "https://x.test/1"})],
         "create_failed", 1),
        # The upload URL failing: storage errors, retried; a refusal, not.
        ("upload", [500], "upload_failed", FAST.max_attempts),
        ("upload", [403], "upload_failed", 1),
    ],
    ids=["create-401", "create-403", "create-500", "create-no-assetId", "create-bad-assetId",
         "upload-500", "upload-403"],
)
def test_a_failed_asset_flow_is_an_error_scoring_1(
    make_client: MakeClient,
    nvcf: FakeNvcf,
    step: str,
    script: list[Any],
    result: str,
    attempts: int,
) -> None:
    nvcf.set_script(step, *script)
    metrics = Metrics()
    assert make_client(metrics=metrics).start(PHOTO).result() == DeepfakeResult(1.0, "error")
    assert len(nvcf.sent(step)) == attempts
    assert nvcf.sent("detect") == []  # nothing to detect without the asset
    assert counted(metrics, result) == 1


def test_an_asset_the_model_cannot_fetch_is_an_error(
    make_client: MakeClient, nvcf: FakeNvcf
) -> None:
    nvcf.set_script("upload", EXPIRED)  # stored nothing: the reference leads nowhere
    assert make_client().start(PHOTO).result() == DeepfakeResult(1.0, "error")
    [detect] = nvcf.sent("detect")  # a 400 is not retried
    assert b"asset_id" in detect.body


@pytest.mark.parametrize("step", ["create", "upload"])
def test_the_budget_holds_over_the_whole_flow(
    make_client: MakeClient, nvcf: FakeNvcf, step: str
) -> None:
    nvcf.set_script(step, HANG)
    started = time.monotonic()
    result = make_client(budget_s=1.0).start(PHOTO).result()
    # "timeout", not the error a dropped connection gives: the budget ended the wait, not the
    # hanging step (which drops its connection after a minute).
    assert result == DeepfakeResult(1.0, "timeout")
    assert time.monotonic() - started >= 1.0  # the budget was waited out
    assert nvcf.sent("detect") == []


def test_a_slow_upload_leaves_no_time_to_detect_and_times_out(
    make_client: MakeClient, nvcf: FakeNvcf
) -> None:
    # The upload succeeds, but only when the server stops: long after the budget.
    nvcf.set_script("upload", Respond(200, delay_s=HELD_S))
    # "timeout", not the verdict the upload would have led to: the client did not wait for it.
    assert make_client(budget_s=1.0).start(PHOTO).result() == DeepfakeResult(1.0, "timeout")
    assert nvcf.sent("detect") == []


def test_an_upload_url_elsewhere_over_plain_http_is_never_connected(
    make_client: MakeClient, nvcf: FakeNvcf
) -> None:
    trap = Trap("127.0.0.2")
    try:
        record = {"assetId": "5e2a9c1e-4f1b-4b43-9f0e-0d1c2b3a4f5e",
                  "uploadUrl": f"http://127.0.0.2:{trap.port}/bucket/asset?X-Amz-Signature=x"}
        nvcf.set_script("create", json_response(record))
        assert make_client().start(PHOTO).result() == DeepfakeResult(1.0, "error")
        assert trap.connections == 0
    finally:
        trap.stop()


def test_an_https_upload_url_on_a_private_address_is_never_connected(
    make_client: MakeClient, nvcf: FakeNvcf
) -> None:
    trap = Trap("127.0.0.3")
    try:
        record = {"assetId": "5e2a9c1e-4f1b-4b43-9f0e-0d1c2b3a4f5e",
                  "uploadUrl": f"https://storage.test:{trap.port}/bucket/asset?X-Amz-Signature=x"}
        nvcf.set_script("create", json_response(record))
        client = make_client(resolve=lambda host, port: ["127.0.0.3"])
        assert client.start(PHOTO).result() == DeepfakeResult(1.0, "error")
        assert trap.connections == 0  # a loopback address is refused before any connection
    finally:
        trap.stop()


def test_over_the_configured_maximum_is_too_large_and_nothing_is_sent(
    make_client: MakeClient, nvcf: FakeNvcf
) -> None:
    client = make_client(max_image_bytes=len(PHOTO) - 1)
    assert client.start(PHOTO).result() == DeepfakeResult(1.0, "too_large")
    assert nvcf.requests == []


def test_no_assets_url_keeps_the_inline_limit(nvcf: FakeNvcf) -> None:
    client = DeepfakeClient(
        url=f"{nvcf.url}{API_PATH}", api_key=API_KEY, budget_s=2.0, max_image_bytes=10 << 20,
        http=urllib3.PoolManager(retries=False), executor=ThreadPoolExecutor(1),
    )
    try:
        assert client.start(PHOTO).result() == DeepfakeResult(1.0, "too_large")
    finally:
        client.close()
    assert nvcf.requests == []


def test_the_key_and_the_upload_signature_stay_out_of_logs(
    make_client: MakeClient, nvcf: FakeNvcf, caplog: pytest.LogCaptureFixture
) -> None:
    nvcf.set_script("upload", 500)
    with caplog.at_level(logging.DEBUG):
        make_client().start(PHOTO).result()
    assert "upload attempt" in caplog.text  # the failures were logged
    [signature] = {a.signature for a in nvcf.assets.values()}
    for secret in (API_KEY.removeprefix("nvapi-"), signature):
        assert secret not in caplog.text


def test_a_verdict_through_an_asset_on_generate(
    make_app: Any, triton_settings: Any, nvcf: FakeNvcf, s3: Any
) -> None:
    app = make_app(triton_settings.replace(
        nvidia_api_url=f"{nvcf.url}{API_PATH}",
        nvidia_assets_url=f"{nvcf.url}{ASSETS_PATH}",
        nvidia_api_key=API_KEY,
        deepfake_budget_s=GUARD_BUDGET_S,
    ))
    nvcf.verdict = faces(0.42)
    body = {"prompt": "p", "width": 256, "height": 512, "num_inference_steps": 1, "upscale": True,
            "enable_deepfake_check": True, "s3_prefix": s3.presign_put("assets/1.png")}
    response = app.test_client().post("/generate", json=body)
    assert response.status_code == 200, response.json
    data = response.json["data"]
    assert (data["deepfake_score"], data["deepfake_status"]) == (0.42, "ok")
    stored = s3.get(f"assets/{data['image_hash']}.jpg")
    assert len(stored) > INLINE_MAX_BYTES and nvcf.sent("upload")[0].body == stored
