"""The PUT and its retries, against a real scripted HTTP server and the local S3."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

import pytest

from gateway.metrics import Metrics
from gateway.retry import RetryPolicy
from gateway.upload.egress import pin
from gateway.upload.uploader import Uploader
from gateway.upload.urls import UploadUrl, check_upload_url, parse_upload_url, rewrite_url
from tests.gateway.faults import CLOSE, HANG, FaultServer, Respond

BODY = b"\xff\xd8\xff" + bytes(range(256)) * 40
MD5 = hashlib.md5(BODY).hexdigest()
QUERY = "?AWSAccessKeyId=AKIAQE43KJDN7ARTLAVM&Signature=%2ByiRa6eTIiuPtE3wGWzFzmS3snA%3D&Expires=1756921542"
FAST = RetryPolicy(backoff=(0.05, 0.1, 0.2))


# An attempt's timeout where the test is not about timeouts: it only stops a test that would hang.
GUARD_TIMEOUT_S = 60.0


def uploader(policy: RetryPolicy = FAST, timeout_s: float = GUARD_TIMEOUT_S, **kwargs) -> Uploader:  # type: ignore[no-untyped-def]
    return Uploader(policy=policy, timeout_s=timeout_s, **kwargs)


def checked(url: str) -> UploadUrl:
    """As the view hands a URL to the uploader: allowed (exactly), resolved, addresses checked."""
    parsed = parse_upload_url(url)
    return pin(check_upload_url(url, (f"http://{parsed.host}:{parsed.port}",)))


def put(server_url: str, up: Uploader, query: str = QUERY):  # type: ignore[no-untyped-def]
    target = rewrite_url(checked(f"{server_url}/aiu-character/000/1.png{query}"), MD5, "rewrite")
    return up.put(target, BODY, MD5)


def test_the_put_carries_the_bytes_to_the_exact_target(fault_server: FaultServer) -> None:
    result = put(fault_server.url, uploader())
    assert result.ok and result.status == 200 and len(result.attempts) == 1
    [received] = fault_server.requests
    assert received.method == "PUT"
    assert received.target == f"/aiu-character/000/{MD5}.jpg{QUERY}"  # byte for byte
    assert received.body == BODY
    assert received.headers["Content-Length"] == str(len(BODY))


def test_lowercase_escapes_reach_storage_unchanged(fault_server: FaultServer) -> None:
    query = "?Signature=ab%2bcd%3d&x=a+b&empty="
    put(fault_server.url, uploader(), query)
    assert fault_server.requests[0].target.endswith(query)


def test_no_content_type_by_default_and_extra_headers_when_configured(
    fault_server: FaultServer,
) -> None:
    put(fault_server.url, uploader())
    assert "Content-Type" not in fault_server.requests[0].headers
    put(fault_server.url, uploader(headers=(("Content-Type", "image/jpeg"), ("x-amz-acl", "public-read"))))
    headers = fault_server.requests[1].headers
    assert headers["Content-Type"] == "image/jpeg" and headers["x-amz-acl"] == "public-read"


def recording_sleep(slept: list[float]) -> Callable[[float], None]:
    """time.sleep that notes what it was asked for: the waits the schedule chose, exactly,
    whatever a busy machine adds to them."""

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    return sleep


def test_503_503_200_succeeds_after_the_backoffs(fault_server: FaultServer) -> None:
    fault_server.set_script(503, 503, 200)
    slept: list[float] = []
    policy = RetryPolicy(backoff=(0.3, 0.6, 1.2))
    result = put(fault_server.url, uploader(policy, sleep=recording_sleep(slept)))
    assert result.ok and result.status == 200
    assert [a.status for a in result.attempts] == [503, 503, 200]
    assert slept == [0.3, 0.6]
    gap1, gap2 = fault_server.gaps()
    assert gap1 >= 0.3 and gap2 >= 0.6  # and storage did see the attempts that far apart


def test_the_default_schedule_is_1_2_4_seconds(fault_server: FaultServer) -> None:
    """The one test on the spec's real schedule (about 7 s)."""
    fault_server.set_script(503)
    slept: list[float] = []
    result = put(fault_server.url, uploader(RetryPolicy(), sleep=recording_sleep(slept)))
    assert not result.ok and result.status == 503
    assert len(fault_server.requests) == 4
    assert slept == [1.0, 2.0, 4.0]
    for gap, expected in zip(fault_server.gaps(), slept, strict=True):
        assert gap >= expected


def test_503_every_time_gives_four_attempts_and_the_last_status(fault_server: FaultServer) -> None:
    fault_server.set_script(503)
    result = put(fault_server.url, uploader())
    assert not result.ok
    assert len(result.attempts) == len(fault_server.requests) == 4
    assert result.status == 503
    assert "4 attempts" in result.describe() and "503" in result.describe()


def test_429_is_retried(fault_server: FaultServer) -> None:
    fault_server.set_script(429, 200)
    assert put(fault_server.url, uploader()).ok
    assert len(fault_server.requests) == 2


@pytest.mark.parametrize("status", [400, 403, 404, 409, 412])
def test_other_4xx_are_not_retried(fault_server: FaultServer, status: int) -> None:
    fault_server.set_script(status, 200)
    result = put(fault_server.url, uploader())
    assert not result.ok and result.status == status
    assert len(fault_server.requests) == 1


def test_the_storage_error_code_is_reported(fault_server: FaultServer) -> None:
    fault_server.set_script(Respond(403, body=b"<Error><Code>SignatureDoesNotMatch</Code></Error>"))
    result = put(fault_server.url, uploader())
    assert "SignatureDoesNotMatch" in result.describe()


def test_redirects_are_not_followed(fault_server: FaultServer) -> None:
    fault_server.set_script(Respond(307, headers=(("Location", "http://169.254.169.254/x"),)))
    result = put(fault_server.url, uploader())
    assert not result.ok and result.status == 307 and len(fault_server.requests) == 1


def test_connection_refused_is_retried_then_reported(closed_port: int) -> None:
    result = put(f"http://127.0.0.1:{closed_port}", uploader())
    assert not result.ok
    assert result.status is None
    assert [a.outcome for a in result.attempts] == ["connection_error"] * 4


def test_a_server_that_never_answers_is_retried_then_reported(fault_server: FaultServer) -> None:
    fault_server.set_script(HANG)
    result = put(fault_server.url, uploader(RetryPolicy(backoff=(0.01, 0.01, 0.01)), timeout_s=0.3))
    assert not result.ok and result.status is None
    assert len(fault_server.requests) == 4
    assert [a.outcome for a in result.attempts] == ["timeout"] * 4


def test_a_dropped_connection_is_retried(fault_server: FaultServer) -> None:
    fault_server.set_script(CLOSE, 200)
    result = put(fault_server.url, uploader())
    assert result.ok and [a.outcome for a in result.attempts] == ["connection_error", "ok"]


def test_an_etag_that_is_not_our_md5_fails_the_attempt(fault_server: FaultServer) -> None:
    fault_server.set_script(Respond(200, etag='"0123456789abcdef0123456789abcdef"'), 200)
    result = put(fault_server.url, uploader())
    assert result.ok
    assert [a.outcome for a in result.attempts] == ["etag_mismatch", "ok"]


def test_an_etag_mismatch_every_time_fails_with_status_200(fault_server: FaultServer) -> None:
    fault_server.set_script(Respond(200, etag='"0123456789abcdef0123456789abcdef"'))
    result = put(fault_server.url, uploader())
    assert not result.ok and result.status == 200 and len(result.attempts) == 4


@pytest.mark.parametrize("etag", [None, '"not-an-md5"', '"d41d8cd98f00b204e9800998ecf8427e-2"'])
def test_etags_that_are_not_md5s_are_ignored(fault_server: FaultServer, etag: str | None) -> None:
    fault_server.set_script(Respond(204, etag=etag))
    result = put(fault_server.url, uploader())
    assert result.ok and result.status == 204


def test_no_backoff_means_one_attempt(fault_server: FaultServer) -> None:
    fault_server.set_script(503)
    assert len(put(fault_server.url, uploader(RetryPolicy(backoff=()))).attempts) == 1


def test_attempts_and_outcomes_are_counted(fault_server: FaultServer) -> None:
    metrics = Metrics()
    fault_server.set_script(503, 200)
    put(fault_server.url, uploader(metrics=metrics))
    text = metrics.render().decode()
    assert 'gateway_upload_attempts_total{outcome="http_5xx"} 1.0' in text
    assert 'gateway_upload_attempts_total{outcome="ok"} 1.0' in text
    assert 'gateway_uploads_total{result="success",status_class="2xx"} 1.0' in text
    assert "gateway_upload_retries_total 1.0" in text
    assert "Signature" not in text and "127.0.0.1" not in text


@pytest.mark.parametrize(
    ("script", "status_class"),
    [((503,), "5xx"), ((403,), "4xx"), ((503, HANG), "5xx"), ((HANG,), "none"), ((302,), "3xx")],
)
def test_failures_are_counted_by_the_class_of_the_last_status(
    fault_server: FaultServer, script: tuple, status_class: str
) -> None:
    metrics = Metrics()
    fault_server.set_script(*script)
    # A hang ends by the timeout; the answers before it get all of a second.
    timeout_s = 1.0 if HANG in script else GUARD_TIMEOUT_S
    result = put(fault_server.url, uploader(RetryPolicy(backoff=(0.01,)), timeout_s=timeout_s, metrics=metrics))
    assert not result.ok and result.status_class == status_class
    text = metrics.render().decode()
    assert f'gateway_uploads_total{{result="failure",status_class="{status_class}"}} 1.0' in text
    retries = len(result.attempts) - 1
    assert f"gateway_upload_retries_total {float(retries)}" in text


def test_logs_never_show_the_signature(fault_server: FaultServer, caplog: pytest.LogCaptureFixture) -> None:
    fault_server.set_script(503)
    with caplog.at_level(logging.DEBUG):
        put(fault_server.url, uploader())
    assert "upload attempt" in caplog.text
    assert "Signature" not in caplog.text and "AKIA" not in caplog.text


def test_the_retry_policy_is_a_value() -> None:
    policy = RetryPolicy(backoff=(1.0, 2.0, 4.0))
    assert policy == RetryPolicy()
    assert policy.max_attempts == 4
    assert [policy.delay_after(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert 429 in policy.retry_statuses and 503 in policy.retry_statuses
    assert 403 not in policy.retry_statuses


def test_a_put_to_the_local_s3_under_a_renamed_key(s3) -> None:  # type: ignore[no-untyped-def]
    url = s3.presign_put("storage-test/1.png")
    target = rewrite_url(checked(url), MD5, "rewrite")
    result = uploader().put(target, BODY, MD5)
    assert result.ok and result.status == 200 and len(result.attempts) == 1  # ETag matched
    assert s3.get(f"storage-test/{MD5}.jpg") == BODY
