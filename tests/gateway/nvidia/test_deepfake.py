"""The deepfake API client against the local fake of NVIDIA's API (tests/gateway/fake_nvidia.py):
semantics of every documented answer, retries inside the budget, the fail-safe, the secret key."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import urllib3

from gateway.imaging import encode_jpeg
from gateway.metrics import NULL_METRICS, Metrics, Recorder
from gateway.nvidia.deepfake import DEFAULT_POLICY, DeepfakeClient, DeepfakeResult
from gateway.retry import RetryPolicy
from tests.gateway.fake_nvidia import (
    API_ERROR,
    API_KEY,
    API_PATH,
    CONTENT_FILTERED,
    NO_FACE,
    answer,
    box,
    faces,
    json_response,
    sent,
)
from tests.gateway.faults import CLOSE, HANG, FaultServer, Respond

JPEG = encode_jpeg(np.random.default_rng(7).integers(0, 256, (48, 64, 3), dtype=np.uint8), 90).data
FAST = RetryPolicy(backoff=(0.05, 0.1, 0.2))
# The budget of a check that must answer: it only stops a test that would hang (the tests
# of the budget itself give theirs).
GUARD_BUDGET_S = 60.0

MakeClient = Callable[..., DeepfakeClient]


@pytest.fixture
def make_client(nvidia_api: FaultServer) -> Iterator[MakeClient]:
    clients: list[DeepfakeClient] = []

    def make(
        *,
        url: str = f"{nvidia_api.url}{API_PATH}",
        budget_s: float = GUARD_BUDGET_S,
        max_image_bytes: int = 1 << 20,
        policy: RetryPolicy = FAST,
        metrics: Recorder = NULL_METRICS,
    ) -> DeepfakeClient:
        client = DeepfakeClient(
            url=url,
            api_key=API_KEY,
            budget_s=budget_s,
            max_image_bytes=max_image_bytes,
            http=urllib3.PoolManager(retries=False),
            executor=ThreadPoolExecutor(2),
            policy=policy,
            metrics=metrics,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (faces(0.87), DeepfakeResult(0.87, "ok")),
        # The highest face, wherever it is: the reference block read the first one only.
        (faces(0.12, 0.93, 0.4), DeepfakeResult(0.93, "ok")),
        (faces(0.0), DeepfakeResult(0.0, "ok")),
        # No face is not a failure, and says so: the reference reported both as 0.0.
        (NO_FACE, DeepfakeResult(0.0, "no_face")),
        (CONTENT_FILTERED, DeepfakeResult(1.0, "content_filtered")),
        (answer("CONTENT_FILTERED", [box(0.1)]), DeepfakeResult(1.0, "content_filtered")),
        (API_ERROR, DeepfakeResult(1.0, "error")),
    ],
    ids=["one-face", "several-faces", "clean-face", "no-face", "filtered", "filtered-with-box",
         "api-error"],
)
def test_documented_answers(
    make_client: MakeClient, nvidia_api: FaultServer, reply: Respond, expected: DeepfakeResult
) -> None:
    nvidia_api.set_script(reply)
    assert make_client().start(JPEG).result() == expected
    assert len(nvidia_api.requests) == 1


@pytest.mark.parametrize(
    "reply",
    [
        Respond(200, body=b"<html>gateway error</html>", etag=None),
        json_response({"data": []}),
        json_response({"detail": "ok"}),
        answer("SUCCESS", [{"vertices": [], "bbox_confidence": 0.9}]),  # no is_deepfake
        answer("SUCCESS", [box(1.5)]),
        answer("SUCCESS", [box(True)]),
        answer("SUCCESS", [box("0.9")]),
        answer("SUCCESS", [box(0.2), "face"]),
        json_response({"data": [{"index": 0, "status": "SUCCESS"}]}),  # no bounding_boxes
        Respond(200, body=b'{"data": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", etag=None),
    ],
    ids=["html", "empty-data", "no-data", "no-is_deepfake", "above-1", "boolean", "string",
         "not-a-box", "no-boxes-key", "deep-nesting"],
)
def test_answers_outside_the_documented_shape_are_errors_scoring_1(
    make_client: MakeClient, nvidia_api: FaultServer, reply: Respond
) -> None:
    nvidia_api.set_script(reply)
    assert make_client().start(JPEG).result() == DeepfakeResult(1.0, "error")
    assert len(nvidia_api.requests) == 1  # a malformed answer is not retried


def test_the_request_is_the_documented_one_with_exactly_the_given_bytes(
    make_client: MakeClient, nvidia_api: FaultServer
) -> None:
    make_client().start(JPEG).result()
    [received] = nvidia_api.requests
    request = sent(received)
    assert request.mime == "image/jpeg"
    assert request.image == JPEG
    assert request.authorization == f"Bearer {API_KEY}"
    assert request.content_type == "application/json"


def test_the_media_type_is_the_one_given(make_client: MakeClient, nvidia_api: FaultServer) -> None:
    make_client().start(b"\x89PNG fake bytes", "image/png").result()
    assert sent(nvidia_api.requests[0]).mime == "image/png"


def test_429_and_5xx_are_retried_with_backoff(
    make_client: MakeClient, nvidia_api: FaultServer
) -> None:
    nvidia_api.set_script(429, 503, faces(0.3))
    assert make_client().start(JPEG).result() == DeepfakeResult(0.3, "ok")
    assert len(nvidia_api.requests) == 3
    gaps = nvidia_api.gaps()
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1
    assert len({r.body for r in nvidia_api.requests}) == 1


def test_500_every_time_is_an_error_scoring_1_after_every_attempt(
    make_client: MakeClient, nvidia_api: FaultServer
) -> None:
    nvidia_api.set_script(500)
    assert make_client().start(JPEG).result() == DeepfakeResult(1.0, "error")
    assert len(nvidia_api.requests) == FAST.max_attempts


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_4xx_are_not_retried(
    make_client: MakeClient, nvidia_api: FaultServer, status: int
) -> None:
    nvidia_api.set_script(status)
    assert make_client().start(JPEG).result() == DeepfakeResult(1.0, "error")
    assert len(nvidia_api.requests) == 1


def test_a_pending_answer_is_not_polled_and_counts_as_an_error(
    make_client: MakeClient, nvidia_api: FaultServer
) -> None:
    # NVCF answers 202 with an NVCF-REQID to poll when the result is not ready in its window.
    metrics = Metrics()
    nvidia_api.set_script(Respond(202, headers=(("NVCF-REQID", "0f3c"),), etag=None))
    assert make_client(metrics=metrics).start(JPEG).result() == DeepfakeResult(1.0, "error")
    assert len(nvidia_api.requests) == 1
    assert 'gateway_deepfake_api_attempts_total{outcome="pending"} 1.0' in metrics.render().decode()


def test_a_redirect_is_not_followed(make_client: MakeClient, nvidia_api: FaultServer) -> None:
    elsewhere = FaultServer().start()
    try:
        nvidia_api.set_script(Respond(307, headers=(("Location", f"{elsewhere.url}{API_PATH}"),)))
        assert make_client().start(JPEG).result() == DeepfakeResult(1.0, "error")
        assert elsewhere.requests == []  # the key never reached another host
    finally:
        elsewhere.stop()


def test_a_hanging_api_is_a_timeout_scoring_1_within_the_budget(
    make_client: MakeClient, nvidia_api: FaultServer
) -> None:
    nvidia_api.set_script(HANG)
    started = time.monotonic()
    result = make_client(budget_s=0.8).start(JPEG).result()
    elapsed = time.monotonic() - started
    assert result == DeepfakeResult(1.0, "timeout")
    assert nvidia_api.unanswered == 1  # the answer came from the budget, not from the API
    assert elapsed >= 0.7  # the budget was waited out


def test_retries_never_outrun_the_budget(make_client: MakeClient, nvidia_api: FaultServer) -> None:
    # The default schedule (0.5 s, 1 s, 2 s) inside a 1.4 s budget: the retry at 1.5 s never starts.
    nvidia_api.set_script(503)
    result = make_client(budget_s=1.4, policy=DEFAULT_POLICY).start(JPEG).result()
    # "error", not "timeout": it stopped on the last 503 instead of sleeping into the budget.
    assert result == DeepfakeResult(1.0, "error")
    assert len(nvidia_api.requests) == 2


@pytest.mark.parametrize("action", [CLOSE, "refused"])
def test_connection_failures_are_retried_then_errors(
    make_client: MakeClient, nvidia_api: FaultServer, closed_port: int, action: str
) -> None:
    if action == "refused":
        client = make_client(url=f"http://127.0.0.1:{closed_port}{API_PATH}")
    else:
        nvidia_api.set_script(CLOSE)
        client = make_client()
    assert client.start(JPEG).result() == DeepfakeResult(1.0, "error")
    if action == CLOSE:
        assert len(nvidia_api.requests) == FAST.max_attempts


def test_an_image_over_the_limit_is_not_sent(make_client: MakeClient, nvidia_api: FaultServer) -> None:
    assert make_client(max_image_bytes=len(JPEG) - 1).start(JPEG).result() == DeepfakeResult(
        1.0, "too_large"
    )
    assert nvidia_api.requests == []
    assert make_client(max_image_bytes=len(JPEG)).start(JPEG).result().status == "ok"


def test_outcomes_attempts_and_latency_are_counted(
    make_client: MakeClient, nvidia_api: FaultServer
) -> None:
    metrics = Metrics()
    client = make_client(metrics=metrics)
    nvidia_api.set_script(503, faces(0.5), NO_FACE)
    client.start(JPEG).result()
    client.start(JPEG).result()
    text = metrics.render().decode()
    assert 'gateway_deepfake_checks_total{status="ok"} 1.0' in text
    assert 'gateway_deepfake_checks_total{status="no_face"} 1.0' in text
    assert 'gateway_deepfake_api_attempts_total{outcome="http_5xx"} 1.0' in text
    assert 'gateway_deepfake_api_attempts_total{outcome="ok"} 2.0' in text
    assert 'gateway_moderation_duration_seconds_count{signal="deepfake"} 2.0' in text


def test_the_key_stays_out_of_logs_metrics_and_reprs(
    make_client: MakeClient, nvidia_api: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    client = make_client(metrics=metrics, budget_s=1.0)
    nvidia_api.set_script(500, 401)
    with caplog.at_level(logging.DEBUG):  # urllib3's own debug lines included
        client.start(JPEG).result()
        nvidia_api.set_script(HANG)
        client.start(JPEG).result()
    assert "deepfake API attempt" in caplog.text  # the failures were logged
    secret = API_KEY.removeprefix("nvapi-")
    for text in (caplog.text, metrics.render().decode(), repr(client)):
        assert secret not in text
